#!/usr/bin/env bash
# One-off check on a real NVIDIA machine (run as root, well under 2 minutes): prints
# what nvidia-smi says, then runs the GPU provider tests, whose
# `nvml_matches_nvidia_smi_when_present` compares canhazgpu's NVML and nvidia-smi
# providers (device count, names, memory, processes, owners, models).
#
# Usage: scripts/device-check.sh [PREBUILT_INTEGRATION_TEST_BINARY [PREBUILT_CANHAZGPU]]
# Without an argument the tests are built with cargo (offline), if cargo exists. The
# lent H100/H200 machines have no cargo and no network (Ubuntu 24.04, glibc 2.39), so
# build here and carry the binary (it needs glibc >= 2.34):
#   cargo test --test integration --no-run   # prints the executable's path
#   mkdir -p target/device-check && cp <that path> target/device-check/integration
#   strip target/device-check/integration    # about 3 MB
#   cargo build --release && cp target/release/canhazgpu target/device-check/
#   then run `scripts/device-check.sh target/device-check/integration target/device-check/canhazgpu`
#   on the device with carry ["target/device-check"]. The second part drives the real
#   binary end to end (admin auto-detection, status with NVML and with nvidia-smi and
#   their timings, UNRESERVED detection of the GPU job, run with CUDA_VISIBLE_DEVICES).
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

chg="${2:-}"
[ -n "$chg" ] || exit 0
section "canhazgpu end to end"
export CANHAZGPU_STATE_DIR
CANHAZGPU_STATE_DIR=$(mktemp -d)/state
"$chg" admin --gpus 1
echo "--- status, NVML"
"$chg" status
"$chg" status --json
echo "--- status, nvidia-smi (CANHAZGPU_NVML=0)"
CANHAZGPU_NVML=0 "$chg" status
median_ms() { # median wall time in ms of 21 runs of the given command
    for _ in $(seq 21); do
        s=$(date +%s%N); "$@" >/dev/null 2>&1; e=$(date +%s%N); echo $(((e - s) / 1000))
    done | sort -n | sed -n 11p | awk '{printf "%.2f ms\n", $1 / 1000}'
}
echo "status median, NVML: $(median_ms "$chg" status)"
echo "status median, nvidia-smi: $(CANHAZGPU_NVML=0 median_ms "$chg" status)"
echo "--- reserve while the GPU job runs (expect UNRESERVED refusal when a job runs)"
"$chg" reserve --duration 1m; echo "(exit $?)"
if [ -n "$worker" ]; then kill "$worker"; wait "$worker" 2>/dev/null; worker=""; sleep 2; fi
echo "--- after the job ended"
"$chg" status
echo "--- run with torch"
"$chg" run -- python3 -c 'import os, torch; print("CUDA_VISIBLE_DEVICES", os.environ["CUDA_VISIBLE_DEVICES"], "CUDA_DEVICE_ORDER", os.environ["CUDA_DEVICE_ORDER"], "devices", torch.cuda.device_count(), torch.cuda.get_device_name(0)); x = torch.ones(256 << 20, device="cuda"); print("sum", x.sum().item())'
echo "(exit $?)"
"$chg" status
echo "--- queue: a waiting run gets the GPU as soon as it is released"
"$chg" reserve --duration 5m >/dev/null
"$chg" run --wait 60s -- python3 -c 'import torch; print("waiter got", torch.cuda.get_device_name(0))' &
waiter=$!
sleep 2
"$chg" queue
"$chg" release
wait "$waiter"; echo "(waiter exit $?)"
"$chg" report --days 1
