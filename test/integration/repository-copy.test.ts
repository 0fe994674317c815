// `qbackup copy` between repositories against real QEMU: a full and
// incrementals copied into a plain repository restore to the original bytes
// and keep their deltas; copying again copies nothing; a later incremental
// copies as a small delta on the target's own index; through an encrypted
// repository and another one under a different key back into a plain one,
// every backup still restores identically; a second domain's copy stores
// only the chunks the target lacks; from a hostile source (a damaged chunk,
// disk index or manifest) the backups that need the damaged object are left
// out and named in one sentence while the others are copied, and no damaged
// chunk reaches the target; a wrong passphrase, a
// chunk-size mismatch, an unknown backup and a copy into itself are refused
// with one sentence and list nothing new; --dry-run creates nothing; a
// copy killed once its first pack is in the target lists only backups
// that restore, and the next copy completes;
// `verify --read-data` passes on every target. The daemon runs copies from
// a schedule (created over HTTP, fake clock) and from POST /api/repository/copy
// with both passphrases in headers.
//
// Only local directories are exercised here: copy speaks to both
// repositories through the Backend interface only, so the S3 backend's case
// (local → S3 → local restores identically) belongs beside these.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { startDaemon } from '../../src/http/daemon.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import type { CopyReport, Manifest } from '../../src/repository/repository.js';
import { Store } from '../../src/repository/store.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { ApiClient } from '../helpers/http.js';
import { KiB, MiB, cliError, fileTree, flipByte, imageDiffers, liveObjects, randomFile, referenceCopies, spawnCli, waitFor } from '../helpers/repo.js';

describe('qbackup copy between repositories (real QEMU)', () => {
  let env: TestEnv;
  let r1: string;
  const backups: Manifest[] = [];
  const refs = new Map<string, Map<string, string>>();
  let restores = 0;

  async function backup(domain: string, tag: string): Promise<Manifest> {
    const ref = await referenceCopies(env, domain, tag);
    const m = await env.qb.repository.backup(domain, { repo: r1 });
    refs.set(m.id, ref);
    return m;
  }

  async function copy(args: string[], extraEnv: Record<string, string> = {}): Promise<CopyReport> {
    const r = await env.cli(['--json', 'copy', ...args], { env: extraEnv });
    assert.equal(r.code, 0, r.stderr);
    return JSON.parse(r.stdout) as CopyReport;
  }

  async function refused(args: string[], code: string, message: RegExp, extraEnv: Record<string, string> = {}): Promise<void> {
    const r = await env.cli(['--json', 'copy', ...args], { env: extraEnv });
    assert.equal(r.code, 1, r.stdout + r.stderr);
    const e = cliError(r);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, message);
  }

  /** Restores backup `m` from `repo` and compares every disk with the bytes it had at backup time. */
  async function assertRestores(repo: string, m: Manifest, password?: string): Promise<void> {
    const to = env.path(`restore-${++restores}`);
    const r = await env.qb.repository.restore(m.domain, { repo, backup: m.id, to, format: 'raw', ...(password !== undefined ? { password } : {}) });
    for (const d of r.disks) {
      const want = refs.get(m.id)?.get(d.target);
      assert.ok(want !== undefined, `a reference for ${m.id} ${d.target}`);
      const why = await imageDiffers(d.file, 'raw', want);
      assert.equal(why, undefined, `backup ${m.id} from ${repo}: ${why ?? ''}`);
    }
  }

  async function verifyReadData(repo: string, extraEnv: Record<string, string> = {}): Promise<void> {
    const r = await env.cli(['verify', '--repo', repo, '--read-data'], { env: extraEnv });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /read back intact/);
  }

  async function indexKinds(repo: string, m: Manifest, password?: string): Promise<string[]> {
    const store = await Store.open(new LocalBackend(repo), password !== undefined ? { password } : {});
    const got = await store.getManifest(m.domain, m.id);
    return Promise.all(got.disks.map(async (d) => (await store.getIndex(d.index)).kind));
  }

  before(async () => {
    delete process.env['QBACKUP_PASSWORD'];
    delete process.env['QBACKUP_FROM_PASSWORD'];
    env = new TestEnv('qbt-copy-');
    r1 = env.path('r1');
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 16 * MiB }, { target: 'sdb', sizeBytes: 8 * MiB }]);
    await env.qb.domains.start('vm', { paused: true });
    await guestWrite(env.qb, 'vm', 'sda', `write -s ${randomFile(env, 'a', 2 * MiB)} 0 2M`);
    await guestWrite(env.qb, 'vm', 'sdb', `write -s ${randomFile(env, 'b', 512 * KiB)} 1M 512k`);
    backups.push(await backup('vm', 'b1'));
    await guestWrite(env.qb, 'vm', 'sda', `write -s ${randomFile(env, 'c', 128 * KiB)} 8M 128k`);
    backups.push(await backup('vm', 'b2'));
    await guestWrite(env.qb, 'vm', 'sda', 'write -z 0 64k');
    await guestWrite(env.qb, 'vm', 'sdb', 'write -P 0x3c 4M 64k');
    backups.push(await backup('vm', 'b3'));
    assert.deepEqual(backups.map((m) => m.disks.map((d) => d.level).join()), ['full,full', 'incremental,incremental', 'incremental,incremental']);
  });
  after(async () => env.cleanup());

  test('full and incrementals into a new plain repository: restores identically, deltas stay deltas; again copies nothing', async () => {
    const r2 = env.path('r2');
    const rep = await copy(['vm', '--from', r1, '--to', r2]);
    assert.equal(rep.targetCreated, true);
    assert.equal(rep.reencrypted, false);
    assert.deepEqual(rep.copied.map((b) => b.id), backups.map((m) => m.id));
    const { named } = await liveObjects(r1);
    assert.equal(rep.chunksRead, named.size, 'every chunk the chains name is read once');
    assert.equal(rep.chunksStored, named.size);
    assert.equal(rep.indexesWritten, 6);
    for (const m of backups) await assertRestores(r2, m);
    assert.deepEqual(await indexKinds(r2, backups[2] as Manifest), ['delta', 'delta']);
    await verifyReadData(r2);

    const before = fileTree(r2);
    const again = await env.cli(['copy', 'vm', '--from', r1, '--to', r2]);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stdout, /Nothing to copy: 3 backup\(s\) already in /);
    assert.deepEqual(fileTree(r2), before, 'copying again writes nothing');

    // A later incremental copies as a small delta on the target's own index.
    await guestWrite(env.qb, 'vm', 'sda', `write -s ${randomFile(env, 'd', 64 * KiB)} 12M 64k`);
    const b4 = await backup('vm', 'b4');
    backups.push(b4);
    const next = await copy(['--from', r1, '--to', r2]);
    assert.deepEqual(next.copied.map((b) => b.id), [b4.id]);
    assert.equal(next.skipped.length, 3);
    assert.equal(next.chunksRead, 1);
    assert.equal(next.chunksStored, 1);
    assert.equal(next.indexesWritten, 2);
    assert.deepEqual(await indexKinds(r2, b4), ['delta', 'delta']);
    await assertRestores(r2, b4);
    await assertRestores(r2, backups[0] as Manifest);
  });

  test('plain → encrypted → encrypted under another key → plain: every backup restores identically; wrong passphrases refused', async () => {
    const e1 = env.path('e1');
    const e2 = env.path('e2');
    const r3 = env.path('r3');
    await env.cli(['init', '--repo', e1, '--encrypt'], { env: { QBACKUP_PASSWORD: 'one' } });
    await env.cli(['init', '--repo', e2, '--encrypt'], { env: { QBACKUP_PASSWORD: 'two' } });
    const toE1 = await copy(['vm', '--from', r1, '--to', e1], { QBACKUP_PASSWORD: 'one' });
    assert.equal(toE1.reencrypted, true);
    assert.equal(toE1.copied.length, backups.length);
    assert.ok(toE1.chunksStored > 0);

    await refused(['--from', e1, '--to', e2], 'WRONG_PASSWORD', new RegExp(`^Cannot copy from repository "${e1}": it is encrypted and no passphrase was given for it$`), { QBACKUP_PASSWORD: 'two' });
    await refused(['--from', e1, '--to', e2], 'WRONG_PASSWORD', new RegExp(`Cannot open repository "${e1}": wrong passphrase`), { QBACKUP_FROM_PASSWORD: 'two', QBACKUP_PASSWORD: 'two' });
    const pwFile = env.writeFile('pw-one', 'one\n');
    await refused(['--from', e1, '--to', e2, '--from-password-file', pwFile], 'WRONG_PASSWORD', new RegExp(`Cannot open repository "${e2}": wrong passphrase`), { QBACKUP_PASSWORD: 'one' });
    assert.equal((await env.qb.repository.list({ repo: e2, password: 'two' })).length, 0, 'a refused copy lists nothing');

    const toE2 = await copy(['--from', e1, '--to', e2, '--from-password-file', pwFile], { QBACKUP_PASSWORD: 'two' });
    assert.equal(toE2.reencrypted, true);
    assert.equal(toE2.copied.length, backups.length);
    const toR3 = await copy(['--from', e2, '--to', r3], { QBACKUP_FROM_PASSWORD: 'two' });
    assert.equal(toR3.targetCreated, true);
    for (const m of backups) await assertRestores(r3, m);
    for (const m of backups) await assertRestores(e2, m, 'two');
    assert.deepEqual(await indexKinds(e2, backups[1] as Manifest, 'two'), ['delta', 'delta']);
    await verifyReadData(e2, { QBACKUP_PASSWORD: 'two' });
    await verifyReadData(r3);
    // Back in plain SHA-256 ids: the same chunks as the original.
    assert.deepEqual([...(await liveObjects(r3)).named].sort(), [...(await liveObjects(r1)).named].sort());
  });

  test('a second domain sharing most data: the copy stores only the chunks the target lacks', async () => {
    await env.defineDomain('vm2', [{ target: 'sda', sizeBytes: 16 * MiB }]);
    await env.qb.domains.start('vm2', { paused: true });
    await guestWrite(env.qb, 'vm2', 'sda', `write -s ${env.path('a')} 0 2M`);
    await guestWrite(env.qb, 'vm2', 'sda', `write -s ${randomFile(env, 'u', 64 * KiB)} 3M 64k`);
    const m = await backup('vm2', 'v1');
    const r4 = env.path('r4');
    await copy(['vm', '--from', r1, '--to', r4]);
    const plain = await copy(['vm2', '--from', r1, '--to', r4]);
    assert.deepEqual(plain.copied.map((b) => b.id), [m.id]);
    assert.equal(plain.chunksRead, 1, 'only the chunk the target lacks is read');
    assert.equal(plain.chunksStored, 1);
    await assertRestores(r4, m);

    const e3 = env.path('e3');
    await env.cli(['init', '--repo', e3, '--encrypt'], { env: { QBACKUP_PASSWORD: 'three' } });
    await copy(['vm', '--from', r1, '--to', e3], { QBACKUP_PASSWORD: 'three' });
    const sealed = await copy(['vm2', '--from', r1, '--to', e3], { QBACKUP_PASSWORD: 'three' });
    assert.equal(sealed.chunksRead, 33, 'ids change: every chunk of the new chain is read to learn its id');
    assert.equal(sealed.chunksStored, 1, 'but only the missing one is stored');
    await assertRestores(e3, m, 'three');
  });

  test('a hostile source: a backup whose chunk, index or manifest is damaged is left out and named; the others are copied, restore exactly, and no damaged chunk reaches the target', async () => {
    const [b1, b2, b3] = backups as [Manifest, Manifest, Manifest];
    const damagedCopy = (name: string): string => {
      const dir = env.path(name);
      execFileSync('cp', ['-a', r1, dir]);
      return dir;
    };
    // The first three backups only: later tests may add backups that share the damaged objects.
    const only = [b1, b2, b3].flatMap((m) => ['--backup', m.id]);
    const listedIds = async (repo: string, password?: string): Promise<string[]> => (await env.qb.repository.list({ repo, ...(password !== undefined ? { password } : {}) })).map((m) => m.id);

    // A chunk only b3 has (sdb's 0x3c cluster at 4 MiB), flipped in its pack.
    const chunkRepo = damagedCopy('damaged-chunk');
    const { store } = await liveObjects(chunkRepo);
    const sdb = b3.disks.find((d) => d.target === 'sdb');
    const id = (await store.resolveIndex(sdb?.index ?? '')).ids.subarray(64 * 32, 65 * 32);
    const loc = store.locate(id);
    assert.ok(loc !== undefined);
    flipByte(join(chunkRepo, 'data', loc.packId.slice(0, 2), loc.packId), loc.offset + Math.floor(loc.length / 2));
    for (const [target, extraEnv, password] of [[env.path('t-plain'), {}, undefined], [env.path('t-sealed'), { QBACKUP_PASSWORD: 'x' }, 'x']] as const) {
      if (password !== undefined) await env.cli(['init', '--repo', target, '--encrypt'], { env: extraEnv });
      await refused(
        ['vm', '--from', chunkRepo, '--to', target, ...only],
        'REPO_DAMAGED',
        new RegExp(`^Cannot copy backup "${b3.id}" of domain "vm": chunk ${id.toString('hex')} of repository "${chunkRepo}" is damaged \\(in pack "${loc.packId}": [^)]*\\); 2 other backup\\(s\\) were copied$`),
        extraEnv,
      );
      assert.deepEqual(await listedIds(target, password), [b1.id, b2.id]);
      for (const m of [b1, b2]) await assertRestores(target, m, password);
      await verifyReadData(target, extraEnv);
    }

    // b2's manifest truncated: b2 is named; b1 and b3 (whose chain runs through b2's intact index) are copied.
    const manifestRepo = damagedCopy('damaged-manifest');
    const manifestFile = join(manifestRepo, 'snapshots', 'vm', b2.id);
    execFileSync('truncate', ['-s', '100', manifestFile]);
    const t2 = env.path('t-manifest');
    await refused(['vm', '--from', manifestRepo, '--to', t2, ...only], 'REPO_DAMAGED', new RegExp(`^Cannot copy backup "${b2.id}" of domain "vm": its manifest in repository "${manifestRepo}" cannot be read .*; 2 other backup\\(s\\) were copied$`));
    assert.deepEqual(await listedIds(t2), [b1.id, b3.id]);
    for (const m of [b1, b3]) await assertRestores(t2, m);
    await verifyReadData(t2);

    // b2's disk index of sda flipped: b2 and b3 (a delta on it) are named; b1 is copied.
    const indexRepo = damagedCopy('damaged-index');
    const sda2 = b2.disks.find((d) => d.target === 'sda')?.index ?? '';
    const indexFile = join(indexRepo, 'indexes', sda2.slice(0, 2), sda2);
    flipByte(indexFile, 40);
    const t3 = env.path('t-index');
    const r = await env.cli(['--json', 'copy', 'vm', '--from', indexRepo, '--to', t3, ...only]);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    const e = cliError(r);
    assert.equal(e.code, 'REPO_DAMAGED');
    for (const m of [b2, b3]) assert.match(e.message, new RegExp(`Cannot copy backup "${m.id}" of domain "vm": .*${sda2}`));
    assert.match(e.message, /1 other backup\(s\) were copied$/);
    assert.deepEqual(await listedIds(t3), [b1.id]);
    await assertRestores(t3, b1);
    await verifyReadData(t3);
  });

  test('refusals: chunk-size mismatch, unknown backup, the same repository; --dry-run and --backup', async () => {
    const big = env.path('big');
    await env.cliOk(['init', '--repo', big, '--chunk-size', '128']);
    await refused(['--from', r1, '--to', big], 'INVALID_ARGUMENT', /^Cannot copy from repository ".*r1" to ".*big": their chunk sizes differ \(64 KiB and 128 KiB\)$/);
    assert.deepEqual(await env.qb.repository.list({ repo: big }), []);
    await refused(['--from', r1, '--to', env.path('r5'), '--backup', '20200101T000000.000Z-abcd'], 'BACKUP_NOT_FOUND', /no backup "20200101T000000\.000Z-abcd"/);
    await refused(['--from', r1, '--to', r1], 'INVALID_ARGUMENT', /they are the same repository/);

    const dry = env.path('dry');
    const plan = await copy(['vm', '--from', r1, '--to', dry, '--dry-run']);
    assert.equal(plan.dryRun, true);
    assert.equal(plan.targetCreated, true);
    assert.deepEqual(plan.copied.map((b) => b.id), backups.map((m) => m.id));
    assert.equal(existsSync(dry), false, 'a dry run creates nothing');

    // One incremental alone: its whole chain comes along, so it restores on its own.
    const one = env.path('one');
    const second = backups[1] as Manifest;
    const rep = await copy(['--from', r1, '--to', one, '--backup', second.id]);
    assert.deepEqual(rep.copied.map((b) => b.id), [second.id]);
    assert.equal(rep.indexesWritten, 4);
    assert.deepEqual((await env.qb.repository.list({ repo: one })).map((m) => m.id), [second.id]);
    await assertRestores(one, second);
    await verifyReadData(one);
  });

  test('the daemon: a copy schedule added over HTTP runs on its cron; POST /api/repository/copy takes both passphrases in headers', async () => {
    let now = Date.now();
    const daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0, clock: { now: () => now } });
    try {
      const api = new ApiClient(daemon.url, daemon.bootstrapToken);
      const scheduled = env.path('scheduled');
      const bad = await api.post('/api/schedules', { action: 'copy', domain: 'vm', when: 'hourly', repo: r1 });
      assert.equal(bad.status, 400, bad.text);
      assert.match(bad.text, /A copy schedule needs a target repository/);
      const added = await api.post('/api/schedules', { action: 'copy', domain: 'vm', when: 'hourly', repo: r1, to: scheduled });
      assert.equal(added.status, 201, added.text);
      const id = (added.body as { id: string }).id;
      now += 2 * 3_600_000;
      assert.deepEqual(daemon.service.scheduler.tick(), [id]);
      const task = daemon.service.tasks.list(1)[0];
      assert.equal(task?.kind, 'repository.copy');
      const done = await daemon.service.tasks.wait(task?.id ?? '');
      assert.equal(done.state, 'succeeded', JSON.stringify(done.error));
      assert.equal(done.requestedBy, `schedule ${id}`);
      assert.deepEqual((await env.qb.repository.list({ repo: scheduled }, 'vm')).map((m) => m.id), backups.map((m) => m.id));

      // Over HTTP: an encrypted repository (made here, not by an earlier test) into a new plain one, one backup.
      const source = env.path('e-http');
      await env.cli(['init', '--repo', source, '--encrypt'], { env: { QBACKUP_PASSWORD: 'two' } });
      await copy(['vm', '--from', r1, '--to', source], { QBACKUP_PASSWORD: 'two' });
      const viaHttp = env.path('via-http');
      const last = backups.at(-1) as Manifest;
      const wrong = await api.post('/api/repository/copy', { from: source, to: viaHttp }, { headers: { 'x-source-repository-password': 'nope' } });
      // Refused at once (and counted against guessing), not in a task.
      assert.equal(wrong.status, 403, wrong.text);
      assert.equal((wrong.body as { code: string }).code, 'WRONG_PASSWORD');
      const accepted = await api.post('/api/repository/copy', { from: source, to: viaHttp, domain: 'vm', backups: [last.id] }, { headers: { 'x-source-repository-password': 'two' } });
      assert.equal(accepted.status, 202, accepted.text);
      const ok = await daemon.service.tasks.wait((accepted.body as { id: string }).id);
      assert.equal(ok.state, 'succeeded', JSON.stringify(ok.error));
      assert.deepEqual((ok.result as CopyReport).copied.map((b) => b.id), [last.id]);
      assert.ok(!JSON.stringify(ok).includes('two"'), 'no passphrase in the task');
      await assertRestores(viaHttp, last);
    } finally {
      await daemon.close();
    }
  });

  test('a copy killed once its first pack is written lists only backups that restore; the next copy completes', async () => {
    const e4 = env.path('e4');
    const pw = { QBACKUP_PASSWORD: 'four' };
    await env.cli(['init', '--repo', e4, '--encrypt'], { env: pw });
    const { child, done } = spawnCli(env, ['copy', 'vm', '--from', r1, '--to', e4], pw);
    const wrote = await waitFor(() => [...fileTree(join(e4, 'data')).keys()].length > 0, 60_000);
    child.kill('SIGKILL');
    const r = await done;
    assert.ok(wrote, `the copy wrote a pack (it ended ${r.code}: ${r.stderr})`);
    const listed = await env.qb.repository.list({ repo: e4, password: 'four' });
    for (const m of listed) await assertRestores(e4, m, 'four');
    const rest = await copy(['vm', '--from', r1, '--to', e4], pw);
    assert.equal(rest.copied.length + listed.length, backups.length, `${listed.length} listed after the kill`);
    for (const m of backups) await assertRestores(e4, m, 'four');
    await verifyReadData(e4, pw);
  });
});
