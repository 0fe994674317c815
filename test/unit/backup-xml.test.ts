// Unit tests for src/libvirt/backup.ts, with documents modelled on libvirt's
// domainbackupxml2xml test inputs and docs/formatbackup.rst.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import type { ErrorCode } from '../../src/errors.js';
import { formatBackupXml, parseBackupXml } from '../../src/libvirt/backup.js';
import type { BackupXml } from '../../src/libvirt/backup.js';

function assertCode(fn: () => unknown, code: ErrorCode, pattern?: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(isQbackupError(err, code), `expected QbackupError ${code}, got ${String(err)}`);
    if (pattern !== undefined) assert.match(err.message, pattern);
    return true;
  });
}

/** parse → format → parse is the identity, and formatting is stable. */
function roundTrip(xml: string): { b: BackupXml; out: string } {
  const b = parseBackupXml(xml);
  const out = formatBackupXml(b);
  assert.deepEqual(parseBackupXml(out), b);
  assert.equal(formatBackupXml(parseBackupXml(out)), out);
  return { b, out };
}

const PUSH = `<domainbackup mode="push">
  <incremental>1525889631</incremental>
  <disks>
    <disk name='vda' type='file'>
      <driver type='raw'/>
      <target file='/path/to/file'/>
    </disk>
    <disk name='vdb' type='file' backupmode='full'/>
    <disk name='hda' backup='no'/>
  </disks>
</domainbackup>
`;

const PULL_TCP = `<domainbackup mode="pull">
  <incremental>1525889631</incremental>
  <server transport='tcp' name='localhost' port='10809'/>
  <disks>
    <disk name='vda' type='file'>
      <scratch file='/path/to/file'/>
    </disk>
    <disk name='hda' backup='no'/>
  </disks>
</domainbackup>
`;

const PULL_UNIX = `<domainbackup mode='pull'>
  <incremental>1525889631</incremental>
  <server transport='unix' socket='/path/to/server'/>
  <disks>
    <disk name='vda' type='file'>
      <scratch file='/path/to/file'/>
    </disk>
    <disk name='hda' backup='no'/>
    <disk name='vdc' type='file' backupmode='full'>
      <scratch file='/path/to/file'/>
    </disk>
    <disk name='vdd' type='file' backupmode='incremental'>
      <scratch file='/path/to/file'/>
    </disk>
    <disk name='vde' type='file' backupmode='incremental' incremental='blah'>
      <scratch file='/path/to/file'/>
    </disk>
    <disk name='vdf' type='file' incremental='bleh'>
      <scratch file='/path/to/file'/>
    </disk>
  </disks>
</domainbackup>
`;

const PULL_EXPORT = `<domainbackup mode="pull">
  <incremental>1525889631</incremental>
  <server transport='tcp' tls='yes' name='localhost' port='10809'/>
  <disks>
    <disk name='vda' type='file' exportname='test-vda' exportbitmap='blah'>
      <driver type='qcow2'/>
      <scratch file='/path/to/file'>
        <seclabel model='dac' relabel='no'/>
      </scratch>
    </disk>
    <disk name='vdb' type='block'>
      <driver type='qcow2'/>
      <scratch dev='/dev/block'/>
    </disk>
  </disks>
</domainbackup>
`;

describe('parseBackupXml', () => {
  it('parses an empty document as a push backup of all disks', () => {
    assert.deepEqual(parseBackupXml('<domainbackup/>'), { mode: 'push' });
  });

  it('parses libvirt backup-push', () => {
    assert.deepEqual(parseBackupXml(PUSH), {
      mode: 'push',
      incremental: '1525889631',
      disks: [
        { name: 'vda', backup: true, type: 'file', driverType: 'raw', target: '/path/to/file' },
        { name: 'vdb', backup: true, type: 'file', backupmode: 'full' },
        { name: 'hda', backup: false },
      ],
    });
  });

  it('parses libvirt backup-pull over tcp', () => {
    assert.deepEqual(parseBackupXml(PULL_TCP), {
      mode: 'pull',
      incremental: '1525889631',
      server: { transport: 'tcp', name: 'localhost', port: 10809 },
      disks: [
        { name: 'vda', backup: true, type: 'file', scratch: '/path/to/file' },
        { name: 'hda', backup: false },
      ],
    });
  });

  it('parses libvirt backup-pull-unix with per-disk backupmode and incremental', () => {
    const b = parseBackupXml(PULL_UNIX);
    assert.deepEqual(b.server, { transport: 'unix', socket: '/path/to/server' });
    assert.deepEqual(
      b.disks?.map((d) => [d.name, d.backup, d.backupmode, d.incremental]),
      [
        ['vda', true, undefined, undefined],
        ['hda', false, undefined, undefined],
        ['vdc', true, 'full', undefined],
        ['vdd', true, 'incremental', undefined],
        ['vde', true, 'incremental', 'blah'],
        ['vdf', true, undefined, 'bleh'],
      ],
    );
  });

  it('parses exportname, exportbitmap, driver and block scratch', () => {
    assert.deepEqual(parseBackupXml(PULL_EXPORT), {
      mode: 'pull',
      incremental: '1525889631',
      server: { transport: 'tcp', name: 'localhost', port: 10809, tls: true },
      disks: [
        { name: 'vda', backup: true, type: 'file', exportname: 'test-vda', exportbitmap: 'blah', driverType: 'qcow2', scratch: '/path/to/file' },
        { name: 'vdb', backup: true, type: 'block', driverType: 'qcow2', scratch: '/dev/block' },
      ],
    });
  });

  it('parses the examples of formatbackup.rst', () => {
    const push = parseBackupXml(`<domainbackup>
      <disks>
        <disk name='vda' backup='yes'/>
        <disk name='vdb' type='file'>
          <target file='/path/to/vdb.backup'/>
          <driver type='raw'/>
        </disk>
        <disk name='vdc' backup='no'/>
      </disks>
    </domainbackup>`);
    assert.deepEqual(push, {
      mode: 'push',
      disks: [
        { name: 'vda', backup: true },
        { name: 'vdb', backup: true, type: 'file', driverType: 'raw', target: '/path/to/vdb.backup' },
        { name: 'vdc', backup: false },
      ],
    });
    const pull = parseBackupXml(`<domainbackup mode="pull">
      <incremental>1525889631</incremental>
      <server transport="unix" socket="/path/to/server"/>
      <disks>
        <disk name='vda' backup='yes' type='file'>
          <scratch file='/path/to/file1.scratch'/>
        </disk>
      </disks>
    </domainbackup>`);
    assert.deepEqual(pull.disks, [{ name: 'vda', backup: true, type: 'file', scratch: '/path/to/file1.scratch' }]);
  });

  it('keeps only the name of a backup=no disk', () => {
    const b = parseBackupXml(`<domainbackup><disks><disk name='sdb' backup='no' type='file' backupmode='full'><target file='/x'/></disk></disks></domainbackup>`);
    assert.deepEqual(b.disks, [{ name: 'sdb', backup: false }]);
  });

  it('defaults the server transport to tcp', () => {
    assert.deepEqual(parseBackupXml(`<domainbackup mode='pull'><server name='::1' port='10809'/></domainbackup>`).server, {
      transport: 'tcp',
      name: '::1',
      port: 10809,
    });
  });

  it('distinguishes an empty <disks/> from an absent one', () => {
    assert.deepEqual(parseBackupXml('<domainbackup><disks/></domainbackup>').disks, []);
    assert.equal(parseBackupXml('<domainbackup/>').disks, undefined);
  });

  describe('errors', () => {
    const cases: Array<[string, string, ErrorCode, RegExp]> = [
      ['a wrong root', `<domaincheckpoint/>`, 'INVALID_XML', /not a <domainbackup> document/],
      ['an unknown mode', `<domainbackup mode='pushpull'/>`, 'INVALID_XML', /mode='pushpull'/],
      ['a server in push mode', `<domainbackup><server transport='unix' socket='/s'/></domainbackup>`, 'INVALID_XML', /push-mode backup but has a <server>/],
      ['a tcp server without port', `<domainbackup mode='pull'><server transport='tcp' name='localhost'/></domainbackup>`, 'INVALID_XML', /without a port/],
      ['a tcp server without name', `<domainbackup mode='pull'><server transport='tcp' port='10809'/></domainbackup>`, 'INVALID_XML', /without a name/],
      ['a non-numeric port', `<domainbackup mode='pull'><server name='h' port='nbd'/></domainbackup>`, 'INVALID_XML', /port 'nbd'/],
      ['a port out of range', `<domainbackup mode='pull'><server name='h' port='65536'/></domainbackup>`, 'INVALID_XML', /port 65536/],
      ['port zero', `<domainbackup mode='pull'><server name='h' port='0'/></domainbackup>`, 'INVALID_XML', /port 0/],
      ['a unix server without socket', `<domainbackup mode='pull'><server transport='unix'/></domainbackup>`, 'INVALID_XML', /without a socket/],
      ['a relative unix socket', `<domainbackup mode='pull'><server transport='unix' socket='run/nbd.sock'/></domainbackup>`, 'INVALID_XML', /relative <server> socket path 'run\/nbd.sock'/],
      ['a unix server with a port', `<domainbackup mode='pull'><server transport='unix' socket='/s' port='1'/></domainbackup>`, 'INVALID_XML', /unix <server> with a name or port/],
      ['an unknown transport', `<domainbackup mode='pull'><server transport='rdma' name='h' port='1'/></domainbackup>`, 'INVALID_XML', /transport 'rdma'/],
      ['duplicate disks', `<domainbackup><disks><disk name='vda'/><disk name='vda' backup='no'/></disks></domainbackup>`, 'INVALID_XML', /disk vda more than once/],
      ['a disk without name', `<domainbackup><disks><disk type='file'/></disks></domainbackup>`, 'INVALID_XML', /<disk> without a name/],
      ['a bad backup attribute', `<domainbackup><disks><disk name='vda' backup='maybe'/></disks></domainbackup>`, 'INVALID_XML', /Disk vda .*backup='maybe'/],
      ['a bad backupmode', `<domainbackup><disks><disk name='vda' backupmode='differential'/></disks></domainbackup>`, 'INVALID_XML', /backupmode='differential'/],
      ['full with an incremental checkpoint', `<domainbackup><disks><disk name='vda' backupmode='full' incremental='c1'/></disks></domainbackup>`, 'INVALID_XML', /backupmode='full' but also/],
      ['a bad disk type', `<domainbackup><disks><disk name='vda' type='network'/></disks></domainbackup>`, 'INVALID_XML', /type='network'/],
      ['a bad driver type', `<domainbackup><disks><disk name='vda'><driver type='vmdk'/></disk></disks></domainbackup>`, 'INVALID_XML', /driver type 'vmdk'/],
      ['a scratch in push mode', `<domainbackup><disks><disk name='vda'><scratch file='/s'/></disk></disks></domainbackup>`, 'INVALID_XML', /<scratch>, which only pull-mode/],
      ['a target in pull mode', `<domainbackup mode='pull'><disks><disk name='vda'><target file='/t'/></disk></disks></domainbackup>`, 'INVALID_XML', /<target>, which only push-mode/],
      ['exportname in push mode', `<domainbackup><disks><disk name='vda' exportname='x'/></disks></domainbackup>`, 'INVALID_XML', /exportname or exportbitmap/],
      ['a relative target', `<domainbackup><disks><disk name='vda'><target file='backup.qcow2'/></disk></disks></domainbackup>`, 'INVALID_XML', /relative <target> path/],
      ['a block target given as file', `<domainbackup><disks><disk name='vda' type='block'><target file='/t'/></disk></disks></domainbackup>`, 'INVALID_XML', /without dev=/],
      ['a bad incremental name', `<domainbackup><incremental>../c1</incremental></domainbackup>`, 'INVALID_NAME', /Incremental checkpoint name/],
      ['a bad per-disk incremental name', `<domainbackup><disks><disk name='vda' incremental='a/b'/></disks></domainbackup>`, 'INVALID_NAME', /disk vda/],
    ];
    for (const [what, xml, code, pattern] of cases) {
      it(`rejects ${what}`, () => assertCode(() => parseBackupXml(xml), code, pattern));
    }

    it('rejects malformed XML', () => {
      for (const xml of ['', 'nonsense', '<domainbackup>', '<domainbackup><disks></domainbackup>']) {
        assertCode(() => parseBackupXml(xml), 'INVALID_XML', /^Backup XML is not well-formed XML: .+\.$/);
      }
    });
  });
});

describe('formatBackupXml', () => {
  it('formats an empty push backup', () => {
    assert.equal(formatBackupXml({ mode: 'push' }), '<domainbackup mode="push"/>\n');
    roundTrip('<domainbackup/>');
  });

  it('round-trips every libvirt-modelled input', () => {
    for (const xml of [PUSH, PULL_TCP, PULL_UNIX, PULL_EXPORT]) roundTrip(xml);
  });

  it('writes libvirt order and two-space indentation', () => {
    const { out } = roundTrip(PUSH);
    assert.equal(
      out,
      [
        '<domainbackup mode="push">',
        '  <incremental>1525889631</incremental>',
        '  <disks>',
        '    <disk name="vda" backup="yes" type="file">',
        '      <driver type="raw"/>',
        '      <target file="/path/to/file"/>',
        '    </disk>',
        '    <disk name="vdb" backup="yes" type="file" backupmode="full"/>',
        '    <disk name="hda" backup="no"/>',
        '  </disks>',
        '</domainbackup>',
        '',
      ].join('\n'),
    );
  });

  it('formats a pull backup with a tcp server, exports and block scratch', () => {
    const { out } = roundTrip(PULL_EXPORT);
    assert.equal(
      out,
      [
        '<domainbackup mode="pull">',
        '  <incremental>1525889631</incremental>',
        '  <server transport="tcp" name="localhost" port="10809" tls="yes"/>',
        '  <disks>',
        '    <disk name="vda" backup="yes" type="file" exportname="test-vda" exportbitmap="blah">',
        '      <driver type="qcow2"/>',
        '      <scratch file="/path/to/file"/>',
        '    </disk>',
        '    <disk name="vdb" backup="yes" type="block">',
        '      <driver type="qcow2"/>',
        '      <scratch dev="/dev/block"/>',
        '    </disk>',
        '  </disks>',
        '</domainbackup>',
        '',
      ].join('\n'),
    );
  });

  it('formats per-disk backupmode and incremental', () => {
    const { out } = roundTrip(PULL_UNIX);
    assert.ok(out.includes('<server transport="unix" socket="/path/to/server"/>'), out);
    assert.ok(out.includes('<disk name="vde" backup="yes" type="file" backupmode="incremental" incremental="blah">'), out);
    assert.ok(out.includes('<disk name="vdf" backup="yes" type="file" incremental="bleh">'), out);
  });

  it('escapes attribute values', () => {
    const b: BackupXml = { mode: 'push', disks: [{ name: 'vda', backup: true, target: '/b/"q" & <x>.qcow2' }] };
    assert.deepEqual(parseBackupXml(formatBackupXml(b)), b);
  });

  it('rejects invalid descriptions with INVALID_ARGUMENT', () => {
    assertCode(() => formatBackupXml({ mode: 'push', server: { transport: 'unix', socket: '/s' } }), 'INVALID_ARGUMENT', /push-mode/);
    assertCode(() => formatBackupXml({ mode: 'pull', server: { transport: 'tcp', name: 'h' } }), 'INVALID_ARGUMENT', /port/);
    assertCode(() => formatBackupXml({ mode: 'pull', server: { transport: 'unix', socket: 'rel' } }), 'INVALID_ARGUMENT', /relative/);
    assertCode(
      () => formatBackupXml({ mode: 'push', disks: [{ name: 'vda', backup: true }, { name: 'vda', backup: false }] }),
      'INVALID_ARGUMENT',
      /more than once/,
    );
    assertCode(
      () => formatBackupXml({ mode: 'push', disks: [{ name: 'vda', backup: false, target: '/t' }] }),
      'INVALID_ARGUMENT',
      /backup='no' but also sets target/,
    );
    assertCode(() => formatBackupXml({ mode: 'pull', disks: [{ name: 'vda', backup: true, target: '/t' }] }), 'INVALID_ARGUMENT', /<target>/);
    assertCode(() => formatBackupXml({ mode: 'push', disks: [{ name: 'vda', backup: true, scratch: '/s' }] }), 'INVALID_ARGUMENT', /<scratch>/);
    assertCode(() => formatBackupXml({ mode: 'push', incremental: 'a b' }), 'INVALID_NAME');
  });
});
