# Shared set-up for the benchmark scripts (sourced, not run): builds the release binary,
# makes a scratch HOME and work directory, starts a private redis-server on a Unix socket,
# and cleans everything up on exit. Scripts add PIDs of their own servers to `bench_pids`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin="$PWD/target/release/canhazgpu"
work=$(mktemp -d)
bench_pids=()
cleanup() {
    for pid in "${bench_pids[@]}"; do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    rm -rf "$work"
}
trap cleanup EXIT
unset $(env | grep -o '^CANHAZGPU_[A-Z_]*' || true)
export HOME="$work/home" CANHAZGPU_NVML=0
mkdir -p "$HOME"

redis-server --port 0 --unixsocket "$work/redis.sock" --save '' --appendonly no --daemonize no >/dev/null &
bench_pids+=($!)
for _ in $(seq 50); do [ -S "$work/redis.sock" ] && break; sleep 0.05; done

sqlite_args=(--backend sqlite --state-dir "$work/state")
redis_args=(--redis-url "redis+unix://$work/redis.sock")

# Sets `args` to the global flags that select backend $1 (sqlite or redis).
backend_args() {
    if [ "$1" = sqlite ]; then args=("${sqlite_args[@]}"); else args=("${redis_args[@]}"); fi
}

# Runs `$bin ARGS...` every 10 ms until its output matches PATTERN, at most TRIES times.
# Usage: wait_for_output TRIES PATTERN ARGS...
wait_for_output() {
    local tries=$1 pattern=$2
    shift 2
    for _ in $(seq "$tries"); do
        "$bin" "$@" 2>/dev/null | grep -q "$pattern" && return 0
        sleep 0.01
    done
    echo "'$bin $*' never printed $pattern" >&2
    return 1
}
