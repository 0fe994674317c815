// Read-ahead of a served backup disk (src/repository/serve.ts), on a real
// local store and no QEMU: reads in ascending order (what QEMU's block-stream
// sends, 512 KiB at a time) return the disk's bytes, and each read's chunks
// were asked of the store before the read came; nothing is fetched twice;
// a read that goes back does not read ahead; a chunk that failed while read
// ahead fails the read that wants it, and is read again (not cached) once the
// store can give it.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { QbackupError } from '../../src/errors.js';
import { NBD_EIO } from '../../src/nbd/constants.js';
import { NbdExportError, type NbdExportSegment } from '../../src/nbd/server-session.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { ZERO_ID } from '../../src/repository/chunk.js';
import type { FullIndex } from '../../src/repository/disk-index.js';
import { BackupDiskExport, ChunkCache, READ_AHEAD_BATCHES, READ_AHEAD_BATCH_CHUNKS } from '../../src/repository/serve.js';
import { Store } from '../../src/repository/store.js';
import { storeChunkDisk } from '../helpers/repo.js';

const C = 64 * 1024;
const PIECE = 512 * 1024; // block-stream's request size
const SLOTS = 400; // 25 MiB: more than the read-ahead window
const HOLES = new Set([3, 4, 5, 100, 101, 250]);

/** The store, with every id asked of readChunks recorded, and ids made to fail while in `failing`. */
function spyOn(store: Store): { store: Store; asked: string[]; failing: Set<string> } {
  const asked: string[] = [];
  const failing = new Set<string>();
  const spy = Object.create(store) as Store;
  spy.readChunks = async (ids, options) => {
    for (const id of ids) asked.push(id.toString('hex'));
    const results = await store.readChunks(ids, options);
    return results.map((r, i) => (failing.has(ids[i]?.toString('hex') ?? '') ? { error: new QbackupError('REPO_DAMAGED', 'injected failure') } : r));
  };
  return { store: spy, asked, failing };
}

function bytesOf(segments: readonly NbdExportSegment[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (const s of segments) s.data?.copy(out, s.offset - offset, 0, s.length);
  return out;
}

describe('read-ahead of a served backup disk', () => {
  let dir: string;
  let store: Store;
  let disk: Buffer;
  let table: FullIndex;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'qbt-readahead-'));
    store = await Store.init(new LocalBackend(join(dir, 'repo')), {});
    ({ disk, table } = await storeChunkDisk(store, SLOTS, C, HOLES, () => randomBytes(C)));
    assert.ok(table.ids.subarray(3 * 32, 4 * 32).equals(ZERO_ID));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const idAt = (slot: number): string => table.ids.subarray(slot * 32, slot * 32 + 32).toString('hex');

  it('answers an ascending reader with the right bytes from chunks asked before each read, each asked once', async () => {
    const spy = spyOn(store);
    const exp = new BackupDiskExport('vda', 'disk "vda"', table, new ChunkCache(spy.store, 2 * BackupDiskExport.readAheadBytes(C)));
    for (let offset = 0; offset < disk.length; offset += PIECE) {
      if (offset > 0) {
        const before = new Set(spy.asked);
        for (let slot = offset / C; slot < (offset + PIECE) / C; slot++) {
          if (!HOLES.has(slot)) assert.ok(before.has(idAt(slot)), `chunk of slot ${slot} was read ahead of the read at ${offset}`);
        }
      }
      const got = await exp.read(offset, PIECE);
      assert.ok(bytesOf(got, offset, PIECE).equals(disk.subarray(offset, offset + PIECE)), `bytes at ${offset}`);
    }
    assert.equal(spy.asked.length, new Set(spy.asked).size, 'no chunk was fetched twice');
    assert.equal(spy.asked.length, SLOTS - HOLES.size);
  });

  it('does not read ahead of a read that goes back, and starts again when reads ascend', async () => {
    const spy = spyOn(store);
    const exp = new BackupDiskExport('vda', 'disk "vda"', table, new ChunkCache(spy.store, 2 * BackupDiskExport.readAheadBytes(C)));
    const high = 300 * C;
    await exp.read(high, PIECE);
    const window = READ_AHEAD_BATCH_CHUNKS * READ_AHEAD_BATCHES;
    assert.equal(spy.asked.length, Math.min(8 + window, SLOTS - 300), 'the first read (ascending from 0) reads ahead');
    spy.asked.length = 0;
    const low = 10 * C;
    const got = await exp.read(low, PIECE);
    assert.ok(bytesOf(got, low, PIECE).equals(disk.subarray(low, low + PIECE)));
    assert.deepEqual(new Set(spy.asked), new Set(Array.from({ length: 8 }, (_, i) => idAt(10 + i))), 'a read going back fetches its own chunks only');
    spy.asked.length = 0;
    await exp.read(low + PIECE, PIECE);
    assert.ok(spy.asked.includes(idAt(18 + window - 1)), 'ascending again reads ahead again');
  });

  it('fails the read of a chunk that failed while read ahead, and reads it again once it can', async () => {
    const spy = spyOn(store);
    const exp = new BackupDiskExport('vda', 'disk "vda"', table, new ChunkCache(spy.store, 2 * BackupDiskExport.readAheadBytes(C)));
    const bad = idAt(12);
    spy.failing.add(bad);
    await exp.read(0, PIECE); // reads slots 8… ahead, slot 12 among them, which fails
    await assert.rejects(exp.read(PIECE, PIECE), (err: unknown) => err instanceof NbdExportError && err.errno === NBD_EIO && err.message.includes(bad));
    spy.failing.delete(bad);
    const got = await exp.read(PIECE, PIECE);
    assert.ok(bytesOf(got, PIECE, PIECE).equals(disk.subarray(PIECE, 2 * PIECE)));
  });
});
