// Reuse of read memory by the backup server (src/repository/read-buffers.ts,
// serve.ts): the pool hands a buffer out again only once every holder let
// go; served reads return the disk's bytes, and keep them while a reply
// holds them, under many readers at once with read-ahead and a cache small
// enough to evict all the time; memory is in fact reused; the NBD server
// tells an export once per read when the reply no longer needs its data;
// and through the server, many requests in flight on several connections
// read the disk exactly.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/index.js';
import { NbdServer } from '../../src/nbd/server.js';
import type { NbdExportSegment, NbdServerExport } from '../../src/nbd/server-session.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import type { FullIndex } from '../../src/repository/disk-index.js';
import { ReadBufferPool } from '../../src/repository/read-buffers.js';
import { BackupDiskExport, ChunkCache, serveBackup } from '../../src/repository/serve.js';
import { Store } from '../../src/repository/store.js';
import { oneDiskFullManifest, storeChunkDisk } from '../helpers/repo.js';

const C = 64 * 1024;
const PIECE = 512 * 1024;
const SLOTS = 400; // 25 MiB: well past the cache's bound
const HOLES = new Set([3, 4, 5, 100, 101, 250, 399]);

function bytesOf(segments: readonly NbdExportSegment[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (const s of segments) s.data?.copy(out, s.offset - offset, 0, s.length);
  return out;
}

/** A fixed pseudo-random sequence (the same on every run). */
function lcg(seed: number): () => number {
  let x = seed >>> 0;
  return () => (x = (Math.imul(x, 1664525) + 1013904223) >>> 0);
}

const ticks = async (n: number): Promise<void> => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
};

describe('ReadBufferPool', () => {
  it('rounds sizes to classes and hands a buffer out again only after its last holder let go', () => {
    assert.equal(ReadBufferPool.classOf(1), 64 * 1024);
    assert.equal(ReadBufferPool.classOf(8 * (C + 1)), 576 * 1024);
    assert.equal(ReadBufferPool.classOf(32 * (C + 1)), 2304 * 1024);
    const pool = new ReadBufferPool(16 * 1024 * 1024);
    const a = pool.take(8 * (C + 1));
    assert.equal(a.length, 8 * (C + 1));
    assert.equal(a.byteOffset, 0);
    assert.equal(a.buffer.byteLength, 576 * 1024);
    pool.ref(a.buffer);
    pool.ref(a.buffer);
    pool.unref(a.buffer);
    assert.notEqual(pool.take(8 * (C + 1)).buffer, a.buffer, 'still held once');
    pool.unref(a.buffer);
    assert.equal(pool.idleBytes, 576 * 1024);
    assert.equal(pool.take(550 * 1024).buffer, a.buffer, 'same class: reused');
    assert.equal(pool.idleBytes, 0);
    assert.throws(() => pool.unref(a.buffer), /released more often than held/);
  });

  it('never keeps memory that is not a whole class, detached, or past its bound', () => {
    const pool = new ReadBufferPool(1024 * 1024);
    const odd = new ArrayBuffer(100_000);
    pool.ref(odd);
    pool.unref(odd);
    const moved = pool.take(C).buffer as ArrayBuffer;
    structuredClone(moved, { transfer: [moved] });
    pool.ref(moved);
    pool.unref(moved);
    const big = pool.take(2 * 1024 * 1024).buffer;
    pool.ref(big);
    pool.unref(big);
    assert.equal(pool.idleBytes, 0);
  });
});

describe('NBD server: letting go of read data', () => {
  it('calls readDone once per read, after the reply is out, for replies in one data chunk or several', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qbt-readdone-'));
    const bytes = randomBytes(4 * C);
    const outstanding = new Set<readonly NbdExportSegment[]>();
    let reads = 0;
    let dones = 0;
    const exp: NbdServerExport = {
      name: 'vda',
      size: bytes.length,
      preferredBlockBytes: 4096,
      read: async (offset, length) => {
        reads++;
        // A hole in the middle when the read spans one: two data chunks in the reply.
        const mid = offset + Math.floor(length / 2);
        const segments = length >= 2 ? [{ offset, length: mid - offset, data: Buffer.from(bytes.subarray(offset, mid)) }, { offset: mid, length: 1, data: undefined }, { offset: mid + 1, length: offset + length - mid - 1, data: Buffer.from(bytes.subarray(mid + 1, offset + length)) }] : [{ offset, length, data: Buffer.from(bytes.subarray(offset, offset + length)) }];
        outstanding.add(segments);
        return segments;
      },
      readDone: (segments) => {
        assert.ok(outstanding.delete(segments), 'readDone gets what read returned, once');
        dones++;
        // The server no longer refers to the data: spoiling it must not change what the client got.
        for (const s of segments) s.data?.fill(0xee);
      },
      blockStatus: async () => [],
    };
    try {
      const server = await NbdServer.start({ exports: [exp], listen: { transport: 'unix', socket: join(dir, 's') } });
      try {
        await using c = await NbdClient.connect({ socket: join(dir, 's') }, { exportName: 'vda' });
        const pieces = [0, 1000, C, 3 * C - 7, 2 * C];
        const got = await Promise.all(pieces.map((o) => c.read(o, C)));
        for (const [j, o] of pieces.entries()) {
          const expect = Buffer.from(bytes.subarray(o, o + C));
          expect[Math.floor(C / 2)] = 0;
          assert.ok(got[j]?.equals(expect), `bytes at ${o}`);
        }
        await c.close();
      } finally {
        await server.close();
      }
      assert.equal(reads, 5);
      assert.equal(dones, 5);
      assert.equal(outstanding.size, 0);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('served reads with reused memory', () => {
  let dir: string;
  let store: Store;
  let disk: Buffer;
  let table: FullIndex;
  const manifestId = '20260101T000000.000Z-0001';

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'qbt-servegc-'));
    store = await Store.init(new LocalBackend(join(dir, 'repo')), {});
    // Mostly incompressible (stored raw: decoded in the read memory itself), every 7th compressible (decoded into fresh memory).
    ({ disk, table } = await storeChunkDisk(store, SLOTS, C, HOLES, (s) => {
      if (s % 7 !== 0) return randomBytes(C);
      const data = Buffer.alloc(C, s & 0xff);
      data.writeUInt32BE(s, 100);
      return data;
    }));
    const index = await store.putIndex(table);
    await store.putManifest(oneDiskFullManifest(manifestId, index, SLOTS * C, { total: SLOTS, new: SLOTS }));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('keeps every held reply intact while streaming and scattered readers share one small cache, and reuses memory', async () => {
    // A quarter of what four streaming exports keep ahead: entries are evicted, and memory let go, all the time.
    const cache = new ChunkCache(store, BackupDiskExport.readAheadBytes(C));
    const exports = Array.from({ length: 5 }, (_, i) => new BackupDiskExport('vda', `disk "vda" #${i}`, table, cache));
    let reads = 0;
    const reader = async (k: number): Promise<void> => {
      const exp = exports[k];
      assert.ok(exp !== undefined);
      const next = lcg(k + 1);
      for (let pass = 0; pass < 2; pass++) {
        for (let n = 0; n < disk.length / PIECE; n++) {
          // Readers 0-3 stream (each from its own start, wrapping); reader 4 jumps about (no read-ahead), at odd offsets and lengths.
          const offset = k < 4 ? ((n + k * 11) * PIECE) % disk.length : next() % (disk.length - 3 * C);
          const length = k < 4 ? PIECE : 1 + (next() % (3 * C));
          const segments = await exp.read(offset, length);
          const want = disk.subarray(offset, offset + length);
          assert.ok(bytesOf(segments, offset, length).equals(want), `reader ${k}: bytes at ${offset}+${length}`);
          // The reply is "being written" for a while: others read meanwhile; its bytes must not change.
          await ticks(next() % 6);
          assert.ok(bytesOf(segments, offset, length).equals(want), `reader ${k}: bytes at ${offset}+${length} changed while held`);
          exp.readDone(segments);
          reads++;
        }
      }
    };
    await Promise.all(exports.map((_, k) => reader(k)));
    assert.equal(reads, 5 * 2 * (disk.length / PIECE));
    assert.ok(cache.pool.stats.reused > 0, `memory reused (${JSON.stringify(cache.pool.stats)})`);
  });

  it('streams the disk in memory that is mostly reused', async () => {
    // Without read-ahead one fetch is in flight at a time, so what is reused does not depend on timing.
    const cache = new ChunkCache(store, 2 * BackupDiskExport.readAheadBytes(C));
    const exp = new BackupDiskExport('vda', 'disk "vda"', table, cache, false);
    const passes = 8;
    for (let pass = 0; pass < passes; pass++) {
      for (let offset = 0; offset < disk.length; offset += PIECE) {
        const segments = await exp.read(offset, PIECE);
        assert.ok(bytesOf(segments, offset, PIECE).equals(disk.subarray(offset, offset + PIECE)), `bytes at ${offset}`);
        exp.readDone(segments);
      }
    }
    // Fresh memory is bounded by what is alive at once (the cache's bound and the free list), not by the bytes streamed.
    const { reused, fresh } = cache.pool.stats;
    assert.ok(fresh < 64 && reused > 4 * fresh, `fresh ${fresh}, reused ${reused}`);
  });

  it('through the NBD server, many requests in flight on three connections read the disk exactly, three times over', async () => {
    const opened = await Store.open(new LocalBackend(join(dir, 'repo')), {});
    await using server = await serveBackup(opened, { domain: 'vm', listen: { transport: 'unix' }, runDir: join(dir, 'run'), cacheBytes: 1 });
    const socket = server.listen.transport === 'unix' ? server.listen.socket : '';
    const clients = await Promise.all([0, 1, 2].map(() => NbdClient.connect({ socket }, { exportName: 'vda' })));
    try {
      await Promise.all(
        clients.map(async (c, k) => {
          for (let pass = 0; pass < 3; pass++) {
            const pieces = Array.from({ length: disk.length / PIECE }, (_, n) => ((n + k * 17) * PIECE) % disk.length);
            // 16 in flight at a time; each checked whole.
            for (let i = 0; i < pieces.length; i += 16) {
              const batch = pieces.slice(i, i + 16);
              const got = await Promise.all(batch.map((o) => c.read(o, PIECE)));
              for (const [j, o] of batch.entries()) assert.ok(got[j]?.equals(disk.subarray(o, o + PIECE)), `connection ${k}: bytes at ${o}`);
            }
          }
        }),
      );
    } finally {
      for (const c of clients) await c.close();
    }
  });
});
