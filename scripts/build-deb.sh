#!/usr/bin/env bash
# Builds the Debian package qbackup_VERSION_ARCH.deb with dpkg-deb, from the
# npm tarball of this tree (npm pack, which builds dist/ through prepack):
#   /usr/lib/qbackup/            the package and its production node_modules
#                                (better-sqlite3 and zstd-napi as built for this Node)
#   /usr/lib/qbackup/node/       the Node.js binary the native modules were built
#                                for (the `node` on the PATH, Node.js 24 after
#                                scripts/setup.sh), so the package runs on a host
#                                whose own Node.js is older or absent
#   /usr/bin/qbackup             runs /usr/lib/qbackup/bin/qbackup with that node
#   /lib/systemd/system/qbackup.service
#   /usr/share/bash-completion/completions/qbackup
#   /usr/share/doc/qbackup/      README.md, config.md, metrics.md, examples/config.yaml,
#                                grafana-dashboard.json
# Depends: qemu-system-x86, qemu-utils.
# Usage: scripts/build-deb.sh [OUTPUT_DIR]   (default: the current directory)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# the Node.js qbackup runs on (and carries), and npm_config_nodedir for a fresh npm ci
source "$root/scripts/node.sh"
out=$(cd "${1:-.}" && pwd)
work=$(mktemp -d /tmp/qbackup-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT

version=$(node -p "require('$root/package.json').version")
arch=$(dpkg --print-architecture)
echo "building qbackup $version for $arch in $work" >&2

(cd "$root" && npm pack --silent --pack-destination "$work" >/dev/null)
tarball=$(ls "$work"/qbackup-*.tgz)
stage="$work/root"
lib="$stage/usr/lib/qbackup"
mkdir -p "$lib" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/usr/share/doc/qbackup/examples" "$stage/DEBIAN"
tar -xzf "$tarball" -C "$lib" --strip-components=1
# Production dependencies only, exactly as the lock file pins them: the tree's
# own node_modules (built for this Node by npm ci) less the development ones,
# else a fresh npm ci (which builds better-sqlite3 and zstd-napi from source).
cp "$root/package-lock.json" "$lib/"
if [ -d "$root/node_modules/better-sqlite3/build/Release" ]; then
  cp -a "$root/node_modules" "$lib/node_modules"
  (cd "$lib" && npm prune --omit=dev --no-audit --no-fund --loglevel=error >&2)
else
  (cd "$lib" && npm ci --omit=dev --no-audit --no-fund --loglevel=error >&2)
fi
rm -f "$lib/package-lock.json"
# The node that built the native modules goes with them (their ABI is that node's).
node_bin=$(readlink -f "$(command -v node)")
install -D -m 0755 "$node_bin" "$lib/node/bin/node"
node_license="$(dirname "$(dirname "$node_bin")")/LICENSE"
[ -f "$node_license" ] && install -D -m 0644 "$node_license" "$stage/usr/share/doc/qbackup/node-LICENSE"
cat > "$stage/usr/bin/qbackup" <<'WRAPPER'
#!/bin/sh
exec /usr/lib/qbackup/node/bin/node /usr/lib/qbackup/bin/qbackup "$@"
WRAPPER
chmod 0755 "$stage/usr/bin/qbackup"
mkdir -p "$stage/usr/share/bash-completion/completions"
QBACKUP_STATE_DIR="$work/state" "$lib/node/bin/node" "$lib/bin/qbackup" completion bash > "$stage/usr/share/bash-completion/completions/qbackup"
install -m 0644 "$root/packaging/qbackup.service" "$stage/lib/systemd/system/qbackup.service"
install -m 0644 "$root/packaging/config.example.yaml" "$stage/usr/share/doc/qbackup/examples/config.yaml"
for doc in README.md docs/config.md docs/metrics.md docs/grafana-dashboard.json; do
  [ -f "$root/$doc" ] && install -m 0644 "$root/$doc" "$stage/usr/share/doc/qbackup/"
done

size=$(du -sk "$stage/usr" "$stage/lib" | awk '{s += $1} END {print s}')
cat > "$stage/DEBIAN/control" <<CONTROL
Package: qbackup
Version: $version
Architecture: $arch
Maintainer: qbackup maintainers <root@localhost>
Installed-Size: $size
Depends: qemu-system-x86, qemu-utils
Recommends: qemu-block-extra
Suggests: default-mta | mail-transport-agent
Section: admin
Priority: optional
Description: checkpoints and incremental disk backups for QEMU/KVM virtual machines
 qbackup takes full and incremental backups of QEMU/KVM domains into a
 deduplicated, compressed and optionally encrypted repository (a directory
 or an S3 bucket), restores them, and runs as a daemon with schedules, an
 HTTP API, Prometheus metrics and notifications (qbackup.service).
CONTROL
cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
POSTINST
cat > "$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
POSTRM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/postrm"
deb="$out/qbackup_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >&2
echo "$deb"
