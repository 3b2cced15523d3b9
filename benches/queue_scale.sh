#!/usr/bin/env bash
# Benchmark for the wait queue at scale (issue 8): N waiters on one host, both backends.
# Usage: benches/queue_scale.sh [WAITERS]    (default 500; needs redis-server, hyperfine)
# Each backend: 8 fake GPUs, all held; WAITERS `reserve --wait` processes join at once.
# Measured: how many joined and how many died; CPU used by all waiters plus the store
# (redis-server) over 10 idle seconds; `status` median with the queue full against an
# empty queue; `release -G 0` to the first waiter served (its process exiting); the
# user's `release` of all 8 GPUs to the eighth waiter served. Prints one line each.
source "$(dirname "$0")/common.sh"
waiters=${1:-500}
tick=$(getconf CLK_TCK)
redis_pid=${bench_pids[0]}

# CPU seconds (user + system) used so far by the given PIDs.
cpu_ticks() {
    local total=0 pid fields
    for pid in "$@"; do
        fields=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null) || continue
        set -- $fields
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

status_median() {
    hyperfine --style none --warmup 5 --runs 40 -N --export-json "$work/status.json" \
        "$bin ${args[*]} status" >/dev/null
    python3 -c 'import json,statistics,sys; r=json.load(open(sys.argv[1]))["results"][0]["times"]; print(f"{statistics.median(r)*1000:.2f}")' "$work/status.json"
}

for backend in sqlite redis; do
    backend_args "$backend"
    "$bin" "${args[@]}" admin --gpus 8 --provider fake --force >/dev/null 2>&1 ||
        "$bin" "${args[@]}" admin --gpus 8 --provider fake >/dev/null 2>&1
    "$bin" "${args[@]}" reserve --gpus 8 --duration 2h >/dev/null
    idle_status=$(status_median)

    pids=()
    mkdir -p "$work/$backend"
    for i in $(seq "$waiters"); do
        "$bin" "${args[@]}" reserve --wait --short --duration 1h \
            >"$work/$backend/$i.out" 2>"$work/$backend/$i.err" &
        pids+=($!)
    done
    joined=0
    for _ in $(seq 600); do
        joined=$("$bin" "${args[@]}" queue --json 2>/dev/null |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["total_waiting"])')
        [ "$joined" -ge "$waiters" ] && break
        sleep 0.1
    done
    alive=0 live=()
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            alive=$((alive + 1)) live+=("$pid")
        else
            wait "$pid" 2>/dev/null || true # reaped now, so `wait -n` below sees only the served
        fi
    done
    pids=("${live[@]}")
    echo "== $backend: $joined of $waiters joined, $((waiters - alive)) died"

    sleep 2
    watched=("${pids[@]}")
    [ "$backend" = redis ] && watched+=("$redis_pid")
    before=$(cpu_ticks "${watched[@]}")
    sleep 10
    after=$(cpu_ticks "${watched[@]}")
    printf '  idle CPU of %d waiters%s: %.2f %% of one core\n' "$waiters" \
        "$([ "$backend" = redis ] && echo ' + redis-server')" \
        "$(echo "($after - $before) * 100 / $tick / 10" | bc -l)"

    busy_status=$(status_median)
    echo "  status median: ${busy_status} ms with $waiters waiting, ${idle_status} ms with none"

    start=$(date +%s%N)
    "$bin" "${args[@]}" release -G 0 >/dev/null
    wait -n || true
    end=$(date +%s%N)
    printf '  release -G 0 to first waiter served: %.1f ms\n' "$(echo "($end - $start) / 1000000" | bc -l)"

    start=$(date +%s%N)
    "$bin" "${args[@]}" release >/dev/null
    for _ in $(seq 8); do wait -n || true; done
    end=$(date +%s%N)
    printf '  release of 8 GPUs to eighth waiter served: %.1f ms\n' "$(echo "($end - $start) / 1000000" | bc -l)"
    served=$(cat "$work/$backend"/*.out | grep -c . || true)
    echo "  waiters served: $served (expected 9)"

    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    unexpected=$(cat "$work/$backend"/*.err | grep -v -e '^Waiting for GPUs' -e 'interrupted by SIGTERM' || true)
    echo "  unexpected messages from waiters: $(echo -n "$unexpected" | grep -c . || true)"
    [ -z "$unexpected" ] || echo "$unexpected" | sort | uniq -c | head -5
done
