#!/usr/bin/env bash
# The main job, end to end with the real QEMU: define a VM, write to its disks
# as a guest would, take a full backup into a repository, write again (data,
# zeroes, discards, a changed file, a hot-plugged disk), take an incremental backup, restore
# both, check every restored byte against the disk at backup time, verify the
# repository (every chunk read back and checked), get one file back as it was
# at each backup (file-level restore: the guest's ext4 read by the libguestfs
# appliance, never by the host), and show what it stores.
set -euo pipefail
cd "$(dirname "$0")/.."
# QBACKUP_BIN: another qbackup to run the demo with (e.g. one installed from the npm tarball or the .deb).
qb=${QBACKUP_BIN:-./bin/qbackup}
work=$(mktemp -d /tmp/qbackup-demo.XXXXXX)
export QBACKUP_STATE_DIR="$work/state"
repo="$work/repo"
q() { echo "+ qbackup $*" >&2; "$qb" "$@"; }
hmp() { "$qb" qemu-monitor-command demo --hmp "$1" >/dev/null; }
cleanup() {
  "$qb" destroy demo >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# A copy of a disk as it is now, to compare restores with.
reference() { # TARGET IMAGE NAME
  hmp "qemu-io -d $1 \"flush\""
  qemu-img convert -U -O raw "$2" "$work/$3.raw"
}
same() { # A B WHAT
  if qemu-img compare -q "$1" "$2"; then echo "  ok: $3"; else echo "demo FAILED: $3 differs" >&2; exit 1; fi
}

# An ext4 filesystem holding the guest's files, built in a file without mounting
# anything (mkfs.ext4 -d copies a directory tree in).
guest_fs() { # IMAGE HOSTNAME
  rm -rf "$work/tree"
  mkdir -p "$work/tree/etc"
  echo "$2" > "$work/tree/etc/hostname"
  mkfs.ext4 -q -F -L demo-root -d "$work/tree" -E root_owner=0:0 "$1" 32M >/dev/null
}

echo "+ the system disk gets an MBR and an ext4 partition (192-224 MiB) whose /etc/hostname is demo-before" >&2
guest_fs "$work/root1.img" demo-before
truncate -s 256M "$work/system.raw"
printf 'label: dos\nstart=393216, size=65536, type=83\n' | sfdisk -q "$work/system.raw"
dd if="$work/root1.img" of="$work/system.raw" bs=1M seek=192 conv=notrunc status=none
qemu-img convert -f raw -O qcow2 "$work/system.raw" "$work/system.qcow2"
rm "$work/system.raw"
qemu-img create -q -f qcow2 "$work/data.qcow2" 64M
cat > "$work/demo.xml" <<XML
<domain type='qemu'>
  <name>demo</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$work/system.qcow2'/>
      <target dev='sda' bus='scsi'/>
    </disk>
  </devices>
</domain>
XML

q define "$work/demo.xml"
q start demo
echo "+ guest writes 64 MiB: 32 MiB of random data, 32 MiB of a repeated pattern" >&2
head -c 32M /dev/urandom > "$work/random"
hmp "qemu-io -d sda \"write -s $work/random 1M 32M\""
hmp 'qemu-io -d sda "write -P 0xcd 100M 32M"'
reference sda "$work/system.qcow2" full-sda
q backup demo --repo "$repo"
# A time between the two backups, for --until below.
between=$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)

echo "+ the guest renames itself: its /etc/hostname becomes demo-after (a new ext4 written over the partition)" >&2
guest_fs "$work/root2.img" demo-after
hmp "qemu-io -d sda \"write -s $work/root2.img 192M 32M\""
echo "+ guest writes 1 MiB, zeroes 4 MiB, discards 2 MiB; a data disk is hot-plugged" >&2
head -c 1M /dev/urandom > "$work/random1"
hmp "qemu-io -d sda \"write -s $work/random1 8M 1M\""
hmp 'qemu-io -d sda "write -z 16M 4M"'
hmp 'qemu-io -d sda "discard 110M 2M"'
q attach-disk demo "$work/data.qcow2" sdb --subdriver qcow2
hmp 'qemu-io -d sdb "write -P 0x5a 4M 8M"'
reference sda "$work/system.qcow2" inc-sda
reference sdb "$work/data.qcow2" inc-sdb
q backup demo --repo "$repo"
q backup-list --repo "$repo"

full=$("$qb" backup-list --repo "$repo" demo --json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s)[0].id))')
q restore demo --repo "$repo" --backup "$full" --to "$work/restore-full" --format raw
q restore demo --repo "$repo" --to "$work/restore-inc"
echo "+ comparing restored images with the disks at backup time" >&2
same "$work/restore-full/sda.raw" "$work/full-sda.raw" "full backup of sda"
same "$work/restore-inc/sda.qcow2" "$work/inc-sda.raw" "incremental backup of sda"
same "$work/restore-inc/sdb.qcow2" "$work/inc-sdb.raw" "hot-plugged sdb (full in the second backup)"
q verify --repo "$repo" --read-data
q shutdown demo

# The appliance runs under software emulation, as the demo VM does (type='qemu').
echo "+ file-level restore: /etc/hostname as it was at $between (the full backup), then as in the latest backup" >&2
QBACKUP_ACCEL=tcg q files demo --repo "$repo" --until "$between" get /etc/hostname --to "$work/files-then"
QBACKUP_ACCEL=tcg q files demo --repo "$repo" get /etc/hostname --to "$work/files-now"
has() { # FILE TEXT WHAT
  if [ "$(cat "$1")" = "$2" ]; then echo "  ok: $3"; else echo "demo FAILED: $3: got \"$(cat "$1")\", expected \"$2\"" >&2; exit 1; fi
}
has "$work/files-then/hostname" demo-before "/etc/hostname from the backup before $between"
has "$work/files-now/hostname" demo-after "/etc/hostname from the latest backup"

echo "+ sizes" >&2
du -h "$work/system.qcow2" "$work/data.qcow2" | sed 's|'"$work"'/||'
q stats --repo "$repo"
echo "demo OK: full and incremental backups restore to exactly the bytes the disks held, verify passes, and a file comes back as it was at each backup"
