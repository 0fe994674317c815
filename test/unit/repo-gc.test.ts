// gc on a real local store: a pack whose chunks are all live is never
// rewritten. (Packs are content-addressed: "repacking" such a pack gave the
// same bytes, the same id, and then deleted it as "the old pack" — every
// backup of a small, compressible disk lost its data.) A listing that hides
// the newest manifest (stale) never makes gc delete that backup's objects.

import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, utimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import type { ObjectInfo } from '../../src/repository/backend/backend.js';
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

/** Lists every manifest except the hidden ones, as a stale listing would. */
class StaleListing extends LocalBackend {
  hidden = new Set<string>();
  override async list(prefix: string): Promise<ObjectInfo[]> {
    return (await super.list(prefix)).filter((o) => !this.hidden.has(o.key));
  }
}

test('a stale listing that hides the newest manifest: two gc runs keep its index and pack; once it is listed they stay live, and with old enough objects garbage goes', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'qb-gc-'));
  const backend = new StaleListing(dir);
  const store = await Store.init(backend);
  const backup = async (n: number, fill: number): Promise<{ index: string; id: Buffer; key: string }> => {
    const data = Buffer.alloc(C, fill);
    const id = store.chunkId(data);
    const writer = store.chunkWriter();
    await writer.add(id, data);
    await writer.flush();
    const table = Buffer.alloc(32);
    id.copy(table);
    const index = await store.putIndex({ kind: 'full', chunkSize: C, virtualSize: C, ids: table });
    const backupId = `2026010${n}T000000.000Z-000${n}`;
    await store.putManifest({
      format: 2, id: backupId, domain: 'vm', uuid: '00000000-0000-0000-0000-000000000000', time: `2026-01-0${n}T00:00:00.000Z`, endTime: `2026-01-0${n}T00:00:01.000Z`,
      checkpoint: `qb-${backupId}`, consistency: 'crash', domainXml: '<domain/>',
      disks: [{ target: 'sda', diskId: 'dk00000001', virtualSize: C, level: 'full', fullReason: 'first', index, bytesRead: C, bytesStored: 1, chunks: 1, newChunks: 1 }],
    });
    return { index, id, key: `snapshots/vm/${backupId}` };
  };
  const first = await backup(1, 0x11);
  const second = await backup(2, 0x22);
  // By the store's clock the first backup is a minute old and the second (all of it) newer than its manifest.
  const at = (file: string, ms: number): void => utimesSync(file, new Date(ms), new Date(ms));
  const now = Date.now();
  for (const f of readdirSync(dir, { recursive: true, withFileTypes: true })) if (f.isFile()) at(join(f.parentPath, f.name), now - 60_000);
  const secondFiles = [join(dir, second.key), join(dir, 'indexes', second.index.slice(0, 2), second.index)];
  for (const f of secondFiles) at(f, now - 30_000);
  await store.loadChunks();
  const secondPack = store.locate(second.id)?.packId ?? '';
  at(join(dir, 'data', secondPack.slice(0, 2), secondPack), now - 30_000);
  at(join(dir, 'index', secondPack), now - 30_000);
  backend.hidden.add(second.key);
  for (let i = 0; i < 2; i++) {
    const r = await collectGarbage(store);
    assert.equal(r.packsDeleted + r.indexesDeleted, 0, `gc ${i + 1} deletes nothing of the hidden backup`);
  }
  backend.hidden.clear();
  const again = await Store.open(new LocalBackend(dir));
  await again.loadChunks();
  assert.ok((await again.readChunk(second.id)).equals(Buffer.alloc(C, 0x22)));
  assert.equal((await again.resolveIndex(second.index)).ids.subarray(0, 32).equals(second.id), true);
  // Its manifest deleted, and all of it older than the quarter of an hour a listing may lag: garbage, collected.
  await again.deleteManifest('vm', second.key.split('/').at(-1) ?? '');
  for (const f of readdirSync(dir, { recursive: true, withFileTypes: true })) if (f.isFile()) at(join(f.parentPath, f.name), now - 3_600_000);
  const r = await collectGarbage(again);
  assert.equal(r.packsDeleted, 1);
  assert.equal(r.indexesDeleted, 1);
  assert.ok((await again.readChunk(first.id)).equals(Buffer.alloc(C, 0x11)));
});
