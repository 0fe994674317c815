#!/usr/bin/env bash
# Installs everything qbackup needs on Debian 12 (as root) and builds it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  for pkg in qemu-system-x86 qemu-utils qemu-block-extra libnbd-bin e2fsprogs openssl chromium ceph-mon ceph-osd radosgw ceph-common libguestfs-tools linux-image-amd64; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
  fi
fi
# libvirt for the libvirt driver and its tests (they start libvirtd themselves when none runs)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! dpkg -s libvirt-daemon-system libvirt-clients >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y libvirt-daemon-system libvirt-clients
  fi
fi
npm ci
npm run build
