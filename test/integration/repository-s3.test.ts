// The repository on a real object store (Ceph radosgw, test/helpers/ceph.ts):
// full and incremental backups of real QEMU domains through the CLI, restores
// byte for byte, verify, prune and gc; two "hosts" (two state directories,
// two processes) sharing one bucket and its chunks, with gc running on one
// while the other backs up; and the faults of object storage (credentials,
// a missing bucket, the endpoint going away mid-backup, a garbage object).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { S3Backend } from '../../src/repository/backend/s3.js';
import type { Manifest, RepoStats, VerifyReport } from '../../src/repository/repository.js';
import { ceph, stopCeph, type Ceph } from '../helpers/ceph.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { MiB, cliError, imageDiffers, randomFile, referenceCopies, spawnCli } from '../helpers/repo.js';

after(stopCeph);

describe('repository on S3 (Ceph radosgw, real QEMU)', () => {
  let c: Ceph;
  let hostA: TestEnv;
  let hostB: TestEnv;
  let restores = 0;
  before(async () => {
    c = await ceph();
    hostA = new TestEnv('qbt-s3a-', { backends: { s3: c.settings } });
    hostB = new TestEnv('qbt-s3b-', { backends: { s3: c.settings } });
  });
  after(async () => {
    await hostA?.cleanup();
    await hostB?.cleanup();
  });

  const cli = async (env: TestEnv, args: readonly string[], extra: Record<string, string> = {}) => spawnCli(env, args, { ...c.env, ...extra }).done;
  const ok = async (env: TestEnv, args: readonly string[]): Promise<string> => {
    const r = await cli(env, args);
    assert.equal(r.code, 0, `qbackup ${args.join(' ')}: ${r.stderr}`);
    return r.stdout;
  };
  const backup = async (env: TestEnv, domain: string, repo: string, extra: string[] = []): Promise<Manifest> => JSON.parse(await ok(env, ['--json', 'backup', domain, '--repo', repo, ...extra])) as Manifest;
  const assertRestores = async (env: TestEnv, repo: string, m: Manifest, refs: Map<string, string>): Promise<void> => {
    const out = await env.qb.repository.restore(m.domain, { repo, backup: m.id, to: env.path(`restore-${m.id}-${++restores}`), format: 'raw' });
    for (const d of out.disks) assert.equal(await imageDiffers(d.file, 'raw', refs.get(d.target) ?? ''), undefined, `backup ${m.id} disk ${d.target}`);
  };

  test('init creates the bucket; full and incremental back up, restore identically, verify, prune and gc', async () => {
    const repo = `s3://${c.bucket()}/hosts`;
    assert.match(await ok(hostA, ['init', '--repo', repo]), /./);
    await hostA.defineDomain('web', [{ target: 'sda', sizeBytes: 32 * MiB }]);
    await hostA.qb.domains.start('web', { paused: true });
    await guestWrite(hostA.qb, 'web', 'sda', `write -s ${randomFile(hostA, 'web-data', 8 * MiB)} 0 8M`);
    const refs1 = await referenceCopies(hostA, 'web', 'w1');
    const m1 = await backup(hostA, 'web', repo);
    assert.equal(m1.disks[0]?.level, 'full');
    await guestWrite(hostA.qb, 'web', 'sda', 'write -P 0x5a 20M 1M');
    const refs2 = await referenceCopies(hostA, 'web', 'w2');
    const m2 = await backup(hostA, 'web', repo);
    assert.equal(m2.disks[0]?.level, 'incremental');
    assert.ok((m2.disks[0]?.bytesRead ?? Infinity) <= 2 * MiB, `the incremental read only the change: ${JSON.stringify(m2.disks[0])}`);
    await assertRestores(hostA, repo, m1, refs1);
    await assertRestores(hostA, repo, m2, refs2);
    const verify = JSON.parse(await ok(hostA, ['--json', 'verify', '--repo', repo, '--read-data'])) as VerifyReport;
    assert.deepEqual(verify.problems, []);
    await ok(hostA, ['prune', 'web', '--repo', repo, '--keep-last', '1']);
    const listed = JSON.parse(await ok(hostA, ['--json', 'backup-list', '--repo', repo])) as Manifest[];
    assert.deepEqual(listed.map((m) => m.id), [m2.id]);
    await ok(hostA, ['gc', '--repo', repo]);
    assert.deepEqual((JSON.parse(await ok(hostA, ['--json', 'verify', '--repo', repo, '--read-data'])) as VerifyReport).problems, []);
    await assertRestores(hostA, repo, m2, refs2);
    await hostA.qb.domains.destroy('web');
  });

  test('instant restore from the bucket: the domain runs from S3 while its data moves in, then holds the backup', async () => {
    const repo = `s3://${c.bucket()}/instant`;
    await ok(hostA, ['init', '--repo', repo]);
    await hostA.defineDomain('app', [{ target: 'sda', sizeBytes: 16 * MiB }]);
    await hostA.qb.domains.start('app', { paused: true });
    await guestWrite(hostA.qb, 'app', 'sda', `write -s ${randomFile(hostA, 'app-data', 4 * MiB)} 0 4M`);
    const refs = await referenceCopies(hostA, 'app', 'app1');
    await backup(hostA, 'app', repo);
    await hostA.qb.domains.destroy('app');
    // The server is a separate process: it reaches the bucket with the library's S3 settings, handed over in its environment.
    await hostA.qb.instant.restore('app', { repo, as: 'app2', to: hostA.path('app2') });
    assert.equal(hostA.qb.domains.info('app2').state, 'running');
    const done = await hostA.qb.instant.wait('app2', { pollMs: 200 });
    assert.equal(done.state, 'completed');
    await hostA.qb.domains.destroy('app2');
    assert.equal(await imageDiffers(hostA.path('app2/sda.qcow2'), 'qcow2', refs.get('sda') ?? ''), undefined);
  });

  test('two hosts back up two domains into one bucket at once and share chunks; gc on one while the other backs up loses nothing', async () => {
    const repo = `s3://${c.bucket()}/fleet`;
    await ok(hostA, ['init', '--repo', repo]);
    const shared = randomFile(hostA, 'template', 16 * MiB);
    const refs = new Map<string, Map<string, string>>();
    for (const [env, name, fill] of [[hostA, 'alpha', 0x11], [hostB, 'beta', 0x22]] as const) {
      await env.defineDomain(name, [{ target: 'sda', sizeBytes: 32 * MiB }]);
      await env.qb.domains.start(name, { paused: true });
      await guestWrite(env.qb, name, 'sda', `write -s ${shared} 0 16M`);
      await guestWrite(env.qb, name, 'sda', `write -P ${fill} 24M 1M`);
      refs.set(name, await referenceCopies(env, name, 'first'));
    }
    const [ra, rb] = await Promise.all([cli(hostA, ['--json', 'backup', 'alpha', '--repo', repo]), cli(hostB, ['--json', 'backup', 'beta', '--repo', repo])]);
    assert.equal(ra.code, 0, ra.stderr);
    assert.equal(rb.code, 0, rb.stderr);
    const ma = JSON.parse(ra.stdout) as Manifest;
    const mb = JSON.parse(rb.stdout) as Manifest;
    const stats = JSON.parse(await ok(hostB, ['--json', 'stats', '--repo', repo])) as RepoStats;
    // 2 × 17 MiB of data; the 16 MiB template is stored (about) once.
    assert.equal(stats.backups, 2);
    assert.ok(stats.uniqueBytes < 24 * MiB && stats.dedupRatio > 1.3, `chunks are shared: ${JSON.stringify(stats)}`);
    // Host B deletes its backup's data out from under nothing: prune, then gc while host A backs up again.
    await guestWrite(hostB.qb, 'beta', 'sda', 'write -P 0x33 24M 1M');
    await backup(hostB, 'beta', repo, ['--full']);
    await ok(hostB, ['prune', 'beta', '--repo', repo, '--keep-last', '1']);
    await guestWrite(hostA.qb, 'alpha', 'sda', `write -s ${randomFile(hostA, 'alpha-more', 30 * MiB)} 0 30M`);
    refs.set('alpha', await referenceCopies(hostA, 'alpha', 'second'));
    const running = spawnCli(hostA, ['--json', 'backup', 'alpha', '--repo', repo, '--full', '--workers', '1'], c.env);
    const probe = new S3Backend({ bucket: repo.slice(5, repo.indexOf('/', 5)), prefix: 'fleet/', pathStyle: true }, c.settings);
    const sawLock = await until(async () => (await probe.list('locks/')).length > 0, 30_000);
    assert.ok(sawLock, 'host A holds its backup lease');
    const gc = JSON.parse(await ok(hostB, ['--json', 'gc', '--repo', repo])) as { condemned: number; packsDeleted: number };
    const stillRunning = running.child.exitCode === null;
    const done = await running.done;
    assert.equal(done.code, 0, done.stderr);
    console.log(`# gc on host B during host A's backup (still running: ${stillRunning}): ${JSON.stringify(gc)}`);
    // It saw host A's lease: beta's old data was condemned, not deleted.
    assert.ok(gc.condemned > 0 && gc.packsDeleted === 0, JSON.stringify(gc));
    const ma2 = JSON.parse(done.stdout) as Manifest;
    assert.deepEqual((JSON.parse(await ok(hostB, ['--json', 'verify', '--repo', repo, '--read-data'])) as VerifyReport).problems, []);
    await assertRestores(hostA, repo, ma2, refs.get('alpha') ?? new Map());
    assert.ok(ma.id !== mb.id);
    // With nothing running, a second gc frees what the first could only condemn.
    await ok(hostA, ['gc', '--repo', repo]);
    assert.deepEqual((JSON.parse(await ok(hostA, ['--json', 'verify', '--repo', repo, '--read-data'])) as VerifyReport).problems, []);
    await hostA.qb.domains.destroy('alpha');
    await hostB.qb.domains.destroy('beta');
  });

  test('wrong credentials and a missing bucket: one sentence each, nothing written, no secret shown', async () => {
    await hostA.defineDomain('cred', [{ target: 'sda', sizeBytes: 8 * MiB }]);
    const repo = `s3://${c.bucket()}/x`;
    const missing = await cli(hostA, ['--json', 'backup', 'cred', '--repo', repo]);
    assert.notEqual(missing.code, 0);
    const e1 = cliError(missing);
    assert.equal(e1.code, 'REPO_INVALID');
    assert.match(e1.message, /bucket "qbt-[0-9a-f]+" does not exist \(qbackup init creates it\)/);
    await ok(hostA, ['init', '--repo', repo]);
    const wrong = await cli(hostA, ['--json', 'backup', 'cred', '--repo', repo], { AWS_SECRET_ACCESS_KEY: 'not-the-secret-at-all' });
    const e2 = cliError(wrong);
    assert.equal(e2.code, 'REPO_ACCESS_DENIED');
    assert.ok(!wrong.stderr.includes('not-the-secret-at-all') && !wrong.stderr.includes(c.env['AWS_ACCESS_KEY_ID'] ?? '?'), wrong.stderr);
    assert.deepEqual(JSON.parse(await ok(hostA, ['--json', 'backup-list', '--repo', repo])), []);
    assert.equal(hostA.qb.checkpoints.list('cred').length, 0, 'no checkpoint was left behind');
  });

  test('the endpoint going away mid-backup fails the backup in one sentence and lists nothing; the next backup works', async () => {
    const repo = `s3://${c.bucket()}/away`;
    await ok(hostA, ['init', '--repo', repo]);
    await hostA.defineDomain('away', [{ target: 'sda', sizeBytes: 96 * MiB }]);
    await hostA.qb.domains.start('away', { paused: true });
    await guestWrite(hostA.qb, 'away', 'sda', `write -s ${randomFile(hostA, 'away-data', 80 * MiB)} 0 80M`);
    const refs = await referenceCopies(hostA, 'away', 'a1');
    const probe = new S3Backend({ bucket: repo.slice(5, repo.indexOf('/', 5)), prefix: 'away/', pathStyle: true }, c.settings);
    const run = spawnCli(hostA, ['--json', 'backup', 'away', '--repo', repo, '--workers', '1'], c.env);
    const packed = await until(async () => (await probe.list('data/')).length > 0, 60_000);
    assert.ok(packed, 'the backup stored a first pack');
    await c.stopGateway();
    let failed;
    try {
      failed = await run.done;
    } finally {
      await c.startGateway();
    }
    assert.notEqual(failed.code, 0, 'the backup failed');
    const e = cliError(failed);
    assert.ok(['REPO_UNAVAILABLE', 'BACKUP_FAILED'].includes(e.code), JSON.stringify(e));
    assert.match(e.message, /cannot be reached/);
    assert.deepEqual(JSON.parse(await ok(hostA, ['--json', 'backup-list', '--repo', repo])), [], 'no listed backup');
    const m = await backup(hostA, 'away', repo);
    await assertRestores(hostA, repo, m, refs);
    await hostA.qb.domains.destroy('away');
  });

  test('an object replaced with garbage: verify and restore name it', async () => {
    const repo = `s3://${c.bucket()}/garbage`;
    await ok(hostA, ['init', '--repo', repo]);
    await hostA.defineDomain('junk', [{ target: 'sda', sizeBytes: 16 * MiB }]);
    await hostA.qb.domains.start('junk', { paused: true });
    await guestWrite(hostA.qb, 'junk', 'sda', `write -s ${randomFile(hostA, 'junk-data', 4 * MiB)} 0 4M`);
    const m = await backup(hostA, 'junk', repo);
    const probe = new S3Backend({ bucket: repo.slice(5, repo.indexOf('/', 5)), prefix: 'garbage/', pathStyle: true }, c.settings);
    const [pack] = await probe.list('data/');
    assert.ok(pack !== undefined);
    const original = await probe.get(pack.key);
    const garbage = Buffer.from(original);
    for (let i = 4096; i < garbage.length; i += 65536) garbage[i] = (garbage[i] ?? 0) ^ 0xff;
    await probe.delete(pack.key);
    await probe.putIfAbsent(pack.key, garbage);
    const v = await cli(hostA, ['--json', 'verify', '--repo', repo, '--read-data']);
    assert.notEqual(v.code, 0);
    const report = JSON.parse(v.stdout) as VerifyReport;
    assert.ok(report.problems.length > 0 && report.problems.every((p) => p.backups.includes(`junk/${m.id}`)), v.stdout);
    const r = await cli(hostA, ['--json', 'restore', 'junk', '--repo', repo, '--to', hostA.path('junk-restore')]);
    assert.notEqual(r.code, 0);
    const e = cliError(r);
    assert.equal(e.code, 'REPO_DAMAGED');
    assert.match(e.message, /disk "sda" of backup/);
    await hostA.qb.domains.destroy('junk');
  });
});

async function until(check: () => Promise<boolean>, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await check().catch(() => false)) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return false;
}
