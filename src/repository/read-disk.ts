// Reading one disk of a pull-mode backup job into the store. For a full
// backup every slot with data is read; for an incremental, only the slots the
// exported dirty bitmap marks, so the bytes read, stored and indexed grow with
// the change and not with the disk. Slots that read as zero (holes, discarded
// or zeroed ranges) are never read at all: the allocation map says so.
//
// Invariants:
// - Chunks are the size of the dirty bitmap's granularity (the repository's
//   chunk size), so a dirty cluster is read once and nothing around it.
// - The index is written only after every chunk it names is stored (the
//   writer is flushed first).

import { NBD_CONTEXT_BASE_ALLOCATION, NBD_STATE_DIRTY, NBD_STATE_ZERO } from '../nbd/constants.js';
import type { NbdClient } from '../nbd/client.js';
import { runPool } from '../util/run-pool.js';
import { ZERO_ID } from './chunk.js';
import { MAX_CHAIN, resolveChain, slotCount, type DiskIndex } from './disk-index.js';
import type { ChunkPool } from './pool.js';
import type { ChunkWriter, Store } from './store.js';

/** Chunks read per NBD request (1 MiB at 64 KiB chunks). */
const RUN_CHUNKS = 16;
/** Reads in flight at once. */
const READS_IN_FLIGHT = 8;
/**
 * A disk with at most this much to read is hashed and compressed on the main
 * thread: starting the pool's worker threads (a new V8 isolate each, loading
 * zstd) costs more than the work (a 1 % incremental of a 4 GiB disk is 41 MiB).
 */
const INLINE_MAX_BYTES = 64 * 1024 * 1024;

export interface ReadDiskOptions {
  client: NbdClient;
  /** The dirty-bitmap context of an incremental; undefined for a full backup. */
  dirtyContext: string | undefined;
  /** The parent's index (incremental only). */
  parentIndex: string | undefined;
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /** Checked before every read: an aborted signal stops the copy with its reason. */
  signal?: AbortSignal | undefined;
}

export interface DiskReadResult {
  indexId: string;
  bytesRead: number;
  bytesStored: number;
  /** Slots with data in this backup's index (full) or delta (incremental). */
  chunks: number;
  newChunks: number;
}

export async function readDisk(store: Store, pool: ChunkPool, writer: ChunkWriter, options: ReadDiskOptions): Promise<DiskReadResult> {
  const { client } = options;
  const chunkSize = store.config.chunkSize;
  const slots = slotCount(client.size, chunkSize);
  const wanted = options.dirtyContext !== undefined ? await dirtySlots(client, options.dirtyContext, chunkSize) : allSlots(slots);
  const zero = await zeroSlots(client, wanted, chunkSize);
  const ids = new Map<number, Buffer>();
  for (const s of zero) ids.set(s, ZERO_ID);
  const runs = toRuns(wanted.filter((s) => !zero.has(s)));
  const result: DiskReadResult = { indexId: '', bytesRead: 0, bytesStored: 0, chunks: 0, newChunks: 0 };
  const total = runs.reduce((n, r) => n + r.count * chunkSize, 0);
  const inline = total <= INLINE_MAX_BYTES;
  // Read buffers go round: read into, to a worker and back, copied into a
  // pack, read into again. Fresh 1 MiB buffers per read cost page faults
  // and garbage collection for the whole size of the disk.
  const runBytes = RUN_CHUNKS * chunkSize;
  const free: Buffer[] = [];
  await runPool(runs[Symbol.iterator](), READS_IN_FLIGHT, async (run) => {
    options.signal?.throwIfAborted();
    const offset = run.first * chunkSize;
    const length = Math.min(run.count * chunkSize, client.size - offset);
    const data = (free.pop() ?? Buffer.allocUnsafeSlow(runBytes)).subarray(0, length);
    await client.readInto(offset, data);
    result.bytesRead += length;
    const chunks: Buffer[] = [];
    for (let at = 0; at < length; at += chunkSize) chunks.push(data.subarray(at, Math.min(at + chunkSize, length)));
    const stored = await pool.storeChunks(chunks, writer, { inline, transfer: true });
    const back = stored.chunks[0]?.buffer;
    if (back instanceof ArrayBuffer && back.byteLength === runBytes) free.push(Buffer.from(back));
    stored.ids.forEach((id, i) => ids.set(run.first + i, id));
    result.newChunks += stored.newChunks;
    result.bytesStored += stored.storedBytes;
    options.onProgress?.(result.bytesRead, total);
  });
  await writer.flush();
  const index = await buildIndex(store, ids, slots, chunkSize, client.size, options.parentIndex);
  result.chunks = [...ids.values()].filter((id) => !id.equals(ZERO_ID)).length;
  result.indexId = await store.putIndex(index);
  return result;
}

/** A full index, or a delta on the parent (a full again once the chain is MAX_CHAIN deltas long). */
export async function buildIndex(store: Store, ids: Map<number, Buffer>, slots: number, chunkSize: number, virtualSize: number, parent: string | undefined): Promise<DiskIndex> {
  if (parent === undefined) {
    const table = Buffer.alloc(slots * 32);
    for (const [slot, id] of ids) id.copy(table, slot * 32);
    return { kind: 'full', chunkSize, virtualSize, ids: table };
  }
  const sorted = [...ids.keys()].sort((a, b) => a - b);
  const delta: DiskIndex = { kind: 'delta', chunkSize, virtualSize, parent, slots: Uint32Array.from(sorted), ids: Buffer.alloc(sorted.length * 32) };
  sorted.forEach((slot, i) => ids.get(slot)?.copy(delta.ids, i * 32));
  if ((await store.indexChainLength(parent)) <= MAX_CHAIN) return delta;
  return resolveChain([...(await store.indexChain(parent)), delta], 'the new disk index');
}

interface Run {
  first: number;
  count: number;
}

/** Consecutive slots grouped into runs of at most RUN_CHUNKS. */
function toRuns(slots: readonly number[]): Run[] {
  const runs: Run[] = [];
  for (const s of slots) {
    const last = runs.at(-1);
    if (last !== undefined && last.first + last.count === s && last.count < RUN_CHUNKS) last.count++;
    else runs.push({ first: s, count: 1 });
  }
  return runs;
}

function allSlots(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i);
}

/** The slots the dirty bitmap touches, ascending. */
async function dirtySlots(client: NbdClient, context: string, chunkSize: number): Promise<number[]> {
  const out: number[] = [];
  for (const e of await client.extents(context)) {
    if ((e.flags & NBD_STATE_DIRTY) === 0) continue;
    const first = Math.floor(e.offset / chunkSize);
    const end = Math.ceil((e.offset + e.length) / chunkSize);
    for (let s = first; s < end; s++) if (out.at(-1) !== s) out.push(s);
  }
  return out;
}

/** Of `slots`, those that read entirely as zeroes (no need to read them). */
async function zeroSlots(client: NbdClient, slots: readonly number[], chunkSize: number): Promise<Set<number>> {
  const zero = new Set<number>();
  if (!client.contexts.has(NBD_CONTEXT_BASE_ALLOCATION) || slots.length === 0) return zero;
  const extents = await client.extents(NBD_CONTEXT_BASE_ALLOCATION);
  let e = 0;
  for (const s of slots) {
    const start = s * chunkSize;
    const end = Math.min(start + chunkSize, client.size);
    while (e < extents.length && (extents[e]?.offset ?? 0) + (extents[e]?.length ?? 0) <= start) e++;
    // The slot is zero when one zero extent covers it whole.
    const ext = extents[e];
    if (ext !== undefined && (ext.flags & NBD_STATE_ZERO) !== 0 && ext.offset <= start && ext.offset + ext.length >= end) zero.add(s);
  }
  return zero;
}
