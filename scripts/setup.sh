#!/usr/bin/env bash
# Installs everything qbackup needs on Debian 12 (as root) and builds it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  for pkg in qemu-system-x86 qemu-utils qemu-block-extra libnbd-bin e2fsprogs openssl chromium ceph-mon ceph-osd radosgw ceph-common libguestfs-tools linux-image-amd64 libvirt-daemon-system libvirt-clients; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
  fi
fi
# Node.js 24 (LTS) from the npm registry when the system's is older (scripts/node.sh)
source scripts/node.sh
npm ci
npm run build
