// Unit tests for src/model/definition-xml.ts: parsing the interpreted subset of libvirt
// <domain> documents and formatting them back without losing anything else.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import type { ErrorCode } from '../../src/errors.js';
import { DEFAULT_MEMORY_KIB, formatDomainXml, parseDomainXml } from '../../src/model/definition-xml.js';
import type { DomainDefinition } from '../../src/model/definition.js';

function withoutSource(def: DomainDefinition): Omit<DomainDefinition, 'sourceXml'> {
  const { sourceXml: _ignored, ...rest } = def;
  return rest;
}

function assertCode(fn: () => unknown, code: ErrorCode, pattern?: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(isQbackupError(err, code), `expected QbackupError ${code}, got ${String(err)}`);
    if (pattern !== undefined) assert.match(err.message, pattern);
    return true;
  });
}

const UUID = 'c7a5fdbd-edaf-9455-926a-d65c16db1809';

const MINIMAL = `<domain type='kvm'><name>vm1</name></domain>`;

const FULL = `<?xml version="1.0"?>
<!-- a full document -->
<domain type='kvm' id='3' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web01</name>
  <uuid>C7A5FDBD-EDAF-9455-926A-D65C16DB1809</uuid>
  <description>Front end &amp; cache</description>
  <metadata>
    <app1:foo xmlns:app1="http://app1.org/app1/" bar="baz">fizz<app1:inner/></app1:foo>
  </metadata>
  <memory unit='GiB'>2</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static' current='1'>4</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <!-- system disk -->
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>
      <source file='/var/lib/images/web01.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <serial>WEB01-SYS</serial>
      <boot order='1'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/iso/install.iso'/>
      <target dev='sdc' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/images/web01-data.img'/>
      <target dev='sda'/>
      <readonly/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/vg0/web01-logs'/>
      <target dev='hdb' bus='ide'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:6b:3c:58'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-trace'/>
  </qemu:commandline>
</domain>
`;

describe('parseDomainXml', () => {
  it('parses a minimal document with defaults', () => {
    const def = parseDomainXml(MINIMAL);
    assert.equal(def.name, 'vm1');
    assert.match(def.uuid, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    assert.equal(def.memoryKiB, DEFAULT_MEMORY_KIB);
    assert.equal(def.memoryKiB, 131072);
    assert.equal(def.vcpus, 1);
    assert.deepEqual(def.disks, []);
    assert.equal(def.sourceXml, MINIMAL);
  });

  it('generates a different UUID for each parse of a document without one', () => {
    assert.notEqual(parseDomainXml(MINIMAL).uuid, parseDomainXml(MINIMAL).uuid);
  });

  it('parses the interpreted fields of a full document', () => {
    const def = parseDomainXml(FULL);
    assert.equal(def.name, 'web01');
    assert.equal(def.uuid, UUID);
    assert.equal(def.memoryKiB, 2 * 1024 * 1024);
    assert.equal(def.vcpus, 4);
    assert.deepEqual(def.disks, [
      {
        target: 'vda',
        source: '/var/lib/images/web01.qcow2',
        format: 'qcow2',
        bus: 'virtio',
        serial: 'WEB01-SYS',
        readonly: false,
      },
      {
        target: 'sda',
        source: '/var/lib/images/web01-data.img',
        format: 'raw',
        bus: 'scsi',
        readonly: true,
      },
    ]);
  });

  it('reads a disk without <driver type> as raw, as libvirt does, and derives the bus from the target prefix', () => {
    const def = parseDomainXml(`<domain><name>d</name><devices>
      <disk type='file' device='disk'><source file='/a.qcow2'/><target dev='vdb'/></disk>
      <disk><driver name='qemu'/><source file='/b.qcow2'/><target dev='sdb'/></disk>
    </devices></domain>`);
    assert.deepEqual(
      def.disks.map((d) => [d.target, d.format, d.bus]),
      [['vdb', 'raw', 'virtio'], ['sdb', 'raw', 'scsi']],
    );
    // Formatting writes the format down, so the stored definition never depends on the default.
    const out = formatDomainXml(def);
    assert.equal(out.match(/type="raw"/g)?.length, 2, out);
    assert.deepEqual(parseDomainXml(out).disks.map((d) => d.format), ['raw', 'raw']);
  });

  it('notes <encryption> and a declared <backingStore> chain, and ignores an empty <backingStore/>', () => {
    const def = parseDomainXml(`<domain><name>d</name><devices>
      <disk><driver type='qcow2'/><source file='/a.qcow2'/><target dev='sda'/>
        <encryption format='luks'><secret type='passphrase' uuid='0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f'/></encryption></disk>
      <disk><driver type='qcow2'/><source file='/b.qcow2'><encryption format='luks'/></source><target dev='sdb'/></disk>
      <disk><driver type='qcow2'/><source file='/c.qcow2'/><target dev='sdc'/>
        <backingStore type='file'><format type='raw'/><source file='/base.raw'/><backingStore/></backingStore></disk>
      <disk><driver type='qcow2'/><source file='/d.qcow2'/><target dev='sdd'/><backingStore/></disk>
    </devices></domain>`);
    assert.deepEqual(
      def.disks.map((d) => [d.target, d.encryption, d.backingStore]),
      [['sda', 'luks', undefined], ['sdb', 'luks', undefined], ['sdc', undefined, '/base.raw'], ['sdd', undefined, undefined]],
    );
  });

  it('accepts a UUID without hyphens and canonicalizes it', () => {
    const def = parseDomainXml(`<domain><name>d</name><uuid>C7A5FDBDEDAF9455926AD65C16DB1809</uuid></domain>`);
    assert.equal(def.uuid, UUID);
  });

  describe('memory units', () => {
    const cases: Array<[string | undefined, string, number]> = [
      [undefined, '524288', 524288],
      ['b', '1048576', 1024],
      ['bytes', '1048577', 1025], // rounded up to a whole KiB
      ['k', '4096', 4096],
      ['KiB', '4096', 4096],
      ['KB', '1024000', 1000000],
      ['M', '512', 524288],
      ['MiB', '512', 524288],
      ['MB', '1000', 976563],
      ['G', '1', 1048576],
      ['GiB', '2', 2097152],
      ['GB', '1', 976563],
      ['T', '1', 1073741824],
      ['TiB', '1', 1073741824],
      ['gib', '1', 1048576],
    ];
    for (const [unit, value, kib] of cases) {
      it(`converts ${value} ${unit ?? '(no unit)'} to ${kib} KiB`, () => {
        const unitAttr = unit === undefined ? '' : ` unit='${unit}'`;
        const def = parseDomainXml(`<domain><name>m</name><memory${unitAttr}>${value}</memory></domain>`);
        assert.equal(def.memoryKiB, kib);
      });
    }

    it('rejects an unknown unit', () => {
      assertCode(() => parseDomainXml(`<domain><name>m</name><memory unit='furlongs'>1</memory></domain>`), 'INVALID_XML', /unit/);
    });

    it('rejects a non-numeric, negative or zero size', () => {
      for (const v of ['lots', '-1', '0', '1.5', '']) {
        assertCode(() => parseDomainXml(`<domain><name>m</name><memory>${v}</memory></domain>`), 'INVALID_XML', /memory/);
      }
    });
  });

  describe('size and depth limits', () => {
    it('refuses a document over 1 MiB with one sentence, before parsing it', () => {
      const big = `<domain><name>d</name><description>${'x'.repeat(1 << 20)}</description></domain>`;
      assertCode(() => parseDomainXml(big), 'INVALID_XML', /^Domain XML is larger than 1 MiB \(\d+ bytes\)\.$/);
    });

    it('refuses a document nested deeper than 64 levels (5000 levels: no RangeError)', () => {
      const deep = `<domain><name>d</name>${'<a>'.repeat(5000)}${'</a>'.repeat(5000)}</domain>`;
      assertCode(() => parseDomainXml(deep), 'INVALID_XML', /^Domain XML is nested deeper than 64 elements\.$/);
      const ok = `<domain><name>d</name>${'<a x="&gt;">'.repeat(60)}<!-- <b><b><b> --><![CDATA[<c><c>]]><e/>${'</a>'.repeat(60)}</domain>`;
      assert.equal(parseDomainXml(ok).name, 'd');
    });
  });

  describe('malformed documents', () => {
    const bad: Array<[string, string]> = [
      ['an unclosed tag', '<domain><name>vm1</name>'],
      ['mismatched tags', '<domain><name>vm1</domain>'],
      ['garbage', 'this is not xml'],
      ['an empty string', ''],
      ['two roots', '<domain/><domain/>'],
      ['trailing garbage', '<domain><name>a</name></domain> junk'],
      ['an undefined entity', '<domain><name>&nope;</name></domain>'],
    ];
    for (const [what, xml] of bad) {
      it(`rejects ${what}`, () => {
        assertCode(() => parseDomainXml(xml), 'INVALID_XML', /^Domain XML is not well-formed XML: .+\.$/);
      });
    }

    it('rejects a document with the wrong root', () => {
      assertCode(
        () => parseDomainXml('<domaincheckpoint><name>x</name></domaincheckpoint>'),
        'INVALID_XML',
        /not a <domain> document.*<domaincheckpoint>/,
      );
    });
  });

  it('rejects a missing or empty name', () => {
    assertCode(() => parseDomainXml('<domain><uuid>' + UUID + '</uuid></domain>'), 'INVALID_XML', /<name>/);
    assertCode(() => parseDomainXml('<domain><name>  </name></domain>'), 'INVALID_XML', /<name>/);
  });

  it('rejects a name containing a slash', () => {
    assertCode(() => parseDomainXml('<domain><name>../etc</name></domain>'), 'INVALID_NAME');
  });

  it('rejects a malformed UUID', () => {
    for (const u of ['not-a-uuid', 'c7a5fdbd-edaf-9455-926a-d65c16db180', 'g7a5fdbd-edaf-9455-926a-d65c16db1809', '']) {
      assertCode(() => parseDomainXml(`<domain><name>u</name><uuid>${u}</uuid></domain>`), 'INVALID_XML', /Domain u .*uuid/);
    }
  });

  it('rejects an invalid vcpu count', () => {
    assertCode(() => parseDomainXml(`<domain><name>v</name><vcpu>0</vcpu></domain>`), 'INVALID_XML', /vcpu/);
    assertCode(() => parseDomainXml(`<domain><name>v</name><vcpu>two</vcpu></domain>`), 'INVALID_XML', /vcpu/);
  });

  const disk = (inner: string, attrs = `type='file' device='disk'`): string =>
    `<domain><name>d</name><devices><disk ${attrs}>${inner}</disk></devices></domain>`;

  it('rejects a relative or missing source path', () => {
    assertCode(() => parseDomainXml(disk(`<source file='images/a.qcow2'/><target dev='vda'/>`)), 'INVALID_XML', /vda.*relative.*absolute/);
    assertCode(() => parseDomainXml(disk(`<target dev='vda'/>`)), 'INVALID_XML', /vda.*source/);
  });

  it('rejects a disk without a target dev', () => {
    assertCode(() => parseDomainXml(disk(`<source file='/a'/><target bus='virtio'/>`)), 'INVALID_XML', /target/);
    assertCode(() => parseDomainXml(disk(`<source file='/a'/>`)), 'INVALID_XML', /target/);
  });

  it('rejects a duplicate target, including one used by an uninterpreted disk', () => {
    const dup = `<domain><name>d</name><devices>
      <disk type='file' device='disk'><source file='/a'/><target dev='vda'/></disk>
      <disk type='file' device='disk'><source file='/b'/><target dev='vda'/></disk>
    </devices></domain>`;
    assertCode(() => parseDomainXml(dup), 'INVALID_XML', /more than one disk with target vda/);
    const dupCdrom = `<domain><name>d</name><devices>
      <disk type='file' device='disk'><source file='/a'/><target dev='sdc'/></disk>
      <disk type='file' device='cdrom'><target dev='sdc' bus='sata'/></disk>
    </devices></domain>`;
    assertCode(() => parseDomainXml(dupCdrom), 'INVALID_XML', /sdc/);
  });

  it('rejects an unknown bus, or a bus that cannot be derived', () => {
    assertCode(() => parseDomainXml(disk(`<source file='/a'/><target dev='hda' bus='ide'/>`)), 'INVALID_XML', /bus 'ide'/);
    assertCode(() => parseDomainXml(disk(`<source file='/a'/><target dev='hda'/>`)), 'INVALID_XML', /no bus/);
  });

  it('rejects an unknown disk format', () => {
    assertCode(() => parseDomainXml(disk(`<driver name='qemu' type='vmdk'/><source file='/a'/><target dev='vda'/>`)), 'INVALID_XML', /format 'vmdk'/);
  });

  it('does not interpret cdrom, block or network disks', () => {
    const def = parseDomainXml(`<domain><name>d</name><devices>
      <disk type='file' device='cdrom'><driver type='iso'/><target dev='hdc' bus='ide'/></disk>
      <disk type='block' device='disk'><source dev='dev/sdz'/><target dev='hda' bus='ide'/></disk>
      <disk type='network' device='disk'><source protocol='nbd' name='x'/><target dev='vdz' bus='virtio'/></disk>
    </devices></domain>`);
    assert.deepEqual(def.disks, []);
  });
});

describe('formatDomainXml', () => {
  it('round-trips a full document, keeping every unknown element', () => {
    const def = parseDomainXml(FULL);
    const out = formatDomainXml(def);
    const again = parseDomainXml(out);
    assert.deepEqual(withoutSource(again), withoutSource(def));
    for (const fragment of [
      '<os>',
      '<type arch="x86_64" machine="pc">hvm</type>',
      '<boot dev="hd"/>',
      '<features>',
      '<acpi/>',
      '<description>Front end &amp; cache</description>',
      '<app1:foo xmlns:app1="http://app1.org/app1/" bar="baz">fizz<app1:inner/></app1:foo>',
      '<currentMemory unit="KiB">1048576</currentMemory>',
      '<vcpu placement="static" current="1">4</vcpu>',
      '<emulator>/usr/bin/qemu-system-x86_64</emulator>',
      '<!-- system disk -->',
      '<driver name="qemu" type="qcow2" cache="none" discard="unmap"/>',
      '<boot order="1"/>',
      '<address type="pci" domain="0x0000" bus="0x00" slot="0x04" function="0x0"/>',
      '<disk type="file" device="cdrom">',
      '<target dev="sdc" bus="sata"/>',
      '<source dev="/dev/vg0/web01-logs"/>',
      '<interface type="network">',
      '<mac address="52:54:00:6b:3c:58"/>',
      '<qemu:commandline>',
      '<qemu:arg value="-trace"/>',
    ]) {
      assert.ok(out.includes(fragment), `output lacks ${fragment}:\n${out}`);
    }
    // Memory is written in KiB; the root keeps its attributes.
    assert.ok(out.includes('<memory unit="KiB">2097152</memory>'), out);
    assert.ok(out.startsWith('<domain type="kvm" id="3" xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0">\n'), out);
    // A second round trip is stable.
    assert.equal(formatDomainXml(again), out);
  });

  it('indents with two spaces', () => {
    const out = formatDomainXml(parseDomainXml(`<domain><name>a</name><uuid>${UUID}</uuid><devices><disk type='file' device='disk'><source file='/x'/><target dev='vda'/></disk></devices></domain>`));
    assert.equal(
      out,
      [
        '<domain>',
        '  <name>a</name>',
        `  <uuid>${UUID}</uuid>`,
        '  <memory unit="KiB">131072</memory>',
        '  <vcpu>1</vcpu>',
        '  <devices>',
        '    <disk type="file" device="disk">',
        '      <driver name="qemu" type="raw"/>',
        '      <source file="/x"/>',
        '      <target dev="vda"/>',
        '    </disk>',
        '  </devices>',
        '</domain>',
        '',
      ].join('\n'),
    );
  });

  it('writes a generated UUID so that it stays stable', () => {
    const def = parseDomainXml(MINIMAL);
    const again = parseDomainXml(formatDomainXml(def));
    assert.equal(again.uuid, def.uuid);
  });

  it('updates name, uuid, memory and vcpu', () => {
    const def = parseDomainXml(FULL);
    const uuid = '00000000-1111-2222-3333-444444444444';
    const out = formatDomainXml({ ...def, name: 'web02', uuid, memoryKiB: 4096, vcpus: 8 });
    const again = parseDomainXml(out);
    assert.equal(again.name, 'web02');
    assert.equal(again.uuid, uuid);
    assert.equal(again.memoryKiB, 4096);
    assert.equal(again.vcpus, 8);
    assert.ok(out.includes('<memory unit="KiB">4096</memory>'));
    assert.ok(out.includes('<vcpu placement="static" current="1">8</vcpu>'));
  });

  it('adds a disk and removes another while keeping the other content', () => {
    const def = parseDomainXml(FULL);
    const vda = def.disks[0];
    assert.ok(vda !== undefined);
    const out = formatDomainXml({
      ...def,
      disks: [vda, { target: 'vdb', source: '/var/lib/images/new.qcow2', format: 'qcow2', bus: 'virtio', readonly: false, serial: 'NEW' }],
    });
    const again = parseDomainXml(out);
    assert.deepEqual(again.disks.map((d) => d.target), ['vda', 'vdb']);
    assert.deepEqual(again.disks[1], {
      target: 'vdb',
      source: '/var/lib/images/new.qcow2',
      format: 'qcow2',
      bus: 'virtio',
      serial: 'NEW',
      readonly: false,
    });
    assert.ok(!out.includes('web01-data.img'), 'removed disk sda is gone');
    // The kept disk keeps its unknown children and attributes, the others stay.
    for (const fragment of ['<boot order="1"/>', 'cache="none"', '<address type="pci"', '<disk type="file" device="cdrom">', '<disk type="block" device="disk">', '<interface type="network">', '<os>', '<app1:foo']) {
      assert.ok(out.includes(fragment), `output lacks ${fragment}`);
    }
    // New disks are grouped right after the previous interpreted disk.
    assert.ok(out.indexOf('new.qcow2') > out.indexOf('web01.qcow2'));
    assert.ok(out.indexOf('new.qcow2') < out.indexOf('install.iso'));
    assert.ok(out.includes(
      [
        '    <disk type="file" device="disk">',
        '      <driver name="qemu" type="qcow2"/>',
        '      <source file="/var/lib/images/new.qcow2"/>',
        '      <target dev="vdb" bus="virtio"/>',
        '      <serial>NEW</serial>',
        '    </disk>',
      ].join('\n'),
    ), out);
  });

  it('updates the interpreted fields of an existing disk in place', () => {
    const def = parseDomainXml(FULL);
    const out = formatDomainXml({
      ...def,
      disks: [
        { target: 'vda', source: '/new/path.raw', format: 'raw', bus: 'scsi', readonly: true },
        { target: 'sda', source: '/var/lib/images/web01-data.img', format: 'qcow2', bus: 'scsi', readonly: false, serial: 'S1' },
      ],
    });
    const again = parseDomainXml(out);
    assert.deepEqual(withoutSource(again).disks, [
      { target: 'vda', source: '/new/path.raw', format: 'raw', bus: 'scsi', readonly: true },
      { target: 'sda', source: '/var/lib/images/web01-data.img', format: 'qcow2', bus: 'scsi', readonly: false, serial: 'S1' },
    ]);
    assert.ok(out.includes('<driver name="qemu" type="raw" cache="none" discard="unmap"/>'), out);
    assert.ok(out.includes('<boot order="1"/>'));
    assert.ok(!out.includes('WEB01-SYS'));
  });

  it('reorders interpreted disks to follow def.disks', () => {
    const def = parseDomainXml(FULL);
    const [vda, sda] = def.disks;
    assert.ok(vda !== undefined && sda !== undefined);
    const again = parseDomainXml(formatDomainXml({ ...def, disks: [sda, vda] }));
    assert.deepEqual(again.disks.map((d) => d.target), ['sda', 'vda']);
  });

  it('removes all interpreted disks and leaves the rest of <devices>', () => {
    const def = parseDomainXml(FULL);
    const out = formatDomainXml({ ...def, disks: [] });
    const again = parseDomainXml(out);
    assert.deepEqual(again.disks, []);
    assert.ok(out.includes('install.iso') && out.includes('web01-logs') && out.includes('<interface'));
  });

  it('creates <devices> when missing', () => {
    const def = parseDomainXml(MINIMAL);
    const out = formatDomainXml({ ...def, disks: [{ target: 'sda', source: '/img/a.qcow2', format: 'qcow2', bus: 'scsi', readonly: false }] });
    assert.match(out, /<devices>\n {4}<disk type="file" device="disk">/);
    assert.equal(parseDomainXml(out).disks.length, 1);
  });

  it('builds a fresh document when sourceXml is empty', () => {
    const def: DomainDefinition = {
      name: 'fresh',
      uuid: UUID,
      memoryKiB: 262144,
      vcpus: 2,
      disks: [{ target: 'vda', source: '/img/fresh.qcow2', format: 'qcow2', bus: 'virtio', readonly: false }],
      sourceXml: '',
    };
    const out = formatDomainXml(def);
    assert.ok(out.startsWith('<domain type="kvm">\n  <name>fresh</name>\n'), out);
    assert.deepEqual(withoutSource(parseDomainXml(out)), withoutSource(def));
  });

  it('refuses a disk whose target is used by an unmanaged device', () => {
    const def = parseDomainXml(FULL);
    assertCode(
      () => formatDomainXml({ ...def, disks: [...def.disks, { target: 'sdc', source: '/x', format: 'raw', bus: 'scsi', readonly: false }] }),
      'DISK_EXISTS',
      /sdc/,
    );
  });

  it('refuses an invalid definition', () => {
    const def = parseDomainXml(MINIMAL);
    assertCode(() => formatDomainXml({ ...def, uuid: 'nope' }), 'INVALID_ARGUMENT');
    assertCode(() => formatDomainXml({ ...def, memoryKiB: 0 }), 'INVALID_ARGUMENT');
    assertCode(() => formatDomainXml({ ...def, vcpus: 1.5 }), 'INVALID_ARGUMENT');
    const d = { target: 'vda', source: 'rel/a', format: 'qcow2', bus: 'virtio', readonly: false } as const;
    assertCode(() => formatDomainXml({ ...def, disks: [d] }), 'INVALID_ARGUMENT', /relative/);
    const abs = { ...d, source: '/a' };
    assertCode(() => formatDomainXml({ ...def, disks: [abs, abs] }), 'INVALID_ARGUMENT', /more than once/);
  });

  it('escapes special characters in text and attributes', () => {
    const def = parseDomainXml(MINIMAL);
    const out = formatDomainXml({
      ...def,
      name: 'a&b<c',
      disks: [{ target: 'vda', source: '/img/"q"&<x>.qcow2', format: 'qcow2', bus: 'virtio', readonly: false, serial: '<s&>' }],
    });
    const again = parseDomainXml(out);
    assert.equal(again.name, 'a&b<c');
    assert.equal(again.disks[0]?.source, '/img/"q"&<x>.qcow2');
    assert.equal(again.disks[0]?.serial, '<s&>');
  });
});

describe('domain XML: direct kernel boot and the guest agent channel', () => {
  const GUEST = `<domain type='kvm'>
  <name>g1</name>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>/boot/vmlinuz</kernel>
    <initrd>/boot/initrd.gz</initrd>
    <cmdline>console=ttyS0 qb.workload=writer</cmdline>
    <boot dev='hd'/>
  </os>
  <devices>
    <channel type='unix'>
      <source mode='bind' path='/run/g1.agent'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <channel type='pty'><target type='virtio' name='org.example.other'/></channel>
  </devices>
</domain>`;

  it('reads <os><kernel>/<initrd>/<cmdline> and the agent channel', () => {
    const def = parseDomainXml(GUEST);
    assert.deepEqual(def.kernelBoot, { kernel: '/boot/vmlinuz', initrd: '/boot/initrd.gz', cmdline: 'console=ttyS0 qb.workload=writer' });
    assert.deepEqual(def.guestAgent, { path: '/run/g1.agent' });
  });

  it('has neither without the elements, and no path when <source> names none', () => {
    const def = parseDomainXml(MINIMAL);
    assert.equal(def.kernelBoot, undefined);
    assert.equal(def.guestAgent, undefined);
    const noPath = parseDomainXml(`<domain><name>g</name><devices><channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>`);
    assert.deepEqual(noPath.guestAgent, {});
  });

  it('keeps other <os> children, the other channel and the <address> through a round trip', () => {
    const def = parseDomainXml(GUEST);
    const out = formatDomainXml(def);
    assert.deepEqual(withoutSource(parseDomainXml(out)), withoutSource(def));
    assert.match(out, /<boot dev="hd"\/>/);
    assert.match(out, /org\.example\.other/);
    assert.match(out, /<address type="virtio-serial"/);
  });

  it('changes and removes them', () => {
    const def = parseDomainXml(GUEST);
    const changed = parseDomainXml(formatDomainXml({ ...def, kernelBoot: { kernel: '/k2' }, guestAgent: {} }));
    assert.deepEqual(changed.kernelBoot, { kernel: '/k2' });
    assert.deepEqual(changed.guestAgent, {});
    const { kernelBoot: _k, guestAgent: _g, ...bare } = def;
    const removed = formatDomainXml(bare);
    assert.deepEqual(withoutSource(parseDomainXml(removed)), withoutSource(bare));
    assert.match(removed, /org\.example\.other/);
  });

  it('writes them into a fresh document', () => {
    const def = { ...parseDomainXml(MINIMAL), sourceXml: '', kernelBoot: { kernel: '/k', cmdline: 'a b' }, guestAgent: { path: '/s' } };
    assert.deepEqual(withoutSource(parseDomainXml(formatDomainXml(def))), withoutSource(def));
  });

  it('refuses relative paths and unsupported channel shapes', () => {
    assertCode(() => parseDomainXml(GUEST.replace('/boot/vmlinuz', 'vmlinuz')), 'INVALID_XML', /relative kernel/);
    assertCode(() => parseDomainXml(GUEST.replace("mode='bind'", "mode='connect'")), 'NOT_SUPPORTED', /connect/);
    assertCode(() => parseDomainXml(GUEST.replace("<channel type='unix'>", "<channel type='pty'>")), 'NOT_SUPPORTED', /pty/);
  });
});
