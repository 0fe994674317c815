// Unit tests for src/libvirt/checkpoint.ts, with documents modelled on libvirt's
// qemudomaincheckpointxml2xml test data and docs/formatcheckpoint.rst.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import type { ErrorCode } from '../../src/errors.js';
import { formatCheckpointXml, parseCheckpointXml } from '../../src/libvirt/checkpoint.js';
import type { CheckpointSpec as CheckpointXml } from '../../src/checkpoint/spec.js';
import { parseDomainXml } from '../../src/model/definition-xml.js';

function assertCode(fn: () => unknown, code: ErrorCode, pattern?: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(isQbackupError(err, code), `expected QbackupError ${code}, got ${String(err)}`);
    if (pattern !== undefined) assert.match(err.message, pattern);
    return true;
  });
}

/**
 * Round trip: parse → format → parse gives the same value (the embedded domain
 * only up to re-indentation), and formatting is stable.
 */
function roundTrip(xml: string): { cp: CheckpointXml; out: string } {
  const cp = parseCheckpointXml(xml);
  const out = formatCheckpointXml(cp, { includeSize: true });
  const { domainXml: before, ...cpRest } = cp;
  const { domainXml: after, ...againRest } = parseCheckpointXml(out);
  assert.deepEqual(againRest, cpRest);
  assert.equal(after === undefined, before === undefined);
  if (before !== undefined && after !== undefined) {
    assert.equal(after.replace(/>\s+</g, '><'), before.replace(/>\s+</g, '><'));
  }
  assert.equal(formatCheckpointXml(parseCheckpointXml(out), { includeSize: true }), out);
  return { cp, out };
}

const SAMPLE_IN = `<domaincheckpoint>
  <description>Completion of updates after OS install</description>
  <disks>
    <disk name='vda' checkpoint='bitmap'/>
    <disk name='vdb' checkpoint='no'/>
  </disks>
</domaincheckpoint>
`;

// libvirt writes parent before creationTime (see the xml2xmlout data).
const SAMPLE_OUT = `<domaincheckpoint>
  <name>1525889631</name>
  <description>Completion of updates after OS install</description>
  <parent>
    <name>1525111885</name>
  </parent>
  <creationTime>1525889631</creationTime>
  <disks>
    <disk name='vda' checkpoint='bitmap' bitmap='1525889631'/>
    <disk name='vdb' checkpoint='no'/>
  </disks>
</domaincheckpoint>
`;

const SIZE_OUT = `<domaincheckpoint>
  <name>c2</name>
  <description>something fun</description>
  <parent>
    <name>1525111885</name>
  </parent>
  <creationTime>1553648510</creationTime>
  <disks>
    <disk name='vda' checkpoint='bitmap' bitmap='c2' size='1048576'/>
  </disks>
</domaincheckpoint>
`;

// Modelled on libvirt's redefine.xml: creationTime, disks and the full domain.
const REDEFINE = `<domaincheckpoint>
  <name>c1</name>
  <parent><name>c0</name></parent>
  <creationTime>1553647812</creationTime>
  <disks>
    <disk name='hda' checkpoint='no'/>
    <disk name='vda' checkpoint='bitmap' bitmap='c1'/>
    <disk name='vdb' checkpoint='bitmap' bitmap='c1'/>
  </disks>
<domain type='qemu'>
<name>QEMUGuest1</name>
<uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>
<memory unit='KiB'>219136</memory>
<currentMemory unit='KiB'>219136</currentMemory>
<vcpu placement='static'>1</vcpu>
<os><type arch='i686' machine='pc'>hvm</type><boot dev='hd'/></os>
<clock offset='utc'/>
<devices>
  <emulator>/usr/bin/qemu-system-i386</emulator>
  <disk type='block' device='disk'>
    <driver name='qemu' type='raw'/>
    <source dev='/dev/HostVG/QEMUGuest1'/>
    <target dev='hda' bus='ide'/>
    <address type='drive' controller='0' bus='0' target='0' unit='0'/>
  </disk>
  <disk type='file' device='disk'>
    <driver name='qemu' type='qcow2'/>
    <source file='/tmp/data.img'/>
    <target dev='vda' bus='virtio'/>
  </disk>
  <disk type='file' device='disk'>
    <driver name='qemu' type='qcow2'/>
    <source file='/tmp/logs.img'/>
    <target dev='vdb' bus='virtio'/>
  </disk>
  <memballoon model='none'/>
</devices>
</domain>
</domaincheckpoint>
`;

describe('parseCheckpointXml', () => {
  it('parses an empty document', () => {
    assert.deepEqual(parseCheckpointXml('<domaincheckpoint/>'), {});
  });

  it('parses libvirt sample input (no name, explicit disks)', () => {
    assert.deepEqual(parseCheckpointXml(SAMPLE_IN), {
      description: 'Completion of updates after OS install',
      disks: [
        { name: 'vda', checkpoint: 'bitmap' },
        { name: 'vdb', checkpoint: 'no' },
      ],
    });
  });

  it('parses the full element set of formatcheckpoint.rst', () => {
    assert.deepEqual(parseCheckpointXml(SAMPLE_OUT), {
      name: '1525889631',
      description: 'Completion of updates after OS install',
      parent: '1525111885',
      creationTime: 1525889631,
      disks: [
        { name: 'vda', checkpoint: 'bitmap', bitmap: '1525889631' },
        { name: 'vdb', checkpoint: 'no' },
      ],
    });
  });

  it('defaults a disk without checkpoint= to bitmap', () => {
    const cp = parseCheckpointXml(`<domaincheckpoint><disks><!-- default --><disk name='vda'/></disks></domaincheckpoint>`);
    assert.deepEqual(cp.disks, [{ name: 'vda', checkpoint: 'bitmap' }]);
  });

  it('distinguishes an empty <disks/> from an absent one', () => {
    assert.deepEqual(parseCheckpointXml('<domaincheckpoint><disks/></domaincheckpoint>').disks, []);
    assert.equal(parseCheckpointXml('<domaincheckpoint><name>a</name></domaincheckpoint>').disks, undefined);
  });

  it('parses the size attribute', () => {
    assert.deepEqual(parseCheckpointXml(SIZE_OUT).disks, [{ name: 'vda', checkpoint: 'bitmap', bitmap: 'c2', size: 1048576 }]);
  });

  it('keeps the <domain> child verbatim and usable by parseDomainXml', () => {
    const cp = parseCheckpointXml(REDEFINE);
    assert.ok(cp.domainXml !== undefined);
    assert.ok(cp.domainXml.startsWith(`<domain type="qemu">\n<name>QEMUGuest1</name>`), cp.domainXml);
    assert.ok(cp.domainXml.includes('<address type="drive" controller="0" bus="0" target="0" unit="0"/>'));
    const dom = parseDomainXml(cp.domainXml);
    assert.equal(dom.name, 'QEMUGuest1');
    assert.deepEqual(dom.disks.map((d) => d.target), ['vda', 'vdb']);
  });

  describe('errors', () => {
    it('rejects a document with the wrong root', () => {
      assertCode(() => parseCheckpointXml('<domain><name>x</name></domain>'), 'INVALID_XML', /is not a <domaincheckpoint> document/);
      assertCode(() => parseCheckpointXml('<domainsnapshot/>'), 'INVALID_XML', /not a <domaincheckpoint> document/);
    });

    it('rejects malformed XML', () => {
      for (const xml of ['', 'garbage', '<domaincheckpoint>', '<domaincheckpoint><name>a</domaincheckpoint>', '<domaincheckpoint/><x/>']) {
        assertCode(() => parseCheckpointXml(xml), 'INVALID_XML', /^Checkpoint XML is not well-formed XML: .+\.$/);
      }
    });

    it('rejects bad checkpoint names with INVALID_NAME', () => {
      for (const name of ['../escape', '.hidden', 'a/b', 'with space', '', 'tab\t', 'ünïcode']) {
        assertCode(
          () => parseCheckpointXml(`<domaincheckpoint><name>${name}</name></domaincheckpoint>`),
          'INVALID_NAME',
          /Checkpoint name .* is invalid/,
        );
      }
    });

    it('accepts names matching the pattern', () => {
      for (const name of ['c1', '1525889631', '-x', '_a.b-c', 'a..b']) {
        assert.equal(parseCheckpointXml(`<domaincheckpoint><name>${name}</name></domaincheckpoint>`).name, name);
      }
    });

    it('rejects a bad parent name', () => {
      assertCode(
        () => parseCheckpointXml(`<domaincheckpoint><name>c2</name><parent><name>../c1</name></parent></domaincheckpoint>`),
        'INVALID_NAME',
        /Parent checkpoint name of checkpoint c2/,
      );
      assertCode(() => parseCheckpointXml(`<domaincheckpoint><parent/></domaincheckpoint>`), 'INVALID_XML', /<parent> without a <name>/);
    });

    it('rejects a bad checkpoint attribute', () => {
      assertCode(
        () => parseCheckpointXml(`<domaincheckpoint><name>c</name><disks><disk name='vda' checkpoint='external'/></disks></domaincheckpoint>`),
        'INVALID_XML',
        /Disk vda of checkpoint c has checkpoint='external'/,
      );
    });

    it('rejects a bitmap on a checkpoint=no disk', () => {
      assertCode(
        () => parseCheckpointXml(`<domaincheckpoint><disks><disk name='vda' checkpoint='no' bitmap='b'/></disks></domaincheckpoint>`),
        'INVALID_XML',
        /bitmap/,
      );
    });

    it('rejects a disk without a name (libvirt disk-invalid.xml)', () => {
      assertCode(
        () => parseCheckpointXml(`<domaincheckpoint><name>bogus</name><disks><!-- no name --><disk/></disks></domaincheckpoint>`),
        'INVALID_XML',
        /Checkpoint bogus has a <disk> without a name/,
      );
    });

    it('rejects duplicate disk names', () => {
      assertCode(
        () => parseCheckpointXml(`<domaincheckpoint><disks><disk name='vda'/><disk name='vda' checkpoint='no'/></disks></domaincheckpoint>`),
        'INVALID_XML',
        /disk vda more than once/,
      );
    });

    it('rejects a bad creationTime or size', () => {
      for (const t of ['-1', 'yesterday', '1.5', '']) {
        assertCode(
          () => parseCheckpointXml(`<domaincheckpoint><creationTime>${t}</creationTime></domaincheckpoint>`),
          'INVALID_XML',
          /creationTime/,
        );
      }
      assertCode(
        () => parseCheckpointXml(`<domaincheckpoint><disks><disk name='vda' size='big'/></disks></domaincheckpoint>`),
        'INVALID_XML',
        /size/,
      );
    });
  });
});

describe('formatCheckpointXml', () => {
  it('formats an empty checkpoint', () => {
    assert.equal(formatCheckpointXml({}), '<domaincheckpoint/>\n');
    roundTrip('<domaincheckpoint/>');
  });

  it('writes libvirt element order with two-space indentation', () => {
    // Properties deliberately in a different order from the output.
    const out = formatCheckpointXml({
      disks: [
        { name: 'vda', checkpoint: 'bitmap', bitmap: '1525889631' },
        { name: 'vdb', checkpoint: 'no' },
      ],
      creationTime: 1525889631,
      parent: '1525111885',
      description: 'Completion of updates after OS install',
      name: '1525889631',
    });
    assert.equal(out, SAMPLE_OUT.replace(/'/g, '"'));
  });

  it('round-trips the sample input and output', () => {
    roundTrip(SAMPLE_IN);
    const { out } = roundTrip(SAMPLE_OUT);
    assert.equal(out, SAMPLE_OUT.replace(/'/g, '"'));
  });

  it('writes sizes only with includeSize', () => {
    const cp = parseCheckpointXml(SIZE_OUT);
    assert.equal(formatCheckpointXml(cp, { includeSize: true }), SIZE_OUT.replace(/'/g, '"'));
    const without = formatCheckpointXml(cp);
    assert.ok(!without.includes('size='), without);
    assert.deepEqual(parseCheckpointXml(without).disks, [{ name: 'vda', checkpoint: 'bitmap', bitmap: 'c2' }]);
  });

  it('re-indents the embedded domain and round-trips a redefine document', () => {
    const { cp, out } = roundTrip(REDEFINE);
    const lines = out.split('\n');
    assert.deepEqual(lines.slice(0, 12), [
      '<domaincheckpoint>',
      '  <name>c1</name>',
      '  <parent>',
      '    <name>c0</name>',
      '  </parent>',
      '  <creationTime>1553647812</creationTime>',
      '  <disks>',
      '    <disk name="hda" checkpoint="no"/>',
      '    <disk name="vda" checkpoint="bitmap" bitmap="c1"/>',
      '    <disk name="vdb" checkpoint="bitmap" bitmap="c1"/>',
      '  </disks>',
      '  <domain type="qemu">',
    ]);
    assert.ok(out.includes('\n    <name>QEMUGuest1</name>\n'), out);
    assert.ok(out.includes('\n    <os>\n      <type arch="i686" machine="pc">hvm</type>\n      <boot dev="hd"/>\n    </os>\n'), out);
    assert.ok(out.includes('\n        <address type="drive" controller="0" bus="0" target="0" unit="0"/>\n'), out);
    assert.ok(out.endsWith('  </domain>\n</domaincheckpoint>\n'), out);
    // The domain's content is unchanged in substance.
    const before = parseDomainXml(cp.domainXml ?? '');
    const after = parseDomainXml(parseCheckpointXml(out).domainXml ?? '');
    assert.deepEqual({ ...after, sourceXml: '' }, { ...before, sourceXml: '' });
  });

  it('leaves out the domain with noDomain', () => {
    const cp = parseCheckpointXml(REDEFINE);
    const out = formatCheckpointXml(cp, { noDomain: true });
    assert.ok(!/<domain[ >]/.test(out), out);
    const { domainXml: _dropped, ...rest } = cp;
    assert.deepEqual(parseCheckpointXml(out), rest);
  });

  it('escapes the description', () => {
    const cp: CheckpointXml = { name: 'c', description: 'a < b & "c"\nsecond line' };
    assert.deepEqual(parseCheckpointXml(formatCheckpointXml(cp)), cp);
  });

  it('writes an explicit empty <disks/>', () => {
    const out = formatCheckpointXml({ name: 'c', disks: [] });
    assert.ok(out.includes('<disks/>'), out);
    assert.deepEqual(parseCheckpointXml(out).disks, []);
  });

  it('rejects invalid values', () => {
    assertCode(() => formatCheckpointXml({ name: '../x' }), 'INVALID_NAME');
    assertCode(() => formatCheckpointXml({ name: 'c', parent: 'a b' }), 'INVALID_NAME');
    assertCode(() => formatCheckpointXml({ name: 'c', creationTime: -5 }), 'INVALID_ARGUMENT');
    assertCode(() => formatCheckpointXml({ name: 'c', disks: [{ name: 'vda', checkpoint: 'no', bitmap: 'x' }] }), 'INVALID_ARGUMENT');
    assertCode(
      () => formatCheckpointXml({ name: 'c', disks: [{ name: 'vda', checkpoint: 'bitmap' }, { name: 'vda', checkpoint: 'no' }] }),
      'INVALID_ARGUMENT',
      /more than once/,
    );
    assertCode(() => formatCheckpointXml({ name: 'c', domainXml: '<domaincheckpoint/>' }), 'INVALID_XML', /not a <domain> document/);
    assertCode(() => formatCheckpointXml({ name: 'c', domainXml: '<domain>' }), 'INVALID_XML', /domain XML of checkpoint c/);
  });
});

describe('checkpoint and backup XML limits', () => {
  it('refuses a checkpoint or backup document nested 5000 levels deep or over its size limit with one sentence', async () => {
    const { parseBackupXml } = await import('../../src/libvirt/backup.js');
    const deep = (root: string): string => `<${root}>${'<a>'.repeat(5000)}${'</a>'.repeat(5000)}</${root}>`;
    assertCode(() => parseCheckpointXml(deep('domaincheckpoint')), 'INVALID_XML', /^Checkpoint XML is nested deeper than \d+ elements\.$/);
    assertCode(() => parseBackupXml(deep('domainbackup')), 'INVALID_XML', /^Backup XML is nested deeper than \d+ elements\.$/);
    const big = (root: string): string => `<${root}><description>${'x'.repeat(3 << 20)}</description></${root}>`;
    assertCode(() => parseCheckpointXml(big('domaincheckpoint')), 'INVALID_XML', /^Checkpoint XML is larger than \d+ MiB/);
    assertCode(() => parseBackupXml(big('domainbackup')), 'INVALID_XML', /^Backup XML is larger than 1 MiB/);
  });
});
