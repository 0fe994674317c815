// The chunk pool's workers hand back what they encoded. Chunks that compress
// to a few bytes come back as Buffers in Node's shared small-buffer pool,
// which Node refuses to transfer between threads (a DataCloneError that
// killed the worker and failed the backup): they must arrive as copies.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { ChunkPool } from '../../src/repository/pool.js';
import { Store } from '../../src/repository/store.js';

const C = 64 * 1024;

describe('chunk pool', () => {
  it('stores chunks that compress to a few bytes and chunks that do not, through the workers, and reads them back', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qb-pool-'));
    const store = await Store.init(new LocalBackend(dir));
    const pool = new ChunkPool(store, 2);
    try {
      const chunks = Array.from({ length: 48 }, (_, i) => (i % 3 === 0 ? randomBytes(C) : Buffer.alloc(C, i + 1)));
      const writer = store.chunkWriter();
      const { ids, newChunks } = await pool.storeChunks(chunks.map((c) => Buffer.from(c)), writer, { transfer: true });
      await writer.flush();
      assert.equal(newChunks, chunks.length);
      const reader = await Store.open(new LocalBackend(dir));
      await reader.loadChunks();
      const back = await reader.readChunks(ids);
      back.forEach((r, i) => {
        assert.ok(!('error' in r), `chunk ${i} reads: ${'error' in r ? r.error.message : ''}`);
        assert.ok('data' in r && r.data.equals(chunks[i]!), `chunk ${i} has its bytes`);
      });
    } finally {
      await pool.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
