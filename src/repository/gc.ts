// Garbage collection: removes packs and disk indexes no backup references,
// and repacks packs that are mostly garbage.
//
// The method, safe while backups run (on this host or others):
// 1. Mark: every manifest's index chain is live, and every chunk a live
//    index names.
// 2. A pack with no live chunk, or an index no manifest reaches, is garbage.
//    A running backup may be about to reference garbage (it found the chunk
//    in the store before gc looked, or wrote the pack and not yet its
//    manifest), so garbage is first *condemned*: a marker object records when
//    gc found it. Backups that start later ignore condemned packs (they store
//    such chunks again). A later gc deletes condemned garbage that is still
//    garbage once every backup running when it was condemned has ended: its
//    marker is older than the oldest live backup lock (by CLOCK_SKEW_MS, as
//    marker and lock may come from hosts whose clocks differ; a backup lock
//    is a lease that other hosts honour until it expires, locks.ts). With no backup running
//    at all, garbage is deleted at once (so a full disk can always be freed,
//    without writing anything first). A backup served over NBD (a `serve`
//    lock) counts as running, so pruning it does not free its chunks
//    under a client; they go with the first gc after serving stops.
//    No pack is repacked while a backup is served (step 5 drops dead
//    chunks without condemning them first).
// 3. Half-written objects (temporary files of a writer killed mid-put) older
//    than 15 minutes are removed too.
// 4. Deletion order: a pack's index object goes before the pack (no index
//    ever names a missing pack); packs that are wholly garbage go before any
//    repacking, which needs space.
// 5. Repack: a pack whose live chunks are under half of it is rewritten: the
//    live chunks go into new packs (stored and indexed first), then the old
//    pack's index and the pack are deleted.
// 6. Before marking, manifest generations a newer one replaced (left by an
//    interrupted prune, fold.ts) are deleted: readers use only the newest.
// 7. Nothing written after the newest manifest gc can list is garbage yet
//    (by the store's own clock: file mtimes, S3 LastModified). A listing
//    that is stale (an object store that lists late, a caching gateway)
//    could hide the manifest of a backup that finished meanwhile; its packs
//    and indexes are newer than every manifest gc sees, so they are kept.
//    Garbage of a killed backup goes once a later backup has committed, or
//    once it is older than STALE_LISTING_MS (so a repository whose only
//    backup failed on a full disk is still freed, a quarter of an hour later).
// Only one gc runs at a time, and never beside a prune (locks.ts). A copy
// reading the repository (a `copy` lock, copy.ts) is a reader like a served
// backup: it counts as a running backup in step 2, and step 5 waits for a
// later gc while a reader holds a lock.

import { QbackupError } from '../errors.js';
import type { Backend } from './backend/backend.js';
import { ZERO_ID } from './chunk.js';
import { indexKey, INDEX_ID, type DiskIndex } from './disk-index.js';
import { acquireLock, CLOCK_SKEW_MS, ensureReserve, isReader, liveLocks } from './locks.js';
import { PACK_ID, PackBuilder, PACK_TARGET_BYTES, packIndexKey, packKey, parseHeader, type PackEntry } from './pack.js';
import type { Store } from './store.js';
import { throwIfCancelled, type OperationOptions } from '../util/operation.js';

export interface GcReport {
  packsDeleted: number;
  packsRepacked: number;
  indexesDeleted: number;
  bytesFreed: number;
  /** Garbage found while backups run, left for a later gc. */
  condemned: number;
  /** Half-written objects of killed writers removed. */
  temporaryRemoved: number;
  /** Lost pack indexes written again from their pack's trailer (the pack held live chunks). */
  indexesRebuilt: number;
}

const TEMPORARY_AGE_MS = 15 * 60 * 1000;
/** How late a listing may be that gc still protects against (step 7). */
const STALE_LISTING_MS = 15 * 60 * 1000;

const CONDEMNED = /^(pack|index)\.([0-9a-f]{64})$/;

/** Packs condemned by a gc: backups do not deduplicate against them. */
export async function condemnedPacks(backend: Backend): Promise<Set<string>> {
  const out = new Set<string>();
  for (const { key } of await backend.list('condemned/')) {
    const m = CONDEMNED.exec(key.slice(10));
    if (m?.[1] === 'pack' && m[2] !== undefined) out.add(m[2]);
  }
  return out;
}

/**
 * Collects garbage. Cancellation (`signal`) is checked between objects: a
 * pack goes with its index, a repack stores the new pack before the old one
 * goes, so a cancelled gc leaves only garbage for the next one.
 */
export async function collectGarbage(store: Store, options: OperationOptions = {}): Promise<GcReport> {
  const cancelled = (): void => throwIfCancelled(options.signal, `Garbage collection of repository "${store.location}"`);
  const backend = store.backend;
  await using _lock = await acquireLock(backend, 'gc', null);
  // A reader (a served backup, a copy) counts as running: what it reads stays until it ends.
  const backups = (await liveLocks(backend)).filter((l) => l.info.kind === 'backup' || isReader(l.info.kind));
  const reading = backups.some((l) => isReader(l.info.kind));
  const oldestBackupMs = Math.min(...backups.map((l) => l.info.takenMs));
  const report: GcReport = { packsDeleted: 0, packsRepacked: 0, indexesDeleted: 0, bytesFreed: 0, condemned: 0, temporaryRemoved: 0, indexesRebuilt: 0 };
  await store.dropSupersededManifests();
  // Listed before marking: a manifest committed in between is marked, and only makes this horizon conservative.
  const horizonMs = Math.max(Date.now() - STALE_LISTING_MS - CLOCK_SKEW_MS, ...(await backend.list('snapshots/')).map((o) => o.modifiedMs ?? Infinity));
  const settled = (modifiedMs: number | undefined): boolean => modifiedMs === undefined || modifiedMs < horizonMs;
  const { liveIndexes, liveChunks } = await mark(store);
  const marks = await readMarks(backend);
  // May this garbage go now? Yes when no backup runs, or it was condemned
  // before every running backup began, by a margin for the clocks of other hosts.
  const mayDelete = (kind: string, id: string): boolean => backups.length === 0 || (marks.get(`${kind}.${id}`) ?? Infinity) < oldestBackupMs - CLOCK_SKEW_MS;
  const packs = await packUsage(store, liveChunks, report);
  // A pack with no dead chunk is never rewritten: it would gain nothing (with
  // small chunks its header alone can outweigh them), and unencrypted its new
  // bytes, hence its id, would be the old ones.
  const hasDead = (p: PackUsage): boolean => p.entries.some((e) => !liveChunks.has(e.id.toString('hex')));
  const garbage = packs.filter((x) => x.liveBytes === 0 && settled(x.modifiedMs));
  const toRepack = (x: PackUsage): boolean => !reading && settled(x.modifiedMs) && x.liveBytes > 0 && x.liveBytes * 2 < x.size && hasDead(x);
  const totalBytes = garbage.reduce((n, p) => n + p.size, 0) + packs.filter((x) => toRepack(x)).reduce((n, p) => n + p.size, 0);
  let doneBytes = 0;
  const progress = (bytes: number): void => options.onProgress?.({ phase: 'gc', doneBytes: (doneBytes += bytes), totalBytes });
  for (const p of garbage) {
    cancelled();
    if (mayDelete('pack', p.packId)) {
      await backend.delete(packIndexKey(p.packId));
      await backend.delete(packKey(p.packId));
      report.packsDeleted++;
      report.bytesFreed += p.size;
    } else report.condemned += await condemn(backend, marks, 'pack', p.packId);
    progress(p.size);
  }
  await collectIndexes(backend, marks, report, { live: liveIndexes, settled, mayDelete, cancelled });
  // Repacking drops dead chunks at once, so it waits while a reader holds a lock (what it reads may be dead by now).
  for (const p of packs.filter((x) => toRepack(x))) {
    cancelled();
    const freed = await repack(store, p, liveChunks, options);
    report.bytesFreed += freed ?? 0;
    report.packsRepacked += freed !== undefined ? 1 : 0;
    progress(p.size);
  }
  await dropStaleMarks(backend, marks, store, liveIndexes, packs);
  // Writers finish a put within seconds; a temporary object this old belongs to a killed one.
  report.temporaryRemoved = (await backend.sweepTemporary?.(TEMPORARY_AGE_MS)) ?? 0;
  // Put back the room a prune or gc on a full disk used (when there is room now).
  await ensureReserve(backend);
  return report;
}

/** Deletes (or condemns, while a backup runs) the disk indexes no manifest names that were written before the horizon. */
async function collectIndexes(
  backend: Store['backend'],
  marks: Awaited<ReturnType<typeof readMarks>>,
  report: GcReport,
  rules: { live: ReadonlySet<string>; settled: (modifiedMs: number | undefined) => boolean; mayDelete: (kind: string, id: string) => boolean; cancelled: () => void },
): Promise<void> {
  for (const { key, size, modifiedMs } of await backend.list('indexes/')) {
    rules.cancelled();
    const id = key.split('/').at(-1) ?? '';
    if (!INDEX_ID.test(id) || rules.live.has(id) || !rules.settled(modifiedMs)) continue;
    if (rules.mayDelete('index', id)) {
      await backend.delete(indexKey(id));
      report.indexesDeleted++;
      report.bytesFreed += size;
    } else report.condemned += await condemn(backend, marks, 'index', id);
  }
}

/** The live indexes (every chain link of every manifest) and the chunks they name. */
async function mark(store: Store): Promise<{ liveIndexes: Set<string>; liveChunks: Set<string> }> {
  const liveIndexes = new Set<string>();
  const liveChunks = new Set<string>();
  const addIndex = (id: string, index: DiskIndex): void => {
    liveIndexes.add(id);
    for (let at = 0; at < index.ids.length; at += 32) {
      const chunk = index.ids.subarray(at, at + 32);
      if (!chunk.equals(ZERO_ID)) liveChunks.add(chunk.toString('hex'));
    }
  };
  for (const m of await store.manifests()) {
    for (const d of m.disks) {
      let at: string | undefined = d.index;
      while (at !== undefined && !liveIndexes.has(at)) {
        const index = await store.getIndex(at);
        addIndex(at, index);
        at = index.kind === 'delta' ? index.parent : undefined;
      }
    }
  }
  return { liveIndexes, liveChunks };
}

interface PackUsage {
  packId: string;
  size: number;
  modifiedMs?: number | undefined;
  liveBytes: number;
  entries: PackEntry[];
}

/**
 * Every pack with its size and the bytes of its live chunks. A pack without
 * an index is read by its trailer: a killed writer's pack (stored before its
 * index, named by no manifest, or holding copies of chunks another pack
 * holds) is garbage; a pack whose index was lost and which alone holds live
 * chunks gets its index back from the trailer and is kept. A pack with
 * neither an index nor a readable trailer cannot be read at all: garbage.
 */
async function packUsage(store: Store, liveChunks: ReadonlySet<string>, report: GcReport): Promise<PackUsage[]> {
  const out: PackUsage[] = [];
  const indexed = new Set((await store.backend.list('index/')).map((o) => o.key.slice(6)));
  const unindexed: Array<{ packId: string; size: number; modifiedMs?: number | undefined }> = [];
  const inIndexedPacks = new Set<string>();
  for (const { key, size, modifiedMs } of await store.backend.list('data/')) {
    const packId = key.split('/').at(-1) ?? '';
    if (!PACK_ID.test(packId)) continue;
    if (!indexed.has(packId)) {
      unindexed.push({ packId, size, modifiedMs });
      continue;
    }
    const entries = await store.packEntries(packId);
    for (const e of entries) inIndexedPacks.add(e.id.toString('hex'));
    out.push({ ...usage(packId, size, entries, liveChunks), modifiedMs });
  }
  for (const { packId, size, modifiedMs } of unindexed) {
    const trailer = (await readTrailer(store, packId, size)) ?? { header: Buffer.alloc(0), entries: [] };
    // Live chunks found nowhere else: the pack's index was lost, not never written.
    if (trailer.entries.some((e) => liveChunks.has(e.id.toString('hex')) && !inIndexedPacks.has(e.id.toString('hex')))) {
      await store.backend.putIfAbsent(packIndexKey(packId), trailer.header);
      report.indexesRebuilt++;
      out.push({ ...usage(packId, size, trailer.entries, liveChunks), modifiedMs });
    } else out.push({ packId, size, liveBytes: 0, entries: [], modifiedMs }); // a killed writer's pack, or copies of chunks stored elsewhere
  }
  return out;
}

function usage(packId: string, size: number, entries: PackEntry[], liveChunks: ReadonlySet<string>): PackUsage {
  const liveBytes = entries.filter((e) => liveChunks.has(e.id.toString('hex'))).reduce((n, e) => n + e.length, 0);
  return { packId, size, liveBytes, entries };
}

/** The header in a pack's trailer and its entries; undefined when it cannot be read. */
async function readTrailer(store: Store, packId: string, size: number): Promise<{ header: Buffer; entries: PackEntry[] } | undefined> {
  try {
    if (size < 4) return { header: Buffer.alloc(0), entries: [] };
    const headerLength = (await store.backend.get(packKey(packId), { offset: size - 4, length: 4 })).readUInt32LE(0);
    if (headerLength > size - 4) return undefined;
    const header = await store.backend.get(packKey(packId), { offset: size - 4 - headerLength, length: headerLength });
    return { header, entries: parseHeader(header, store.key, `Trailer of pack "${packId}"`, store.config.chunkSize, size - 4 - headerLength) };
  } catch (err) {
    if (err instanceof QbackupError && (err.code === 'REPO_DAMAGED' || err.code === 'REPO_OBJECT_NOT_FOUND')) return undefined;
    throw err;
  }
}

async function readMarks(backend: Backend): Promise<Map<string, number>> {
  const marks = new Map<string, number>();
  for (const { key } of await backend.list('condemned/')) {
    const name = key.slice(10);
    if (!CONDEMNED.test(name)) continue;
    const text = (await backend.get(key).catch(() => Buffer.from(''))).toString('utf8');
    const ms = Number(text);
    marks.set(name, Number.isFinite(ms) && ms > 0 ? ms : Date.now());
  }
  return marks;
}

async function condemn(backend: Backend, marks: Map<string, number>, kind: 'pack' | 'index', id: string): Promise<number> {
  if (marks.has(`${kind}.${id}`)) return 0;
  await backend.putIfAbsent(`condemned/${kind}.${id}`, Buffer.from(String(Date.now())));
  return 1;
}

/**
 * Moves a pack's live chunks into a new pack, then deletes it; returns the
 * bytes freed, or undefined (the pack left as it is) when a live chunk in it
 * does not read back intact: damage is never copied into a new pack.
 */
async function repack(store: Store, pack: PackUsage, liveChunks: ReadonlySet<string>, options: OperationOptions): Promise<number | undefined> {
  const builder = new PackBuilder();
  const live = pack.entries.filter((e) => liveChunks.has(e.id.toString('hex')));
  // Through the one read path: each chunk checked against its id; the stored form moves as it is (still compressed and sealed).
  const read = await store.readChunks(
    live.map((e) => e.id),
    { keepStored: true, locations: live.map((e) => ({ packId: pack.packId, offset: e.offset, length: e.length, rawLength: e.rawLength })) },
  );
  for (const [i, e] of live.entries()) {
    const r = read[i];
    if (r === undefined || 'error' in r || r.stored === undefined) {
      options.logger?.log({ level: 'warn', msg: 'pack not repacked: a live chunk in it is damaged (verify --read-data names it)', fields: { pack: pack.packId } });
      return undefined;
    }
    builder.add(e.id, r.stored, e.rawLength);
    if (builder.bytes >= PACK_TARGET_BYTES) throw new QbackupError('REPO_DAMAGED', `Pack "${pack.packId}" holds more than a pack can`);
  }
  const newSize = builder.bytes;
  const newId = builder.count > 0 ? await store.storePack(builder) : undefined;
  // Packs are content-addressed: the same bytes are the same pack, which must stay.
  if (newId === pack.packId) return 0;
  await store.backend.delete(packIndexKey(pack.packId));
  await store.backend.delete(packKey(pack.packId));
  return pack.size - newSize;
}

/** Markers of garbage that came back to life, or is gone, are removed. */
async function dropStaleMarks(backend: Backend, marks: ReadonlyMap<string, number>, store: Store, liveIndexes: ReadonlySet<string>, packs: readonly PackUsage[]): Promise<void> {
  const garbagePacks = new Set(packs.filter((p) => p.liveBytes === 0).map((p) => p.packId));
  for (const name of marks.keys()) {
    const [kind, id] = name.split('.');
    const stillGarbage = kind === 'pack' ? garbagePacks.has(id ?? '') : !liveIndexes.has(id ?? '') && (await store.backend.stat(indexKey(id ?? ''))) !== undefined;
    if (!stillGarbage) await backend.delete(`condemned/${name}`);
  }
}
