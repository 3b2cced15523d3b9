#!/usr/bin/env bash
# Benchmarks for the core commands: `status` wall time (8 and 1,024 GPUs) and 64
# concurrent reserves, with the Redis transaction retries they needed.
# Usage: benches/core.sh [OTHER_BINARY]   (needs hyperfine and redis-server; release build)
# With OTHER_BINARY (e.g. an older build), the same figures are measured for it first,
# in the same run, for a before/after comparison. Prints medians; copy them into
# BENCHMARKS.md.
source "$(dirname "$0")/common.sh"
binaries=("$@" "$bin")

median_ms() {
    python3 -c 'import json,statistics,sys; r=json.load(open(sys.argv[1]))["results"][0]["times"]; r=sorted(t*1000 for t in r); print(f"median {statistics.median(r):.2f} ms, p90 {r[int(len(r)*0.9)]:.2f} ms, n={len(r)}")' "$1"
}

# Median wall time in ms of 64 concurrent `reserve --gpus 1` on 8 free GPUs, how
# many succeeded, and (Redis) the transaction retries per process, over 11 trials.
concurrent_reserves() {
    local exe=$1
    shift
    local -a args=("$@")
    local times=() winners=() retries=()
    for trial in $(seq 11); do
        "$exe" "${args[@]}" admin --gpus 8 --provider fake --force >/dev/null 2>&1
        local start end ok=0 pids=()
        start=$(date +%s%N)
        for i in $(seq 64); do
            CANHAZGPU_REPORT_RETRIES=1 "$exe" "${args[@]}" reserve --gpus 1 --duration 1h \
                >/dev/null 2>"$work/reserve.$trial.$i.err" &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do
            if wait "$pid"; then ok=$((ok + 1)); fi
        done
        end=$(date +%s%N)
        times+=($(( (end - start) / 1000000 )))
        winners+=("$ok")
        for i in $(seq 64); do
            retries+=("$(grep -o '[0-9]* Redis transaction retries' "$work/reserve.$trial.$i.err" | grep -o '^[0-9]*' || echo 0)")
        done
    done
    local median
    median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 6p)
    echo "  64 concurrent reserves: median ${median} ms (all trials: ${times[*]}), winners per trial: ${winners[*]}"
    if [[ "${args[*]}" == *redis* ]]; then
        local sorted=($(printf '%s\n' "${retries[@]}" | sort -n))
        echo "  Redis transaction retries per process: median ${sorted[$(( ${#sorted[@]} / 2 ))]}, max ${sorted[-1]} (over ${#sorted[@]} processes)"
    fi
}

for exe in "${binaries[@]}"; do
    echo "#### $exe"
    for backend in sqlite redis; do
        backend_args "$backend"
        "$exe" "${args[@]}" admin --gpus 8 --provider fake --force >/dev/null 2>&1 ||
            "$exe" "${args[@]}" admin --gpus 8 --provider fake >/dev/null
        "$exe" "${args[@]}" reserve --gpus 3 >/dev/null
        echo "== $backend"
        hyperfine --style none --warmup 20 --runs 300 -N --export-json "$work/$backend.json" \
            "$exe ${args[*]} status" >/dev/null
        echo "  status (8 GPUs, fake provider): $(median_ms "$work/$backend.json")"
        "$exe" "${args[@]}" admin --gpus 1024 --provider fake --force >/dev/null 2>&1
        "$exe" "${args[@]}" reserve --gpus 300 >/dev/null
        hyperfine --style none --warmup 5 --runs 60 -N --export-json "$work/$backend-1024.json" \
            "$exe ${args[*]} status" >/dev/null
        echo "  status (1,024 GPUs, 300 reserved): $(median_ms "$work/$backend-1024.json")"
        concurrent_reserves "$exe" "${args[@]}"
    done
    redis-cli -s "$work/redis.sock" flushall >/dev/null
    rm -rf "$work/state"
done
