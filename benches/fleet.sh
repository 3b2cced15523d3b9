#!/usr/bin/env bash
# Benchmark of a simulated fleet (issue 10): HOSTS hosts x 8 fake GPUs on one Redis
# (host names set with CANHAZGPU_HOST_NAME), about half of the GPUs reserved, each
# host with a fresh snapshot. Usage: benches/fleet.sh [HOSTS]   (default 256; needs
# redis-server, hyperfine, wrk). Prints medians of `status --all`, `status --all
# --summary` and `find --gpus 4`; `/api/hosts/status` requests per second at 64
# clients; allocations per second with every host reserving and releasing at once
# (benches/fleet_alloc.rs); Redis memory per host; the agent's CPU share at 10 s.
cargo_home=$HOME    # common.sh moves HOME; cargo needs the real one
source "$(dirname "$0")/common.sh"
hosts=${1:-256}
tick=$(getconf CLK_TCK)
export CANHAZGPU_REDIS_URL="redis+unix://$work/redis.sock"
redis_cli() { redis-cli -s "$work/redis.sock" "$@"; }
used_memory() { redis_cli info memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p'; }

# Runs `$bin ARGS...` once per host (as that host), 32 at a time.
on_every_host() {
    local pids=() i
    for i in $(seq 0 $((hosts - 1))); do
        CANHAZGPU_HOST_NAME=$(printf 'h%03d' "$i") "$bin" "$@" >/dev/null 2>&1 &
        pids+=($!)
        if (( ${#pids[@]} == 32 )); then wait "${pids[@]}"; pids=(); fi
    done
    if (( ${#pids[@]} > 0 )); then wait "${pids[@]}"; fi
}
before=$(used_memory)
on_every_host admin --gpus 8 --provider fake
# Reserving also queries the GPUs, which publishes the host's snapshot.
on_every_host reserve --gpus 4 --duration 8h
after=$(used_memory)
echo "redis memory: $(( (after - before) / hosts )) bytes per host (8 GPUs, 4 reserved, snapshot)"

median_ms() {
    hyperfine --style none --warmup 3 --runs 30 -N --export-json "$work/h.json" "$1" >/dev/null
    python3 -c 'import json,statistics,sys; r=json.load(open(sys.argv[1]))["results"][0]["times"]; print(f"{statistics.median(r)*1000:.1f} ms")' "$work/h.json"
}
export CANHAZGPU_HOST_NAME=login
echo "status --all ($hosts hosts): $(median_ms "$bin status --all")"
echo "status --all --summary: $(median_ms "$bin status --all --summary")"
echo "find --gpus 4: $(median_ms "$bin find --gpus 4")"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CANHAZGPU_HOST_NAME=h000 "$bin" web --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
bench_pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
if curl -sf "http://127.0.0.1:$port/api/hosts/status" >/dev/null; then
    wrk -t2 -c64 -d10s "http://127.0.0.1:$port/api/hosts/status" | sed -n 's/^Requests\/sec: */\/api\/hosts\/status at 64 clients: /p'
else
    echo "/api/hosts/status: not served by this build"
fi

# The agent at the default 10 s interval, over 60 s.
CANHAZGPU_HOST_NAME=h001 "$bin" agent --interval 10s 2>/dev/null &
agent=$!
bench_pids+=($agent)
sleep 60
set -- $(sed 's/^.*) //' "/proc/$agent/stat")
echo "agent CPU at a 10 s interval: $(python3 -c "print(f'{(${12} + ${13}) / $tick / 60 * 100:.3f} %')") of one core over 60 s"

HOME=$cargo_home cargo bench --quiet --bench fleet_alloc -- "$CANHAZGPU_REDIS_URL" "$hosts" 10 2>/dev/null |
    tail -1 | sed 's/^/allocations: /'
# Afterwards, every host still has exactly its 4 reservations.
held=$(for i in $(seq 0 $((hosts - 1))); do redis_cli --raw mget $(for g in 0 1 2 3 4 5 6 7; do printf 'canhazgpu:{h%03d}:gpu:%d ' "$i" "$g"; done); done | grep -c '"type":"manual"' || true)
echo "manual reservations left: $held (expected $((hosts * 4)))"
