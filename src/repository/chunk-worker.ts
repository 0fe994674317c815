// The worker-thread side of the chunk pool (pool.ts): hashes a batch of
// chunks and, for those the main thread asks for, compresses and encrypts
// them. Runs in a worker so that both cores hash and compress while the main
// thread reads from the VM and writes packs.

import { parentPort, workerData } from 'node:worker_threads';
import { encodeChunk, isZero } from './chunk.js';
import { ChunkCompressor } from './compress.js';
import { chunkId, type MasterKey } from './crypto.js';

export interface WorkerInit {
  dataKey?: Uint8Array;
  idKey?: Uint8Array;
  level: number;
}

export type WorkerRequest = { op: 'hash'; seq: number; chunks: Uint8Array[] } | { op: 'encode'; seq: number; wanted: boolean[] };

export type WorkerReply = { op: 'hashed'; seq: number; ids: Uint8Array[]; zero: boolean[] } | { op: 'encoded'; seq: number; blobs: Array<Uint8Array | null> } | { op: 'error'; seq: number; message: string };

const init = workerData as WorkerInit;
const key: MasterKey | undefined = init.dataKey !== undefined && init.idKey !== undefined ? { dataKey: Buffer.from(init.dataKey), idKey: Buffer.from(init.idKey) } : undefined;
const compressor = new ChunkCompressor(init.level);
/** Chunks hashed and waiting for the main thread's decision, by batch. */
const waiting = new Map<number, Uint8Array[]>();

function handle(msg: WorkerRequest): WorkerReply {
  if (msg.op === 'hash') {
    waiting.set(msg.seq, msg.chunks);
    const zero = msg.chunks.map((c) => isZero(c));
    return { op: 'hashed', seq: msg.seq, ids: msg.chunks.map((c, i) => (zero[i] ? new Uint8Array(32) : chunkId(c, key))), zero };
  }
  const chunks = waiting.get(msg.seq) ?? [];
  waiting.delete(msg.seq);
  return { op: 'encoded', seq: msg.seq, blobs: chunks.map((c, i) => (msg.wanted[i] === true ? encodeChunk(c, { compressor, key }) : null)) };
}

parentPort?.on('message', (msg: WorkerRequest) => {
  let reply: WorkerReply;
  try {
    reply = handle(msg);
  } catch (err) {
    reply = { op: 'error', seq: msg.seq, message: err instanceof Error ? err.message : String(err) };
  }
  const transfer = reply.op === 'encoded' ? reply.blobs.filter((b): b is Uint8Array => b !== null).map((b) => b.buffer as ArrayBuffer) : [];
  parentPort?.postMessage(reply, transfer);
});
