#!/usr/bin/env bash
# Benchmarks for the core commands (issue: status wall time, 64 concurrent reserves).
# Usage: benches/core.sh            (needs hyperfine and redis-server; release build)
# Prints medians; copy them into BENCHMARKS.md.
source "$(dirname "$0")/common.sh"


# Median wall time in ms of 64 concurrent `reserve --gpus 1` on 8 free GPUs, and
# how many succeeded, over 11 trials.
concurrent_reserves() {
    local -a args=("$@")
    local times=() winners=()
    for _ in $(seq 11); do
        "$bin" "${args[@]}" admin --gpus 8 --provider fake --force >/dev/null 2>&1
        local start end ok=0 pids=()
        start=$(date +%s%N)
        for _ in $(seq 64); do
            "$bin" "${args[@]}" reserve --gpus 1 --duration 1h >/dev/null 2>&1 &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do
            if wait "$pid"; then ok=$((ok + 1)); fi
        done
        end=$(date +%s%N)
        times+=($(( (end - start) / 1000000 )))
        winners+=("$ok")
    done
    local median
    median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 6p)
    echo "  64 concurrent reserves: median ${median} ms (all trials: ${times[*]}), winners per trial: ${winners[*]}"
}

for backend in sqlite redis; do
    backend_args "$backend"
    "$bin" "${args[@]}" admin --gpus 8 --provider fake --force >/dev/null 2>&1 ||
        "$bin" "${args[@]}" admin --gpus 8 --provider fake >/dev/null
    "$bin" "${args[@]}" reserve --gpus 3 >/dev/null
    echo "== $backend"
    hyperfine --style none --warmup 20 --runs 300 -N --export-json "$work/$backend.json" \
        "$bin ${args[*]} status" >/dev/null
    python3 - "$work/$backend.json" <<'PY'
import json, statistics, sys
r = json.load(open(sys.argv[1]))["results"][0]["times"]
r = sorted(t * 1000 for t in r)
print(f"  status (8 GPUs, fake provider): median {statistics.median(r):.2f} ms, p90 {r[int(len(r)*0.9)]:.2f} ms, n={len(r)}")
PY
    concurrent_reserves "${args[@]}"
done
