// restore --define: the new domain's definition from a backup's saved XML
// (new name, no UUID, no MACs, disks on the restored images, disks not
// restored dropped, CD-ROMs kept).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { definitionForRestore } from '../../src/repository/define-xml.js';

const saved = `<domain type='kvm'>
  <name>web1</name>
  <uuid>6f1c2a8e-1b2c-4d5e-8f90-123456789abc</uuid>
  <memory unit='KiB'>1048576</memory>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg/web1'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web1-data.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
    </interface>
  </devices>
</domain>`;

describe('restore --define', () => {
  it('renames, drops the UUID and MACs, and points the restored disks at their images', () => {
    const xml = definitionForRestore(saved, 'web1-restored', [{ target: 'vda', file: '/restore/vda.qcow2', format: 'qcow2' }]);
    assert.match(xml, /<name>web1-restored<\/name>/);
    assert.doesNotMatch(xml, /<uuid>/);
    assert.doesNotMatch(xml, /52:54:00:12:34:56/);
    assert.match(xml, /<disk type="file" device="disk">\s*<source file="\/restore\/vda.qcow2"\/>\s*<driver name="qemu" type="qcow2" cache="none"\/>/);
    assert.doesNotMatch(xml, /\/dev\/vg\/web1|backingStore/);
    // vdb was not restored: the new domain must not open the original's image.
    assert.doesNotMatch(xml, /web1-data|dev="vdb"/);
    assert.match(xml, /install\.iso/);
  });
});

describe('instant restore through libvirt', () => {
  it('declares each overlay\'s backing as the NBD export of its target and drops the disk\'s encryption', () => {
    const encrypted = saved.replace("<source file='/var/lib/libvirt/images/web1-data.qcow2'/>", "<source file='/var/lib/libvirt/images/web1-data.qcow2'/><encryption format='luks'><secret type='passphrase' uuid='0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f'/></encryption>");
    const xml = definitionForRestore(encrypted, 'web1-now', [{ target: 'vdb', file: '/r/vdb.qcow2', format: 'qcow2', nbdBacking: { socket: '/tmp/x/backup.sock', exportName: 'vdb' } }]);
    assert.match(xml, /<source file="\/r\/vdb.qcow2"\/>\s*<backingStore type="network">\s*<format type="raw"\/>\s*<source protocol="nbd" name="vdb">\s*<host transport="unix" socket="\/tmp\/x\/backup.sock"\/>/);
    assert.doesNotMatch(xml, /encryption|luks/);
    assert.doesNotMatch(xml, /dev="vda"/);
  });
});
