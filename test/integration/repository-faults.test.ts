// The format 2 repository under faults, against real QEMU:
// - one flipped byte in a stored chunk: verify --read-data names the chunk and
//   exactly the backups that use it; their restore fails in one sentence and
//   leaves no file; the others still restore exactly.
// - a hostile or damaged repository (symlinked directories, bad manifests, a
//   newer format, a truncated index): one sentence naming the object, and
//   nothing deleted, inside or outside the repository.
// - two gc at once, and gc while a backup runs: nothing a backup needs is lost.
// - kill -9 during a backup: no listed backup, no lock that blocks, and the
//   repository recovers (the killed process's pull job is noted).

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, renameSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import { runTool } from '../../src/image/tools.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { acquireLock } from '../../src/repository/locks.js';
import type { GcReport, Manifest, VerifyReport } from '../../src/repository/repository.js';
import { TestEnv, guestWrite, type CliResult } from '../helpers/env.js';
import { KiB, MiB, cliError, fileTree, flipByte, imageDiffers, liveObjects, randomFile, referenceCopies, repoObjects, spawnCli, waitFor } from '../helpers/repo.js';

/**
 * Dates every object of a repository an hour back: gc takes for garbage
 * nothing written after the newest manifest it lists unless it is older than
 * a listing may lag (gc.ts step 7), and these tests make garbage by deleting
 * the newest manifests by hand.
 */
function backdate(repo: string): void {
  execFileSync('find', [repo, '-type', 'f', '-exec', 'touch', '-h', '-d', '1 hour ago', '{}', '+']);
}

describe('repository format 2 under faults (real QEMU)', () => {
  let env: TestEnv;
  let repo: string;
  const refs = new Map<string, string>(); // backup id → raw reference of the disk's sda
  const f: Manifest[] = [];
  let restores = 0;

  async function backup(domain: string, r: string, tag: string, extra: string[] = []): Promise<Manifest> {
    const ref = (await referenceCopies(env, domain, tag)).get('sda') ?? '';
    const m = JSON.parse(await env.cliOk(['--json', 'backup', domain, '--repo', r, ...extra])) as Manifest;
    refs.set(m.id, ref);
    return m;
  }
  async function assertRestores(domain: string, r: string, m: Manifest): Promise<void> {
    const file = env.path(`restore-${++restores}.raw`);
    await env.cliOk(['export', domain, '--repo', r, '--backup', m.id, '--disk', 'sda', '--to', file, '--format', 'raw']);
    const why = await imageDiffers(file, 'raw', refs.get(m.id) ?? '');
    assert.equal(why, undefined, `backup ${m.id} restores exactly from ${r}: ${why ?? ''}`);
  }
  /** Runs a CLI command that must fail with one sentence; returns its code and message. */
  async function fails(args: string[], code: string | RegExp, message: RegExp): Promise<{ code: string; message: string }> {
    const r = await env.cli(['--json', ...args]);
    assert.equal(r.code, 1, `${args.join(' ')} fails: ${r.stdout} ${r.stderr}`);
    const e = cliError(r);
    if (typeof code === 'string') assert.equal(e.code, code, `${args.join(' ')}: ${e.message}`);
    else assert.match(e.code, code);
    assert.match(e.message, message, args.join(' '));
    assert.ok(!/\n/.test(e.message.trim()) && !/^\s+at /m.test(r.stderr), 'one sentence, no stack');
    return e;
  }
  let copies = 0;
  async function copyRepo(): Promise<string> {
    const dst = env.path(`copy-${++copies}`);
    await runTool('cp', ['-a', repo, dst]);
    return dst;
  }

  before(async () => {
    env = new TestEnv('qbt-faults-');
    repo = env.path('repo');
    await env.defineDomain('f', [{ target: 'sda', sizeBytes: 32 * MiB }]);
    await env.qb.domains.start('f', { paused: true });
    await guestWrite(env.qb, 'f', 'sda', `write -s ${randomFile(env, 'f-r1', 2 * MiB)} 0 2M`);
    await guestWrite(env.qb, 'f', 'sda', `write -s ${randomFile(env, 'f-r2', MiB)} 8M 1M`);
    f.push(await backup('f', repo, 'f1'));
    await guestWrite(env.qb, 'f', 'sda', `write -s ${randomFile(env, 'f-r3', 64 * KiB)} 16M 64k`);
    f.push(await backup('f', repo, 'f2'));
    await guestWrite(env.qb, 'f', 'sda', 'write -P 0x77 0 64k'); // f3 no longer uses the first chunk of f1
    f.push(await backup('f', repo, 'f3'));
    assert.deepEqual(f.map((m) => m.disks[0]?.level), ['full', 'incremental', 'incremental']);
  });
  after(async () => env.cleanup());

  test('one flipped byte in a stored chunk: verify names the chunk and exactly the backups using it; their restore fails cleanly', async () => {
    const [f1, f2, f3] = f;
    assert.ok(f1 !== undefined && f2 !== undefined && f3 !== undefined);
    const { store } = await liveObjects(repo);
    const table = await store.resolveIndex(f1.disks[0]?.index ?? '');
    const id = table.ids.subarray(0, 32);
    const hex = id.toString('hex');
    const loc = store.locate(id);
    assert.ok(loc !== undefined);
    const pack = join(repo, 'data', loc.packId.slice(0, 2), loc.packId);
    flipByte(pack, loc.offset + Math.floor(loc.length / 2));
    try {
      // Existence only: still fine (the chunk is listed and its pack exists).
      const quick = await env.cli(['verify', '--repo', repo]);
      assert.equal(quick.code, 0, quick.stderr);
      // Reading the data finds it, once, with both backups that use it and not f3.
      const v = await env.cli(['--json', 'verify', '--repo', repo, '--read-data']);
      assert.equal(v.code, 1);
      const report = JSON.parse(v.stdout) as VerifyReport;
      assert.equal(report.problems.length, 1, v.stdout);
      assert.equal(report.problems[0]?.object, `chunk ${hex}`);
      assert.deepEqual([...(report.problems[0]?.backups ?? [])].sort(), [`f/${f1.id}`, `f/${f2.id}`].sort());
      assert.match(report.problems[0]?.problem ?? '', /does not match its id/);
      const e = cliError(v);
      assert.equal(e.code, 'VERIFY_FAILED');
      assert.ok(e.message.includes(hex) && e.message.includes(f1.id) && e.message.includes(f2.id) && !e.message.includes(f3.id), e.message);
      const human = await env.cli(['verify', '--repo', repo, '--read-data']);
      assert.match(human.stdout, new RegExp(`DAMAGED chunk ${hex}: .*; used by `));
      // A backup that does not use it verifies and restores.
      const only3 = await env.cli(['verify', 'f', '--backup', f3.id, '--repo', repo, '--read-data']);
      assert.equal(only3.code, 0, only3.stderr);
      await assertRestores('f', repo, f3);
      // Restoring an affected backup fails in one sentence naming the chunk, and leaves no file.
      const to = env.path('damaged');
      const r = await fails(['restore', 'f', '--repo', repo, '--backup', f1.id, '--to', to, '--format', 'raw'], 'REPO_DAMAGED', new RegExp(`Cannot restore disk "sda" of backup "${f1.id}": Chunk ${hex} in pack "${loc.packId}" is damaged`));
      assert.ok(r.message.length < 400);
      assert.deepEqual(existsSync(to) ? readdirSync(to) : [], [], 'no restored or partial file is left');
      const exported = env.path('damaged.qcow2');
      await fails(['export', 'f', '--repo', repo, '--backup', f2.id, '--disk', 'sda', '--to', exported], 'REPO_DAMAGED', new RegExp(`Chunk ${hex}`));
      assert.ok(!existsSync(exported) && !existsSync(`${exported}.partial`));
    } finally {
      flipByte(pack, loc.offset + Math.floor(loc.length / 2));
    }
    const v = await env.cli(['verify', '--repo', repo, '--read-data']);
    assert.equal(v.code, 0, v.stderr);
    await assertRestores('f', repo, f1);
  });

  test('a symlinked directory inside the repository: commands fail in one sentence and nothing outside is touched', async () => {
    const unsafe = /is unsafe: ".*" is a symbolic link/;
    // REPO/data -> a directory outside holding copies of the packs.
    const c1 = await copyRepo();
    const victim = env.path('victim-data');
    renameSync(join(c1, 'data'), victim);
    symlinkSync(victim, join(c1, 'data'));
    const victimTree = fileTree(victim);
    const checkpoints = env.qb.checkpoints.list('f').map((c) => c.name);
    for (const args of [['gc'], ['verify', '--read-data'], ['stats'], ['restore', 'f', '--to', env.path('sym-restore')]]) {
      await fails([...args, '--repo', c1], 'REPO_INVALID', unsafe);
    }
    // A backup that has data to store fails too, and its checkpoint goes with it.
    await guestWrite(env.qb, 'f', 'sda', `write -s ${randomFile(env, 'f-r4', 64 * KiB)} 20M 64k`);
    await fails(['backup', 'f', '--repo', c1], 'REPO_INVALID', unsafe);
    assert.deepEqual(env.qb.checkpoints.list('f').map((c) => c.name), checkpoints, 'the failed backup left no checkpoint');
    assert.deepEqual(readdirSync(join(c1, 'snapshots', 'f')).sort(), f.map((m) => m.id).sort(), 'and no manifest');
    assert.deepEqual(fileTree(victim), victimTree, 'nothing outside the repository changed');
    assert.ok(!existsSync(env.path('sym-restore/sda.raw')));

    // One pack directory REPO/data/xx -> outside: gc never deletes through it; verify names it.
    const c2 = await copyRepo();
    const sub = readdirSync(join(c2, 'data')).sort()[0] ?? '';
    const victim2 = env.path('victim-sub');
    renameSync(join(c2, 'data', sub), victim2);
    symlinkSync(victim2, join(c2, 'data', sub));
    rmManifest(c2, f[0]?.id ?? ''); // make garbage, so that gc has something to delete
    rmManifest(c2, f[1]?.id ?? '');
    rmManifest(c2, f[2]?.id ?? '');
    backdate(c2);
    const victim2Tree = fileTree(victim2);
    const gc = await env.cli(['--json', 'gc', '--repo', c2]);
    if (gc.code !== 0) assert.match(cliError(gc).message, unsafe);
    assert.deepEqual(fileTree(victim2), victim2Tree, 'gc deleted nothing through the symlink');
    await env.cliOk(['gc', '--repo', c2]).catch(() => undefined);
    assert.deepEqual(fileTree(victim2), victim2Tree);

    // REPO/snapshots/f -> outside: prune deletes no manifest there and no checkpoint.
    const c3 = await copyRepo();
    const victim3 = env.path('victim-snapshots');
    renameSync(join(c3, 'snapshots', 'f'), victim3);
    symlinkSync(victim3, join(c3, 'snapshots', 'f'));
    const victim3Tree = fileTree(victim3);
    await fails(['prune', 'f', '--repo', c3, '--keep-last', '1'], 'REPO_INVALID', unsafe);
    await fails(['backup-list', 'f', '--repo', c3], 'REPO_INVALID', unsafe);
    assert.deepEqual(fileTree(victim3), victim3Tree);
    assert.deepEqual(env.qb.checkpoints.list('f').map((c) => c.name), checkpoints, 'the refused prune merged no checkpoint away');
  });

  test('bad manifests are named in one sentence and set aside (the other backups list and restore); gc refuses and deletes nothing; a newer format and a truncated index are refused', async () => {
    const [f1, f2, f3] = f;
    assert.ok(f1 !== undefined && f2 !== undefined && f3 !== undefined);
    const c = await copyRepo();
    const dir = join(c, 'snapshots', 'f');
    const good = readFileSync(join(dir, f1.id), 'utf8');
    const cases: Array<[string, string, RegExp]> = [
      ['not-a-backup-id', good, /Invalid backup id "not-a-backup-id"/],
      ['20990101T000000.000Z-dead', 'garbage{', /Manifest of backup "20990101T000000\.000Z-dead" \(domain "f"\) is damaged: not valid JSON/],
      ['20990101T000000.000Z-beef', good, /Manifest of backup "20990101T000000\.000Z-beef" \(domain "f"\) is damaged: it names another backup/],
      ['20990101T000000.000Z-cafe', good.replaceAll(f1.id, '20990101T000000.000Z-cafe').replace(/"index": "[0-9a-f]+"/, '"index": "../../../etc/passwd"'), /Manifest of backup "20990101T000000\.000Z-cafe" \(domain "f"\) is damaged: disk "sda" names an invalid index/],
    ];
    for (const [name, text, message] of cases) {
      writeFileSync(join(dir, name), text);
      const tree = fileTree(c);
      // Damage stays local: the list names the bad manifest and lists the others; they restore.
      const list = await env.cli(['--json', 'backup-list', '--repo', c]);
      assert.equal(list.code, 0, list.stderr);
      assert.match(list.stderr, message);
      assert.ok((JSON.parse(list.stdout) as Manifest[]).some((m) => m.id === f1.id));
      const restored = await env.cli(['restore', 'f', '--repo', c, '--backup', f1.id, '--to', env.path(`restored-${name}`)]);
      assert.equal(restored.code, 0, restored.stderr);
      await fails(['gc', '--repo', c], /^(REPO_DAMAGED|BACKUP_NOT_FOUND)$/, message);
      assert.deepEqual(fileTree(c), tree, `gc deleted nothing because of ${name}`);
      rmManifest(c, name);
    }

    // A repository of a newer format is refused by every command, and left alone.
    const newer = await copyRepo();
    const config = JSON.parse(readFileSync(join(newer, 'config'), 'utf8')) as Record<string, unknown>;
    writeFileSync(join(newer, 'config'), JSON.stringify({ ...config, format: 3 }));
    const newerTree = fileTree(newer);
    const checkpoints = env.qb.checkpoints.list('f').map((x) => x.name);
    for (const args of [['backup-list'], ['backup', 'f'], ['gc'], ['verify'], ['prune', 'f', '--keep-last', '1']]) {
      await fails([...args, '--repo', newer], 'REPO_INVALID', /has format 3, newer than this qbackup understands \(2\)/);
    }
    await fails(['init', '--repo', newer], 'REPO_INVALID', /one already exists there/);
    assert.deepEqual(fileTree(newer), newerTree);
    assert.deepEqual(env.qb.checkpoints.list('f').map((x) => x.name), checkpoints);

    // A truncated disk index: the backups whose chain runs through it are named; gc refuses rather than guess.
    const cut = await copyRepo();
    const index = f2.disks[0]?.index ?? '';
    const file = join(cut, 'indexes', index.slice(0, 2), index);
    truncateSync(file, Math.floor(readFileSync(file).length / 2));
    const cutTree = fileTree(cut);
    await fails(['restore', 'f', '--repo', cut, '--backup', f2.id, '--to', env.path('cut')], 'REPO_DAMAGED', new RegExp(`Disk index "${index}" is damaged`));
    const v = await env.cli(['--json', 'verify', '--repo', cut]);
    assert.equal(v.code, 1);
    const report = JSON.parse(v.stdout) as VerifyReport;
    const named = report.problems.filter((p) => p.problem.includes(index)).flatMap((p) => p.backups).sort();
    assert.deepEqual(named, [`f/${f2.id}`, `f/${f3.id}`].sort(), 'both backups whose chain runs through the index');
    await fails(['gc', '--repo', cut], 'REPO_DAMAGED', new RegExp(`Disk index "${index}" is damaged`));
    assert.deepEqual(fileTree(cut), cutTree, 'gc deleted nothing');
    await assertRestores('f', cut, f1);
  });

  test('two gc at once: any refused one says REPO_LOCKED, and the result is what one gc gives', async () => {
    const one = await copyRepo();
    const two = await copyRepo();
    // Garbage: the last backup's delta index and the pack only it used.
    const f3 = f[2];
    assert.ok(f3 !== undefined);
    for (const r of [one, two]) {
      rmManifest(r, f3.id);
      backdate(r);
    }
    const single = JSON.parse(await env.cliOk(['--json', 'gc', '--repo', one])) as GcReport;
    assert.ok(single.indexesDeleted >= 1 && single.packsDeleted + single.packsRepacked >= 1, JSON.stringify(single));
    const results: CliResult[] = await Promise.all([env.cli(['--json', 'gc', '--repo', two]), env.cli(['--json', 'gc', '--repo', two])]);
    console.log(`# two gc at once: exit codes ${results.map((r) => r.code).join(', ')}`);
    for (const r of results) if (r.code !== 0) assert.equal(cliError(r).code, 'REPO_LOCKED', r.stderr);
    // Both may back off (each took its lock, then saw the other's): safe, and a retry works.
    if (results.every((r) => r.code !== 0)) await env.cliOk(['gc', '--repo', two]);
    const a = repoObjects(one);
    const b = repoObjects(two);
    assert.deepEqual([[...b.packs].sort(), [...b.indexes].sort()], [[...a.packs].sort(), [...a.indexes].sort()]);
    for (const m of f.slice(0, 2)) await assertRestores('f', two, m);
    const v = await env.cli(['verify', '--repo', two, '--read-data']);
    assert.equal(v.code, 0, v.stderr);
    assert.deepEqual(readdirSync(join(two, 'locks')), [], 'no lock is left behind');
  });

  test('gc while a backup runs removes nothing the backup needs', async () => {
    const r = env.path('gc-repo');
    await env.defineDomain('g', [{ target: 'sda', sizeBytes: 64 * MiB }]);
    await env.qb.domains.start('g', { paused: true });
    const R = randomFile(env, 'g-R', 24 * MiB);
    await guestWrite(env.qb, 'g', 'sda', `write -s ${R} 0 24M`);
    const g1 = await backup('g', r, 'g1');
    await guestWrite(env.qb, 'g', 'sda', `write -s ${randomFile(env, 'g-S', 24 * MiB)} 0 24M`);
    await backup('g', r, 'g2', ['--full']);
    await env.cliOk(['prune', 'g', '--repo', r, '--keep-last', '1']);
    // The packs of R are garbage now; the next backup finds R on the disk again.
    await guestWrite(env.qb, 'g', 'sda', `write -s ${R} 0 24M`);
    const ref = (await referenceCopies(env, 'g', 'g3')).get('sda') ?? '';
    const packsOfR = new Set([...repoObjects(r).packs]);
    const run = spawnCli(env, ['--json', 'backup', 'g', '--repo', r, '--workers', '1']);
    const sawLock = await waitFor(() => existsSync(join(r, 'locks')) && readdirSync(join(r, 'locks')).length > 0, 20_000);
    assert.ok(sawLock, 'the backup took its lock');
    const during = await env.qb.repository.gc({ repo: r });
    const done = await run.done;
    console.log(`# gc during the backup: ${JSON.stringify(during)}`);
    assert.equal(done.code, 0, done.stderr);
    const g3 = JSON.parse(done.stdout) as Manifest;
    refs.set(g3.id, ref);
    assert.equal(during.packsDeleted, 0, `gc deleted no pack while the backup ran (${JSON.stringify(during)})`);
    await assertRestores('g', r, g3);
    // Once the backup has ended, gc frees what is garbage and only that.
    const afterGc = await env.qb.repository.gc({ repo: r });
    assert.equal(afterGc.condemned, 0);
    assert.deepEqual(existsSync(join(r, 'condemned')) ? readdirSync(join(r, 'condemned')) : [], [], 'no stale garbage marker is left');
    await assertRestores('g', r, g3);
    const v = await env.cli(['verify', '--repo', r, '--read-data']);
    assert.equal(v.code, 0, v.stderr);
    assert.equal(g1.disks[0]?.level, 'full');
    assert.ok(packsOfR.size > 0);
  });

  test('gc does not delete a condemned pack that a later backup stores again, byte for byte, while that backup runs', async () => {
    // A pack's id is the hash of its bytes, so a backup that stores the same
    // chunks again (it ignores condemned packs) can write a pack identical to
    // a condemned one. A gc during that backup must not take it for the old garbage.
    const r = env.path('recondemn-repo');
    await env.defineDomain('h', [{ target: 'sda', sizeBytes: 16 * MiB }, { target: 'sdb', sizeBytes: 64 * MiB }]);
    await env.qb.domains.start('h', { paused: true });
    const C = randomFile(env, 'h-C', 64 * KiB);
    await guestWrite(env.qb, 'h', 'sda', `write -s ${C} 0 64k`);
    await backup('h', r, 'h1'); // sda's pack holds C alone
    await guestWrite(env.qb, 'h', 'sda', 'write -P 0x42 0 64k');
    await backup('h', r, 'h2', ['--full']);
    await env.cliOk(['prune', 'h', '--repo', r, '--keep-last', '1']);
    // gc while another backup runs (a lock this process holds) condemns the pack of C.
    const other = await acquireLock(new LocalBackend(r), 'backup', 'other');
    const condemning = await env.qb.repository.gc({ repo: r });
    await other.release();
    assert.ok(condemning.condemned >= 1 && condemning.packsDeleted === 0, JSON.stringify(condemning));
    // h2's pack holds one small compressible chunk: all live, though its header outweighs it. gc keeps it.
    const kept = await env.cli(['verify', '--repo', r, '--read-data']);
    assert.equal(kept.code, 0, `gc kept every chunk of the kept backup: ${kept.stdout}`);
    await new Promise((resolve) => setTimeout(resolve, 20)); // the next backup starts strictly later
    // C comes back, and sdb gives the backup something to read after sda's pack is stored.
    await guestWrite(env.qb, 'h', 'sda', `write -s ${C} 0 64k`);
    await guestWrite(env.qb, 'h', 'sdb', `write -s ${randomFile(env, 'h-big', 48 * MiB)} 0 48M`);
    const refs3 = await referenceCopies(env, 'h', 'h3');
    const known = repoObjects(r).packs;
    const run = spawnCli(env, ['--json', 'backup', 'h', '--repo', r, '--workers', '1']);
    const sdbStarted = await waitFor(() => [...repoObjects(r).packs].some((p) => !known.has(p)), 60_000);
    assert.ok(sdbStarted, 'the backup stored a pack of sdb');
    const during = await env.qb.repository.gc({ repo: r });
    const staged = run.child.exitCode === null && run.child.signalCode === null;
    const done = await run.done;
    assert.equal(done.code, 0, done.stderr);
    assert.ok(staged, 'gc ran while the backup was still reading sdb');
    console.log(`# gc during the backup that re-stored a condemned pack: ${JSON.stringify(during)}`);
    const h3 = JSON.parse(done.stdout) as Manifest;
    refs.set(h3.id, refs3.get('sda') ?? '');
    const v = await env.cli(['verify', '--repo', r]);
    assert.equal(v.code, 0, `every chunk of the new backup is still stored: ${v.stdout}`);
    await assertRestores('h', r, h3);
  });

  describe('kill -9 during a backup', () => {
    let killRepo: string;
    let ref: string;
    let next: CliResult | undefined;

    test('the killed backup leaves no listed backup and no lock that blocks', async () => {
      killRepo = env.path('kill-repo');
      await env.defineDomain('k', [{ target: 'sda', sizeBytes: 64 * MiB }]);
      await env.qb.domains.start('k', { paused: true });
      await guestWrite(env.qb, 'k', 'sda', `write -s ${randomFile(env, 'k-R', 48 * MiB)} 0 48M`);
      ref = (await referenceCopies(env, 'k', 'k')).get('sda') ?? '';
      const checkpointsBefore = env.qb.checkpoints.list('k').map((c) => c.name);
      const run = spawnCli(env, ['backup', 'k', '--repo', killRepo, '--workers', '1']);
      // Kill it once it has stored its first pack (16 MiB of 48).
      const stored = await waitFor(() => repoObjects(killRepo).packs.size > 0, 30_000);
      run.child.kill('SIGKILL');
      const r = await run.done;
      assert.ok(stored, 'the backup stored a pack before it was killed');
      assert.equal(r.signal, 'SIGKILL', `the backup was killed mid-way (it ended with ${r.code}: ${r.stderr})`);
      assert.deepEqual(await env.qb.repository.list({ repo: killRepo }), [], 'no backup is listed');
      assert.ok(readdirSync(join(killRepo, 'locks')).length > 0, 'the dead process\'s lock is still there');
      const temporary = [...fileTree(killRepo).keys()].filter((k) => k.split('/').at(-1)?.startsWith('.tmp-'));
      console.log(`# after kill -9: checkpoints ${JSON.stringify(env.qb.checkpoints.list('k').map((c) => c.name).filter((n) => !checkpointsBefore.includes(n)))}; temporary files ${temporary.length}`);
      // The next backup: a dead process's lock never blocks it.
      next = await env.cli(['--json', 'backup', 'k', '--repo', killRepo]);
      if (next.code !== 0) assert.notEqual(cliError(next).code, 'REPO_LOCKED', next.stderr);
      assert.deepEqual(readdirSync(join(killRepo, 'locks')), [], 'the dead lock was removed');
    });

    test('the next backup succeeds on its own after the kill, and the killed run\'s checkpoint is gone', () => {
      assert.ok(next !== undefined);
      // The killed process owned its pull job: the next command ended it and merged its checkpoint away.
      assert.equal(next.code, 0, next.stderr);
      const m = JSON.parse(next.stdout) as Manifest;
      assert.deepEqual(env.qb.checkpoints.list('k').map((c) => c.name), [m.checkpoint]);
    });

    test('after the job is ended, backup, verify --read-data, restore and gc all pass', async () => {
      assert.ok(next !== undefined);
      let m: Manifest;
      if (next.code === 0) m = JSON.parse(next.stdout) as Manifest;
      else {
        await env.cliOk(['domjobabort', 'k']);
        m = JSON.parse(await env.cliOk(['--json', 'backup', 'k', '--repo', killRepo])) as Manifest;
      }
      refs.set(m.id, ref);
      assert.equal(m.disks[0]?.level, 'full');
      assert.equal(m.disks[0]?.bytesRead, 48 * MiB);
      const v = await env.cli(['verify', '--repo', killRepo, '--read-data']);
      assert.equal(v.code, 0, v.stderr);
      await assertRestores('k', killRepo, m);
      const gc = JSON.parse(await env.cliOk(['--json', 'gc', '--repo', killRepo])) as GcReport;
      console.log(`# gc after the kill: ${JSON.stringify(gc)}`);
      const { named, store } = await liveObjects(killRepo);
      let stored = 0;
      for (const p of repoObjects(killRepo).packs) stored += (await store.packEntries(p)).length;
      assert.equal(stored, named.size, 'no unreferenced chunk is left after gc');
      await assertRestores('k', killRepo, m);
      assert.deepEqual(await env.qb.repository.list({ repo: killRepo }).then((l) => l.map((x) => x.id)), [m.id]);
    });
  });
});

function rmManifest(repo: string, id: string): void {
  const file = join(repo, 'snapshots', 'f', id);
  if (existsSync(file)) renameSync(file, join(repo, `.removed-${id}`));
}
