// Pull-mode backups against real QEMU: the export shows the disk frozen at the
// job's start while the guest keeps writing (read with nbdcopy), the dirty map
// of an incremental (nbdinfo --map=qemu:dirty-bitmap:backup-<target>) is
// exactly the clusters written since the checkpoint, and ending, aborting or
// crashing leaves no node, export, server or scratch file behind.

import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { exportUri, type JobInfo } from '../../src/backup/job.js';
import { runTool } from '../../src/image/tools.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { clustersOf, mergeAdjacent, type Extent } from '../helpers/extents.js';

const MiB = 1 << 20;

function uri(job: JobInfo, exportName: string): string {
  const s = job.server;
  assert.ok(s !== undefined);
  return exportUri(s, exportName);
}
async function dirtyMap(job: JobInfo, target: string): Promise<Extent[]> {
  const { stdout } = await runTool('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:backup-${target}`, uri(job, target)]);
  const entries = JSON.parse(stdout) as Array<{ offset: number; length: number; type: number }>;
  return mergeAdjacent(entries.filter((e) => (e.type & 1) === 1).map((e) => ({ offset: e.offset, length: e.length })));
}
async function identical(a: string, aFormat: string, b: string, bFormat: string): Promise<boolean> {
  try {
    await runTool('qemu-img', ['compare', '-U', '-f', aFormat, '-F', bFormat, a, b]);
    return true;
  } catch {
    return false;
  }
}
function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.listen(0, '127.0.0.1', () => {
      const address = srv.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

describe('pull backups (real QEMU)', () => {
  let env: TestEnv;
  let sda: string;

  /** A copy of the disk as it is now (flushed), to compare what the export shows later. */
  async function reference(name: string): Promise<string> {
    await guestWrite(env.qb, 'vm', 'sda', 'flush');
    const file = env.path(name);
    await runTool('qemu-img', ['convert', '-U', '-O', 'raw', sda, file]);
    return file;
  }
  async function assertNothingLeft(): Promise<void> {
    const nodes = (await env.qb.domains.monitorCommand('vm', '{"execute":"query-named-block-nodes"}')) as Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string }> }>;
    assert.deepEqual(nodes.map((n) => n['node-name']).filter((n) => n.startsWith('bk')), [], 'no job node left');
    assert.ok(!nodes.some((n) => (n['dirty-bitmaps'] ?? []).some((b) => b.name.startsWith('backup-') || b.name.startsWith('qbackup-tmp'))), 'no temporary bitmap left');
    assert.deepEqual(await env.qb.domains.monitorCommand('vm', '{"execute":"query-jobs"}'), []);
    assert.deepEqual(await env.qb.domains.monitorCommand('vm', '{"execute":"query-block-exports"}'), []);
    const dir = env.qb.domains.domainDir('vm');
    assert.deepEqual(readdirSync(dir).filter((f) => f.startsWith('nbd-')), [], 'no socket directory left');
    assert.deepEqual(existsSync(join(dir, 'scratch')) ? readdirSync(join(dir, 'scratch')) : [], [], 'no scratch image left');
  }

  before(async () => {
    env = new TestEnv();
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 16 * MiB }]);
    await env.qb.domains.start('vm', { paused: true });
    sda = env.qb.domains.blockList('vm')[0]?.source ?? '';
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x11 0 4M');
  });
  after(async () => env.cleanup());

  test('full pull with a checkpoint: the export stays frozen while the guest writes', async () => {
    const ref = await reference('ref1.raw');
    const job = await env.qb.backups.begin('vm', { mode: 'pull' }, { checkpoint: { name: 'p1' } });
    assert.equal(job.mode, 'pull');
    assert.equal(env.qb.checkpoints.info('vm', 'p1').current, true, 'the checkpoint exists from the job start');
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x99 0 8M'); // after the job started: not in the view
    await runTool('nbdcopy', [uri(job, 'sda'), env.path('pulled1.raw')]);
    assert.ok(await identical(env.path('pulled1.raw'), 'raw', ref, 'raw'), 'the export shows the disk at the job start');
    const r = await env.cli(['attach-disk', 'vm', await env.image('x.qcow2'), 'sdb', '--subdriver', 'qcow2']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, new RegExp(`backup job "${job.id}" is running`));
    const ended = await env.qb.backups.abort('vm');
    assert.equal(ended.state, 'completed');
    await assertNothingLeft();
  });

  test('incremental pull: the dirty map is exactly the clusters written since the checkpoint', async () => {
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x22 9M 4k');
    await guestWrite(env.qb, 'vm', 'sda', 'write -z 1M 128k');
    await guestWrite(env.qb, 'vm', 'sda', 'discard 2M 64k');
    const ref = await reference('ref2.raw');
    const job = await env.qb.backups.begin('vm', { mode: 'pull', since: 'p1' }, { checkpoint: { name: 'p2' } });
    assert.equal(job.disks[0]?.mode, 'incremental');
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x98 12M 64k'); // during the job: neither in the map nor the view
    const expected = clustersOf([
      { offset: 0, length: 8 * MiB }, // the 0x99 write after p1 was created
      { offset: 9 * MiB, length: 4096 },
      { offset: 1 * MiB, length: 128 * 1024 },
      { offset: 2 * MiB, length: 64 * 1024 },
    ]);
    assert.deepEqual(await dirtyMap(job, 'sda'), expected);
    await runTool('nbdcopy', [uri(job, 'sda'), env.path('pulled2.raw')]);
    assert.ok(await identical(env.path('pulled2.raw'), 'raw', ref, 'raw'));
    const xml = await env.cliOk(['backup-dumpxml', 'vm']);
    assert.match(xml, /<domainbackup mode="pull">/);
    assert.match(xml, /exportbitmap="backup-sda"/);
    assert.match(xml, /state="running"/);
    await env.cliOk(['domjobabort', 'vm']);
    await assertNothingLeft();
  });

  test('TCP server on an explicit port', async () => {
    const port = await freePort();
    const file = env.writeFile('tcp.xml', `<domainbackup mode='pull'><server transport='tcp' name='127.0.0.1' port='${port}'/></domainbackup>`);
    const unchosen = await env.cli(['backup-begin', 'vm', file]);
    assert.equal(unchosen.code, 1);
    assert.match(unchosen.stderr, /without choosing TLS: add tls='yes'/);
    const plain = env.writeFile('tcp-plain.xml', `<domainbackup mode='pull'><server transport='tcp' name='127.0.0.1' port='${port}' tls='no'/></domainbackup>`);
    const out = JSON.parse(await env.cliOk(['backup-begin', 'vm', plain, '--json'])) as JobInfo;
    const { stdout } = await runTool('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/sda`]);
    assert.equal(Number(stdout.trim()), 16 * MiB);
    assert.equal(out.server?.transport === 'tcp' ? out.server.port : undefined, port);
    await env.cliOk(['domjobabort', 'vm']);
    await assertNothingLeft();
  });

  test('bad input: TCP without a port, raw scratch, a second job', async () => {
    const noPort = await env.cli(['backup-begin', 'vm', env.writeFile('np.xml', "<domainbackup mode='pull'><server transport='tcp' name='localhost'/></domainbackup>")]);
    assert.equal(noPort.code, 1);
    assert.match(noPort.stderr, /port/);
    const raw = await env.cli(['backup-begin', 'vm', env.writeFile('raw.xml', "<domainbackup mode='pull'><disks><disk name='sda'><driver type='raw'/></disk></disks></domainbackup>")]);
    assert.equal(raw.code, 1);
    assert.match(raw.stderr, /scratch image must be qcow2/);
    await env.qb.backups.begin('vm', { mode: 'pull' });
    const second = await env.cli(['backup-begin', 'vm', env.writeFile('p.xml', "<domainbackup mode='pull'/>")]);
    assert.equal(second.code, 1);
    assert.match(second.stderr, /is running/);
    await env.qb.backups.abort('vm');
    await assertNothingLeft();
  });

  test('qbackup killed while starting a pull job: the next command removes every piece', async () => {
    for (const point of ['backup-begin:before-qemu', 'backup-begin:after-qemu']) {
      const r = await env.cli(['backup-begin', 'vm', env.writeFile('k.xml', "<domainbackup mode='pull'/>"), '--checkpoint', `k-${point.slice(-4)}`], {
        env: { QBACKUP_CRASH_AT: point },
      });
      assert.notEqual(r.code, 0, point);
      const info = await env.qb.backups.info('vm');
      assert.equal(info, undefined, `${point}: no job is left running`);
      await assertNothingLeft();
    }
  });

  test('QEMU killed during a pull job: reported failed, scratch and socket removed', async () => {
    const job = await env.qb.backups.begin('vm', { mode: 'pull' });
    const scratch = job.disks[0]?.targetFile ?? '';
    assert.ok(existsSync(scratch));
    const pid = env.qb.domains.info('vm').pid;
    assert.ok(pid !== undefined);
    process.kill(pid, 'SIGKILL');
    await new Promise((r) => setTimeout(r, 300));
    const last = await env.qb.backups.lastResult('vm');
    assert.equal(last?.state, 'failed');
    assert.ok(!existsSync(scratch));
    assert.ok(!existsSync((job.server?.transport === 'unix' ? job.server.socketDir : undefined) ?? '/nonexistent-dir-for-test'));
  });
});
