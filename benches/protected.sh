#!/usr/bin/env bash
# Protected mode's cost: `status` and a reserve/release pair as a real user, with the
# setgid binary on the protected store against the same binary without setgid on a
# shared store. Both run as chg_alice in one mount namespace with a private
# /etc/canhazgpu, so runuser and unshare cost the same on both sides. Needs root,
# hyperfine. Prints hyperfine's tables, then the medians BENCHMARKS.md quotes.
source "$(dirname "$0")/common.sh"
command -v hyperfine >/dev/null || { echo "needs hyperfine" >&2; exit 1; }
getent group canhazgpu >/dev/null || groupadd --system canhazgpu
id chg_alice >/dev/null 2>&1 || useradd -m chg_alice
chmod 755 "$work"
install -o root -g canhazgpu -m 2755 "$bin" "$work/canhazgpu-setgid"
install -o root -g root -m 0755 "$bin" "$work/canhazgpu-plain"
mkdir -p "$work/etc" /etc/canhazgpu
printf 'state_dir: %s/protected\n' "$work" > "$work/etc/config.yaml"
chmod 644 "$work/etc/config.yaml"

export work
unshare --mount --propagation private -- bash -euo pipefail -c '
mount --bind "$work/etc" /etc/canhazgpu
"$work/canhazgpu-setgid" admin --gpus 8 --provider fake >/dev/null 2>&1
"$work/canhazgpu-plain" --state-dir "$work/shared" admin --gpus 8 --provider fake >/dev/null 2>&1
as_alice="runuser -u chg_alice -- env HOME=/nonexistent CANHAZGPU_NVML=0"
protected="$as_alice $work/canhazgpu-setgid"
shared="$as_alice $work/canhazgpu-plain --state-dir $work/shared"
$protected admin --check | head -1
hyperfine --warmup 5 --runs 60 -N --export-json "$work/status.json" \
    -n "status, shared" "$shared status" \
    -n "status, protected" "$protected status"
hyperfine --warmup 5 --runs 40 --export-json "$work/reserve.json" \
    -n "reserve+release, shared" "$shared reserve --short >/dev/null && $shared release >/dev/null" \
    -n "reserve+release, protected" "$protected reserve --short >/dev/null && $protected release >/dev/null"
'
python3 - "$work/status.json" "$work/reserve.json" <<'PY'
import json, sys
for path in sys.argv[1:]:
    for result in json.load(open(path))["results"]:
        print(f"median {result['command']}: {result['median'] * 1000:.1f} ms")
PY
