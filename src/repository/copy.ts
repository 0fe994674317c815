// Copies backups from one repository (the source) into another (the
// target), on any two backends: manifests, the disk indexes they need, and
// only the chunks the target lacks, packed into the target's own packs.
//
// Method (docs/design.md, "Copying between repositories"):
// - Plan: the source's backups (of a domain, or the ids asked for) that the
//   target does not hold under the same domain and id, oldest first; the
//   others are skipped. Copying again therefore copies nothing.
// - Index chains keep their shape. A backup's disk index is the last link of
//   a chain (a full index, then deltas). The target already holds, for every
//   backup both repositories have, an index that resolves to the same slot
//   table; the copy writes only the links after the newest such one, each a
//   delta on the target's own index, so a copied incremental stays a small
//   delta and restores on its own in the target. With nothing in common the
//   whole chain is written, full index first.
// - Chunk ids: when both repositories use the same keys (both unencrypted,
//   or the same master key) ids are equal, so only chunks the target lacks
//   are read, checked and moved in their stored form. Otherwise ids differ
//   (plain SHA-256 against HMACs, or HMACs under different keys): every chunk
//   the written links name is read and checked, given its id under the
//   target's key, and stored unless the target has it; the indexes are
//   rewritten with the target's ids.
// - Every chunk read from the source is checked against its id before it is
//   written, so no damaged chunk ever reaches the target. A source backup
//   that cannot be copied (its manifest, an index of its chain or a chunk it
//   needs is damaged or missing) is left out and named in `failed` with why;
//   the others are copied all the same (RepositoryService.copy then fails in
//   one sentence naming what was left out).
// - Crash safety: per backup, packs first, then its indexes, then its
//   manifest (the commit point), as a backup does. A copy killed at any
//   moment leaves at most unreferenced packs and indexes in the target.
// - Locks: a "copy" lock in the source (never conflicts; gc there keeps
//   garbage condemned rather than deleted and does not repack while it is
//   held) and a backup lock per copied domain in the target (gc there treats
//   the copy as a running backup).

import { QbackupError, describeError, isQbackupError } from '../errors.js';
import { assert } from '../util/assert.js';
import { ZERO_ID } from './chunk.js';
import { throwIfCancelled, type Logger } from '../util/operation.js';
import { type DiskIndex } from './disk-index.js';
import { condemnedPacks } from './gc.js';
import { acquireLock, type HeldLock } from './locks.js';
import type { Manifest, ManifestDisk } from './manifest.js';
import { ChunkPool } from './pool.js';
import type { ChunkLocation, ChunkReadResult, ChunkWriter, Store } from './store.js';
import type { Progress } from './backup.js';

export interface CopySelection {
  /** Only this domain's backups. */
  domain?: string;
  /** Only these backups (of any domain unless `domain` is given). */
  backups?: readonly string[];
}

export interface CopyPlan {
  /** Backups to copy, oldest first. */
  copy: Manifest[];
  /** Selected backups the target already holds. */
  skip: Array<{ domain: string; id: string; reason: string }>;
}

export interface CopyOptions extends CopySelection {
  /** Only plan: nothing is read beyond manifests, nothing is written. */
  dryRun?: boolean;
  /** Worker threads that hash and compress when ids change (default 2). */
  workers?: number;
  onProgress?: ((p: Progress) => void) | undefined;
  /** Checked between groups of chunks read: a cancelled copy leaves at most unreferenced packs and indexes in the target. */
  signal?: AbortSignal | undefined;
  /** One event per backup copied. */
  logger?: Logger | undefined;
}

export interface CopyReport {
  from: string;
  to: string;
  /** The target did not exist: it was created (or, with dryRun, would be). */
  targetCreated: boolean;
  dryRun: boolean;
  /** Chunk ids change (the repositories' keys differ): chunks are re-encrypted and indexes rewritten. */
  reencrypted: boolean;
  copied: Array<{ domain: string; id: string }>;
  skipped: Array<{ domain: string; id: string; reason: string }>;
  /** Selected backups that could not be copied because the source is damaged, and why (one sentence each). */
  failed: Array<{ domain: string; id: string; reason: string }>;
  /** Chunks read (and checked) from the source, and their plaintext bytes. */
  chunksRead: number;
  bytesRead: number;
  /** Chunks the target lacked and now stores, and their stored bytes. */
  chunksStored: number;
  bytesStored: number;
  indexesWritten: number;
}

// ---- planning (pure) ----------------------------------------------------------

/** Which selected source backups to copy and which the target already holds. */
export function planCopy(source: readonly Manifest[], target: readonly Manifest[], selection: CopySelection): CopyPlan {
  const wanted = selection.backups ?? [];
  const inDomain = (m: Manifest): boolean => selection.domain === undefined || m.domain === selection.domain;
  for (const id of wanted) {
    if (!source.some((m) => m.id === id && inDomain(m))) {
      throw new QbackupError('BACKUP_NOT_FOUND', `The source repository has no backup "${id}"${selection.domain !== undefined ? ` of domain "${selection.domain}"` : ''}`);
    }
  }
  const held = new Set(target.map((m) => `${m.domain}/${m.id}`));
  const chosen = source.filter((m) => inDomain(m) && (wanted.length === 0 || wanted.includes(m.id)));
  chosen.sort((a, b) => a.time.localeCompare(b.time) || a.id.localeCompare(b.id));
  return {
    copy: chosen.filter((m) => !held.has(`${m.domain}/${m.id}`)),
    skip: chosen.filter((m) => held.has(`${m.domain}/${m.id}`)).map((m) => ({ domain: m.domain, id: m.id, reason: 'already in the target repository' })),
  };
}

/**
 * Source index id → target index id, for every disk of every backup both
 * repositories hold (same domain, id, disk id and target): the two resolve
 * to the same content, so a copied delta may take the target's as parent.
 */
export function knownIndexes(source: readonly Manifest[], target: readonly Manifest[]): Map<string, string> {
  const byKey = new Map(target.map((m) => [`${m.domain}/${m.id}`, m]));
  const out = new Map<string, string>();
  for (const m of source) {
    const t = byKey.get(`${m.domain}/${m.id}`);
    for (const d of t !== undefined ? m.disks : []) {
      const td = t?.disks.find((x) => x.diskId === d.diskId && x.target === d.target && x.virtualSize === d.virtualSize);
      if (td !== undefined) out.set(d.index, td.index);
    }
  }
  return out;
}

/** The ids of a chain's links, full index first, given the id of its last link. */
export function chainIds(lastId: string, chain: readonly DiskIndex[]): string[] {
  const ids: string[] = new Array<string>(chain.length);
  let at = lastId;
  for (let i = chain.length - 1; i >= 0; i--) {
    ids[i] = at;
    const link = chain[i];
    if (link?.kind === 'delta') at = link.parent;
  }
  return ids;
}

/** Where writing starts: just after the newest link the target already has (0: the whole chain). */
export function firstLinkToWrite(ids: readonly string[], known: ReadonlyMap<string, string>): number {
  for (let i = ids.length - 1; i >= 0; i--) if (known.has(ids[i] ?? '')) return i + 1;
  return 0;
}

/** A link with its chunk ids mapped into the target and, for a delta, the target's parent. */
export function translateIndex(index: DiskIndex, parent: string | undefined, mapId: (id: Buffer) => Buffer): DiskIndex {
  const ids = Buffer.alloc(index.ids.length);
  for (let at = 0; at < index.ids.length; at += 32) {
    const id = index.ids.subarray(at, at + 32);
    if (!id.equals(ZERO_ID)) mapId(id).copy(ids, at);
  }
  if (index.kind === 'full') return { kind: 'full', chunkSize: index.chunkSize, virtualSize: index.virtualSize, ids };
  assert(parent !== undefined, 'a copied delta has a parent in the target');
  return { kind: 'delta', chunkSize: index.chunkSize, virtualSize: index.virtualSize, parent, slots: index.slots, ids };
}

/** Do the two repositories give equal content equal ids and equal stored forms? */
export function sameKeys(source: Store, target: Store): boolean {
  if (source.key === undefined || target.key === undefined) return source.key === target.key;
  return source.key.dataKey.equals(target.key.dataKey) && source.key.idKey.equals(target.key.idKey);
}

// ---- execution -----------------------------------------------------------------

/** Refuses a copy the target cannot take as it is. */
export function checkCompatible(source: Store, target: Store): void {
  target.assertConfigIntact(`copy into repository "${target.location}"`);
  if (source.config.id === target.config.id) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot copy repository "${source.location}" into "${target.location}": they are the same repository`);
  }
  if (source.config.chunkSize !== target.config.chunkSize) {
    const kib = (n: number): string => `${n / 1024} KiB`;
    throw new QbackupError('INVALID_ARGUMENT', `Cannot copy from repository "${source.location}" to "${target.location}": their chunk sizes differ (${kib(source.config.chunkSize)} and ${kib(target.config.chunkSize)})`);
  }
}

/**
 * Copies the selected backups of `source` into `target` (undefined: a target
 * that does not exist yet, only with dryRun). `targetCreated` is reported as given.
 */
export async function copyBackups(source: Store, target: Store | undefined, options: CopyOptions & { targetCreated?: boolean }): Promise<CopyReport> {
  // A source manifest that cannot be read is named, never a reason to copy nothing.
  const readable = await source.readableManifests(options.domain);
  const unreadable = (): CopyReport['failed'] =>
    readable.damaged.filter((d) => (options.backups ?? []).length === 0 || (options.backups ?? []).includes(d.id)).map((d) => ({ domain: d.domain, id: d.id, reason: `Cannot copy backup "${d.id}" of domain "${d.domain}": its manifest in repository "${source.location}" cannot be read (${d.problem})` }));
  const sourceManifests = readable.manifests;
  const first = planCopy(sourceManifests, target !== undefined ? await target.manifests(options.domain) : [], selectionWithout(options, readable.damaged));
  const report: CopyReport = {
    from: source.location, to: target?.location ?? '', targetCreated: options.targetCreated ?? false, dryRun: options.dryRun === true,
    reencrypted: target !== undefined && !sameKeys(source, target), copied: [], skipped: first.skip, failed: unreadable(),
    chunksRead: 0, bytesRead: 0, chunksStored: 0, bytesStored: 0, indexesWritten: 0,
  };
  if (target !== undefined) checkCompatible(source, target);
  // A dry run reports as copied what a copy would copy.
  if (options.dryRun === true || target === undefined) return { ...report, copied: first.copy.map((m) => ({ domain: m.domain, id: m.id })) };
  if (first.copy.length === 0) return report;
  const locks = await takeLocks(source, target, [...new Set(first.copy.map((m) => m.domain))]);
  try {
    // Planned again under the locks: another copy may have finished, or a
    // prune in the source removed a backup, meanwhile.
    const now = await source.readableManifests(options.domain);
    readable.damaged = now.damaged;
    report.failed = unreadable();
    const sourceNow = now.manifests;
    const targetManifests = await target.manifests(options.domain);
    const plan = planCopy(sourceNow, targetManifests, selectionWithout(options, now.damaged));
    report.skipped = plan.skip;
    await source.loadChunks();
    await target.loadChunks(await condemnedPacks(target.backend));
    const copier = new Copier(source, target, knownIndexes(sourceNow, targetManifests), report, options, locks);
    try {
      for (const m of plan.copy) {
        try {
          await copier.copyBackup(m);
        } catch (err) {
          // Damage in the source (an index or chunk of this backup): nothing of it was committed; the others go on.
          if (!isQbackupError(err, 'REPO_DAMAGED') && !isQbackupError(err, 'REPO_OBJECT_NOT_FOUND')) throw err;
          const said = describeError(err);
          const reason = said.startsWith('Cannot copy backup') ? said : `Cannot copy backup "${m.id}" of domain "${m.domain}": ${said.charAt(0).toLowerCase()}${said.slice(1)}`;
          report.failed.push({ domain: m.domain, id: m.id, reason });
          options.logger?.log({ level: 'error', msg: 'backup not copied', fields: { domain: m.domain, backup: m.id, error: reason } });
        }
      }
    } finally {
      await copier.close();
    }
  } finally {
    for (const l of locks.reverse()) await l.release();
  }
  return report;
}

/** The selection with the ids of unreadable manifests dropped from an explicit list (they are reported, not looked for). */
function selectionWithout(options: CopySelection, damaged: ReadonlyArray<{ id: string }>): CopySelection {
  if (options.backups === undefined || options.backups.length === 0) return options;
  const gone = new Set(damaged.map((d) => d.id));
  return { ...options, backups: options.backups.filter((id) => !gone.has(id)) };
}

async function takeLocks(source: Store, target: Store, domains: readonly string[]): Promise<HeldLock[]> {
  const locks: HeldLock[] = [];
  try {
    locks.push(await acquireLock(source.backend, 'copy', null));
    for (const d of [...domains].sort()) locks.push(await acquireLock(target.backend, 'backup', d));
    return locks;
  } catch (err) {
    for (const l of locks.reverse()) await l.release();
    throw err;
  }
}

/** One disk of a backup being copied: the links of its chain the target needs. */
interface DiskCopy {
  disk: ManifestDisk;
  ids: string[];
  links: DiskIndex[];
  start: number;
}

/** Packs a chunk read from the source, with where it is. */
interface SourceChunk {
  hex: string;
  loc: ChunkLocation;
}

const BATCH_BYTES = 4 * 1024 * 1024;
/** Chunks asked of Store.readChunks at once (it reads nearby ones of a pack in one request). */
const READ_GROUP_CHUNKS = 256;

class Copier {
  private readonly same: boolean;
  private readonly writer: ChunkWriter;
  private readonly pool: ChunkPool;
  /** Source chunk id → target chunk id, when they differ. */
  private readonly ids = new Map<string, Buffer>();

  constructor(
    private readonly source: Store,
    private readonly target: Store,
    private readonly known: Map<string, string>,
    private readonly report: CopyReport,
    private readonly options: CopyOptions,
    private readonly locks: readonly HeldLock[],
  ) {
    this.same = sameKeys(source, target);
    this.writer = target.chunkWriter();
    this.pool = new ChunkPool(target, options.workers ?? 2);
  }

  async close(): Promise<void> {
    await this.pool.close();
  }

  /** Chunks, then indexes, then the manifest (the commit point). */
  async copyBackup(m: Manifest): Promise<void> {
    const disks: DiskCopy[] = [];
    for (const d of m.disks) {
      const chain = await this.source.indexChain(d.index);
      const ids = chainIds(d.index, chain);
      const start = firstLinkToWrite(ids, this.known);
      disks.push({ disk: d, ids, links: chain.slice(start), start });
    }
    await this.copyChunks(m, disks);
    await this.writer.flush();
    this.report.chunksStored = this.writer.storedChunks;
    this.report.bytesStored = this.writer.storedBytes;
    const out: ManifestDisk[] = [];
    for (const dc of disks) out.push({ ...dc.disk, index: await this.writeLinks(dc) });
    // As a backup does: a lease lost meanwhile (a gc elsewhere judged this copy dead) must not commit.
    for (const l of this.locks) if (l.info.kind === 'backup' && l.info.domain === m.domain) await l.assertHeld();
    await this.target.putManifest({ ...m, disks: out });
    this.report.copied.push({ domain: m.domain, id: m.id });
    this.options.logger?.log({ level: 'info', msg: 'backup copied', fields: { domain: m.domain, backup: m.id } });
  }

  /** Writes the links the target lacks; returns the target's id of the last. */
  private async writeLinks(dc: DiskCopy): Promise<string> {
    for (const [i, link] of dc.links.entries()) {
      const at = dc.start + i;
      const parent = link.kind === 'delta' ? this.known.get(dc.ids[at - 1] ?? '') : undefined;
      const written = await this.target.putIndex(translateIndex(link, parent, (id) => this.mapId(id)));
      this.report.indexesWritten++;
      this.known.set(dc.ids[at] ?? '', written);
    }
    const last = this.known.get(dc.disk.index);
    assert(last !== undefined, `disk index "${dc.disk.index}" has a copy in the target`);
    return last;
  }

  private mapId(id: Buffer): Buffer {
    if (this.same) return id;
    const mapped = this.ids.get(id.toString('hex'));
    assert(mapped !== undefined, `chunk ${id.toString('hex')} was given a target id`);
    return mapped;
  }

  /** The chunks the links name that the target needs, by source pack, and their plaintext bytes. */
  private chunksToRead(m: Manifest, disks: readonly DiskCopy[]): { byPack: Map<string, SourceChunk[]>; total: number } {
    const byPack = new Map<string, SourceChunk[]>();
    let total = 0;
    for (const hex of chunksNamed(disks.flatMap((d) => d.links))) {
      const id = Buffer.from(hex, 'hex');
      if (this.same ? this.writer.has(id) : this.ids.has(hex)) continue;
      const loc = this.source.locate(id);
      if (loc === undefined) throw damaged(this.source, m, hex, 'no pack of the source repository holds it');
      const list = byPack.get(loc.packId) ?? [];
      list.push({ hex, loc });
      byPack.set(loc.packId, list);
      total += loc.rawLength;
    }
    return { byPack, total };
  }

  /**
   * Reads, checks and stores every chunk the links name that the target
   * needs. Re-keyed chunks go to the workers in batches, as many in flight as
   * there are workers, while this thread reads and checks the next ones.
   */
  private async copyChunks(m: Manifest, disks: readonly DiskCopy[]): Promise<void> {
    const { byPack, total } = this.chunksToRead(m, disks);
    const inFlight = new Set<Promise<void>>();
    let failure: { err: unknown } | undefined;
    const send = async (batch: Array<{ hex: string; data: Buffer }>): Promise<void> => {
      const p: Promise<void> = this.storeBatch(batch)
        .catch((err: unknown) => void (failure ??= { err }))
        .finally(() => inFlight.delete(p));
      inFlight.add(p);
      while (inFlight.size > Math.max(1, this.options.workers ?? 2)) await Promise.race(inFlight);
      if (failure !== undefined) throw failure.err;
    };
    let batch: Array<{ hex: string; data: Buffer }> = [];
    let batchBytes = 0;
    let done = 0;
    try {
      for (const [packId, chunks] of byPack) {
        chunks.sort((a, b) => a.loc.offset - b.loc.offset);
        for (let at = 0; at < chunks.length; at += READ_GROUP_CHUNKS) {
          throwIfCancelled(this.options.signal, `Copy of backup "${m.id}"`);
          const group = chunks.slice(at, at + READ_GROUP_CHUNKS);
          const results = await this.source.readChunks(group.map((c) => Buffer.from(c.hex, 'hex')), { keepStored: this.same, signal: this.options.signal });
          for (const [k, { hex, loc }] of group.entries()) {
            const data = this.check(m, hex, packId, results[k]);
            if (this.same) await this.writer.addEncoded(Buffer.from(hex, 'hex'), data.stored ?? Buffer.alloc(0), loc.rawLength);
            else {
              batch.push({ hex, data: data.data });
              batchBytes += data.data.length;
              if (batchBytes >= BATCH_BYTES) {
                await send(batch);
                batch = [];
                batchBytes = 0;
              }
            }
            done += data.data.length;
            this.options.onProgress?.({ phase: `copy ${m.domain}/${m.id}`, doneBytes: done, totalBytes: total });
          }
        }
      }
      await send(batch);
    } finally {
      // Nothing may still be writing when the caller flushes the writer or closes the pool.
      await Promise.all(inFlight);
    }
    if (failure !== undefined) throw failure.err;
  }

  /** A chunk read from the source, or the copy's failure naming it. */
  private check(m: Manifest, hex: string, packId: string, r: ChunkReadResult | undefined): { data: Buffer; stored?: Buffer } {
    if (r !== undefined && !('error' in r)) {
      this.report.chunksRead++;
      this.report.bytesRead += r.data.length;
      return r;
    }
    const err = r?.error;
    if (err === undefined) throw new Error(`chunk ${hex} was not read`);
    if (err.code !== 'REPO_DAMAGED' && err.code !== 'REPO_OBJECT_NOT_FOUND') throw err;
    const why = / cannot be read: /.test(err.message) ? `its pack "${packId}" cannot be read: ${err.message.replace(/^.* cannot be read: /, '')}` : describeError(err).replace(/^chunk [0-9a-f]+ in /i, 'in ').replace(/ is damaged: /, ': ');
    throw damaged(this.source, m, hex, why);
  }

  /** Gives a batch of plaintexts their target ids and stores the new ones. */
  private async storeBatch(batch: Array<{ hex: string; data: Buffer }>): Promise<void> {
    if (batch.length === 0) return;
    const inline = batch.length < 16;
    const result = await this.pool.storeChunks(batch.map((c) => c.data), this.writer, { inline });
    for (const [i, c] of batch.entries()) {
      const id = result.ids[i];
      assert(id !== undefined, 'the pool returns an id per chunk');
      this.ids.set(c.hex, id);
    }
  }
}

/** Every non-zero chunk id the links name, as hex, once each. */
function chunksNamed(links: readonly DiskIndex[]): Set<string> {
  const out = new Set<string>();
  for (const link of links) {
    for (let at = 0; at < link.ids.length; at += 32) {
      const id = link.ids.subarray(at, at + 32);
      if (!id.equals(ZERO_ID)) out.add(id.toString('hex'));
    }
  }
  return out;
}

function damaged(source: Store, m: Manifest, hex: string, why: string): QbackupError {
  return new QbackupError('REPO_DAMAGED', `Cannot copy backup "${m.id}" of domain "${m.domain}": chunk ${hex} of repository "${source.location}" is damaged (${why})`, { details: { chunk: hex, backup: m.id, domain: m.domain } });
}
