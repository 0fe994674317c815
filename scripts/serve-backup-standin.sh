#!/bin/bash
# Development stand-in for `qbackup serve-backup` with the same command line
# (`--json serve-backup --repo R DOMAIN --backup ID [--disk T]... --socket S`)
# and the same announcement line: it restores the backup's disks to raw files
# beside the socket (kept for a restart), then becomes qemu-storage-daemon
# serving them read-only, one export per disk named by its target, on S.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo='' domain='' backup='' socket='' disks=()
while [ $# -gt 0 ]; do
  case "$1" in
    --json|serve-backup) shift ;;
    --repo) repo=$2; shift 2 ;;
    --backup) backup=$2; shift 2 ;;
    --disk) disks+=("$2"); shift 2 ;;
    --socket) socket=$2; shift 2 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) domain=$1; shift ;;
  esac
done
[ -n "$repo" ] && [ -n "$domain" ] && [ -n "$backup" ] && [ -n "$socket" ] && [ ${#disks[@]} -gt 0 ] || { echo "usage: serve-backup --repo R DOMAIN --backup ID --disk T... --socket S" >&2; exit 2; }
work="$(dirname "$socket")/standin-$backup"
mkdir -p -m 0700 "$work"
missing=()
for t in "${disks[@]}"; do [ -f "$work/$t.raw" ] || missing+=(--disk "$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  "$here/../bin/qbackup" --state-dir "$work/state" restore "$domain" --repo "$repo" --backup "$backup" "${missing[@]}" --to "$work" --format raw >&2
fi
args=() exports='' i=0
for t in "${disks[@]}"; do
  args+=(--blockdev "{\"driver\":\"file\",\"node-name\":\"f$i\",\"filename\":\"$work/$t.raw\",\"read-only\":true}")
  args+=(--blockdev "{\"driver\":\"raw\",\"node-name\":\"n$i\",\"file\":\"f$i\",\"read-only\":true}")
  args+=(--export "type=nbd,id=e$i,node-name=n$i,name=$t,writable=off")
  size=$(stat -c %s "$work/$t.raw")
  exports+="${exports:+,}{\"name\":\"$t\",\"size\":$size,\"uri\":\"nbd+unix:///$t?socket=$socket\"}"
  i=$((i + 1))
done
rm -f "$socket"
echo "{\"event\":\"serving\",\"socket\":\"$socket\",\"exports\":[$exports]}"
exec qemu-storage-daemon --nbd-server "addr.type=unix,addr.path=$socket,max-connections=0" "${args[@]}"
