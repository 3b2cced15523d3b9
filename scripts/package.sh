#!/usr/bin/env bash
# Builds the Debian package: the release binary, then its man pages and shell
# completions generated from it (never committed), then `cargo deb`.
# Output: target/debian/canhazgpu_<version>-1_<arch>.deb
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb" >&2
    cargo install --locked cargo-deb
fi
cargo build --release --locked
bin=target/release/canhazgpu
rm -rf target/package
mkdir -p target/package/man target/package/completions
"$bin" man target/package/man >/dev/null
gzip -9n target/package/man/*.1
"$bin" completion bash > target/package/completions/canhazgpu
# upstream's users type `chg`: the same completion under that name.
sed -e 's/_canhazgpu/_chg/g' -e 's/\(complete .*\) canhazgpu$/\1 chg/' \
    target/package/completions/canhazgpu > target/package/completions/chg
"$bin" completion zsh > target/package/completions/_canhazgpu
"$bin" completion fish > target/package/completions/canhazgpu.fish
cargo deb --no-build --locked "$@"
