#!/usr/bin/env bash
# The agent's CPU use per interval (issue 12): a pool of N fake GPUs, half of them
# reserved, `agent --interval 1s` sampling them into the store (activity, policy,
# notifications off) for SECONDS seconds, on both backends. Prints the agent's CPU
# time per interval (user + system, from /proc) for 8 and 1,024 GPUs.
# Usage: benches/agent_cpu.sh [SECONDS]   (default 30; needs redis-server)
source "$(dirname "$0")/common.sh"
seconds=${1:-30}
tick=$(getconf CLK_TCK)

for backend in sqlite redis; do
    for gpus in 8 1024; do
        backend_args "$backend"
        rm -rf "$work/state"
        redis-cli -s "$work/redis.sock" flushall >/dev/null
        "$bin" "${args[@]}" admin --gpus "$gpus" --provider fake --force >/dev/null 2>&1
        "$bin" "${args[@]}" reserve --gpus $((gpus / 2)) --duration 8h >/dev/null
        "$bin" "${args[@]}" agent --interval 1s 2>/dev/null &
        agent=$!
        sleep "$seconds"
        read -r -a stat < "/proc/$agent/stat"
        kill "$agent"; wait "$agent" 2>/dev/null || true
        # utime and stime (fields 14 and 15), in clock ticks.
        ticks=$(( stat[13] + stat[14] ))
        python3 -c 'import sys; t,hz,s=map(int,sys.argv[1:4]); print(f"{sys.argv[4]:6} {int(sys.argv[5]):5} GPUs: {t*1000/hz/s:.2f} ms CPU per 1 s interval ({t*100/hz/s:.2f} % of a core)")' \
            "$ticks" "$tick" "$seconds" "$backend" "$gpus"
    done
done
