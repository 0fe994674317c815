#!/usr/bin/env bash
# Installs qbackup the two ways that need no clone and runs what was installed:
#   1. npm pack, then npm install -g of the tarball into a throw-away prefix;
#      `qbackup --version`, `qbackup config check` of the example configuration,
#      and the demo (scripts/demo.sh) with that qbackup.
#   2. with --install-deb (as root, Debian 12): scripts/build-deb.sh, then
#      apt-get install ./qbackup_*.deb; `qbackup serve` started from the unit's
#      ExecStart line (no systemctl), /metrics read with the admin token it
#      wrote, SIGTERM; then apt-get purge qbackup.
# Usage: scripts/check-package.sh [--install-deb] [--skip-npm]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# the Node.js qbackup runs on, and npm_config_nodedir for the native builds of npm install -g
source "$root/scripts/node.sh"
work=$(mktemp -d /tmp/qbackup-pkg.XXXXXX)
server=
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
deb=0 npm=1
for a in "$@"; do
  case "$a" in
    --install-deb) deb=1 ;;
    --skip-npm) npm=0 ;;
    *) echo "usage: $0 [--install-deb] [--skip-npm]" >&2; exit 2 ;;
  esac
done

if [ "$npm" = 1 ]; then
  echo "== npm pack + npm install -g" >&2
  (cd "$root" && npm pack --silent --pack-destination "$work" >/dev/null)
  npm install -g --prefix "$work/prefix" --no-audit --no-fund --loglevel=error "$work"/qbackup-*.tgz >&2
  bin="$work/prefix/bin/qbackup"
  "$bin" --version
  QBACKUP_STATE_DIR="$work/state-npm" "$bin" --config "$work/prefix/lib/node_modules/qbackup/packaging/config.example.yaml" config check >/dev/null
  QBACKUP_BIN="$bin" bash "$root/scripts/demo.sh"
  echo "ok: the npm package installs a working qbackup" >&2
fi

if [ "$deb" = 1 ]; then
  echo "== Debian package" >&2
  file=$(bash "$root/scripts/build-deb.sh" "$work")
  apt-get install -y "$file" >&2
  trap 'apt-get purge -y qbackup >&2 || true; cleanup' EXIT
  files=$(dpkg -L qbackup)
  for f in /usr/bin/qbackup /lib/systemd/system/qbackup.service /usr/share/doc/qbackup/examples/config.yaml /usr/share/bash-completion/completions/qbackup; do
    grep -qx "$f" <<<"$files" || { echo "check-package: the package lacks $f" >&2; exit 1; }
  done
  qbackup --version
  exec_start=$(sed -n 's/^ExecStart=//p' /lib/systemd/system/qbackup.service)
  printf 'server:\n  listen: 127.0.0.1:0\nmetrics: token\n' > "$work/config.yaml"
  # The unit's command line as systemd would run it, with a private state directory and configuration.
  QBACKUP_STATE_DIR="$work/state-deb" QBACKUP_CONFIG="$work/config.yaml" $exec_start > "$work/serve.out" 2> "$work/serve.err" &
  server=$!
  for _ in $(seq 120); do grep -q 'listening on' "$work/serve.out" 2>/dev/null && break; sleep 0.5; done
  url=$(sed -n 's/^qbackup serve: listening on //p' "$work/serve.out")
  [ -n "$url" ] || { cat "$work/serve.err" >&2; echo "check-package: qbackup serve did not start" >&2; exit 1; }
  token=$(cat "$work/state-deb/admin-token")
  metrics=$(curl -fsS -H "Authorization: Bearer $token" "$url/metrics")
  grep -q '^# HELP qbackup_tasks' <<<"$metrics" || { echo "check-package: /metrics lacks qbackup_tasks" >&2; exit 1; }
  kill -TERM "$server"; wait "$server" || true; server=
  echo "ok: the .deb installs, and qbackup serve starts from the unit's ExecStart line" >&2
fi
