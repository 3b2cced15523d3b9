#!/usr/bin/env bash
# Builds the Debian package and tries it on this machine as an administrator would:
# install, the commands, man page and completions, protected mode, an upgrade over
# itself and a removal, with a reservation that must outlive all of it. Needs root.
# The machine's own state is kept: /var/lib/canhazgpu is set aside and put back.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "package check: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || fail "run it as root (it installs the package)"
missing=()
for tool in zsh fish man sqlite3; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zsh fish man-db sqlite3
fi

scripts/package.sh
deb=$(ls -t target/debian/canhazgpu_*.deb | head -n1)
echo "package check: $deb" >&2

saved=""
if [ -e /var/lib/canhazgpu ]; then
    saved=$(mktemp -d /var/lib/canhazgpu.saved.XXXXXX)
    mv /var/lib/canhazgpu "$saved/"
fi
cleanup() {
    dpkg --purge canhazgpu >/dev/null 2>&1 || true
    rm -rf /var/lib/canhazgpu
    if [ -n "$saved" ]; then mv "$saved/canhazgpu" /var/lib/canhazgpu && rmdir "$saved"; fi
    userdel -r chg_pkg >/dev/null 2>&1 || true
}
trap cleanup EXIT

dpkg -i "$deb" >/dev/null
chg --version | grep -q '^canhazgpu ' || fail "chg --version"
[ "$(readlink /usr/bin/chg)" = canhazgpu ] || fail "chg is not a symlink to canhazgpu"
man -w canhazgpu >/dev/null || fail "man -w canhazgpu"
man -w canhazgpu-reserve >/dev/null || fail "man -w canhazgpu-reserve"
bash -c 'source /usr/share/bash-completion/completions/canhazgpu && complete -p canhazgpu' >/dev/null \
    || fail "bash completion"
bash -c 'source /usr/share/bash-completion/completions/chg && complete -p chg' >/dev/null \
    || fail "bash completion for chg"
[ "$(zsh -fc 'fpath=(/usr/share/zsh/vendor-completions $fpath); autoload -Uz compinit && compinit -u -D && autoload -Uz _canhazgpu && whence -w _canhazgpu')" = "_canhazgpu: function" ] \
    || fail "zsh completion"
fish --no-config -c 'source /usr/share/fish/vendor_completions.d/canhazgpu.fish; complete -C"canhazgpu rese"' | grep -q '^reserve' \
    || fail "fish completion"
[ "$(zsh -fc 'fpath=(/usr/share/zsh/vendor-completions $fpath); autoload -Uz compinit && compinit -u -D && autoload -Uz _chg && whence -w _chg')" = "_chg: function" ] \
    || fail "zsh completion for chg"
fish --no-config -c 'source /usr/share/fish/vendor_completions.d/chg.fish; complete -C"chg rese"' | grep -q '^reserve' \
    || fail "fish completion for chg"
[ -f /etc/canhazgpu/config.yaml ] || fail "no example /etc/canhazgpu/config.yaml"
dpkg-query -W -f='${Conffiles}' canhazgpu | grep -q /etc/canhazgpu/config.yaml || fail "config.yaml is not a conffile"
for unit in canhazgpu-agent canhazgpu-web; do
    [ -f "/usr/lib/systemd/system/$unit.service" ] || fail "no $unit.service"
done

# Protected mode, as the trust issue wants it.
[ "$(stat -c '%U:%G %a' /usr/bin/canhazgpu)" = "root:canhazgpu 2755" ] || fail "binary not setgid canhazgpu"
[ "$(stat -c '%U:%G %a' /var/lib/canhazgpu)" = "root:canhazgpu 2770" ] || fail "state directory not protected"
canhazgpu admin --gpus 2 --provider fake >/dev/null 2>&1
id chg_pkg >/dev/null 2>&1 || useradd -m chg_pkg
runuser -u chg_pkg -- chg reserve --gpus 1 -d 2h >/dev/null
holds() { runuser -u chg_pkg -- canhazgpu status --json | grep -q '"user": "chg_pkg"'; }
holds || fail "the reservation is not there"
runuser -u chg_pkg -- canhazgpu admin --check | grep -q '^Mode: protected' || fail "admin --check is not protected"
if runuser -u chg_pkg -- sqlite3 /var/lib/canhazgpu/state.db 'select 1' >/dev/null 2>&1; then
    fail "a user opened the store with sqlite3"
fi
runuser -u chg_pkg -- canhazgpu run -- id -G | grep -qw "$(getent group canhazgpu | cut -d: -f3)" \
    && fail "run passed the canhazgpu group on"

# Upgrade over itself, remove, install again: the reservation stays throughout.
dpkg -i "$deb" >/dev/null
holds || fail "the upgrade lost the reservation"
[ "$(stat -c '%U:%G %a' /usr/bin/canhazgpu)" = "root:canhazgpu 2755" ] || fail "the upgrade dropped the setgid bit"
dpkg -r canhazgpu >/dev/null
[ -f /var/lib/canhazgpu/state.db ] || fail "removing the package removed the store"
dpkg -i "$deb" >/dev/null
holds || fail "remove and install lost the reservation"
dpkg --purge canhazgpu >/dev/null
[ -f /var/lib/canhazgpu/state.db ] || fail "purging the package removed the store"
[ ! -e /usr/bin/canhazgpu ] || fail "purge left the binary"
echo "package check: passed" >&2
