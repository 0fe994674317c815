// Turns chunks read from a VM into stored chunks, on worker threads: each
// batch is hashed in a worker, the main thread decides which chunks are new
// (zero chunks and chunks the repository has are not stored), and the same
// worker compresses and encrypts just those. With no workers, or for a batch
// the caller marks inline, it all runs on the main thread (small jobs and
// tests). Workers start with the first batch that needs them: starting one
// costs more than hashing and compressing a few MiB, so a backup with little
// to read never pays for them.
//
// Invariants:
// - A batch goes to one worker for both steps (the worker keeps its chunks
//   between them); a worker's failure fails the batches it holds.
// - The ids returned are in the batch's order; a zero chunk's id is ZERO_ID.
// - A batch sent with `transfer` gives its memory to the worker, which hands
//   it back with the result (`chunks`): the caller must own every byte of the
//   chunks' ArrayBuffers and use only the returned views after.

import { Worker } from 'node:worker_threads';
import { QbackupError } from '../errors.js';
import { assert } from '../util/assert.js';
import { encodeChunkParts, encodedParts, isZero, ZERO_ID } from './chunk.js';
import { transferList, type WorkerInit, type WorkerReply, type WorkerRequest } from './chunk-worker.js';
import { SEAL_OVERHEAD } from './crypto.js';
import type { ChunkWriter, Store } from './store.js';

/** What encoding may add to a chunk: its codec byte and, when sealed, nonce and tag. */
const ENCODED_OVERHEAD = 1 + SEAL_OVERHEAD;
/** The usual size of a batch's body buffer (16 chunks of 64 KiB, encoded), and how many are kept. */
const OUT_BYTES = 16 * (64 * 1024 + ENCODED_OVERHEAD);
const OUTS_KEPT = 16;

interface Slot {
  worker: Worker;
  busy: number;
  waiters: Map<number, (reply: WorkerReply) => void>;
  /** Why the worker is gone (it failed or exited): every later request fails with it at once instead of waiting forever. */
  dead?: string;
}

export interface StoreResult {
  ids: Buffer[];
  /** Chunks that were new and stored, and their stored bytes. */
  newChunks: number;
  storedBytes: number;
  /** The batch's chunks, the caller's again (the same memory, handed back by the worker when it was transferred). */
  chunks: Buffer[];
}

export class ChunkPool {
  private readonly slots: Slot[] = [];
  /** Shared buffers for encoded bodies, free for the next batch (see takeOut). */
  private readonly outs: Buffer[] = [];
  private seq = 0;
  private started = false;
  private closed = false;

  constructor(
    private readonly store: Store,
    private readonly workers: number,
  ) {}

  private start(): void {
    this.started = true;
    const store = this.store;
    const init: WorkerInit = { level: 1, ...(store.key !== undefined ? { dataKey: store.key.dataKey, idKey: store.key.idKey } : {}) };
    for (let i = 0; i < this.workers; i++) {
      const worker = new Worker(new URL('./chunk-worker.js', import.meta.url), { workerData: init });
      const slot: Slot = { worker, busy: 0, waiters: new Map() };
      worker.on('message', (reply: WorkerReply) => {
        const w = slot.waiters.get(reply.seq);
        slot.waiters.delete(reply.seq);
        w?.(reply);
      });
      const fail = (message: string): void => {
        slot.dead ??= message;
        for (const w of slot.waiters.values()) w({ op: 'error', seq: -1, message });
        slot.waiters.clear();
        worker.unref();
      };
      worker.on('error', (err) => fail(err.message === '' ? String(err) : err.message));
      worker.on('exit', (code) => fail(`the worker exited (${code})`));
      worker.unref();
      this.slots.push(slot);
    }
  }

  /**
   * Hashes `chunks`, stores the new ones through `writer`, and returns every
   * chunk's id. With `inline` the batch is done on this thread (the caller
   * knows there is too little work to be worth starting the workers).
   */
  async storeChunks(chunks: Buffer[], writer: ChunkWriter, options: { inline?: boolean; transfer?: boolean } = {}): Promise<StoreResult> {
    assert(!this.closed, 'storeChunks after close');
    if (options.inline === true || this.workers === 0) return this.storeInline(chunks, writer);
    if (!this.started) this.start();
    const slot = this.slots.reduce((a, b) => (b.busy < a.busy ? b : a));
    const seq = this.seq++;
    // With `transfer` the chunks' memory moves to the worker (no copy) and is unusable here after.
    const lengths = chunks.map((c) => c.length);
    const transfer = options.transfer === true ? transferList(chunks) : [];
    slot.busy++;
    try {
      const hashed = await this.ask(slot, { op: 'hash', seq, chunks }, transfer);
      assert(hashed.op === 'hashed', 'a hash request is answered with ids');
      const all = Buffer.from(hashed.ids.buffer, hashed.ids.byteOffset, hashed.ids.byteLength);
      const ids = chunks.map((_, i) => (hashed.zero[i] === true ? ZERO_ID : all.subarray(32 * i, 32 * i + 32)));
      const wanted = ids.map((id) => !id.equals(ZERO_ID) && !writer.has(id));
      // Compressed or sealed bodies come back in shared memory of ours, reused from batch to batch.
      const out = this.takeOut(lengths.reduce((n, l, i) => n + (wanted[i] === true ? l + ENCODED_OVERHEAD : 0), 0));
      const encoded = await this.ask(slot, { op: 'encode', seq, wanted, out });
      assert(encoded.op === 'encoded', 'an encode request is answered with blobs');
      let newChunks = 0;
      let storedBytes = 0;
      for (const [i, blob] of encoded.blobs.entries()) {
        const id = ids[i];
        const rawLength = lengths[i];
        if (blob === null || id === undefined || rawLength === undefined) continue;
        // Copied into the pack: the batch's memory is free again once this loop ends.
        const length = await writer.addEncoded(id, encodedParts(blob), rawLength);
        if (length > 0) {
          newChunks++;
          storedBytes += length;
        }
      }
      this.outs.push(out);
      return { ids, newChunks, storedBytes, chunks: encoded.chunks.map((c) => Buffer.from(c.buffer, c.byteOffset, c.byteLength)) };
    } finally {
      slot.busy--;
    }
  }

  /** Shared memory of at least `bytes` for a batch's encoded bodies: a reused one when one is large enough. */
  private takeOut(bytes: number): Buffer {
    const i = this.outs.findIndex((b) => b.length >= bytes);
    if (i >= 0) return this.outs.splice(i, 1)[0] as Buffer;
    if (this.outs.length >= OUTS_KEPT) this.outs.shift();
    return Buffer.from(new SharedArrayBuffer(Math.max(bytes, OUT_BYTES)));
  }

  private async storeInline(chunks: Buffer[], writer: ChunkWriter): Promise<StoreResult> {
    const ids: Buffer[] = [];
    let newChunks = 0;
    let storedBytes = 0;
    for (const c of chunks) {
      if (isZero(c)) {
        ids.push(ZERO_ID);
        continue;
      }
      const id = this.store.chunkId(c);
      ids.push(id);
      if (writer.has(id)) continue;
      const length = await writer.addEncoded(id, encodedParts(encodeChunkParts(c, { compressor: this.store.compressor, key: this.store.key })), c.length);
      if (length > 0) {
        newChunks++;
        storedBytes += length;
      }
    }
    return { ids, newChunks, storedBytes, chunks };
  }

  private ask(slot: Slot, msg: WorkerRequest, transfer: ArrayBuffer[] = []): Promise<WorkerReply> {
    return new Promise((resolve, reject) => {
      if (slot.dead !== undefined) {
        reject(new QbackupError('BACKUP_FAILED', `A chunk worker failed: ${slot.dead}`));
        return;
      }
      // An idle worker does not keep the process alive; one with a request out must
      // (a caller with nothing else pending, such as a copy, would otherwise exit mid-way).
      slot.worker.ref();
      slot.waiters.set(msg.seq, (reply) => {
        if (slot.waiters.size === 0) slot.worker.unref();
        if (reply.op === 'error') reject(new QbackupError('BACKUP_FAILED', `A chunk worker failed: ${reply.message}`));
        else resolve(reply);
      });
      slot.worker.postMessage(msg, transfer);
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
    this.slots.length = 0;
  }
}
