#!/usr/bin/env bash
# Benchmark for the wait queue (issue 5): time from `canhazgpu release` to the first
# waiter holding the GPU, on both backends.
# Usage: benches/queue_wakeup.sh [TRIALS]    (needs redis-server; release build)
# Each trial: GPU 0 (of 1) is held, `reserve --wait --short` waits in the queue; the
# clock starts just before `release -G 0` is run and stops when the waiter has exited
# after taking the GPU (it prints the ID and exits at once). So each figure includes
# starting the `release` process and its own store write. Prints the median and range.
source "$(dirname "$0")/common.sh"
trials=${1:-21}

for backend in sqlite redis; do
    backend_args "$backend"
    "$bin" "${args[@]}" admin --gpus 1 --provider fake >/dev/null 2>&1
    "$bin" "${args[@]}" reserve --duration 1h >/dev/null
    times=()
    for _ in $(seq "$trials"); do
        "$bin" "${args[@]}" reserve --wait --short --duration 1h >"$work/served" 2>/dev/null &
        waiter=$!
        wait_for_output 500 '"total_waiting": 1' "${args[@]}" queue --json
        start=$(date +%s%N)
        "$bin" "${args[@]}" release -G 0 >/dev/null
        wait "$waiter"
        end=$(date +%s%N)
        [ "$(cat "$work/served")" = 0 ] || { echo "waiter was not served GPU 0" >&2; exit 1; }
        times+=("$(( (end - start) / 1000 ))")
    done
    sorted=($(printf '%s\n' "${times[@]}" | sort -n))
    median=${sorted[$(( trials / 2 ))]}
    printf '== %s: release to waiter holding the GPU, median %.1f ms (min %.1f, max %.1f) over %d trials\n' \
        "$backend" "$(echo "$median / 1000" | bc -l)" "$(echo "${sorted[0]} / 1000" | bc -l)" \
        "$(echo "${sorted[-1]} / 1000" | bc -l)" "$trials"
done
