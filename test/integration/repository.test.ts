// The backup repository end to end against real QEMU: three backups (full,
// incremental, incremental) with writes, write-zeroes and discards between
// them each restore to exactly the bytes the disk held when the backup
// started; verify catches a flipped byte and names the file; prune keeps every
// kept backup restoring to the same bytes; bad input changes nothing.

import assert from 'node:assert/strict';
import { closeSync, existsSync, openSync, readFileSync, readSync, readdirSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import type { Manifest } from '../../src/repository/repo.js';
import { runTool } from '../../src/qemu/tools.js';
import { TestEnv, guestWrite } from '../helpers/env.js';

const MiB = 1 << 20;

async function identical(a: string, b: string): Promise<boolean> {
  try {
    await runTool('qemu-img', ['compare', '-U', a, b]);
    return true;
  } catch {
    return false;
  }
}

describe('backup repository (real QEMU)', () => {
  let env: TestEnv;
  let repo: string;
  const refs = new Map<string, Map<string, string>>(); // backup id → target → reference raw image

  async function snapshot(tag: string): Promise<Map<string, string>> {
    const out = new Map<string, string>();
    for (const d of env.qb.domains.blockList('vm')) {
      await guestWrite(env.qb, 'vm', d.target, 'flush');
      const file = env.path(`ref-${tag}-${d.target}.raw`);
      await runTool('qemu-img', ['convert', '-U', '-O', 'raw', d.source, file]);
      out.set(d.target, file);
    }
    return out;
  }
  async function backup(tag: string, mode: 'push' | 'pull' = 'push'): Promise<Manifest> {
    const ref = await snapshot(tag);
    const m = await env.qb.repository.backup('vm', { repo, mode });
    refs.set(m.id, ref);
    return m;
  }
  async function assertRestores(m: Manifest, tag: string): Promise<void> {
    const to = env.path(`restore-${tag}-${m.id}`);
    const r = await env.qb.repository.restore('vm', { repo, backup: m.id, to, format: 'raw' });
    for (const d of r.disks) {
      const ref = refs.get(m.id)?.get(d.target);
      assert.ok(ref !== undefined);
      assert.ok(await identical(d.file, ref), `backup ${m.id} disk ${d.target} restores to the bytes at backup time (${tag})`);
    }
  }

  before(async () => {
    env = new TestEnv();
    repo = env.path('repo');
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 32 * MiB }, { target: 'sdb', sizeBytes: 16 * MiB, clusterSizeBytes: 256 * 1024 }]);
    await env.qb.domains.start('vm', { paused: true });
  });
  after(async () => env.cleanup());

  test('full, incremental, incremental: each restores to the bytes at its start; incrementals hold only changes', async () => {
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x11 0 8M');
    await guestWrite(env.qb, 'vm', 'sdb', 'write -P 0x12 1M 3M');
    const b1 = await backup('b1');
    assert.deepEqual(b1.disks.map((d) => [d.target, d.level]), [['sda', 'full'], ['sdb', 'full']]);

    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x21 20M 64k');
    await guestWrite(env.qb, 'vm', 'sda', 'write -z 1M 128k');
    await guestWrite(env.qb, 'vm', 'sdb', 'discard 1M 256k');
    const b2 = await backup('b2');
    assert.deepEqual(b2.disks.map((d) => [d.level, d.parent]), [['incremental', b1.id], ['incremental', b1.id]]);
    assert.ok((b2.disks[0]?.bytesWritten ?? Infinity) <= 64 * 1024, 'sda incremental stores only the 64k of new data');

    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x31 2M 4k');
    await guestWrite(env.qb, 'vm', 'sda', 'discard 4M 1M');
    const b3 = await backup('b3');
    assert.deepEqual(b3.disks.map((d) => d.parent), [b2.id, b2.id]);

    for (const m of [b1, b2, b3]) await assertRestores(m, 'initial');
    const listed = env.qb.repository.list(repo, 'vm').map((m) => m.id);
    assert.deepEqual(listed, [b1.id, b2.id, b3.id]);
    const report = await env.qb.repository.verify(repo);
    assert.deepEqual(report.problems, []);
    assert.equal(report.backupsChecked, 3);
  });

  test('push and pull give identical restores (full and incremental)', async () => {
    const pushRepo = env.path('repo-push');
    const pullRepo = env.path('repo-pull');
    for (const round of [1, 2]) {
      await guestWrite(env.qb, 'vm', 'sda', `write -P 0x7${round} ${round * 5}M 200k`);
      await guestWrite(env.qb, 'vm', 'sdb', `write -z ${round}M 256k`);
      const ref = await snapshot(`pp${round}`);
      const a = await env.qb.repository.backup('vm', { repo: pushRepo, mode: 'push' });
      const b = await env.qb.repository.backup('vm', { repo: pullRepo, mode: 'pull' });
      assert.deepEqual(b.disks.map((d) => d.level), round === 1 ? ['full', 'full'] : ['incremental', 'incremental']);
      const ra = await env.qb.repository.restore('vm', { repo: pushRepo, backup: a.id, to: env.path(`pp-a${round}`), format: 'raw' });
      const rb = await env.qb.repository.restore('vm', { repo: pullRepo, backup: b.id, to: env.path(`pp-b${round}`), format: 'raw' });
      for (const [i, d] of ra.disks.entries()) {
        assert.ok(await identical(d.file, rb.disks[i]?.file ?? ''), `push and pull restores of ${d.target} agree (round ${round})`);
        assert.ok(await identical(d.file, ref.get(d.target) ?? ''), `and equal the disk (round ${round})`);
      }
      if (round === 2) assert.ok((b.disks[0]?.bytesWritten ?? Infinity) <= 256 * 1024, 'the pull incremental copied only dirty extents');
    }
  });

  test('restore --until picks the latest backup at or before the time; qcow2 output works too', async () => {
    const all = env.qb.repository.list(repo, 'vm');
    const second = all[1];
    assert.ok(second !== undefined);
    const r = await env.qb.repository.restore('vm', { repo, until: new Date(new Date(second.time).getTime() + 1), to: env.path('until'), disks: ['sda'] });
    assert.equal(r.backup, second.id);
    assert.deepEqual(r.disks.map((d) => d.target), ['sda']);
    assert.ok(await identical(r.disks[0]?.file ?? '', refs.get(second.id)?.get('sda') ?? ''));
  });

  test('a hot-plugged disk is full in the next backup while the others stay incremental', async () => {
    const hot = await env.image('hot.qcow2', 8 * MiB);
    await env.qb.domains.attachDisk('vm', { source: hot, target: 'sdc', format: 'qcow2' });
    await guestWrite(env.qb, 'vm', 'sdc', 'write -P 0x41 0 1M');
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x42 3M 4k');
    const b4 = await backup('b4');
    const levels = Object.fromEntries(b4.disks.map((d) => [d.target, d.level]));
    assert.deepEqual(levels, { sda: 'incremental', sdb: 'incremental', sdc: 'full' });
    assert.match(b4.disks.find((d) => d.target === 'sdc')?.fullReason ?? '', /no earlier backup/);
    await assertRestores(b4, 'hotplug');
  });

  test('prune --keep-last 2 keeps every kept backup restoring to the same bytes', async () => {
    const before = env.qb.repository.list(repo, 'vm');
    const r = await env.qb.repository.prune('vm', { repo, keepLast: 2 });
    assert.deepEqual(r.kept, before.slice(-2).map((m) => m.id));
    assert.deepEqual(r.removed, before.slice(0, -2).map((m) => m.id));
    assert.deepEqual(r.checkpointsRemoved, before.slice(0, -2).map((m) => m.checkpoint), 'the dropped backups’ checkpoints are merged away');
    const after = env.qb.repository.list(repo, 'vm');
    assert.equal(after.length, 2);
    for (const m of after) await assertRestores(m, 'after-prune');
    assert.deepEqual((await env.qb.repository.verify(repo)).problems, []);
    // nothing but the kept backups' files remains
    const files = after.flatMap((m) => m.disks.map((d) => d.file)).sort();
    const onDisk = readdirSync(join(repo, 'vm', 'disks')).flatMap((sub) => readdirSync(join(repo, 'vm', 'disks', sub)).map((f) => join('disks', sub, f))).sort();
    assert.deepEqual(onDisk, files);
    // the next backup is still incremental on the newest kept one
    const next = await backup('b5');
    assert.ok(next.disks.every((d) => d.level === 'incremental' && d.parent === after.at(-1)?.id));
    await assertRestores(next, 'after-prune-next');
  });

  test('verify fails naming the file after one byte of a data cluster is flipped', async () => {
    const m = env.qb.repository.list(repo, 'vm').at(-2);
    const disk = m?.disks.find((d) => d.target === 'sda');
    assert.ok(m !== undefined && disk !== undefined);
    const file = join(repo, 'vm', disk.file);
    const { stdout } = await runTool('qemu-img', ['map', '--output=json', file]);
    const data = (JSON.parse(stdout) as Array<{ depth: number; data: boolean; offset?: number }>).find((e) => e.depth === 0 && e.data && e.offset !== undefined);
    assert.ok(data?.offset !== undefined, 'the backup has a data cluster');
    const fd = openSync(file, 'r+');
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, data.offset + 100);
    b[0] = (b[0] ?? 0) ^ 0xff;
    writeSync(fd, b, 0, 1, data.offset + 100);
    closeSync(fd);
    const r = await env.cli(['verify', '--repo', repo, 'vm']);
    assert.equal(r.code, 1);
    assert.ok(r.stderr.includes(file), r.stderr);
    assert.match(r.stderr, /does not match the recorded digest/);
    // restore refuses to hand out damaged bytes
    await assert.rejects(env.qb.repository.restore('vm', { repo, backup: m.id, to: env.path('damaged') }), (err: unknown) => isQbackupError(err, 'VERIFY_FAILED'));
    assert.ok(!existsSync(env.path('damaged/sda.qcow2')));
    // put the byte back
    const fd2 = openSync(file, 'r+');
    b[0] = (b[0] ?? 0) ^ 0xff;
    writeSync(fd2, b, 0, 1, data.offset + 100);
    closeSync(fd2);
    assert.deepEqual((await env.qb.repository.verify(repo)).problems, []);
  });

  test('bad input: one-sentence errors and the repository left as it was', async () => {
    const snapshotRepo = (): string => JSON.stringify(env.qb.repository.list(repo).map((m) => m.id));
    const before = snapshotRepo();
    const aFile = env.writeFile('not-a-dir', 'x');
    const newer = env.path('newer');
    await runTool('mkdir', ['-p', newer]);
    writeFileSync(join(newer, 'qbackup-repo.json'), JSON.stringify({ format: 99 }));
    const existingTo = env.path('occupied');
    await runTool('mkdir', ['-p', existingTo]);
    writeFileSync(join(existingTo, 'sda.qcow2'), 'precious');
    const cases: Array<[string[], RegExp]> = [
      [['backup', 'vm', '--repo', aFile], /is not a directory/],
      [['backup', 'vm', '--repo', newer], /format 99, written by a newer qbackup/],
      [['restore', 'vm', '--repo', repo, '--backup', 'nope', '--to', env.path('x')], /has no backup "nope"/],
      [['restore', 'vm', '--repo', repo, '--backup', '../../etc', '--to', env.path('x')], /has no backup/],
      [['restore', 'vm', '--repo', repo, '--to', existingTo], /"[^"]*sda\.qcow2" exists/],
      [['restore', 'vm', '--repo', repo, '--until', 'yesterday-ish', '--to', env.path('x')], /Invalid --until/],
      [['backup', 'vm', '--repo', repo, '--disk', 'sdz'], /has no disk "sdz"/],
      [['prune', 'vm', '--repo', repo, '--keep-last', '0'], /keep at least 1/],
    ];
    for (const [args, pattern] of cases) {
      const r = await env.cli(args);
      assert.equal(r.code, 1, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, pattern);
      assert.equal(r.stderr.trim().split('\n').length, 1);
    }
    assert.equal(snapshotRepo(), before);

    // a second backup of the same domain at once is refused by the repository lock
    const [x, y] = await Promise.all([env.cli(['backup', 'vm', '--repo', repo]), env.cli(['backup', 'vm', '--repo', repo])]);
    assert.deepEqual([x.code, y.code].sort(), [0, 1], `${x.stderr} ${y.stderr}`);
    assert.match(x.code === 1 ? x.stderr : y.stderr, /is busy|is running/);

    // disk full while writing: a clear error, no file and no manifest left, no stray checkpoint
    const tiny = env.path('tiny');
    await runTool('mkdir', ['-p', tiny]);
    let mounted = false;
    try {
      await runTool('mount', ['-t', 'tmpfs', '-o', 'size=3M', 'tmpfs', tiny]);
      mounted = true;
    } catch {
      // not allowed to mount here: the disk-full case cannot be staged
    }
    if (mounted) {
      try {
        const checkpointsBefore = env.qb.checkpoints.list('vm').length;
        for (const mode of ['push', 'pull']) {
          const full = await env.cli(['backup', 'vm', '--repo', join(tiny, 'repo'), '--mode', mode]);
          assert.equal(full.code, 1, mode);
          assert.match(full.stderr, /No space left on device|ENOSPC/i);
          assert.equal(full.stderr.trim().split('\n').length, 1);
          assert.deepEqual(env.qb.repository.list(join(tiny, 'repo'), 'vm'), []);
          assert.deepEqual(readdirSync(join(tiny, 'repo', 'vm', 'disks')).flatMap((d) => readdirSync(join(tiny, 'repo', 'vm', 'disks', d))), []);
        }
        assert.equal(env.qb.checkpoints.list('vm').length, checkpointsBefore, 'the failed backups left no checkpoint');
      } finally {
        await runTool('umount', [tiny]);
      }
    }

    // a truncated manifest is reported, not skipped
    const mdir = join(repo, 'vm', 'manifests');
    const victim = join(mdir, readdirSync(mdir).sort()[0] ?? '');
    const text = readFileSync(victim, 'utf8');
    writeFileSync(victim, text.slice(0, text.length / 2));
    const r = await env.cli(['backup-list', '--repo', repo]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /is damaged/);
    writeFileSync(victim, text);

    // a missing backing file fails verify naming the file that needs it
    const newest = env.qb.repository.list(repo, 'vm').at(-1);
    const parentId = newest?.disks[0]?.parent;
    assert.ok(parentId !== undefined && parentId !== null);
    const parent = env.qb.repository.list(repo, 'vm').find((m) => m.id === parentId);
    const parentFile = join(repo, 'vm', parent?.disks[0]?.file ?? '');
    const saved = readFileSync(parentFile);
    const { rmSync } = await import('node:fs');
    rmSync(parentFile);
    const v = await env.cli(['verify', '--repo', repo, 'vm']);
    assert.equal(v.code, 1);
    assert.match(v.stderr, /missing/);
    writeFileSync(parentFile, saved);
  });
});
