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
# upstream's users type `chg`: it completes too.
for name in canhazgpu chg; do
    "$bin" completion bash --name "$name" > "target/package/completions/$name"
    "$bin" completion zsh --name "$name" > "target/package/completions/_$name"
    "$bin" completion fish --name "$name" > "target/package/completions/$name.fish"
done
cargo deb --no-build --locked "$@"
