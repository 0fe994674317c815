#!/usr/bin/env bash
# Builds the tiny test guest from Debian packages: a kernel (the package
# linux-image-amd64 depends on) and an initramfs holding busybox-static,
# qemu-ga with the shared libraries it needs, the kernel modules for virtio
# disks, the virtio console and ext4, and scripts/guest/init.
#
# Usage: scripts/guest/build.sh [CACHE_DIR]
#   CACHE_DIR defaults to $QBACKUP_GUEST_CACHE, else ${TMPDIR:-/tmp}/qbackup-guest-cache.
# Prints the directory holding vmlinuz and initrd.gz (the last line of stdout).
#
# The result is cached under CACHE_DIR/<key>, the key being the package
# versions plus a hash of this script and of init, so a rerun costs an
# apt-cache lookup. Nothing is installed on the host; the packages come from
# the host's apt sources with `apt-get download`. The libraries qemu-ga needs
# are taken from the host (ldd); qemu-system-x86 pulls all of them in.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${1:-${QBACKUP_GUEST_CACHE:-${TMPDIR:-/tmp}/qbackup-guest-cache}}"
# Modules loaded by /init, in this order after their dependencies.
wanted_modules="virtio_pci virtio_blk virtio_scsi sd_mod virtio_console crc32c_generic ext4"

candidate() { apt-cache policy "$1" | awk '/Candidate:/ { print $2 }'; }

kernel_pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"
[ -n "$kernel_pkg" ] || { echo "build.sh: apt knows no linux-image-amd64 (run apt-get update)" >&2; exit 1; }
versions="$kernel_pkg=$(candidate "$kernel_pkg") busybox-static=$(candidate busybox-static) qemu-guest-agent=$(candidate qemu-guest-agent)"
key="$( { echo "$versions"; cat "$here/build.sh" "$here/init"; } | sha256sum | cut -c1-16)"
out="$cache/$key"
if [ -f "$out/initrd.gz" ] && [ -f "$out/vmlinuz" ]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache"
work="$(mktemp -d "$cache/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt-get download writes into the current directory; _apt cannot always read it.
chmod 755 "$work"
apt-get download -q -o APT::Sandbox::User=root "$kernel_pkg" busybox-static qemu-guest-agent >&2
for deb in ./*.deb; do dpkg-deb -x "$deb" x; done

kver="$(ls x/lib/modules)"
bb="$work/x/bin/busybox"
root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,run,tmp,mnt,etc,var/run,lib/modules,lib64,usr/sbin}
cp x/bin/busybox "$root/bin/busybox"
for applet in $("$bb" --list); do [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"; done

# qemu-ga and the libraries it links against, at the paths the loader looks in.
cp x/usr/sbin/qemu-ga "$root/usr/sbin/qemu-ga"
ldd x/usr/sbin/qemu-ga | awk '/not found/ { print "missing " $1; exit 1 }' >&2
for lib in $(ldd x/usr/sbin/qemu-ga | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

# Kernel modules: the closure of wanted_modules over modules.dep, dependencies first.
"$bb" depmod -b x "$kver"
moddep="x/lib/modules/$kver/modules.dep"
declare -A seen=()
order=()
add_module() { # $1: path relative to lib/modules/$kver
  [ -n "${seen[$1]:-}" ] && return
  seen[$1]=1
  local deps dep
  deps="$(awk -v m="$1:" '$1 == m { $1 = ""; print }' "$moddep")"
  # modules.dep lists a module's dependencies so that the last is loaded first.
  for dep in $(echo "$deps" | tr ' ' '\n' | tac); do add_module "$dep"; done
  order+=("$1")
}
for m in $wanted_modules; do
  path="$(awk -F: -v m="/$m.ko" 'index($1, m) && substr($1, length($1) - length(m) + 1) == m { print $1; exit }' "$moddep")"
  [ -n "$path" ] || { echo "build.sh: module $m not found in $kernel_pkg" >&2; exit 1; }
  add_module "$path"
done
: > "$root/lib/modules/load-order"
for m in "${order[@]}"; do
  cp "x/lib/modules/$kver/$m" "$root/lib/modules/"
  basename "$m" >> "$root/lib/modules/load-order"
done

cp "$here/init" "$root/init"
chmod 755 "$root/init"
echo "$versions" > "$root/etc/qbackup-guest-versions"

mkdir -p "$work/out"
(cd "$root" && find . | LC_ALL=C sort | "$bb" cpio -o -H newc 2>/dev/null | gzip -6) > "$work/out/initrd.gz"
cp "x/boot/vmlinuz-$kver" "$work/out/vmlinuz"
echo "$versions" > "$work/out/versions"
# Publish atomically: a concurrent build of the same key loses the rename and is discarded.
mv -T "$work/out" "$out" 2>/dev/null || true
[ -f "$out/initrd.gz" ] || { echo "build.sh: could not publish $out" >&2; exit 1; }
echo "$out"
