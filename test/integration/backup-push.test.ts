// Push-mode backup jobs against real QEMU: a full and an incremental backup
// (with write-zeroes and discards over data the full one holds) compare
// identical to the disk; the incremental holds about the changed clusters only;
// the job and its checkpoint start in one QMP transaction; coverage decides
// per disk; the configuration is frozen while a job runs; aborts and crashes
// leave nothing behind.

import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import { Qbackup } from '../../src/qbackup.js';
import { runTool } from '../../src/image/tools.js';
import { TestEnv, guestWrite } from '../helpers/env.js';

const MiB = 1 << 20;

async function flush(qb: Qbackup, target: string): Promise<void> {
  await guestWrite(qb, 'vm', target, 'flush');
}
async function compare(a: string, b: string): Promise<boolean> {
  try {
    await runTool('qemu-img', ['compare', '-U', a, b]);
    return true;
  } catch {
    return false;
  }
}
/** Bytes of data allocated in the top file alone (not its backing chain). */
async function topDataBytes(file: string): Promise<number> {
  const { stdout } = await runTool('qemu-img', ['map', '--output=json', file]);
  const map = JSON.parse(stdout) as Array<{ length: number; depth: number; data: boolean }>;
  return map.filter((e) => e.depth === 0 && e.data).reduce((a, e) => a + e.length, 0);
}

describe('push backups (real QEMU)', () => {
  let env: TestEnv;
  let sent: Array<{ execute?: string; arguments?: { actions?: Array<{ type: string }> } }> = [];
  let qb: Qbackup;
  let sda: string;
  let sdb: string;

  before(async () => {
    env = new TestEnv();
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 32 * MiB }, { target: 'sdb', sizeBytes: 16 * MiB, clusterSizeBytes: 512 * 1024 }]);
    qb = Qbackup.open({ stateDir: env.stateDir, qmpTrace: (dir, msg) => dir === 'send' && sent.push(msg as (typeof sent)[number]) });
    await qb.domains.start('vm', { paused: true });
    sda = qb.domains.blockList('vm')[0]?.source ?? '';
    sdb = qb.domains.blockList('vm')[1]?.source ?? '';
    await guestWrite(qb, 'vm', 'sda', 'write -P 0x11 0 8M');
    await guestWrite(qb, 'vm', 'sdb', 'write -P 0x22 1M 2M');
  });
  after(async () => {
    qb.close();
    await env.cleanup();
  });

  test('full backup with a new checkpoint: one transaction, identical copy', async () => {
    sent = [];
    const job = await qb.backups.begin('vm', { mode: 'push' }, { checkpoint: { name: 'c1' }, targetDir: env.path('bk') });
    assert.equal(job.checkpoint, 'c1');
    const transactions = sent.filter((m) => m.execute === 'transaction');
    assert.equal(transactions.length, 1, 'the job starts with one transaction');
    const types = transactions[0]?.arguments?.actions?.map((a) => a.type) ?? [];
    assert.deepEqual(types.filter((t) => t === 'blockdev-backup').length, 2);
    assert.deepEqual(types.filter((t) => t === 'block-dirty-bitmap-add').length, 2, 'the checkpoint bitmaps are in the same transaction');
    const result = await qb.backups.wait('vm', job.id);
    assert.equal(result.state, 'completed');
    assert.deepEqual(result.disks.map((d) => d.mode), ['full', 'full']);
    await flush(qb, 'sda');
    await flush(qb, 'sdb');
    assert.ok(await compare(env.path('bk/sda.c1.qcow2'), sda));
    assert.ok(await compare(env.path('bk/sdb.c1.qcow2'), sdb));
    assert.equal(qb.checkpoints.info('vm', 'c1').current, true);
  });

  test('incremental after writes, write-zeroes and discards: identical chain, only changed clusters', async () => {
    await guestWrite(qb, 'vm', 'sda', 'write -P 0x33 20M 64k');
    await guestWrite(qb, 'vm', 'sda', 'write -z 1M 128k'); // zeroes over data the full backup has
    await guestWrite(qb, 'vm', 'sda', 'discard 2M 64k'); // discard over data the full backup has
    await guestWrite(qb, 'vm', 'sdb', 'write -P 0x44 10M 4k');
    const started = await qb.backups.begin('vm', { mode: 'push', since: 'c1' }, { checkpoint: { name: 'c2' }, targetDir: env.path('bk') });
    const result = await qb.backups.wait('vm', started.id);
    assert.equal(result.state, 'completed', result.error);
    assert.deepEqual(result.disks.map((d) => d.mode), ['incremental', 'incremental']);
    assert.ok(result.disks.every((d) => d.backingFile !== undefined), 'incremental targets are backed by the previous backup');
    await flush(qb, 'sda');
    await flush(qb, 'sdb');
    assert.ok(await compare(env.path('bk/sda.c2.qcow2'), sda), 'sda chain equals the disk');
    assert.ok(await compare(env.path('bk/sdb.c2.qcow2'), sdb), 'sdb chain equals the disk');
    // 64k of new data on sda (zeroes and discards become zero clusters, not data); one 64k cluster on sdb
    assert.ok((await topDataBytes(env.path('bk/sda.c2.qcow2'))) <= 64 * 1024, 'sda incremental holds only the changed data');
    assert.ok((await topDataBytes(env.path('bk/sdb.c2.qcow2'))) <= 512 * 1024, 'sdb incremental holds only the changed cluster');
    // the backing link is relative so the backups can move together
    const { stdout } = await runTool('qemu-img', ['info', '--output=json', env.path('bk/sda.c2.qcow2')]);
    assert.equal((JSON.parse(stdout) as { 'backing-filename': string })['backing-filename'], 'sda.c1.qcow2');
  });

  test('a hot-plugged and a re-attached disk get full backups while the others stay incremental; --strict refuses', async () => {
    const hot = await env.image('hot.qcow2', 8 * MiB);
    await qb.domains.attachDisk('vm', { source: hot, target: 'sdc', format: 'qcow2' });
    await qb.domains.detachDisk('vm', 'sdb');
    await qb.domains.attachDisk('vm', { source: sdb, target: 'sdb', format: 'qcow2' });
    await guestWrite(qb, 'vm', 'sdc', 'write -P 0x55 0 64k');

    const before = readdirSync(env.path('bk')).sort();
    await assert.rejects(qb.backups.begin('vm', { mode: 'push', since: 'c2' }, { checkpoint: { name: 'c3' }, targetDir: env.path('bk'), strict: true }), (err: unknown) => {
      assert.ok(isQbackupError(err));
      assert.match(err.message, /disk "sdb": detached-since/);
      assert.match(err.message, /disk "sdc": not-in-checkpoint/);
      return true;
    });
    assert.deepEqual(readdirSync(env.path('bk')).sort(), before, '--strict leaves nothing behind');
    assert.equal(qb.checkpoints.store.get('vm', 'c3'), undefined);

    const started = await qb.backups.begin('vm', { mode: 'push', since: 'c2' }, { checkpoint: { name: 'c3' }, targetDir: env.path('bk') });
    const result = await qb.backups.wait('vm', started.id);
    const byTarget = new Map(result.disks.map((d) => [d.target, d]));
    assert.equal(byTarget.get('sda')?.mode, 'incremental');
    assert.equal(byTarget.get('sdb')?.mode, 'full');
    assert.ok(byTarget.get('sdb')?.fullReasons?.some((r) => r.code === 'detached-since'));
    assert.equal(byTarget.get('sdc')?.mode, 'full');
    assert.deepEqual(byTarget.get('sdc')?.fullReasons?.map((r) => r.code), ['not-in-checkpoint']);
    for (const t of ['sda', 'sdb', 'sdc']) await flush(qb, t);
    assert.ok(await compare(env.path('bk/sdc.c3.qcow2'), hot));
    assert.ok(await compare(env.path('bk/sdb.c3.qcow2'), sdb));
    assert.ok(await compare(env.path('bk/sda.c3.qcow2'), sda));
  });

  test('while a job runs the configuration is frozen; domjobabort removes its targets', async () => {
    await qb.backups.begin('vm', { mode: 'push' }, { targetDir: env.path('slow'), bandwidthBytesPerSec: 1 * MiB });
    const job = await qb.backups.info('vm');
    assert.equal(job?.state, 'running');
    const frozen = [
      () => qb.domains.attachDisk('vm', { source: env.path('hot2.qcow2'), target: 'sdd', format: 'qcow2' }),
      () => qb.domains.detachDisk('vm', 'sdc'),
      () => qb.checkpoints.create('vm', { name: 'during' }),
      () => qb.checkpoints.delete('vm', 'c1'),
      () => qb.domains.undefine('vm', { checkpointsMetadata: true }),
    ];
    for (const attempt of frozen) {
      await assert.rejects(attempt(), (err: unknown) => {
        assert.ok(isQbackupError(err, 'BACKUP_RUNNING'), String(err));
        assert.match(err.message, new RegExp(`backup job "${job?.id ?? ''}" is running`));
        return true;
      });
    }
    assert.equal(qb.checkpoints.list('vm').length, 3, 'reads still work');
    const second = await env.cli(['backup-begin', 'vm', '--target-dir', env.path('other')]);
    assert.equal(second.code, 1);
    assert.match(second.stderr, /is running/);

    const aborted = await qb.backups.abort('vm');
    assert.equal(aborted.state, 'aborted');
    assert.deepEqual(readdirSync(env.path('slow')), [], 'targets of an aborted job are removed');
    const nodes = (await qb.domains.monitorCommand('vm', '{"execute":"query-named-block-nodes"}')) as Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string }> }>;
    assert.ok(!nodes.some((n) => n['node-name'].startsWith('bk')), 'no target node left');
    assert.ok(!nodes.some((n) => (n['dirty-bitmaps'] ?? []).some((b) => b.name.startsWith('qbackup-tmp'))), 'no temporary bitmap left');
    assert.equal(((await qb.domains.monitorCommand('vm', '{"execute":"query-jobs"}')) as unknown[]).length, 0);
  });

  test('qbackup killed inside backup-begin: the next command cleans up or adopts', async () => {
    // killed after the job was recorded but before QEMU heard of it: cleaned up
    const r1 = await env.cli(['backup-begin', 'vm', '--target-dir', env.path('k1'), '--checkpoint', 'k1'], { env: { QBACKUP_CRASH_AT: 'backup-begin:before-qemu' } });
    assert.notEqual(r1.code, 0);
    await env.cliOk(['domjobinfo', 'vm']);
    assert.deepEqual(existsSync(env.path('k1')) ? readdirSync(env.path('k1')) : [], []);
    assert.equal(qb.checkpoints.store.get('vm', 'k1'), undefined, 'the checkpoint was not created');
    // killed after QEMU started the job: adopted, its checkpoint committed, and it completes
    const r2 = await env.cli(['backup-begin', 'vm', '--target-dir', env.path('k2'), '--checkpoint', 'k2'], { env: { QBACKUP_CRASH_AT: 'backup-begin:after-qemu' } });
    assert.notEqual(r2.code, 0);
    const adopted = await qb.backups.info('vm');
    const result = adopted !== undefined ? await qb.backups.wait('vm', adopted.id) : await qb.backups.lastResult('vm');
    assert.equal(result?.state, 'completed');
    assert.equal(qb.checkpoints.info('vm', 'k2').current, true);
    for (const t of ['sda', 'sdb', 'sdc']) await flush(qb, t);
    assert.ok(await compare(env.path('k2/sda.k2.qcow2'), sda));
  });

  test('backup-begin BACKUP.xml CHECKPOINT.xml: per-disk choices and a described checkpoint from XML', async () => {
    const target = env.path('xml/sda-only.qcow2');
    const backupXml = env.writeFile(
      'job.xml',
      `<domainbackup><incremental>k2</incremental><disks><disk name='sda' type='file'><driver type='qcow2'/><target file='${target}'/></disk><disk name='sdb' backup='no'/><disk name='sdc' backup='no'/></disks></domainbackup>`,
    );
    const checkpointXml = env.writeFile('cp.xml', `<domaincheckpoint><name>fromxml</name><description>made with the job</description></domaincheckpoint>`);
    const out = JSON.parse(await env.cliOk(['backup-begin', 'vm', backupXml, checkpointXml, '--wait', '--json'])) as { state: string; checkpoint: string; disks: Array<{ target: string; mode: string; targetFile: string }> };
    assert.equal(out.state, 'completed');
    assert.equal(out.checkpoint, 'fromxml');
    assert.deepEqual(out.disks.map((d) => [d.target, d.mode, d.targetFile]), [['sda', 'incremental', target]]);
    assert.match(await env.cliOk(['checkpoint-dumpxml', 'vm', 'fromxml', '--no-domain']), /<description>made with the job<\/description>/);
    const completed = JSON.parse(await env.cliOk(['domjobinfo', 'vm', '--completed', '--json'])) as { id: string; state: string };
    assert.equal(completed.state, 'completed');
  });

  test('QEMU killed mid-job: the job is reported failed and its partial targets are removed', async () => {
    await qb.backups.begin('vm', { mode: 'push' }, { targetDir: env.path('dead'), bandwidthBytesPerSec: 1 * MiB });
    const pid = qb.domains.info('vm').pid;
    assert.ok(pid !== undefined);
    process.kill(pid, 'SIGKILL');
    await new Promise((r) => setTimeout(r, 300));
    const r = await env.cliOk(['domjobinfo', 'vm', '--completed', '--json']);
    const last = JSON.parse(r) as { state: string; error: string };
    assert.equal(last.state, 'failed');
    assert.match(last.error, /QEMU exited/);
    assert.deepEqual(readdirSync(env.path('dead')), []);
  });

  test('bad input: unknown disk, unknown checkpoint, existing target, shut-off domain', async () => {
    await qb.domains.start('vm', { paused: true });
    const xml = env.writeFile('b.xml', `<domainbackup><disks><disk name='sdz'/></disks></domainbackup>`);
    const cases: Array<[string[], RegExp]> = [
      [['backup-begin', 'vm', xml], /has no disk "sdz"/],
      [['backup-begin', 'vm', '--incremental', 'nope'], /has no checkpoint "nope"/],
      [['backup-begin', 'vm', env.writeFile('dup.xml', `<domainbackup><disks><disk name='sda'/><disk name='sda'/></disks></domainbackup>`)], /sda/],
      [['backup-begin', 'vm', '--target-dir', env.path('bk'), '--checkpoint', 'c1'], /already exists|exists/],
      [['backup-begin', 'vm', env.writeFile('tcp.xml', `<domainbackup mode='pull'><server transport='tcp' name='localhost'/></domainbackup>`)], /port/],
      [['domjobabort', 'vm'], /no backup job/],
    ];
    for (const [args, pattern] of cases) {
      const r = await env.cli(args);
      assert.equal(r.code, 1, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, pattern);
      assert.equal(r.stderr.trim().split('\n').length, 1);
    }
    // the target of c1's backup exists: refused without --reuse-external
    const exists = await env.cli(['backup-begin', 'vm', '--target-dir', env.path('bk'), '--checkpoint', 'c1x', env.writeFile('t.xml', `<domainbackup><disks><disk name='sda'><target file='${env.path('bk/sda.c1.qcow2')}'/></disk></disks></domainbackup>`)]);
    assert.equal(exists.code, 1);
    assert.match(exists.stderr, /exists \(use --reuse-external/);
    await qb.domains.shutdown('vm');
    const off = await env.cli(['backup-begin', 'vm']);
    assert.match(off.stderr, /it is not running/);
  });
});
