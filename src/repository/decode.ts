// The repository's shared worker pool: decodes ranged reads of packs
// (decrypt, decompress, check against ids) off the main thread, for every
// reader of chunks (Store.readChunks; for a restore from a local
// repository, Store.copyChunksToFile, whose workers read the pack and write
// the image themselves, keeping one read buffer each), checks whole packs
// without handing plaintexts back (Store.checkPack, pack-check.ts), and
// hashes full packs for every writer (Store.storePack). One pool per process, shared by
// every repository open in it (the key travels with each request), started
// with the first read big enough to be worth it; idle workers never keep the
// process alive.
//
// Invariants:
// - A request's bytes are transferred to the worker when the caller hands
//   them over (`transfer`), else copied; the plaintexts come back in one
//   transferred buffer: the request's own bytes when it was handed over
//   and every plaintext fits before the next blob (chunks stored raw),
//   else a fresh one.
// - A worker that dies fails the requests it holds, and is replaced at the
//   next request.

import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { QbackupError } from '../errors.js';
import { ChunkCompressor } from './compress.js';
import { copyEntries, decodeEntries, hashPack, type CopyReply, type CopyRequest, type DecodeEntry, type DecodeReply, type DecodeRequest, type HashPackRequest, type WorkerReply, type WorkerRequest } from './chunk-worker.js';
import type { MasterKey } from './crypto.js';
import { checkPackBytes, type CheckPackReply, type CheckPackRequest } from './pack-check.js';

/** Below this many bytes a request is decoded on the calling thread: a round trip to a worker costs more. */
export const INLINE_DECODE_BYTES = 256 * 1024;

interface Slot {
  worker: Worker;
  busy: number;
  waiters: Map<number, (reply: WorkerReply) => void>;
  dead: boolean;
}

class DecodePool {
  private readonly slots: Slot[] = [];
  private seq = 0;
  private readonly inline = new ChunkCompressor();
  private inlineScratch: Buffer | undefined;

  constructor(private readonly size: number) {}

  /**
   * With `transfer`, `bytes` moves to the worker (unusable after) when it
   * owns its memory, or when `wholeMemory` says all of `bytes.buffer` is the
   * caller's to give (a pooled read buffer longer than the read: the
   * plaintexts may then also go after the read's bytes, see roomAfter).
   */
  async decode(bytes: Buffer, entries: DecodeEntry[], key: MasterKey | undefined, options: { transfer?: boolean | undefined; wholeMemory?: boolean | undefined } = {}): Promise<DecodeReply> {
    // Given up by the caller (`transfer`), the bytes may hold the plaintexts: one buffer fewer per request.
    const whole = options.wholeMemory === true && bytes.buffer instanceof ArrayBuffer && bytes.byteLength > 0;
    const request: DecodeRequest = { op: 'decode', seq: this.seq++, bytes, entries, dataKey: key?.dataKey, idKey: key?.idKey, inPlace: options.transfer === true, roomAfter: options.transfer === true && whole };
    if (this.size === 0 || bytes.length < INLINE_DECODE_BYTES) return decodeEntries(request, this.inline);
    const reply = await this.ask(request, options.transfer === true && (whole || ownsAll(bytes)) ? [bytes.buffer as ArrayBuffer] : []);
    if (reply.op !== 'decoded') throw new Error('a decode request is answered with plaintexts');
    return reply;
  }

  /**
   * Checks a whole pack against its id and each chunk its header lists
   * against the chunk's (pack-check.ts), on a worker; only the damaged
   * chunks come back. `bytes` moves to the worker without a copy when it
   * owns its memory, and is unusable after.
   */
  async check(bytes: Buffer, entries: DecodeEntry[], key: MasterKey | undefined, packId: string): Promise<CheckPackReply> {
    const request: CheckPackRequest = { op: 'check', seq: this.seq++, bytes, entries, dataKey: key?.dataKey, idKey: key?.idKey, packId };
    if (this.size === 0 || bytes.length < INLINE_DECODE_BYTES) return checkPackBytes(request, this.inline);
    const reply = await this.ask(request, ownsAll(bytes) ? [bytes.buffer as ArrayBuffer] : []);
    if (reply.op !== 'checked') throw new Error('a check request is answered with its damaged chunks');
    return reply;
  }

  /**
   * Has a worker read a range of an open pack, decode and check its chunks
   * and write their plaintexts to an open output file (CopyRequest): the
   * bytes never reach the calling thread. The fds stay open until it answers.
   */
  async copy(request: Omit<CopyRequest, 'op' | 'seq' | 'dataKey' | 'idKey'>, key: MasterKey | undefined): Promise<CopyReply> {
    const full: CopyRequest = { ...request, op: 'copy', seq: this.seq++, dataKey: key?.dataKey, idKey: key?.idKey };
    if (this.size === 0) {
      // Copies in flight at once each read into memory of their own.
      const mine = this.inlineScratch;
      this.inlineScratch = undefined;
      const { reply, scratch } = await copyEntries(full, this.inline, mine);
      this.inlineScratch = scratch;
      return reply;
    }
    const reply = await this.ask(full, []);
    if (reply.op !== 'copied') throw new Error('a copy request is answered with its results');
    return reply;
  }

  /**
   * A whole pack's id (the SHA-256 of its bytes), hashed on a worker. A pack
   * in shared memory (PackBuilder's) is read there in place; any other is
   * copied with the request. The caller must not change it meanwhile.
   */
  async hashPack(pack: Buffer): Promise<string> {
    const request: HashPackRequest = { op: 'hashPack', seq: this.seq++, bytes: pack };
    const reply = this.size === 0 || pack.length < INLINE_DECODE_BYTES ? hashPack(request) : await this.ask(request, []);
    if (reply.op !== 'packHashed') throw new Error('a pack hash request is answered with its id');
    return reply.packId;
  }

  private async ask(request: WorkerRequest, transfer: ArrayBuffer[]): Promise<WorkerReply> {
    const slot = this.pick();
    slot.busy++;
    try {
      const reply = await new Promise<WorkerReply>((resolve) => {
        slot.worker.ref();
        slot.waiters.set(request.seq, (r) => {
          if (slot.waiters.size === 0) slot.worker.unref();
          resolve(r);
        });
        slot.worker.postMessage(request, transfer);
      });
      if (reply.op === 'error') throw new QbackupError('REPO_DAMAGED', `A chunk worker failed: ${reply.message}`);
      return reply;
    } finally {
      slot.busy--;
    }
  }

  private pick(): Slot {
    for (let i = this.slots.length - 1; i >= 0; i--) if (this.slots[i]?.dead === true) this.slots.splice(i, 1);
    if (this.slots.length < this.size && this.slots.every((s) => s.busy > 0)) this.slots.push(this.spawn());
    return this.slots.reduce((a, b) => (b.busy < a.busy ? b : a));
  }

  private spawn(): Slot {
    const worker = new Worker(new URL('./chunk-worker.js', import.meta.url), { workerData: { level: 1 } });
    const slot: Slot = { worker, busy: 0, waiters: new Map(), dead: false };
    worker.on('message', (reply: WorkerReply) => {
      const w = slot.waiters.get(reply.seq);
      slot.waiters.delete(reply.seq);
      w?.(reply);
    });
    const fail = (message: string): void => {
      slot.dead = true;
      for (const w of slot.waiters.values()) w({ op: 'error', seq: -1, message });
      slot.waiters.clear();
    };
    worker.on('error', (err) => fail(err.message));
    worker.on('exit', (code) => fail(`the worker exited (${code})`));
    worker.unref();
    return slot;
  }
}

/** True when `b` is the whole of its memory, which can then move to a worker without a copy. */
function ownsAll(b: Buffer): boolean {
  return b.buffer instanceof ArrayBuffer && b.byteOffset === 0 && b.byteLength === b.buffer.byteLength && b.byteLength > 0;
}

let shared: DecodePool | undefined;

/** The process's decode pool: as many workers as cores, at most 4. */
export function decodePool(): DecodePool {
  shared ??= new DecodePool(Math.max(1, Math.min(4, availableParallelism())));
  return shared;
}

export type { DecodePool };
