#!/usr/bin/env bash
# One-off check on a real NVIDIA machine (run as root, well under 2 minutes): prints
# what nvidia-smi says, then runs the GPU provider tests, whose
# `nvml_matches_nvidia_smi_when_present` compares canhazgpu's NVML and nvidia-smi
# providers (device count, names, memory, processes, owners, models).
#
# Usage: scripts/device-check.sh [PREBUILT_INTEGRATION_TEST_BINARY]
# Without an argument the tests are built with cargo (offline), if cargo exists. The
# lent H100/H200 machines have no cargo and no network (Ubuntu 24.04, glibc 2.39), so
# build here and carry the binary (it needs glibc >= 2.34):
#   cargo test --test integration --no-run   # prints the executable's path
#   mkdir -p target/device-check && cp <that path> target/device-check/integration
#   strip target/device-check/integration    # about 3 MB
#   then run `scripts/device-check.sh target/device-check/integration` on the device
#   with carry ["target/device-check"].
set -uo pipefail
cd "$(dirname "$0")/.."

section() { printf '\n=== %s ===\n' "$*"; }
smi_query() { timeout 30 nvidia-smi "$@" --format=csv,noheader,nounits; echo "(exit $?)"; }

section "nvidia-smi"
if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi -L
    smi_query --query-gpu=index,gpu_uuid,name,memory.used,memory.reserved,memory.total
    smi_query --query-compute-apps=pid,process_name,gpu_uuid,used_memory
else
    echo "nvidia-smi not on PATH"
fi
section "NVML library"
ldconfig -p | grep 'libnvidia-ml' || echo "libnvidia-ml not in the ldconfig cache"

# A GPU job whose command line names a model, when PyTorch with CUDA happens to be here.
worker=""
log=$(mktemp)
trap '[ -n "$worker" ] && kill "$worker" 2>/dev/null; rm -f "$log"' EXIT
section "GPU job"
if command -v python3 >/dev/null &&
    timeout 60 python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    python3 -c 'import time, torch
x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
print("allocated", flush=True)
time.sleep(90)' --model meta-llama/Llama-2-7b >"$log" 2>&1 &
    worker=$!
    for _ in $(seq 60); do
        grep -q allocated "$log" && break
        sleep 1
    done
    echo "python3 pid $worker: $(cat "$log")"
    smi_query --query-compute-apps=pid,process_name,gpu_uuid,used_memory
else
    echo "no python3 with CUDA-enabled torch: checking without a GPU job"
fi

section "canhazgpu GPU provider tests"
bin="${1:-}"
if [ -n "$bin" ]; then
    timeout 90 "$bin" --nocapture --test-threads=1 gpu_providers
elif command -v cargo >/dev/null; then
    timeout 90 cargo test --offline --test integration -- --nocapture --test-threads=1 gpu_providers
else
    echo "neither a prebuilt test binary nor cargo: cannot run the tests" >&2
    exit 2
fi
