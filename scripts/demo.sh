#!/usr/bin/env bash
# The main job, end to end with the real QEMU: define a VM, start it, write to
# its disk as a guest would, hot-plug and unplug a second disk, shut it down,
# and check the written bytes are in the image.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/qbackup-demo.XXXXXX)
export QBACKUP_STATE_DIR="$work/state"
q() { echo "+ qbackup $*" >&2; ./bin/qbackup "$@"; }
cleanup() {
  ./bin/qbackup destroy demo >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

qemu-img create -q -f qcow2 "$work/system.qcow2" 64M
qemu-img create -q -f qcow2 "$work/data.qcow2" 32M
cat > "$work/demo.xml" <<XML
<domain type='kvm'>
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
q list
q qemu-monitor-command demo --hmp 'qemu-io -d sda "write -P 0xab 0 1M"'
q checkpoint-create-as demo --name c1 --description 'before the data disk'
q qemu-monitor-command demo --hmp 'qemu-io -d sda "write -P 0xcd 2M 128k"'
q attach-disk demo "$work/data.qcow2" sdb
q checkpoint-coverage demo c1
q checkpoint-create-as demo --name c2
q checkpoint-dumpxml demo c1 --size --no-domain
q checkpoint-list demo --tree
q domblklist demo --details
q qemu-monitor-command demo --hmp 'qemu-io -d sdb "write -P 0x5a 4M 256k"'
q detach-disk demo sdb
q shutdown demo
q checkpoint-delete demo c1
q checkpoint-info demo c2
q list --all

echo "+ checking the guest's writes reached the images" >&2
qemu-io -r -f qcow2 -c 'read -P 0xab 0 1M' "$work/system.qcow2" | grep -q '^read 1048576/1048576' 
qemu-io -r -f qcow2 -c 'read -P 0x5a 4M 256k' "$work/data.qcow2" | grep -q '^read 262144/262144'
if qemu-io -r -f qcow2 -c 'read -P 0xab 0 1M' "$work/system.qcow2" | grep -q 'Pattern verification failed'; then
  echo "demo FAILED: system disk does not hold the written pattern" >&2; exit 1
fi
if qemu-io -r -f qcow2 -c 'read -P 0x5a 4M 256k' "$work/data.qcow2" | grep -q 'Pattern verification failed'; then
  echo "demo FAILED: data disk does not hold the written pattern" >&2; exit 1
fi
echo "demo OK: both disks hold exactly what the guest wrote"
