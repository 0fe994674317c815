// Writing one backed-up disk out of the store: as a new sparse raw image or a
// new qcow2 image (zero chunks stay holes), or into an existing image (zero
// chunks are written as zeroes). Every chunk is checked against its id as it
// is read; a new image is written under a temporary name and renamed into
// place only when complete, so nothing partial ever looks finished.

import { constants, promises as fs } from 'node:fs';
import { dirname } from 'node:path';
import { QbackupError } from '../errors.js';
import { NbdClient } from '../nbd/client.js';
import { runPool } from '../util/run-pool.js';
import { createImage } from '../image/qemu-img.js';
import { startQemuNbd } from '../image/qemu-nbd.js';
import { ZERO_ID } from './chunk.js';
import { packKey } from './pack.js';
import { decodeChunk } from './chunk.js';
import type { FullIndex } from './disk-index.js';
import type { Store } from './store.js';

export type ImageFormat = 'raw' | 'qcow2';

/** Where restored bytes go. */
interface Sink {
  write(offset: number, data: Buffer): Promise<void>;
  zero(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
}

const RUN_CHUNKS = 64;
const RUNS_IN_FLIGHT = 4;

export interface WriteDiskOptions {
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /** Names the disk and backup in errors, e.g. 'disk "sda" of backup "…"'. */
  what: string;
}

/** Writes the table's disk into a new image file at `path`. */
export async function restoreToFile(store: Store, table: FullIndex, path: string, format: ImageFormat, options: WriteDiskOptions): Promise<void> {
  await fs.mkdir(dirname(path), { recursive: true, mode: 0o700 });
  if (await fs.lstat(path).catch(() => undefined)) throw new QbackupError('INVALID_ARGUMENT', `Cannot restore ${options.what}: "${path}" exists`);
  const partial = `${path}.partial`;
  await fs.rm(partial, { force: true });
  try {
    const sink = format === 'raw' ? await rawSink(partial, table.virtualSize) : await qcow2Sink(partial, table.virtualSize);
    try {
      await copyTable(store, table, sink, false, options);
    } finally {
      await sink.close();
    }
    await fs.chmod(partial, 0o600);
    await fs.rename(partial, path);
  } catch (err) {
    await fs.rm(partial, { force: true });
    throw err;
  }
}

/** Writes the table's disk over an existing image (a shut-off domain's disk) of the same size. */
export async function restoreIntoImage(store: Store, table: FullIndex, image: string, format: ImageFormat, options: WriteDiskOptions): Promise<void> {
  await using server = await startQemuNbd(image, { format });
  await using client = await NbdClient.connect({ socket: server.socket }, { exportName: server.exportName });
  if (client.size !== table.virtualSize) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot restore ${options.what} into "${image}": the image has ${client.size} bytes, the backup ${table.virtualSize}`);
  }
  await copyTable(store, table, nbdSink(client), true, options);
  await client.flush();
}

/** Reads every chunk of the table (runs of chunks adjacent in one pack in one read) and writes it to the sink. */
async function copyTable(store: Store, table: FullIndex, sink: Sink, writeZeroes: boolean, options: WriteDiskOptions): Promise<void> {
  const chunkSize = table.chunkSize;
  const slots = table.ids.length / 32;
  const total = table.virtualSize;
  let done = 0;
  const runs = function* (): Generator<{ first: number; count: number }> {
    for (let first = 0; first < slots; first += RUN_CHUNKS) yield { first, count: Math.min(RUN_CHUNKS, slots - first) };
  };
  await runPool(runs(), RUNS_IN_FLIGHT, async ({ first, count }) => {
    const datas = await readRun(store, table, first, count, options.what);
    // The run's writes go out together: one at a time, a restore waited for a
    // round trip to qemu-nbd (or the thread pool) per 64 KiB chunk.
    const writes: Array<Promise<void>> = [];
    for (let i = 0; i < count; i++) {
      const offset = (first + i) * chunkSize;
      const length = Math.min(chunkSize, total - offset);
      const data = datas[i];
      if (data !== undefined) writes.push(sink.write(offset, data.subarray(0, length)));
      else if (writeZeroes) writes.push(sink.zero(offset, length));
      done += length;
    }
    // Every write settles before the run ends (and before the sink can be closed); the first failure is thrown.
    const failed = (await Promise.allSettled(writes)).find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed !== undefined) throw failed.reason;
    options.onProgress?.(done, total);
  });
}

/** The plaintext of slots first…first+count-1 (undefined for holes), reading pack ranges that touch once. */
async function readRun(store: Store, table: FullIndex, first: number, count: number, what: string): Promise<Array<Buffer | undefined>> {
  const out: Array<Buffer | undefined> = new Array<Buffer | undefined>(count);
  const wanted: Array<{ i: number; id: Buffer; packId: string; offset: number; length: number; rawLength: number }> = [];
  for (let i = 0; i < count; i++) {
    const id = table.ids.subarray((first + i) * 32, (first + i + 1) * 32);
    if (id.equals(ZERO_ID)) continue;
    const loc = store.locate(id);
    if (loc === undefined) throw new QbackupError('REPO_OBJECT_NOT_FOUND', `Cannot restore ${what}: chunk ${id.toString('hex')} is missing from the repository`, { details: { chunk: id.toString('hex') } });
    wanted.push({ i, id, ...loc });
  }
  // Group entries that lie back to back in the same pack into one ranged read.
  let g = 0;
  while (g < wanted.length) {
    const start = wanted[g];
    if (start === undefined) break;
    let end = g + 1;
    while (end < wanted.length && wanted[end]?.packId === start.packId && wanted[end]?.offset === (wanted[end - 1]?.offset ?? 0) + (wanted[end - 1]?.length ?? 0)) end++;
    const last = wanted[end - 1] ?? start;
    const blob = await store.backend.get(packKey(start.packId), { offset: start.offset, length: last.offset + last.length - start.offset });
    for (const w of wanted.slice(g, end)) {
      const hex = w.id.toString('hex');
      try {
        out[w.i] = decodeChunk(blob.subarray(w.offset - start.offset, w.offset - start.offset + w.length), w.id, w.rawLength, { compressor: store.compressor, key: store.key }, `Chunk ${hex} in pack "${w.packId}"`);
      } catch (err) {
        throw new QbackupError('REPO_DAMAGED', `Cannot restore ${what}: ${(err as Error).message}`, { cause: err, details: { chunk: hex } });
      }
    }
    g = end;
  }
  return out;
}

async function rawSink(path: string, size: number): Promise<Sink> {
  const fh = await fs.open(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
  await fh.truncate(size);
  return {
    write: async (offset, data) => {
      await fh.write(data, 0, data.length, offset);
    },
    zero: async () => undefined, // a new sparse file reads zero already
    close: async () => {
      await fh.sync();
      await fh.close();
    },
  };
}

async function qcow2Sink(path: string, size: number): Promise<Sink> {
  await createImage(path, 'qcow2', size);
  const server = await startQemuNbd(path, { format: 'qcow2' });
  const client = await NbdClient.connect({ socket: server.socket }, { exportName: server.exportName }).catch(async (err: unknown) => {
    await server.stop();
    throw err;
  });
  const sink = nbdSink(client);
  return {
    ...sink,
    close: async () => {
      try {
        await client.flush();
        await client.close();
      } finally {
        await server.stop();
      }
    },
  };
}

function nbdSink(client: NbdClient): Sink {
  return {
    write: (offset, data) => client.write(offset, data),
    zero: (offset, length) => client.writeZeroes(offset, length),
    close: () => client.close(),
  };
}
