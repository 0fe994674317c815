// gc on a real local store: a pack whose chunks are all live is never
// rewritten. (Packs are content-addressed: "repacking" such a pack gave the
// same bytes, the same id, and then deleted it as "the old pack" — every
// backup of a small, compressible disk lost its data.)

import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { collectGarbage } from '../../src/repository/gc.js';
import type { Manifest } from '../../src/repository/manifest.js';
import { Store } from '../../src/repository/store.js';

const C = 64 * 1024;

test('gc keeps a live pack whose header outweighs its (well compressed) chunks', async () => {
  const store = await Store.init(new LocalBackend(mkdtempSync(join(tmpdir(), 'qb-gc-'))));
  const data = Buffer.alloc(C, 0xd6);
  const id = store.chunkId(data);
  const writer = store.chunkWriter();
  await writer.add(id, data);
  await writer.flush();
  const table = Buffer.alloc(32);
  id.copy(table);
  const index = await store.putIndex({ kind: 'full', chunkSize: C, virtualSize: C, ids: table });
  const manifest: Manifest = {
    format: 2,
    id: '20260101T000000.000Z-0001',
    domain: 'vm',
    uuid: '00000000-0000-0000-0000-000000000000',
    time: '2026-01-01T00:00:00.000Z',
    endTime: '2026-01-01T00:00:01.000Z',
    checkpoint: 'qb-20260101T000000.000Z-0001',
    consistency: 'crash',
    domainXml: '<domain/>',
    disks: [{ target: 'sda', diskId: 'dk00000001', virtualSize: C, level: 'full', fullReason: 'first', index, bytesRead: C, bytesStored: 1, chunks: 1, newChunks: 1 }],
  };
  await store.putManifest(manifest);
  const report = await collectGarbage(store);
  assert.equal(report.packsDeleted, 0);
  assert.equal(report.packsRepacked, 0);
  const again = await Store.open(store.backend);
  await again.loadChunks();
  assert.ok((await again.readChunk(id)).equals(data));
});

test('gc rebuilds a lost pack index from the pack trailer when the pack holds live chunks, and deletes nothing of it', async () => {
  const store = await Store.init(new LocalBackend(mkdtempSync(join(tmpdir(), 'qb-gc-'))));
  const data = Buffer.from(Array.from({ length: C }, (_, i) => (i * 7) & 0xff));
  const id = store.chunkId(data);
  const writer = store.chunkWriter();
  await writer.add(id, data);
  await writer.flush();
  const table = Buffer.alloc(32);
  id.copy(table);
  const index = await store.putIndex({ kind: 'full', chunkSize: C, virtualSize: C, ids: table });
  await store.putManifest({
    format: 2,
    id: '20260101T000000.000Z-0002',
    domain: 'vm',
    uuid: '00000000-0000-0000-0000-000000000000',
    time: '2026-01-01T00:00:00.000Z',
    endTime: '2026-01-01T00:00:01.000Z',
    checkpoint: 'qb-20260101T000000.000Z-0002',
    consistency: 'crash',
    domainXml: '<domain/>',
    disks: [{ target: 'sda', diskId: 'dk00000001', virtualSize: C, level: 'full', fullReason: 'first', index, bytesRead: C, bytesStored: 1, chunks: 1, newChunks: 1 }],
  });
  const [packIndex] = await store.backend.list('index/');
  assert.ok(packIndex !== undefined);
  const saved = await store.backend.get(packIndex.key);
  await store.backend.delete(packIndex.key); // the index is lost; the pack is whole
  const report = await collectGarbage(store);
  assert.equal(report.packsDeleted, 0, 'the pack with live data stays');
  assert.equal(report.indexesRebuilt, 1);
  assert.ok((await store.backend.get(packIndex.key)).equals(saved), 'the index is rebuilt from the trailer');
  const again = await Store.open(store.backend);
  await again.loadChunks();
  assert.ok((await again.readChunk(id)).equals(data));
});
