// Unit tests for backup planning (src/backup/plan.ts) and the mapping of
// <domainbackup> onto BackupSpec (src/libvirt/backup.ts): every decision of a
// job checked without QEMU.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { exportUri } from '../../src/backup/job.js';
import { planBackup, selectDisks, type PlanInputs } from '../../src/backup/plan.js';
import { validateBackupSpec, type BackupSpec } from '../../src/backup/spec.js';
import type { DiskCoverage } from '../../src/checkpoint/coverage.js';
import type { AttachedDisk } from '../../src/domain/domains.js';
import { isQbackupError } from '../../src/errors.js';
import { formatBackupXml, formatJobXml, parseBackupSpec, parseBackupXml } from '../../src/libvirt/backup.js';

const disks: AttachedDisk[] = [
  { target: 'sda', source: '/img/a.qcow2', format: 'qcow2', bus: 'scsi', readonly: false, diskId: 'd1' },
  { target: 'sdb', source: '/img/b.qcow2', format: 'qcow2', bus: 'scsi', readonly: false, diskId: 'd2' },
  { target: 'sdc', source: '/img/c.raw', format: 'raw', bus: 'scsi', readonly: true, diskId: 'd3' },
];

function inputs(spec: BackupSpec, over: Partial<PlanInputs> = {}): PlanInputs {
  return {
    domain: 'vm',
    jobId: 'backup-0123abcd',
    spec,
    options: {},
    selected: selectDisks('vm', disks, spec),
    checkpointName: undefined,
    coverage: new Map(),
    bitmapNames: new Map(),
    domainDir: '/state/domains/vm',
    exists: () => false,
    previousTarget: () => undefined,
    ...over,
  };
}

const covered = (diskId: string, target: string): DiskCoverage => ({ diskId, target, mode: 'incremental', reasons: [], bitmaps: ['c1', 'c2'] });
const lost = (diskId: string, target: string): DiskCoverage => ({
  diskId,
  target,
  mode: 'full',
  reasons: [{ code: 'detached-since', detail: 'detached after c1' }],
  bitmaps: [],
});

function code(fn: () => unknown, expected: string, message?: RegExp): void {
  assert.throws(fn, (err: unknown) => isQbackupError(err) && err.code === expected && (message === undefined || message.test(err.message)));
}

describe('selectDisks', () => {
  it('takes every writable disk when none are listed', () => {
    assert.deepEqual(selectDisks('vm', disks, { mode: 'push' }).map((s) => s.disk.target), ['sda', 'sdb']);
  });
  it('takes exactly the listed disks, read-only ones too', () => {
    assert.deepEqual(selectDisks('vm', disks, { mode: 'push', disks: [{ target: 'sdc' }] }).map((s) => s.disk.target), ['sdc']);
  });
  it('refuses unknown disks and an empty selection', () => {
    code(() => selectDisks('vm', disks, { mode: 'push', disks: [{ target: 'sdz' }] }), 'DISK_NOT_FOUND', /"sdz"/);
    code(() => selectDisks('vm', disks, { mode: 'push', disks: [] }), 'INVALID_ARGUMENT', /no disk selected/);
  });
});

describe('planBackup', () => {
  it('plans a full push backup with default targets next to the disks', () => {
    const job = planBackup(inputs({ mode: 'push' }, { checkpointName: 'c1' }));
    assert.equal(job.mode, 'push');
    assert.equal(job.checkpoint, 'c1');
    assert.deepEqual(job.disks.map((d) => [d.target, d.mode, d.targetFile]), [
      ['sda', 'full', '/img/a.qcow2.c1'],
      ['sdb', 'full', '/img/b.qcow2.c1'],
    ]);
    assert.equal(job.server, undefined);
  });

  it('an incremental push merges the chain and is backed by the previous backup', () => {
    const spec: BackupSpec = { mode: 'push', since: 'c1' };
    const job = planBackup(
      inputs(spec, {
        options: { targetDir: '/bk' },
        checkpointName: 'c3',
        coverage: new Map([['d1', covered('d1', 'sda')], ['d2', lost('d2', 'sdb')]]),
        exists: (p) => p === '/bk/sda.c1.qcow2',
        previousTarget: (cp, id) => (cp === 'c1' && id === 'd1' ? '/bk/sda.c1.qcow2' : id === 'd2' ? '/bk/gone.qcow2' : undefined),
      }),
    );
    const [a, b] = job.disks;
    assert.equal(a?.mode, 'incremental');
    assert.deepEqual(a?.bitmaps, ['c1', 'c2']);
    assert.match(a?.tmpBitmap ?? '', /^qbackup-tmp-0123abcd-sda$/);
    assert.equal(a?.backingFile, '/bk/sda.c1.qcow2');
    assert.equal(a?.targetFile, '/bk/sda.c3.qcow2');
    // coverage lost: full, with the reason, and no backing file
    assert.equal(b?.mode, 'full');
    assert.deepEqual(b?.fullReasons?.map((r) => r.code), ['detached-since']);
    assert.equal(b?.backingFile, undefined);
  });

  it('strict refuses a disk whose coverage is lost, naming it and why', () => {
    code(
      () => planBackup(inputs({ mode: 'push', since: 'c1' }, { options: { strict: true }, coverage: new Map([['d1', covered('d1', 'sda')], ['d2', lost('d2', 'sdb')]]) })),
      'BITMAP_INCONSISTENT',
      /disk "sdb": detached-since/,
    );
  });

  it('a per-disk full overrides the job checkpoint', () => {
    const job = planBackup(inputs({ mode: 'push', since: 'c1', disks: [{ target: 'sda', mode: 'full' }] }));
    assert.equal(job.disks[0]?.mode, 'full');
    assert.equal(job.disks[0]?.fullReasons, undefined);
  });

  it('refuses to overwrite a push target unless reusing it, and needs it when reusing', () => {
    code(() => planBackup(inputs({ mode: 'push' }, { exists: () => true })), 'INVALID_ARGUMENT', /exists \(use --reuse-external/);
    code(() => planBackup(inputs({ mode: 'push' }, { options: { reuseExternal: true } })), 'INVALID_ARGUMENT', /must exist/);
  });

  it('plans a pull backup: private socket, scratch images, exports and the exported bitmap', () => {
    const job = planBackup(inputs({ mode: 'pull', since: 'c1', disks: [{ target: 'sda' }] }, { coverage: new Map([['d1', covered('d1', 'sda')]]) }));
    assert.deepEqual(job.server, { transport: 'unix', socket: '/state/domains/vm/nbd-0123abcd/nbd.sock', socketDir: '/state/domains/vm/nbd-0123abcd' });
    const d = job.disks[0];
    assert.equal(d?.targetFile, '/state/domains/vm/scratch/backup-0123abcd-sda.qcow2');
    assert.equal(d?.pull?.exportName, 'sda');
    assert.equal(d?.tmpBitmap, 'backup-sda');
  });

  it('pull refuses a taken bitmap name, an existing scratch file, raw scratch and clashing export names', () => {
    const cov = new Map([['d1', covered('d1', 'sda')]]);
    code(() => planBackup(inputs({ mode: 'pull', since: 'c1', disks: [{ target: 'sda' }] }, { coverage: cov, bitmapNames: new Map([['d1', ['backup-sda']]]) })), 'INVALID_ARGUMENT', /already has a bitmap/);
    code(() => planBackup(inputs({ mode: 'pull' }, { exists: () => true })), 'INVALID_ARGUMENT', /scratch file/);
    code(() => planBackup(inputs({ mode: 'pull', disks: [{ target: 'sda', format: 'raw' }] })), 'INVALID_ARGUMENT', /must be qcow2/);
    code(() => planBackup(inputs({ mode: 'pull', disks: [{ target: 'sda', exportName: 'x' }, { target: 'sdb', exportName: 'x' }] })), 'INVALID_ARGUMENT', /export name "x"/);
  });
});

describe('validateBackupSpec', () => {
  it('refuses fields of the other mode, relative paths and bad ports', () => {
    code(() => validateBackupSpec({ mode: 'push', disks: [{ target: 'sda', scratchFile: '/s' }] }), 'INVALID_ARGUMENT', /pull mode/);
    code(() => validateBackupSpec({ mode: 'pull', disks: [{ target: 'sda', targetFile: '/t' }] }), 'INVALID_ARGUMENT', /push mode/);
    code(() => validateBackupSpec({ mode: 'push', disks: [{ target: 'sda', targetFile: 'rel.qcow2' }] }), 'INVALID_ARGUMENT', /relative/);
    code(() => validateBackupSpec({ mode: 'pull', server: { transport: 'tcp', host: 'h', port: 70000, tls: false } }), 'INVALID_ARGUMENT', /port/);
    code(() => validateBackupSpec({ mode: 'push', server: { transport: 'unix', socket: '/s' } }), 'INVALID_ARGUMENT', /only pull mode/);
    code(() => validateBackupSpec({ mode: 'push', disks: [{ target: 'sda', mode: 'full', since: 'c1' }] }), 'INVALID_ARGUMENT', /full mode and also/);
    code(() => validateBackupSpec({ mode: 'push', since: '../x' }), 'INVALID_NAME');
  });
});

describe('planning a TLS server', () => {
  const tcp = (tls: boolean): BackupSpec => ({ mode: 'pull', server: { transport: 'tcp', host: '127.0.0.1', port: 10809, tls } });

  it('gives a TLS server its certificate directory and a credentials object id; a plain one gets neither', () => {
    const job = planBackup(inputs(tcp(true), { tlsCertDir: '/pki/qbackup' }));
    assert.deepEqual(job.server, { transport: 'tcp', host: '127.0.0.1', port: 10809, tls: true, tlsCertDir: '/pki/qbackup', tlsCredsId: 'bk0123abcd-tls' });
    assert.deepEqual(planBackup(inputs(tcp(false))).server, { transport: 'tcp', host: '127.0.0.1', port: 10809, tls: false });
    assert.match(formatJobXml(job), /<server transport="tcp" name="127.0.0.1" port="10809" tls="yes"\/>/);
  });

  it('an accepted client identity adds an authorization object', () => {
    const job = planBackup(inputs(tcp(true), { tlsCertDir: '/pki', options: { tlsClientIdentity: 'CN=backup-client' } }));
    assert.deepEqual(job.server, { transport: 'tcp', host: '127.0.0.1', port: 10809, tls: true, tlsCertDir: '/pki', tlsCredsId: 'bk0123abcd-tls', tlsAuthzId: 'bk0123abcd-authz', tlsClientIdentity: 'CN=backup-client' });
  });

  it('refuses TLS without a certificate directory rather than serving in the clear', () => {
    code(() => planBackup(inputs(tcp(true))), 'TLS_CREDENTIALS', /^Cannot serve the backup of domain "vm" over TLS: no certificate directory was given$/);
  });

  it('shows the export of a TLS server as nbds://', () => {
    const job = planBackup(inputs(tcp(true), { tlsCertDir: '/pki' }));
    assert.ok(job.server !== undefined);
    assert.equal(exportUri(job.server, 'sda'), 'nbds://127.0.0.1:10809/sda');
    assert.equal(exportUri({ transport: 'tcp', host: '::1', port: 1, tls: false }, 'a b'), 'nbd://[::1]:1/a%20b');
    assert.equal(exportUri({ transport: 'unix', socket: '/run/x/nbd.sock' }, 'sda'), 'nbd+unix:///sda?socket=/run/x/nbd.sock');
  });
});

describe('libvirt <domainbackup> ↔ BackupSpec', () => {
  it('maps libvirt documents onto the spec: excluded disks dropped, server typed, tls kept', () => {
    const spec = parseBackupSpec(`<domainbackup mode='pull'><incremental>c1</incremental>
      <server transport='tcp' name='127.0.0.1' port='10809' tls='yes'/>
      <disks><disk name='sda' exportname='e' exportbitmap='b'><scratch file='/s.qcow2'/></disk><disk name='sdb' backup='no'/></disks></domainbackup>`);
    assert.deepEqual(spec, {
      mode: 'pull',
      since: 'c1',
      server: { transport: 'tcp', host: '127.0.0.1', port: 10809, tls: true },
      disks: [{ target: 'sda', exportName: 'e', exportBitmap: 'b', scratchFile: '/s.qcow2' }],
    });
  });

  it('refuses a TCP server that does not choose TLS, and keeps an explicit tls=no', () => {
    code(() => parseBackupSpec(`<domainbackup mode='pull'><server transport='tcp' name='127.0.0.1' port='10809'/></domainbackup>`), 'INVALID_ARGUMENT', /over TCP \(127\.0\.0\.1:10809\) without choosing TLS/);
    assert.deepEqual(parseBackupSpec(`<domainbackup mode='pull'><server transport='tcp' name='h' port='1' tls='no'/></domainbackup>`).server, { transport: 'tcp', host: 'h', port: 1, tls: false });
  });

  it('keeps LUKS encryption of a target or scratch, and refuses every other kind rather than dropping it', () => {
    const uuid = '6F2A0A3E-1C2B-4D5E-8F90-0123456789AB';
    const enc = (inner: string, driver = ''): string =>
      `<domainbackup><disks><disk name='sda'>${driver}<target file='/t.qcow2'><encryption ${inner}</encryption></target></disk></disks></domainbackup>`;
    const spec = parseBackupSpec(enc(`format='luks'><secret type='passphrase' uuid='${uuid}'/>`));
    assert.deepEqual(spec.disks, [{ target: 'sda', targetFile: '/t.qcow2', encryption: { format: 'luks', secret: uuid.toLowerCase() } }]);
    const xml = parseBackupXml(enc(`format='luks'><secret type='passphrase' uuid='${uuid}'/>`));
    assert.deepEqual(parseBackupXml(formatBackupXml(xml)), xml, 'round trip');
    assert.match(formatBackupXml(xml), /<target file="\/t.qcow2">\s*<encryption format="luks">\s*<secret type="passphrase" uuid="6f2a0a3e-1c2b-4d5e-8f90-0123456789ab"\/>/);
    code(() => parseBackupSpec(enc(`format='qcow'><secret type='passphrase' uuid='${uuid}'/>`)), 'NOT_SUPPORTED', /in format 'qcow' \(only luks is supported\)/);
    code(() => parseBackupSpec(enc(`format='luks'><secret type='passphrase' usage='x'/>`)), 'NOT_SUPPORTED', /named by usage/);
    code(() => parseBackupSpec(enc(`format='luks'><secret type='passphrase' uuid='${uuid}'/>`, "<driver type='raw'/>")), 'NOT_SUPPORTED', /encrypted raw destination/);
    code(() => parseBackupSpec(enc(`format='luks'><secret type='passphrase' uuid='../../etc'/>`)), 'INVALID_XML', /is not a UUID/);
    code(() => parseBackupSpec(enc(`format='luks'>`)), 'INVALID_XML', /without exactly one <secret>/);
    code(() => validateBackupSpec({ mode: 'push', disks: [{ target: 'sda', encryption: { format: 'luks', secret: '../x' } }] }), 'INVALID_ARGUMENT', /not a lower-case UUID/);
    code(() => validateBackupSpec({ mode: 'push', disks: [{ target: 'sda', format: 'raw', encryption: { format: 'luks', secret: uuid.toLowerCase() } }] }), 'NOT_SUPPORTED', /qcow2 only/);
  });

  it('plans a LUKS disk with its passphrase file and a secret object id', () => {
    const secret = '6f2a0a3e-1c2b-4d5e-8f90-0123456789ab';
    const job = planBackup(inputs({ mode: 'push', disks: [{ target: 'sda', encryption: { format: 'luks', secret } }] }, { secretFile: (u) => `/state/secrets/${u}` }));
    assert.deepEqual(job.disks[0]?.encryption, { secret, secretFile: `/state/secrets/${secret}`, secretId: 'bk0123abcd-sda-sec' });
    assert.match(formatJobXml(job), new RegExp(`<encryption format="luks">\\s*<secret type="passphrase" uuid="${secret}"/>`));
  });

  it('shows a planned job as <domainbackup> with each disk state', () => {
    const job = planBackup(inputs({ mode: 'pull', since: 'c1', disks: [{ target: 'sda' }] }, { coverage: new Map([['d1', covered('d1', 'sda')]]) }));
    const xml = formatJobXml(job);
    assert.match(xml, /<domainbackup mode="pull">/);
    assert.match(xml, /<server transport="unix" socket="\/state\/domains\/vm\/nbd-0123abcd\/nbd.sock"\/>/);
    assert.match(xml, /<disk name="sda" backup="yes" type="file" backupmode="incremental" incremental="c1" exportname="sda" exportbitmap="backup-sda" state="running">/);
  });
});
