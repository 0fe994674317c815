// The worker-thread side of the chunk pools (pool.ts for writing, decode.ts
// for reading). Writing: hashes a batch of chunks and, for those the main
// thread asks for, compresses and encrypts them. Reading: decodes (decrypts,
// decompresses) a ranged read of a pack, checks every chunk against its id
// and, when asked, the whole pack against its id; or (copy) reads that range
// itself from an open pack, decodes and checks it the same way and writes
// each plaintext to an open image file. Runs in a worker so that
// both cores hash, compress and decode while the main thread does the I/O.
//
// Invariants:
// - A decode reply carries every chunk's plaintext in one transferred buffer
//   (in the request's order), or that chunk's error; one damaged chunk never
//   hides the others.
// - A copy writes only chunks that were checked against their ids, and
//   answers only once every write of its request has returned: the caller
//   may close the files then.

import { createHash } from 'node:crypto';
import { isMarkedAsUntransferable, parentPort, workerData } from 'node:worker_threads';
import { decodeChunk, encodeChunkParts, isZero, type EncodedChunk } from './chunk.js';
import { ChunkCompressor } from './compress.js';
import { chunkId, type MasterKey } from './crypto.js';
import { DirectWriter, readRangeSync } from '../util/direct-io.js';
import { checkPackBytes, type CheckPackReply, type CheckPackRequest } from './pack-check.js';

export interface WorkerInit {
  dataKey?: Uint8Array;
  idKey?: Uint8Array;
  level: number;
}

/** One chunk of a decode request: where it lies in the request's bytes, and what it must be. */
export interface DecodeEntry {
  id: Uint8Array;
  at: number;
  length: number;
  rawLength: number;
  what: string;
}

export interface DecodeRequest {
  op: 'decode';
  seq: number;
  bytes: Uint8Array;
  entries: DecodeEntry[];
  dataKey?: Uint8Array | undefined;
  idKey?: Uint8Array | undefined;
  /** The sender no longer reads `bytes`: the plaintexts may be put back to back in it (see decodeEntries). */
  inPlace?: boolean | undefined;
  /** With inPlace: the rest of `bytes.buffer` after `bytes` is the sender's too, so plaintexts that do not fit in place may go there. */
  roomAfter?: boolean | undefined;
}

export interface DecodeReply {
  op: 'decoded';
  seq: number;
  /** The plaintexts back to back, in the entries' order (a failed entry takes no room). */
  plain: Uint8Array;
  /** Per entry: its plaintext's offset in `plain`, or the error's message. */
  results: Array<{ at: number } | { error: string }>;
}

/**
 * A ranged read of a pack that the worker does itself (pread of `fd`, an
 * open pack of a local repository, into memory it keeps for the next
 * request; direct I/O where the file takes it, see util/direct-io.ts), decodes and checks like a DecodeRequest, and writes straight to
 * the output file `to` (pwrite): each entry's plaintext, cut to `length`,
 * at each of its `writes`. Nothing but the results travels back.
 */
export interface CopyRequest {
  op: 'copy';
  seq: number;
  fd: number;
  offset: number;
  length: number;
  entries: DecodeEntry[];
  /** Per entry: where its plaintext goes in `to` (a chunk stored once may appear at several places). */
  writes: Array<Array<{ position: number; length: number }>>;
  to: number;
  /** A descriptor of the same file opened for direct I/O, if any: the aligned middle of each write goes through it (see util/direct-io.ts). */
  toDirect?: number | undefined;
  dataKey?: Uint8Array | undefined;
  idKey?: Uint8Array | undefined;
}

export interface CopyReply {
  op: 'copied';
  seq: number;
  /** Per entry: undefined when written, else why its chunk could not be read. */
  errors: Array<string | undefined>;
  /** Why reading the pack (then nothing was written) or writing the output failed (the first failure; the output is not to be used). */
  ioError?: { read: boolean; message: string } | undefined;
}

/** A whole pack, to be hashed into its id (in shared memory: read where it lies). */
export interface HashPackRequest {
  op: 'hashPack';
  seq: number;
  bytes: Uint8Array;
}

export interface HashPackReply {
  op: 'packHashed';
  seq: number;
  packId: string;
}

/**
 * A batch's chunks, encoded: per chunk its stored form (see EncodedChunk in
 * chunk.ts; a raw chunk's body is a view of the batch itself) or null when
 * it was not wanted, and the batch's chunks handed back (their memory is
 * the caller's again).
 */
export interface EncodedReply {
  op: 'encoded';
  seq: number;
  blobs: Array<EncodedChunk | null>;
  chunks: Uint8Array[];
}

export type WorkerRequest = { op: 'hash'; seq: number; chunks: Uint8Array[] } | { op: 'encode'; seq: number; wanted: boolean[]; /** Shared memory to put compressed or sealed bodies in (see gatherBodies). */ out?: Uint8Array | undefined } | DecodeRequest | HashPackRequest | CopyRequest | CheckPackRequest;

export type WorkerReply = { op: 'hashed'; seq: number; /** 32 bytes per chunk, back to back (a zero chunk's are zero). */ ids: Uint8Array; zero: boolean[] } | EncodedReply | DecodeReply | HashPackReply | CopyReply | CheckPackReply | { op: 'error'; seq: number; message: string };

/** A pack's id: the SHA-256 of every byte. */
export function hashPack(msg: HashPackRequest): HashPackReply {
  return { op: 'packHashed', seq: msg.seq, packId: createHash('sha256').update(msg.bytes).digest('hex') };
}

const init = (workerData ?? { level: 1 }) as WorkerInit;
const key: MasterKey | undefined = init.dataKey !== undefined && init.idKey !== undefined ? { dataKey: Buffer.from(init.dataKey), idKey: Buffer.from(init.idKey) } : undefined;
/**
 * This thread's zstd contexts, made at its first request: a worker that is
 * stopped (or whose process exits) while it starts up never calls into the
 * native module, whose objects abort the process when made during teardown.
 */
let threadCompressor: ChunkCompressor | undefined;
function compressorOf(): ChunkCompressor {
  threadCompressor ??= new ChunkCompressor(init.level);
  return threadCompressor;
}
/** Chunks hashed and waiting for the main thread's decision, by batch. */
const waiting = new Map<number, Uint8Array[]>();

/** Decodes every entry of a request into one buffer; the work of Store.readChunks off the main thread. */
export function decodeEntries(msg: DecodeRequest, codecCompressor: ChunkCompressor): DecodeReply {
  const bytes = Buffer.from(msg.bytes.buffer, msg.bytes.byteOffset, msg.bytes.byteLength);
  const readKey = msg.dataKey !== undefined && msg.idKey !== undefined ? { dataKey: Buffer.from(msg.dataKey), idKey: Buffer.from(msg.idKey) } : undefined;
  const total = msg.entries.reduce((n, e) => n + e.rawLength, 0);
  // In place when allowed and no plaintext can land on a blob not yet
  // decoded (chunks stored raw: each plaintext is its blob less the codec
  // byte); else right after the blobs when the sender gave room there; else
  // never from the shared small-buffer pool: its memory is transferred to
  // the caller.
  const inPlace = msg.inPlace === true && fitsInPlace(msg.entries, bytes.length);
  const after = !inPlace && msg.inPlace === true && msg.roomAfter === true && bytes.buffer.byteLength - bytes.byteOffset - bytes.length >= total;
  const plain = inPlace ? bytes : after ? Buffer.from(bytes.buffer, bytes.byteOffset + bytes.length, total) : Buffer.allocUnsafeSlow(total);
  let at = 0;
  const results: DecodeReply['results'] = msg.entries.map((e) => {
    try {
      const blob = bytes.subarray(e.at, e.at + e.length);
      if (blob.length !== e.length) return { error: `${e.what} is damaged: its pack is shorter than its index says` };
      const data = decodeChunk(blob, Buffer.from(e.id), e.rawLength, { compressor: codecCompressor, key: readKey }, e.what);
      // copy() moves overlapping bytes correctly (memmove), and only after the chunk was checked against its id.
      data.copy(plain, at);
      at += data.length;
      return { at: at - data.length };
    } catch (err) {
      return { error: err instanceof Error ? err.message : String(err) };
    }
  });
  return { op: 'decoded', seq: msg.seq, plain: plain.subarray(0, at), results };
}

/**
 * True when writing the plaintexts back to back from the start of the
 * buffer never reaches a blob after the one being decoded: the entries lie
 * in order without overlap, and each plaintext ends before the next blob
 * starts (or the buffer ends).
 */
export function fitsInPlace(entries: readonly DecodeEntry[], size: number): boolean {
  let at = 0;
  let blobEnd = 0;
  for (const [k, e] of entries.entries()) {
    if (e.at < blobEnd) return false;
    blobEnd = e.at + e.length;
    at += e.rawLength;
    if (at > (entries[k + 1]?.at ?? size)) return false;
  }
  return true;
}

/** This thread's read buffer for copy requests, kept from one request to the next. */
let copyBuffer: Buffer | undefined;

/** Back-to-back plaintexts written together: one write's worth, and while it is out the next is decoded. */
const COPY_WRITE_BYTES = 4 * 1024 * 1024;

/**
 * Reads, decodes, checks and writes one copy request (see CopyRequest);
 * `scratch` may be reused across calls that do not overlap. Its writes go
 * out as their chunks are decoded and are all settled when it returns.
 */
export async function copyEntries(msg: CopyRequest, codecCompressor: ChunkCompressor, scratch?: Buffer): Promise<{ reply: CopyReply; scratch: Buffer }> {
  const errors: Array<string | undefined> = msg.entries.map(() => undefined);
  let buffer: Buffer;
  try {
    const read = readRangeSync(msg.fd, msg.offset, msg.length, scratch);
    buffer = read.bytes;
    scratch = read.scratch;
    const done = read.done;
    if (done < msg.length) {
      for (const [k, e] of msg.entries.entries()) if (e.at + e.length > done) errors[k] = `${e.what} is damaged: its pack is shorter than its index says`;
    }
  } catch (err) {
    return { reply: { op: 'copied', seq: msg.seq, errors, ioError: { read: true, message: err instanceof Error ? err.message : String(err) } }, scratch: scratch ?? Buffer.alloc(0) };
  }
  const readKey = msg.dataKey !== undefined && msg.idKey !== undefined ? { dataKey: Buffer.from(msg.dataKey), idKey: Buffer.from(msg.idKey) } : undefined;
  // Writes to back-to-back positions go out together (one pwritev, or
  // their aligned middle staged and written directly), on the thread pool
  // while the next chunks are decoded.
  const out = DirectWriter.over(msg.to, msg.toDirect);
  const writes: Array<Promise<void>> = [];
  let batch: { position: number; length: number; parts: Buffer[] } | undefined;
  const flush = (): void => {
    if (batch === undefined) return;
    writes.push(out.writev(batch.parts, batch.position));
    batch = undefined;
  };
  try {
    for (const [k, e] of msg.entries.entries()) {
      if (errors[k] !== undefined) continue;
      let data: Buffer;
      try {
        data = decodeChunk(buffer.subarray(e.at, e.at + e.length), Buffer.from(e.id), e.rawLength, { compressor: codecCompressor, key: readKey }, e.what);
      } catch (err) {
        errors[k] = err instanceof Error ? err.message : String(err);
        continue;
      }
      for (const w of msg.writes[k] ?? []) {
        const part = data.subarray(0, w.length);
        if (batch !== undefined && batch.position + batch.length === w.position && batch.length < COPY_WRITE_BYTES && batch.parts.length < 512) {
          batch.parts.push(part);
          batch.length += part.length;
        } else {
          flush();
          batch = { position: w.position, length: part.length, parts: [part] };
        }
      }
    }
    flush();
  } catch (err) {
    writes.push(Promise.reject(err));
  }
  const failed = (await Promise.allSettled(writes)).find((r): r is PromiseRejectedResult => r.status === 'rejected');
  const ioError = failed !== undefined ? { read: false, message: failed.reason instanceof Error ? failed.reason.message : String(failed.reason) } : undefined;
  return { reply: { op: 'copied', seq: msg.seq, errors, ioError }, scratch };
}

async function handle(msg: WorkerRequest): Promise<WorkerReply> {
  const compressor = compressorOf();
  if (msg.op === 'decode') return decodeEntries(msg, compressor);
  if (msg.op === 'hashPack') return hashPack(msg);
  if (msg.op === 'check') return checkPackBytes(msg, compressor);
  if (msg.op === 'copy') {
    const { reply, scratch } = await copyEntries(msg, compressor, copyBuffer);
    copyBuffer = scratch;
    return reply;
  }
  if (msg.op === 'hash') {
    waiting.set(msg.seq, msg.chunks);
    const zero = msg.chunks.map((c) => isZero(c));
    // One buffer for the batch's ids: one allocation and one copy in the message, not one per chunk.
    const ids = Buffer.alloc(32 * msg.chunks.length);
    msg.chunks.forEach((c, i) => {
      if (!zero[i]) chunkId(c, key).copy(ids, 32 * i);
    });
    return { op: 'hashed', seq: msg.seq, ids, zero };
  }
  const chunks = waiting.get(msg.seq) ?? [];
  waiting.delete(msg.seq);
  const blobs = chunks.map((c, i) => (msg.wanted[i] === true ? encodeChunkParts(c, { compressor, key }) : null));
  return { op: 'encoded', seq: msg.seq, blobs: gatherBodies(blobs, chunks, msg.out), chunks };
}

/**
 * The blobs with every body that is not a view of the batch itself
 * (compressed or sealed: each a buffer of its own) copied into `out`, shared
 * memory the caller reuses from batch to batch, when they fit (else into
 * one new buffer). A fresh buffer per chunk, or even per batch, handed to
 * the main thread and dropped there after its copy into a pack, made V8
 * collect garbage every few MiB (an encrypted full backup ran ~55 full
 * collections per GiB).
 */
function gatherBodies(blobs: Array<EncodedChunk | null>, chunks: readonly Uint8Array[], out: Uint8Array | undefined): Array<EncodedChunk | null> {
  const batch = new Set(chunks.map((c) => c.buffer));
  const own = blobs.filter((b): b is EncodedChunk => b !== null && !batch.has(b.body.buffer));
  const bytes = own.reduce((n, b) => n + b.body.byteLength, 0);
  if (own.length === 0 || (out === undefined && own.length < 2)) return blobs;
  const all = out !== undefined && out.byteLength >= bytes ? out : Buffer.allocUnsafeSlow(bytes);
  let at = 0;
  return blobs.map((b) => {
    if (b === null || batch.has(b.body.buffer)) return b;
    all.set(b.body, at);
    at += b.body.byteLength;
    return { codec: b.codec, body: all.subarray(at - b.body.byteLength, at) };
  });
}

/**
 * The distinct memory behind `views` that can be handed to another thread.
 * A small Buffer (a compressed chunk of a few bytes, say) lives in Node's
 * shared pool with other Buffers; Node refuses to transfer that memory
 * (DataCloneError), so such views are copied with the message instead.
 */
export function transferList(views: readonly Uint8Array[]): ArrayBuffer[] {
  const out = new Set<ArrayBuffer>();
  for (const v of views) if (v.buffer instanceof ArrayBuffer && v.byteLength > 0 && !isMarkedAsUntransferable(v.buffer)) out.add(v.buffer);
  return [...out];
}

/** Requests are handled one at a time, in order (a copy waits for its writes; the next request waits for it). */
let handling: Promise<void> = Promise.resolve();

parentPort?.on('message', (msg: WorkerRequest) => {
  handling = handling.then(async () => {
    let reply: WorkerReply;
    try {
      reply = await handle(msg);
    } catch (err) {
      reply = { op: 'error', seq: msg.seq, message: err instanceof Error ? err.message : String(err) };
    }
    parentPort?.postMessage(reply, transferList(repliedMemory(reply)));
  });
});

/** The memory a reply hands over to the caller. */
function repliedMemory(reply: WorkerReply): Uint8Array[] {
  if (reply.op === 'encoded') return [...reply.chunks, ...reply.blobs.flatMap((b) => (b === null ? [] : [b.body]))];
  if (reply.op === 'decoded') return [reply.plain];
  return [];
}
