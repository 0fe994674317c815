// LUKS-encrypted push targets and pull scratch images against real QEMU:
// `<encryption format='luks'><secret type='passphrase' uuid=…/></encryption>`
// in <target>/<scratch> makes the job write a LUKS qcow2 whose passphrase is
// the file STATE_DIR/secrets/UUID. The files hold no plaintext of the disk,
// open with the passphrase as exactly the disk at the job's instant (an
// incremental with its encrypted backing chain), and every secret object is
// removed with the job. A missing or world-readable passphrase file and the
// kinds of encryption qbackup does not write are refused before anything
// changes.

import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { JobInfo } from '../../src/backup/job.js';
import { exportUri } from '../../src/backup/job.js';
import { runTool } from '../../src/image/tools.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { referenceCopy } from '../helpers/repo.js';

const MiB = 1 << 20;
const UUID = '6f2a0a3e-1c2b-4d5e-8f90-0123456789ab';

describe('LUKS-encrypted backup targets and scratch images (real QEMU)', () => {
  let env: TestEnv;
  let secretFile: string;

  async function qmp(command: string, args: object = {}): Promise<unknown> {
    return env.qb.domains.monitorCommand('vm', JSON.stringify({ execute: command, arguments: args }));
  }
  async function secretObjects(): Promise<string[]> {
    const objects = (await qmp('qom-list', { path: '/objects' })) as Array<{ name: string; type: string }>;
    return objects.filter((o) => o.type === 'child<secret>').map((o) => o.name);
  }
  async function assertNothingLeft(): Promise<void> {
    assert.deepEqual(await secretObjects(), [], 'no secret object left');
    assert.deepEqual(await qmp('query-jobs'), []);
    assert.deepEqual(await qmp('query-block-exports'), []);
    const nodes = (await qmp('query-named-block-nodes')) as Array<{ 'node-name': string }>;
    assert.deepEqual(nodes.map((n) => n['node-name']).filter((n) => n.startsWith('bk')), []);
  }
  /** Is `file` exactly the raw `reference`, opened with the passphrase (its encrypted backing too)? */
  async function sameAsReference(file: string, reference: string, withBacking = false): Promise<void> {
    const image = `driver=qcow2,file.filename=${file},encrypt.key-secret=s0${withBacking ? ',backing.encrypt.key-secret=s0' : ''}`;
    await runTool('qemu-img', ['compare', '--object', `secret,id=s0,file=${secretFile}`, '--image-opts', image, `driver=raw,file.filename=${reference}`]);
  }
  async function assertLuks(file: string): Promise<void> {
    const { stdout } = await runTool('qemu-img', ['info', '-U', '--output=json', '-f', 'qcow2', file]);
    const info = JSON.parse(stdout) as { encrypted?: boolean; 'format-specific'?: { data?: { encrypt?: { format?: string } } } };
    assert.equal(info.encrypted, true, `${file} is encrypted`);
    assert.equal(info['format-specific']?.data?.encrypt?.format, 'luks');
  }
  function pushXml(name: string, file: string, incremental?: string, uuid = UUID): string {
    const inc = incremental !== undefined ? `<incremental>${incremental}</incremental>` : '';
    return env.writeFile(name, `<domainbackup>${inc}<disks><disk name='sda'><target file='${file}'><encryption format='luks'><secret type='passphrase' uuid='${uuid}'/></encryption></target></disk></disks></domainbackup>`);
  }

  before(async () => {
    env = new TestEnv('qbt-luks-');
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 16 * MiB }]);
    await env.qb.domains.start('vm', { paused: true });
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x3c 0 4M');
    mkdirSync(join(env.stateDir, 'secrets'), { mode: 0o700 });
    secretFile = join(env.stateDir, 'secrets', UUID);
    writeFileSync(secretFile, 'correct horse battery staple', { mode: 0o600 });
  });
  after(async () => env.cleanup());

  test('push: full and incremental targets are LUKS qcow2, hold no plaintext, and open as the disk at each instant', async () => {
    const ref1 = await referenceCopy(env, 'vm', 'sda', env.path('ref1.raw'));
    const full = env.path('full.qcow2');
    await env.cliOk(['backup-begin', 'vm', pushXml('full.xml', full), '--checkpoint', 'c1', '--wait']);
    await assertLuks(full);
    assert.equal(readFileSync(full).indexOf(Buffer.alloc(4096, 0x3c)), -1, 'no 4 KiB of the plaintext pattern in the file');
    await sameAsReference(full, ref1);
    await assertNothingLeft();

    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x5d 5M 1M');
    const ref2 = await referenceCopy(env, 'vm', 'sda', env.path('ref2.raw'));
    const inc = env.path('inc.qcow2');
    const out = JSON.parse(await env.cliOk(['backup-begin', 'vm', pushXml('inc.xml', inc, 'c1'), '--checkpoint', 'c2', '--wait', '--json'])) as JobInfo;
    assert.equal(out.disks[0]?.mode, 'incremental');
    assert.equal(out.disks[0]?.backingFile, full);
    await assertLuks(inc);
    assert.equal(readFileSync(inc).indexOf(Buffer.alloc(4096, 0x5d)), -1);
    await sameAsReference(inc, ref2, true);
    await assertNothingLeft();
    const xml = await env.cliOk(['backup-dumpxml', 'vm']).catch(() => '');
    assert.equal(xml, '', 'no job running');
  });

  test('pull: the scratch image is LUKS while the job runs; the export still reads the frozen disk', async () => {
    const ref = await referenceCopy(env, 'vm', 'sda', env.path('ref-pull.raw'));
    const scratch = env.path('scratch.qcow2');
    const file = env.writeFile('pull.xml', `<domainbackup mode='pull'><disks><disk name='sda'><scratch file='${scratch}'><encryption format='luks'><secret type='passphrase' uuid='${UUID}'/></encryption></scratch></disk></disks></domainbackup>`);
    const job = JSON.parse(await env.cliOk(['backup-begin', 'vm', file, '--json'])) as JobInfo;
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x11 0 2M'); // the old data goes to the encrypted scratch image
    await guestWrite(env.qb, 'vm', 'sda', 'flush');
    await assertLuks(scratch);
    assert.equal(readFileSync(scratch).indexOf(Buffer.alloc(4096, 0x3c)), -1, 'the copied-before-write data is encrypted');
    assert.equal((await secretObjects()).length, 1);
    const xml = await env.cliOk(['backup-dumpxml', 'vm']);
    assert.match(xml, new RegExp(`<scratch file="${scratch}">\\s*<encryption format="luks">\\s*<secret type="passphrase" uuid="${UUID}"/>`));
    assert.ok(job.server !== undefined);
    await runTool('nbdcopy', [exportUri(job.server, 'sda'), env.path('pulled.raw')]);
    assert.ok(readFileSync(env.path('pulled.raw')).equals(readFileSync(ref)), 'the export is the disk at the job start');
    await env.cliOk(['domjobabort', 'vm']);
    assert.ok(!existsSync(scratch));
    await assertNothingLeft();
  });

  test('refused before anything changes: no passphrase file, one others can read, and encryption qbackup does not write', async () => {
    const other = '0d8f3c2a-5b6e-4f70-8a9b-c0d1e2f3a4b5';
    const target = env.path('never.qcow2');
    const cases: Array<[string, RegExp]> = [
      [pushXml('missing.xml', target, undefined, other), new RegExp(`^error: Cannot encrypt the backup of disk "sda" of domain "vm": secret ${other} has no passphrase file ".*/secrets/${other}"\\n$`)],
      [env.writeFile('qcow-enc.xml', `<domainbackup><disks><disk name='sda'><target file='${target}'><encryption format='qcow'><secret type='passphrase' uuid='${UUID}'/></encryption></target></disk></disks></domainbackup>`), /in format 'qcow' \(only luks is supported\)/],
      [env.writeFile('usage.xml', `<domainbackup><disks><disk name='sda'><target file='${target}'><encryption format='luks'><secret type='passphrase' usage='mine'/></encryption></target></disk></disks></domainbackup>`), /whose secret is named by usage/],
      [env.writeFile('raw.xml', `<domainbackup><disks><disk name='sda'><driver type='raw'/><target file='${target}'><encryption format='luks'><secret type='passphrase' uuid='${UUID}'/></encryption></target></disk></disks></domainbackup>`), /encrypted raw destination/],
    ];
    for (const [file, message] of cases) {
      const r = await env.cli(['backup-begin', 'vm', file, '--checkpoint', 'never']);
      assert.equal(r.code, 1, `${file}: ${r.stdout}${r.stderr}`);
      assert.match(r.stderr, message);
      assert.ok(!existsSync(target));
      assert.ok(!env.qb.checkpoints.exists('vm', 'never'));
      await assertNothingLeft();
    }
    chmodSync(secretFile, 0o644);
    const open = await env.cli(['backup-begin', 'vm', pushXml('open.xml', target), '--checkpoint', 'never']);
    chmodSync(secretFile, 0o600);
    assert.equal(open.code, 1);
    assert.match(open.stderr, /is readable by other users \(make it 0600\)/);
    assert.ok(!existsSync(target));
    await assertNothingLeft();
  });
});
