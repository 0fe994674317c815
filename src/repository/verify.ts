// Verification of a format 2 repository: the config and key files match
// their checksums (checksum.ts), every chosen backup's index chain
// parses, every chunk it names is listed in a pack index and its pack exists
// (fast), and with readData every pack holding such chunks is read whole
// (several at once), hashed whole against its id (so a flipped byte in its
// salt or trailer is found too) and each of its chunks decoded and checked
// against its id, in one pass on the decode pool's workers (Store.checkPack,
// pack-check.ts). A damaged
// chunk is reported with the backups that use it (others in the same pack
// stay certified); a pack that does not hash to its id although every chunk
// in it is intact is reported with every backup that uses the pack. A missing
// or damaged chunk or pack is reported once, with every backup that uses it,
// so damage is never certified by a later backup that merely references it.

import { createHash } from 'node:crypto';
import { QbackupError, describeError } from '../errors.js';
import { runPool } from '../util/run-pool.js';
import { throwIfCancelled, type Logger, type ProgressSink } from '../util/operation.js';
import { ZERO_ID } from './chunk.js';
import type { Manifest } from './manifest.js';
import { PACK_ID, packKey, parseHeader } from './pack.js';
import { trailerHeader } from './repair.js';
import type { Store } from './store.js';

export interface VerifyProblem {
  /** The damaged or missing object: a chunk id, a disk index or a pack. */
  object: string;
  problem: string;
  /** Every backup (domain/id) that depends on the object. */
  backups: string[];
}

export interface VerifyReport {
  backupsChecked: number;
  chunksChecked: number;
  chunksRead: number;
  problems: VerifyProblem[];
}

export interface VerifyOptions {
  domain?: string | undefined;
  backup?: string | undefined;
  readData?: boolean | undefined;
  /** With readData: read the packs holding this percentage of the chunks (chosen by id and day). */
  readDataPercent?: number | undefined;
  /** Phase "verify": bytes of packs read of bytes to read. */
  onProgress?: ProgressSink | undefined;
  /** Checked between backups and between packs read: an aborted signal stops verify with its reason. */
  signal?: AbortSignal | undefined;
  /** One event per damaged object. */
  logger?: Logger | undefined;
}

/**
 * Whole packs read at once: two per decode worker on two cores, so each
 * worker has the next pack waiting while it checks one and the main thread
 * reads another (with three, a worker sat idle a fifth of the time).
 */
const PACKS_IN_FLIGHT = 4;

export async function verifyStore(store: Store, options: VerifyOptions = {}): Promise<VerifyReport> {
  await store.loadChunks();
  // A manifest that cannot be read is a problem named by its key; the others are verified all the same.
  const readable = await store.readableManifests(options.domain);
  const manifests = readable.manifests.filter((m) => options.backup === undefined || m.id === options.backup);
  const users = new Map<string, Set<string>>();
  const problems = new Map<string, VerifyProblem>();
  const report = (object: string, problem: string, backup: string): void => {
    const p = problems.get(object) ?? { object, problem, backups: [] };
    if (!p.backups.includes(backup)) p.backups.push(backup);
    problems.set(object, p);
  };
  // The config and key files: damage to them is the repository's, not a backup's.
  for (const { object, problem } of await store.metadataProblems()) problems.set(object, { object, problem, backups: [] });
  for (const d of readable.damaged) if (options.backup === undefined || d.id === options.backup) report(`manifest ${d.key}`, d.problem, `${d.domain}/${d.id}`);
  for (const m of manifests) {
    throwIfCancelled(options.signal, 'Verify');
    await collectChunks(store, m, users, report);
  }
  const packs = new Map<string, boolean>();
  const unindexed = await unindexedChunks(store, users);
  for (const [hex, backups] of users) {
    const loc = store.locateHex(hex);
    if (loc === undefined) {
      const packId = unindexed.get(hex);
      const problem = packId === undefined ? 'missing: no pack holds it' : `missing from the pack indexes: its pack "${packId}" has lost its index (verify --repair rebuilds it from the pack)`;
      for (const b of backups) report(`chunk ${hex}`, problem, b);
      continue;
    }
    if (!packs.has(loc.packId)) packs.set(loc.packId, (await store.backend.stat(`data/${loc.packId.slice(0, 2)}/${loc.packId}`)) !== undefined);
    if (packs.get(loc.packId) !== true) for (const b of backups) report(`chunk ${hex}`, `missing: its pack "${loc.packId}" is gone`, b);
  }
  // The pack indexes are compared with their trailers while the packs are
  // read; each records what it finds aside, added in a fixed order after.
  const indexReports: Array<Parameters<typeof report>> = [];
  const dataReports: Array<Parameters<typeof report>> = [];
  const [chunksRead] = await Promise.all([
    options.readData ? readChunks(store, users, problems, options, (...r) => void dataReports.push(r)) : 0,
    checkPackIndexes(store, users, (...r) => void indexReports.push(r)),
  ]);
  for (const r of [...indexReports, ...dataReports]) report(...r);
  return { backupsChecked: manifests.length, chunksChecked: users.size, chunksRead, problems: [...problems.values()] };
}

/**
 * Where chunks that no pack index names are after all: in a pack whose index
 * object is gone but whose trailer still reads (read only when such chunks
 * exist; a pack without an index is otherwise the garbage of a killed writer).
 */
async function unindexedChunks(store: Store, users: ReadonlyMap<string, Set<string>>): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const missing = [...users.keys()].filter((hex) => store.locateHex(hex) === undefined);
  if (missing.length === 0) return out;
  const wanted = new Set(missing);
  const indexed = new Set((await store.backend.list('index/')).map((o) => o.key.slice(6)));
  for (const { key, size } of await store.backend.list('data/')) {
    const packId = key.slice(key.lastIndexOf('/') + 1);
    if (!PACK_ID.test(packId) || indexed.has(packId)) continue;
    const header = await trailerHeader(store, packId, size);
    if (header === undefined) continue;
    for (const e of parseHeader(header, store.key, `Trailer of pack "${packId}"`, store.config.chunkSize)) {
      const hex = e.id.toString('hex');
      if (wanted.has(hex)) out.set(hex, packId);
    }
  }
  return out;
}

/**
 * Every pack index object is byte for byte the header in its pack's trailer
 * (two small ranged reads per pack): in a plain repository a flipped byte in
 * an index moves a chunk's offset, which nothing else would notice before the
 * data is read. A pack that is gone is reported by the chunk checks.
 */
async function checkPackIndexes(store: Store, users: Map<string, Set<string>>, report: (object: string, problem: string, backup: string) => void): Promise<void> {
  const usersOfPack = new Map<string, Set<string>>();
  for (const [hex, backups] of users) {
    const loc = store.locateHex(hex);
    if (loc === undefined) continue;
    const set = usersOfPack.get(loc.packId) ?? new Set<string>();
    for (const b of backups) set.add(b);
    usersOfPack.set(loc.packId, set);
  }
  for (const { key, size } of await store.backend.list('index/')) {
    const packId = key.slice(6);
    if (!PACK_ID.test(packId)) continue;
    const pack = await store.backend.stat(packKey(packId));
    if (pack === undefined || pack.size < 4) continue;
    let same: boolean;
    try {
      const headerLength = (await store.backend.get(packKey(packId), { offset: pack.size - 4, length: 4 })).readUInt32LE(0);
      same = headerLength === size && headerLength <= pack.size - 4 && (await store.backend.get(packKey(packId), { offset: pack.size - 4 - headerLength, length: headerLength })).equals(await store.backend.get(key));
    } catch (err) {
      if (!(err instanceof QbackupError && err.code === 'REPO_OBJECT_NOT_FOUND')) throw err;
      continue; // deleted meanwhile by a gc
    }
    if (same) continue;
    const backups = [...(usersOfPack.get(packId) ?? [])];
    const problem = `differs from the header in its pack's trailer (run verify --read-data; rebuild it from the pack)`;
    if (backups.length === 0) report(`index ${packId}`, problem, '(no backup)');
    for (const b of backups) report(`index ${packId}`, problem, b);
  }
}

async function collectChunks(store: Store, m: Manifest, users: Map<string, Set<string>>, report: (object: string, problem: string, backup: string) => void): Promise<void> {
  const name = `${m.domain}/${m.id}`;
  for (const d of m.disks) {
    let table;
    try {
      table = await store.resolveIndex(d.index);
    } catch (err) {
      report(`index ${d.index}`, describeError(err), name);
      continue;
    }
    for (let at = 0; at < table.ids.length; at += 32) {
      const id = table.ids.subarray(at, at + 32);
      if (id.equals(ZERO_ID)) continue;
      const hex = id.toString('hex');
      let set = users.get(hex);
      if (set === undefined) users.set(hex, (set = new Set()));
      set.add(name);
    }
  }
}

/** Reads every pack that holds chosen chunks, whole: the pack checked against its id, each chosen chunk against its own. */
async function readChunks(store: Store, users: ReadonlyMap<string, Set<string>>, problems: ReadonlyMap<string, VerifyProblem>, options: VerifyOptions, report: (object: string, problem: string, backup: string) => void): Promise<number> {
  const percent = Math.min(100, Math.max(0, options.readDataPercent ?? 100));
  const chosen = [...users.keys()].filter((hex) => !problems.has(`chunk ${hex}`) && (percent >= 100 || sample(hex) < percent));
  const byPack = new Map<string, { ids: Buffer[]; bytes: number }>();
  for (const hex of chosen) {
    const loc = store.locateHex(hex);
    if (loc === undefined) continue;
    const id = Buffer.from(hex, 'hex');
    const p = byPack.get(loc.packId) ?? { ids: [], bytes: 0 };
    p.ids.push(id);
    byPack.set(loc.packId, p);
  }
  const sizes = await store.backend.list('data/');
  const sizeOf = new Map(sizes.map((o) => [o.key.slice(o.key.lastIndexOf('/') + 1), o.size]));
  let total = 0;
  for (const [packId, p] of byPack) total += (p.bytes = sizeOf.get(packId) ?? 0);
  let done = 0;
  let read = 0;
  const damaged = (object: string, problem: string, ids: readonly Buffer[]): void => {
    options.logger?.log({ level: 'error', msg: 'damaged', fields: { object, problem } });
    for (const id of ids) for (const b of users.get(id.toString('hex')) ?? []) report(object, problem, b);
  };
  await runPool(byPack.entries(), PACKS_IN_FLIGHT, async ([packId, p]) => {
    throwIfCancelled(options.signal, 'Verify');
    try {
      const checked = await store.checkPack(packId, p.bytes);
      // A damaged chunk explains a pack that does not hash to its id; with
      // every chunk intact the damage is in the salt or the trailer.
      if (checked.packError !== undefined && checked.chunkErrors.size === 0) damaged(`pack ${packId}`, checked.packError, p.ids);
      for (const id of p.ids) {
        const err = checked.chunkErrors.get(id.toString('hex'));
        if (err !== undefined) damaged(`chunk ${id.toString('hex')}`, describeError(err), [id]);
      }
    } catch (err) {
      damaged(`pack ${packId}`, `cannot be read: ${describeError(err)}`, p.ids);
    }
    read += p.ids.length;
    done += p.bytes;
    options.onProgress?.({ phase: 'verify', doneBytes: done, totalBytes: total });
  });
  return read;
}

/** A stable number in [0, 100) per chunk and day, so subsets differ from day to day. */
function sample(hex: string): number {
  const day = new Date().toISOString().slice(0, 10);
  return createHash('sha256').update(day).update(hex).digest().readUInt32LE(0) % 100;
}
