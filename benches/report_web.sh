#!/usr/bin/env bash
# Benchmarks for `report` and `web` (issue: report over 1,000,000 history records on each
# backend; /api/status throughput and p99 with 64 concurrent clients).
# Usage: benches/report_web.sh   (needs hyperfine, wrk, sqlite3 and redis-server; release build)
# Prints the figures; copy them into BENCHMARKS.md.
source "$(dirname "$0")/common.sh"

records=1000000
now=$(date +%s)

# 1,000,000 finished reservations of 50 users on 8 GPUs, one ending every 7 s over the
# last 81 days, 1 to 2 hours long, a third of them `run`.
fill_sqlite() {
    sqlite3 "$work/state/state.db" "
        WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < $records - 1)
        INSERT INTO history (user, actual_user, gpu_id, start_time, end_time, type)
        SELECT 'user' || (i % 50), 'user' || (i % 50), i % 8,
               $now - i * 7 - 3600 - (i % 7) * 600, $now - i * 7,
               CASE WHEN i % 3 = 0 THEN 'run' ELSE 'manual' END
        FROM n;"
}

# The same records in upstream's zset layout (member: JSON record, score: end time).
fill_redis() {
    cat >"$work/fill.lua" <<'LUA'
local now, first, count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = first, first + count - 1 do
  local finish = now - i * 7
  local start = finish - 3600 - (i % 7) * 600
  local user = "user" .. (i % 50)
  local kind = (i % 3 == 0) and "run" or "manual"
  redis.call("ZADD", "canhazgpu:usage_history_sorted", finish, cjson.encode({
    user = user, actual_user = user, gpu_id = i % 8, start_time = start, end_time = finish,
    duration_seconds = finish - start, reservation_type = kind, seq = i }))
end
return count
LUA
    for first in $(seq 0 100000 $((records - 1))); do
        redis-cli -s "$work/redis.sock" --eval "$work/fill.lua" , "$now" "$first" 100000 >/dev/null
    done
}

median_ms() {
    python3 - "$1" <<'PY'
import json, statistics, sys
r = sorted(t * 1000 for t in json.load(open(sys.argv[1]))["results"][0]["times"])
print(f"median {statistics.median(r):.0f} ms, max {r[-1]:.0f} ms, n={len(r)}")
PY
}

# /api/status with 64 concurrent keep-alive clients for 10 s; GPU snapshots taken
# meanwhile must stay at one per cache interval (5 s).
web_load() {
    local -a args=("$@")
    "$bin" "${args[@]}" web --host 127.0.0.1 --port 0 --cache-seconds 5 >"$work/web.out" 2>/dev/null &
    local web_pid=$!
    bench_pids+=("$web_pid")
    local url=""
    for _ in $(seq 100); do
        url=$(grep -o 'http://[0-9.:]*' "$work/web.out" || true)
        [ -n "$url" ] && break
        sleep 0.05
    done
    local before after
    before=$(curl -s "$url/healthz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["gpu_snapshots"])')
    wrk -t2 -c64 -d10s --latency "$url/api/status" >"$work/wrk.txt"
    after=$(curl -s "$url/healthz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["gpu_snapshots"])')
    kill "$web_pid" && wait "$web_pid" 2>/dev/null || true
    local rps p50 p99 errors
    rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
    p50=$(awk '$1 == "50%" {print $2}' "$work/wrk.txt")
    p99=$(awk '$1 == "99%" {print $2}' "$work/wrk.txt")
    errors=$(grep -E 'Non-2xx|Socket errors' "$work/wrk.txt" || echo "none")
    echo "  /api/status, 64 clients, 10 s: ${rps} req/s, p50 ${p50}, p99 ${p99}, errors: ${errors}; GPU snapshots during the run: $((after - before))"
}

for backend in sqlite redis; do
    backend_args "$backend"
    "$bin" "${args[@]}" admin --gpus 8 --provider fake >/dev/null 2>&1
    "fill_$backend"
    "$bin" "${args[@]}" reserve --gpus 3 >/dev/null
    echo "== $backend"
    "$bin" "${args[@]}" report --days 90 | tail -4 | head -1 | sed 's/^/  /'
    hyperfine --style none --warmup 1 --runs 10 -N --export-json "$work/$backend.json" \
        "$bin ${args[*]} report --days 90" >/dev/null
    echo "  report --days 90 over $records records: $(median_ms "$work/$backend.json")"
    web_load "${args[@]}"
done
