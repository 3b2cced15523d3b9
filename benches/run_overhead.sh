#!/usr/bin/env bash
# Benchmarks for `canhazgpu run` (issue 3): overhead of `run -- true` over plain `true`,
# peak memory of the supervising canhazgpu during a long command, and the time from
# `kill -9` of canhazgpu to its GPU being reservable again. On both backends.
# Usage: benches/run_overhead.sh    (needs hyperfine and redis-server; release build)
# Prints medians; copy them into BENCHMARKS.md.
source "$(dirname "$0")/common.sh"

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

for backend in sqlite redis; do
    backend_args "$backend"
    "$bin" "${args[@]}" admin --gpus 8 --provider fake --force >/dev/null 2>&1 ||
        "$bin" "${args[@]}" admin --gpus 8 --provider fake >/dev/null 2>&1
    echo "== $backend"

    # 1. Overhead: the whole run (reserve, spawn, wait, release) minus the command.
    hyperfine --style none --warmup 20 --runs 300 -N --export-json "$work/$backend.json" \
        "true" "$bin ${args[*]} run -- true" >/dev/null 2>&1
    python3 - "$work/$backend.json" <<'PY'
import json, statistics, sys
results = json.load(open(sys.argv[1]))["results"]
plain, run = (sorted(t * 1000 for t in r["times"]) for r in results)
p90 = lambda v: v[int(len(v) * 0.9)]
print(f"  plain true: median {statistics.median(plain):.2f} ms")
print(f"  run -- true: median {statistics.median(run):.2f} ms, p90 {p90(run):.2f} ms, n={len(run)}")
print(f"  added by run (median difference): {statistics.median(run) - statistics.median(plain):.2f} ms")
PY

    # 2. Peak memory of the supervisor (VmHWM) while a 3 s command runs.
    "$bin" "${args[@]}" run --heartbeat-interval 1s -- sleep 3 2>/dev/null &
    supervisor=$!
    sleep 2.5
    hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$supervisor/status")
    rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$supervisor/status")
    wait "$supervisor"
    echo "  supervisor memory during the command: peak RSS (VmHWM) ${hwm} kB, RSS ${rss} kB"

    # 3. kill -9 of canhazgpu until `reserve` of its GPU succeeds, 11 trials.
    times=()
    for _ in $(seq 11); do
        "$bin" "${args[@]}" run --gpu-ids 0 -- sleep 30 >/dev/null 2>&1 &
        supervisor=$!
        disown "$supervisor" # no "Killed" job report
        wait_for_output 200 '"IN_USE"' "${args[@]}" status --json
        command=$(cat "/proc/$supervisor/task/$supervisor/children")
        start=$(date +%s%N)
        kill -9 "$supervisor"
        until "$bin" "${args[@]}" reserve --gpu-ids 0 --duration 1m >/dev/null 2>&1; do :; done
        end=$(date +%s%N)
        times+=($(( (end - start) / 1000 )))
        kill "$command"
        "$bin" "${args[@]}" release >/dev/null
    done
    ms=$(printf '%s\n' "${times[@]}" | median | awk '{ printf "%.2f", $1 / 1000 }')
    echo "  kill -9 to GPU reserved again: median ${ms} ms (all, in us: ${times[*]})"
done
