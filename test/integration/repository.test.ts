// The format 2 repository end to end against real QEMU.
// - A full and three incrementals, with data writes, write-zeroes and
//   discards between them (and a write while a backup reads): each backup
//   restores (raw and qcow2, `restore --to` and `export`, library and CLI) to
//   exactly the bytes its disks held when its job started.
// - An incremental reads exactly the dirty clusters (rounded to the bitmap's
//   granularity, 64 KiB, also on sdb's 256 KiB clusters), never a zeroed or
//   discarded range, and stores about what it read.
// - `restore --into-domain` writes a backup over a shut-off domain's disks.
// - A second domain whose disks are copies of the first adds no chunk.
// - prune (policies, --dry-run) and gc: kept backups restore exactly, and gc
//   removes exactly the packs and indexes no manifest reaches.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ZERO_ID } from '../../src/repository/chunk.js';
import { runTool } from '../../src/image/tools.js';
import type { Manifest, ManifestDisk, PruneResult, RepoStats, GcReport } from '../../src/repository/repository.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { KiB, MiB, cliError, fileTree, imageDiffers, liveObjects, randomFile, referenceCopies, repoObjects } from '../helpers/repo.js';

function disk(m: Manifest, target: string): ManifestDisk {
  const d = m.disks.find((x) => x.target === target);
  assert.ok(d !== undefined, `backup ${m.id} has disk ${target}`);
  return d;
}

/** Raw chunk stored uncompressed and unencrypted: one codec byte more than its data. */
const RAW_CHUNK_BYTES = 64 * KiB + 1;

describe('repository format 2: backups, restores, dedup (real QEMU)', () => {
  let env: TestEnv;
  let repo: string;
  /** Reference raw copies of every disk at each backup's start, by backup id. */
  const refs = new Map<string, Map<string, string>>();
  const chain: Manifest[] = [];

  const w = (domain: string, target: string, command: string): Promise<void> => guestWrite(env.qb, domain, target, command);
  const rand = (name: string, bytes: number): string => randomFile(env, name, bytes);

  async function backupLib(tag: string, onProgress?: () => void): Promise<Manifest> {
    const ref = await referenceCopies(env, 'vm', tag);
    const m = await env.qb.repository.backup('vm', { repo, ...(onProgress !== undefined ? { onProgress } : {}) });
    refs.set(m.id, ref);
    return m;
  }
  async function backupCli(tag: string): Promise<Manifest> {
    const ref = await referenceCopies(env, 'vm', tag);
    const m = JSON.parse(await env.cliOk(['--json', 'backup', 'vm', '--repo', repo])) as Manifest;
    refs.set(m.id, ref);
    return m;
  }

  /** Restores a backup four ways and checks every image against the reference taken at its start. */
  async function assertRestores(domain: string, m: Manifest, ref: Map<string, string> | undefined, tag: string): Promise<void> {
    assert.ok(ref !== undefined, `a reference for ${m.id}`);
    const check = async (file: string, format: 'raw' | 'qcow2', target: string, how: string): Promise<void> => {
      const want = ref.get(target);
      assert.ok(want !== undefined);
      const why = await imageDiffers(file, format, want);
      assert.equal(why, undefined, `backup ${m.id} (${tag}) disk ${target} via ${how}: ${why ?? ''}`);
    };
    // restore --to, raw, through the library
    const rawDir = env.path(`restore-raw-${tag}`);
    const r = await env.qb.repository.restore(domain, { repo, backup: m.id, to: rawDir, format: 'raw' });
    assert.equal(r.backup, m.id);
    assert.deepEqual(r.disks.map((d) => d.target).sort(), m.disks.map((d) => d.target).sort());
    for (const d of r.disks) await check(d.file, 'raw', d.target, 'library restore --format raw');
    // restore --to, qcow2, through the CLI
    const qDir = env.path(`restore-qcow2-${tag}`);
    await env.cliOk(['restore', domain, '--repo', repo, '--backup', m.id, '--to', qDir, '--format', 'qcow2']);
    for (const d of m.disks) await check(join(qDir, `${d.target}.qcow2`), 'qcow2', d.target, 'CLI restore --format qcow2');
    // export one disk raw through the CLI, every disk qcow2 through the library
    const first = m.disks[0];
    assert.ok(first !== undefined);
    const exported = env.path(`export-${tag}-${first.target}.raw`);
    await env.cliOk(['export', domain, '--repo', repo, '--backup', m.id, '--disk', first.target, '--to', exported, '--format', 'raw']);
    await check(exported, 'raw', first.target, 'CLI export --format raw');
    for (const d of m.disks) {
      const file = env.path(`export-${tag}-${d.target}.qcow2`);
      await env.qb.repository.exportDisk(domain, { repo, backup: m.id, disk: d.target, file });
      await check(file, 'qcow2', d.target, 'library export (qcow2)');
    }
  }

  before(async () => {
    env = new TestEnv('qbt-repo-');
    repo = env.path('repo');
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 32 * MiB }, { target: 'sdb', sizeBytes: 16 * MiB, clusterSizeBytes: 256 * KiB }]);
    await env.qb.domains.start('vm', { paused: true });
  });
  after(async () => env.cleanup());

  test('full, then incrementals with writes, write-zeroes and discards: each restores exactly; incrementals read only dirty clusters', async () => {
    // ---- b1: full --------------------------------------------------------------
    await w('vm', 'sda', `write -s ${rand('r1', 4 * MiB)} 0 4M`);
    await w('vm', 'sda', 'write -P 0x11 8M 2M'); // 32 equal chunks: one unique
    await w('vm', 'sdb', `write -s ${rand('r2', 3 * MiB)} 1M 3M`);
    const b1 = await backupLib('b1');
    chain.push(b1);
    assert.deepEqual(b1.disks.map((d) => [d.target, d.level]), [['sda', 'full'], ['sdb', 'full']]);
    assert.match(disk(b1, 'sda').fullReason ?? '', /no earlier backup/);
    // A full reads every slot with data and nothing else (unallocated clusters read as zero: skipped).
    assert.equal(disk(b1, 'sda').bytesRead, 6 * MiB);
    assert.equal(disk(b1, 'sda').chunks, 96);
    assert.equal(disk(b1, 'sda').newChunks, 65, '64 random chunks and one pattern chunk are new');
    const sdaStored1 = disk(b1, 'sda').bytesStored;
    assert.ok(sdaStored1 >= 64 * RAW_CHUNK_BYTES && sdaStored1 < 64 * RAW_CHUNK_BYTES + 4 * KiB, `sda full stored ${sdaStored1}`);
    assert.equal(disk(b1, 'sdb').bytesRead, 3 * MiB);
    assert.equal(disk(b1, 'sdb').newChunks, 48);
    assert.equal(disk(b1, 'sdb').bytesStored, 48 * RAW_CHUNK_BYTES);

    // ---- b2: incremental after data writes, write-zeroes and discards -----------
    await w('vm', 'sda', `write -s ${rand('r3', 64 * KiB)} 20M 64k`); // cluster 320
    await w('vm', 'sda', `write -P 0x22 ${5 * MiB + 4 * KiB} 8k`); // inside cluster 80
    await w('vm', 'sda', `write -s ${rand('r4', 8 * KiB)} ${12 * MiB - 4 * KiB} 8k`); // clusters 191 and 192
    await w('vm', 'sda', 'write -z 1M 128k'); // clusters 16-17 of the random data become zeroes
    await w('vm', 'sda', 'discard 8M 256k'); // clusters 128-131 of the pattern are discarded
    await w('vm', 'sdb', `write -P 0x33 ${3 * MiB + 512 * KiB} 4k`); // 4 KiB of one 256 KiB cluster of sdb's random data
    await w('vm', 'sdb', 'write -z 2M 256k');
    await w('vm', 'sdb', 'discard 3M 256k');
    const b2 = await backupLib('b2');
    chain.push(b2);
    assert.deepEqual(b2.disks.map((d) => [d.target, d.level, d.fullReason]), [['sda', 'incremental', null], ['sdb', 'incremental', null]]);
    const sda2 = disk(b2, 'sda');
    assert.equal(sda2.bytesRead, 256 * KiB, 'sda: 4 dirty 64 KiB clusters read; the 6 zeroed or discarded ones are not');
    assert.equal(sda2.chunks, 4);
    assert.equal(sda2.newChunks, 4);
    assert.ok(sda2.bytesStored > 64 * KiB && sda2.bytesStored <= sda2.bytesRead + 4, `sda incremental stored ${sda2.bytesStored}`);
    const sdb2 = disk(b2, 'sdb');
    // QEMU caps a bitmap's default granularity at 64 KiB, so even on 256 KiB clusters one 64 KiB slot is dirty.
    assert.equal(sdb2.bytesRead, 64 * KiB, 'sdb: the one dirty 64 KiB slot is read; zeroed and discarded clusters are not');
    assert.equal(sdb2.chunks, 1);
    assert.equal(sdb2.newChunks, 1);
    assert.ok(sdb2.bytesStored <= RAW_CHUNK_BYTES, `sdb stored one chunk (${sdb2.bytesStored})`);

    // ---- b3: incremental; the guest writes while the backup reads --------------
    await w('vm', 'sda', `write -s ${rand('r5', MiB)} 24M 1M`); // clusters 384-399
    await w('vm', 'sda', 'write -P 0x44 2M 4k'); // cluster 32, inside the first random data
    let during: Promise<void> | undefined;
    const b3 = await backupLib('b3', () => {
      // The pull export shows the disk frozen at the job's start: this write must not be in b3.
      during ??= w('vm', 'sda', `write -P 0x55 ${24 * MiB + 960 * KiB} 64k`);
    });
    assert.ok(during !== undefined, 'the backup reported progress');
    await during;
    chain.push(b3);
    assert.deepEqual(b3.disks.map((d) => d.level), ['incremental', 'incremental']);
    assert.equal(disk(b3, 'sda').bytesRead, MiB + 64 * KiB);
    assert.equal(disk(b3, 'sda').newChunks, 17);
    assert.ok(disk(b3, 'sda').bytesStored <= 17 * RAW_CHUNK_BYTES);
    assert.deepEqual([disk(b3, 'sdb').bytesRead, disk(b3, 'sdb').chunks, disk(b3, 'sdb').bytesStored], [0, 0, 0], 'an unchanged disk reads and stores nothing');

    // ---- b4 (CLI): the write made during b3, and a zeroed cluster --------------
    await w('vm', 'sda', 'write -z 24M 64k'); // cluster 384 becomes zeroes
    await w('vm', 'sdb', `write -s ${rand('r6', 256 * KiB)} 0 256k`);
    const b4 = await backupCli('b4');
    chain.push(b4);
    assert.deepEqual(b4.disks.map((d) => d.level), ['incremental', 'incremental']);
    assert.equal(disk(b4, 'sda').bytesRead, 64 * KiB, 'only the cluster written during b3 is read');
    assert.equal(disk(b4, 'sdb').bytesRead, 256 * KiB);
    assert.equal(disk(b4, 'sdb').bytesStored, 4 * RAW_CHUNK_BYTES);

    // Every backup restores to its own instant, older ones after newer ones exist.
    for (const [i, m] of chain.entries()) await assertRestores('vm', m, refs.get(m.id), `b${i + 1}`);

    const listed = JSON.parse(await env.cliOk(['--json', 'backup-list', 'vm', '--repo', repo])) as Manifest[];
    assert.deepEqual(listed.map((m) => m.id), chain.map((m) => m.id));
    const v = await env.cli(['verify', '--repo', repo, '--read-data']);
    assert.equal(v.code, 0, v.stderr);
    assert.match(v.stdout, /Verified 4 backups: all \d+ chunks present, \d+ read back intact/);
  });

  test('restore --into-domain writes a backup over a shut-off domain\'s disks', async () => {
    const b2 = chain[1];
    assert.ok(b2 !== undefined, 'the chain test ran');
    await env.defineDomain('copy', [{ target: 'sda', sizeBytes: 32 * MiB }, { target: 'sdb', sizeBytes: 16 * MiB }]);
    const disks = env.qb.domains.blockList('copy');
    // Junk everywhere, so holes of the backup must be written as zeroes.
    for (const d of disks) await runTool('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x99 0 ${d.target === 'sda' ? 32 : 16}M`, d.source]);
    const out = await env.cliOk(['restore', 'vm', '--repo', repo, '--backup', b2.id, '--into-domain', 'copy']);
    assert.match(out, new RegExp(`Restored backup ${b2.id}`));
    for (const d of disks) {
      const why = await imageDiffers(d.source, 'qcow2', refs.get(b2.id)?.get(d.target) ?? '');
      assert.equal(why, undefined, `disk ${d.target} of "copy" holds backup ${b2.id}: ${why ?? ''}`);
    }
    // A running domain is refused, and its disks are left alone.
    const r = await env.cli(['--json', 'restore', 'vm', '--repo', repo, '--backup', b2.id, '--into-domain', 'vm']);
    assert.equal(r.code, 1);
    const e = cliError(r);
    assert.equal(e.code, 'DOMAIN_RUNNING');
    assert.match(e.message, /domain "vm": it is running/);
  });

  test('a second domain whose disks are copies of the first adds no chunk to the repository', async () => {
    const b4 = chain[3];
    assert.ok(b4 !== undefined, 'the chain test ran');
    // No write since b4: the copies hold exactly b4's data.
    const xml: Array<{ target: string; file: string }> = [];
    for (const d of env.qb.domains.blockList('vm')) {
      await w('vm', d.target, 'flush');
      const file = env.path(`twin-${d.target}.qcow2`);
      await runTool('qemu-img', ['convert', '-U', '-O', 'qcow2', d.source, file]);
      xml.push({ target: d.target, file });
    }
    await env.qb.domains.define(env.domainXml('twin', xml));
    const before = JSON.parse(await env.cliOk(['--json', 'stats', '--repo', repo])) as RepoStats;
    const { store } = await liveObjects(repo);
    // The twin is shut off: the backup starts it paused and shuts it down again.
    const m = JSON.parse(await env.cliOk(['--json', 'backup', 'twin', '--repo', repo])) as Manifest;
    assert.equal(env.qb.domains.info('twin').state, 'shut off');
    for (const d of m.disks) {
      assert.equal(d.level, 'full');
      const table = await store.resolveIndex(disk(b4, d.target).index);
      let withData = 0;
      for (let at = 0; at < table.ids.length; at += 32) if (!table.ids.subarray(at, at + 32).equals(ZERO_ID)) withData++;
      assert.equal(d.chunks, withData, `disk ${d.target}: as many chunks as vm's disk at b4`);
      assert.equal(d.newChunks, 0, `disk ${d.target}: every chunk is already in the repository`);
      assert.equal(d.bytesStored, 0);
    }
    const afterStats = JSON.parse(await env.cliOk(['--json', 'stats', '--repo', repo])) as RepoStats;
    assert.equal(afterStats.uniqueChunks, before.uniqueChunks);
    assert.equal(afterStats.storedChunkBytes, before.storedChunkBytes);
    assert.ok(afterStats.repositoryBytes - before.repositoryBytes < 64 * KiB, `only an index and a manifest were added (${afterStats.repositoryBytes - before.repositoryBytes} bytes)`);
    assert.ok(afterStats.dedupRatio > before.dedupRatio);
    const twinRef = new Map(xml.map((x) => [x.target, refs.get(b4.id)?.get(x.target) ?? '']));
    await assertRestores('twin', m, twinRef, 'twin');
  });
});

describe('repository format 2: prune and gc (real QEMU)', () => {
  let env: TestEnv;
  let repo: string;
  const refs = new Map<string, string>(); // backup id → reference of sda
  let restores = 0;

  const w = (command: string): Promise<void> => guestWrite(env.qb, 'pr', 'sda', command);
  async function backup(tag: string, extra: string[] = []): Promise<Manifest> {
    const ref = (await referenceCopies(env, 'pr', tag)).get('sda') ?? '';
    const m = JSON.parse(await env.cliOk(['--json', 'backup', 'pr', '--repo', repo, ...extra])) as Manifest;
    refs.set(m.id, ref);
    return m;
  }
  async function assertRestores(m: Manifest): Promise<void> {
    const file = env.path(`restore-${m.id}-${++restores}.raw`);
    await env.cliOk(['export', 'pr', '--repo', repo, '--backup', m.id, '--disk', 'sda', '--to', file, '--format', 'raw']);
    const why = await imageDiffers(file, 'raw', refs.get(m.id) ?? '');
    assert.equal(why, undefined, `backup ${m.id} restores exactly: ${why ?? ''}`);
  }
  /**
   * What gc must do, computed independently of gc: packs with no chunk a live
   * index names go, packs under half live with a dead chunk are rewritten,
   * unreachable indexes go.
   */
  async function expectedGc(): Promise<{ deleted: Set<string>; repacked: Set<string>; liveChunks: Set<string>; garbageIndexes: Set<string> }> {
    const { indexes, named: chunks, store } = await liveObjects(repo);
    const objects = repoObjects(repo);
    const deleted = new Set<string>();
    const repacked = new Set<string>();
    for (const packId of objects.packs) {
      const size = readFileSync(join(repo, 'data', packId.slice(0, 2), packId)).length;
      const entries = await store.packEntries(packId);
      const live = entries.filter((e) => chunks.has(e.id.toString('hex'))).reduce((n, e) => n + e.length, 0);
      // A pack without a dead chunk is never rewritten, however small its chunks (gc.ts).
      const hasDead = entries.some((e) => !chunks.has(e.id.toString('hex')));
      if (live === 0) deleted.add(packId);
      else if (live * 2 < size && hasDead) repacked.add(packId);
    }
    return { deleted, repacked, liveChunks: new Set(chunks.keys()), garbageIndexes: new Set([...objects.indexes].filter((i) => !indexes.has(i))) };
  }
  /** Runs gc and checks it removed exactly what `expectedGc` said, and that every live chunk is still in a pack. */
  async function gcExactly(): Promise<GcReport> {
    const want = await expectedGc();
    const before = repoObjects(repo);
    const report = JSON.parse(await env.cliOk(['--json', 'gc', '--repo', repo])) as GcReport;
    assert.equal(report.packsDeleted, want.deleted.size);
    assert.equal(report.packsRepacked, want.repacked.size);
    assert.equal(report.indexesDeleted, want.garbageIndexes.size);
    assert.equal(report.condemned, 0, 'no backup runs: garbage goes at once');
    const afterGc = repoObjects(repo);
    const gone = [...before.packs].filter((p) => !afterGc.packs.has(p)).sort();
    assert.deepEqual(gone, [...want.deleted, ...want.repacked].sort(), 'exactly the garbage packs (and the rewritten ones) are gone');
    assert.deepEqual([...afterGc.packs].sort(), [...afterGc.packIndexes].sort(), 'every pack has its index and no index names a missing pack');
    assert.deepEqual([...before.indexes].filter((i) => !afterGc.indexes.has(i)).sort(), [...want.garbageIndexes].sort(), 'exactly the unreachable disk indexes are gone');
    const { named, store } = await liveObjects(repo);
    assert.deepEqual(named, want.liveChunks);
    for (const hex of named) assert.ok(store.locate(Buffer.from(hex, 'hex')) !== undefined, `live chunk ${hex} is still stored`);
    return report;
  }

  before(async () => {
    env = new TestEnv('qbt-prune-');
    repo = env.path('repo');
    await env.defineDomain('pr', [{ target: 'sda', sizeBytes: 16 * MiB }]);
    await env.qb.domains.start('pr', { paused: true });
  });
  after(async () => env.cleanup());

  test('prune --dry-run shows keep reasons and changes nothing; prune and gc keep every kept backup exact and free exactly the garbage', async () => {
    // p2 is a full so that p1 (and its data, all overwritten) is outside the
    // chain the kept backups run through; prune folds p3's chain (through the
    // removed p2) into a full index and rebases p4 on it.
    await w(`write -s ${randomFile(env, 'A', 4 * MiB)} 0 4M`);
    const p1 = await backup('p1');
    await w(`write -s ${randomFile(env, 'B', 4 * MiB)} 0 4M`); // every chunk of p1 is overwritten
    await w(`write -s ${randomFile(env, 'C', MiB)} 8M 1M`);
    const p2 = await backup('p2', ['--full']);
    await w(`write -s ${randomFile(env, 'D', MiB)} 12M 1M`);
    const p3 = await backup('p3');
    await w(`write -s ${randomFile(env, 'E', 3 * MiB)} 0 3M`); // most of B is overwritten
    const p4 = await backup('p4');
    assert.deepEqual([p1, p2, p3, p4].map((m) => m.disks[0]?.level), ['full', 'full', 'incremental', 'incremental']);
    assert.equal(p2.disks[0]?.fullReason, 'requested with --full');

    // --dry-run: the plan with its reasons, and nothing changes.
    const treeBefore = fileTree(repo);
    const checkpointsBefore = env.qb.checkpoints.list('pr').map((c) => c.name);
    const dry = await env.cliOk(['prune', 'pr', '--repo', repo, '--keep-last', '2', '--keep-hourly', '1', '--dry-run']);
    const hour = new Date(p4.time).toISOString().slice(0, 13);
    assert.deepEqual(dry.trim().split('\n'), [
      `keep   ${p4.id}  last 1, hourly ${hour}`,
      `keep   ${p3.id}  last 2`,
      `would remove ${p2.id}`,
      `would remove ${p1.id}`,
      `would fold   ${p3.id} sda: a full index replaces 2 index link(s)`,
      `would fold   ${p4.id} sda: a delta on ${p3.id} replaces 1 index link(s)`,
    ]);
    assert.deepEqual(fileTree(repo), treeBefore, 'a dry run changes no file of the repository');
    assert.deepEqual(env.qb.checkpoints.list('pr').map((c) => c.name), checkpointsBefore);
    const dryJson = JSON.parse(await env.cliOk(['--json', 'prune', 'pr', '--repo', repo, '--keep-daily', '1', '--dry-run'])) as PruneResult;
    assert.deepEqual(dryJson.keep.map((k) => [k.id, k.reasons]), [[p4.id, [`daily ${hour.slice(0, 10)}`]]]);
    assert.deepEqual(dryJson.remove.map((x) => x.id), [p3.id, p2.id, p1.id]);
    assert.deepEqual(fileTree(repo), treeBefore);
    // A policy that keeps nothing is refused.
    const none = await env.cli(['--json', 'prune', 'pr', '--repo', repo, '--keep-last', '0']);
    assert.equal(none.code, 1);
    assert.match(cliError(none).message, /keep at least 1/);

    // prune --keep-last 2: p1, p2 go with their checkpoints; p3, p4 restore exactly.
    const pruned = JSON.parse(await env.cliOk(['--json', 'prune', 'pr', '--repo', repo, '--keep-last', '2'])) as PruneResult;
    assert.deepEqual(pruned.keep.map((k) => k.id), [p4.id, p3.id]);
    assert.deepEqual(pruned.remove.map((x) => x.id), [p2.id, p1.id]);
    assert.deepEqual(pruned.checkpointsRemoved.sort(), [p1.checkpoint, p2.checkpoint].sort());
    assert.deepEqual(pruned.folds.map((f) => [f.backup, f.kind, f.folded.length]), [[p3.id, 'full', 2], [p4.id, 'delta', 1]]);
    assert.deepEqual(env.qb.checkpoints.list('pr').map((c) => c.name).sort(), [p3.checkpoint, p4.checkpoint].sort());
    assert.deepEqual((await env.qb.repository.list({ repo }, 'pr')).map((m) => m.id), [p3.id, p4.id]);
    for (const m of [p3, p4]) await assertRestores(m);

    // gc: p1's pack (all of A, overwritten) goes; so do the indexes of p1 and
    // p2 and the replaced ones of p3 and p4. B and C stay: p3 still holds them.
    const stats0 = JSON.parse(await env.cliOk(['--json', 'stats', '--repo', repo])) as RepoStats;
    const gc1 = await gcExactly();
    assert.equal(gc1.packsDeleted, 1, 'the pack of A');
    assert.equal(gc1.indexesDeleted, 4, 'the indexes of p1 and p2, and the two that folding replaced');
    for (const m of [p3, p4]) await assertRestores(m);
    const stats1 = JSON.parse(await env.cliOk(['--json', 'stats', '--repo', repo])) as RepoStats;
    assert.ok(stats0.repositoryBytes - stats1.repositoryBytes >= 4 * MiB, `gc freed the 4 MiB of A (${stats0.repositoryBytes} → ${stats1.repositoryBytes})`);

    // A full backup, then keep only it: every older index and the mostly-dead pack of B and C go or shrink.
    const p5 = await backup('p5', ['--full']);
    assert.equal(p5.disks[0]?.level, 'full');
    assert.equal(p5.disks[0]?.newChunks, 0, 'a full of unchanged data stores nothing new');
    await env.cliOk(['prune', 'pr', '--repo', repo, '--keep-last', '1']);
    const gc2 = await gcExactly();
    assert.equal(gc2.indexesDeleted, 2, 'the (folded) indexes of p3 and p4');
    assert.equal(gc2.packsRepacked, 1, 'the pack of B and C: 16 of its 80 chunks live');
    await assertRestores(p5);
    // No garbage is left: every stored chunk is referenced, every index reachable.
    const stats2 = JSON.parse(await env.cliOk(['--json', 'stats', '--repo', repo])) as RepoStats;
    assert.ok(stats2.repositoryBytes < stats1.repositoryBytes);
    const { store, named: chunks, indexes } = await liveObjects(repo);
    const objects = repoObjects(repo);
    let entries = 0;
    for (const packId of objects.packs) entries += (await store.packEntries(packId)).length;
    assert.equal(entries, chunks.size, 'every stored chunk is live');
    assert.equal(stats2.uniqueChunks, chunks.size);
    assert.deepEqual([...objects.indexes].sort(), [...indexes].sort(), 'every disk index is live');
    const again = JSON.parse(await env.cliOk(['--json', 'gc', '--repo', repo])) as GcReport;
    assert.deepEqual([again.packsDeleted, again.packsRepacked, again.indexesDeleted], [0, 0, 0], 'a second gc finds nothing');
    const v = await env.cli(['verify', '--repo', repo, '--read-data']);
    assert.equal(v.code, 0, v.stderr);

    // The chain goes on: the next backup is incremental on p5 and restores.
    await w('write -P 0x66 5M 64k');
    const p6 = await backup('p6');
    assert.equal(p6.disks[0]?.level, 'incremental');
    assert.equal(p6.disks[0]?.bytesRead, 64 * KiB);
    for (const m of [p5, p6]) await assertRestores(m);
  });

  test('prune keep-last 1 of a full and three incrementals folds the chain: the newest restores exactly, gc frees exactly the chunks only the removed backups used, verify --read-data passes', async () => {
    await env.defineDomain('fo', [{ target: 'sda', sizeBytes: 16 * MiB }]);
    await env.qb.domains.start('fo', { paused: true });
    const fw = (command: string): Promise<void> => guestWrite(env.qb, 'fo', 'sda', command);
    const frefs = new Map<string, string>();
    const fbackup = async (tag: string): Promise<Manifest> => {
      const ref = (await referenceCopies(env, 'fo', tag)).get('sda') ?? '';
      const m = JSON.parse(await env.cliOk(['--json', 'backup', 'fo', '--repo', repo])) as Manifest;
      frefs.set(m.id, ref);
      return m;
    };
    await fw(`write -s ${randomFile(env, 'F0', 4 * MiB)} 0 4M`);
    const full = await fbackup('f0');
    await fw(`write -s ${randomFile(env, 'F1', 3 * MiB)} 0 3M`); // overwrites most of the full's data
    const inc1 = await fbackup('f1');
    await fw(`write -s ${randomFile(env, 'F2', MiB)} 6M 1M`);
    await fw('write -z 3M 512k'); // zeroes over the full's data
    const inc2 = await fbackup('f2');
    await fw(`write -s ${randomFile(env, 'F3', MiB)} 6M 1M`); // all of inc2's new data overwritten
    const inc3 = await fbackup('f3');
    assert.deepEqual([full, inc1, inc2, inc3].map((m) => m.disks[0]?.level), ['full', 'incremental', 'incremental', 'incremental']);

    // Which chunks only the removed backups use, computed from the resolved views before the prune.
    const before = await liveObjects(repo);
    const exclusive = [...before.chunks].filter(([, users]) => ![...users].some((u) => u === `fo/${inc3.id}`)).map(([hex]) => hex);
    const newest = [...before.chunks].filter(([, users]) => users.has(`fo/${inc3.id}`)).map(([hex]) => hex);
    const othersChunks = new Set([...before.chunks].filter(([, users]) => [...users].some((u) => !u.startsWith('fo/'))).map(([hex]) => hex));
    assert.ok(exclusive.length >= 48 + 8 + 16, `the removed backups hold data of their own (${exclusive.length} chunks)`);

    const pruned = JSON.parse(await env.cliOk(['--json', 'prune', 'fo', '--repo', repo, '--keep-last', '1'])) as PruneResult;
    assert.deepEqual(pruned.remove.map((x) => x.id).sort(), [full.id, inc1.id, inc2.id].sort());
    assert.deepEqual(pruned.folds.map((f) => [f.backup, f.kind, f.folded.length]), [[inc3.id, 'full', 4]]);
    const listed = await env.qb.repository.list({ repo }, 'fo');
    assert.deepEqual(listed.map((m) => [m.id, m.generation]), [[inc3.id, 2]]);
    assert.equal(listed[0]?.disks[0]?.level, 'incremental', 'the manifest still says how the backup was taken');
    const restoreNewest = async (): Promise<void> => {
      const file = env.path(`restore-fo-${++restores}.raw`);
      await env.cliOk(['export', 'fo', '--repo', repo, '--backup', inc3.id, '--disk', 'sda', '--to', file, '--format', 'raw']);
      assert.equal(await imageDiffers(file, 'raw', frefs.get(inc3.id) ?? ''), undefined, 'the kept newest backup restores exactly');
    };
    await restoreNewest();
    for (const gone of [full, inc1, inc2]) {
      const r = await env.cli(['--json', 'export', 'fo', '--repo', repo, '--backup', gone.id, '--disk', 'sda', '--to', env.path('gone.raw'), '--format', 'raw']);
      assert.equal(cliError(r).code, 'BACKUP_NOT_FOUND');
    }

    // After the fold no live index names a chunk only the removed backups
    // used (before it, the kept chain's links named them all), so gc frees
    // them: inc2's pack is all garbage, the full's pack is 1/8 live and is
    // rewritten without them.
    for (const hex of exclusive) assert.ok(before.named.has(hex), 'before the prune, the chain named every chunk of the removed backups');
    const folded = await liveObjects(repo);
    for (const hex of exclusive) if (!othersChunks.has(hex)) assert.ok(!folded.named.has(hex), `chunk ${hex} only the removed backups used is garbage`);
    await gcExactly();
    const afterGc = await liveObjects(repo);
    for (const hex of exclusive) {
      if (!othersChunks.has(hex)) assert.equal(afterGc.store.locate(Buffer.from(hex, 'hex')), undefined, `chunk ${hex} only the removed backups used is gone`);
    }
    for (const hex of newest) assert.ok(afterGc.store.locate(Buffer.from(hex, 'hex')) !== undefined, `chunk ${hex} of the kept backup stays`);
    await restoreNewest();
    const v = await env.cli(['verify', '--repo', repo, 'fo', '--read-data']);
    assert.equal(v.code, 0, v.stderr);

    // The chain goes on from the folded index.
    await fw('write -P 0x5a 9M 64k');
    const inc4 = await fbackup('f4');
    assert.equal(inc4.disks[0]?.level, 'incremental');
    assert.equal(inc4.disks[0]?.bytesRead, 64 * KiB);
    const file = env.path(`restore-fo-${++restores}.raw`);
    await env.cliOk(['export', 'fo', '--repo', repo, '--backup', inc4.id, '--disk', 'sda', '--to', file, '--format', 'raw']);
    assert.equal(await imageDiffers(file, 'raw', frefs.get(inc4.id) ?? ''), undefined);
  });

  test('restore of a pruned backup is refused with one sentence', async () => {
    const r = await env.cli(['--json', 'restore', 'pr', '--repo', repo, '--backup', '20200101T000000.000Z-0000', '--to', env.path('nope')]);
    assert.equal(r.code, 1);
    const e = cliError(r);
    assert.equal(e.code, 'BACKUP_NOT_FOUND');
    assert.match(e.message, /has no backup "20200101T000000.000Z-0000" of domain "pr"/);
  });
});
