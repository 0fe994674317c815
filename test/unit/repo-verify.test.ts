// verify --read-data on a real local store: every pack is hashed whole
// against its id, so a flipped byte anywhere in it is found — in a chunk
// (named as that chunk), in the salt before the chunks or in the trailer
// (the embedded copy of the pack's index; named as the pack) — plain and
// encrypted; an intact repository verifies clean; chunks whose pack lost its
// index are named with that pack.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { LocalBackend } from '../../src/repository/backend/local.js';
import type { Manifest } from '../../src/repository/manifest.js';
import { packKey } from '../../src/repository/pack.js';
import { Store } from '../../src/repository/store.js';
import { verifyStore } from '../../src/repository/verify.js';

const C = 64 * 1024;
const CHUNKS = 40;

/** A store with one backup of CHUNKS chunks (half random, half compressible) in one pack. */
async function oneBackup(password?: string): Promise<{ store: Store; root: string; packId: string }> {
  const root = mkdtempSync(join(tmpdir(), 'qb-verify-'));
  const store = await Store.init(new LocalBackend(root), { password });
  const writer = store.chunkWriter();
  const table = Buffer.alloc(CHUNKS * 32);
  for (let i = 0; i < CHUNKS; i++) {
    const data = i % 2 === 0 ? randomBytes(C) : Buffer.alloc(C, `chunk ${i} `);
    const id = store.chunkId(data);
    await writer.add(id, data);
    id.copy(table, i * 32);
  }
  await writer.flush();
  const index = await store.putIndex({ kind: 'full', chunkSize: C, virtualSize: CHUNKS * C, ids: table });
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
    disks: [{ target: 'sda', diskId: 'dk00000001', virtualSize: CHUNKS * C, level: 'full', fullReason: 'first', index, bytesRead: CHUNKS * C, bytesStored: 1, chunks: CHUNKS, newChunks: CHUNKS }],
  };
  await store.putManifest(manifest);
  const packs = (await store.backend.list('index/')).map((o) => o.key.slice(6));
  assert.equal(packs.length, 1);
  return { store, root, packId: packs[0] ?? '' };
}

function flip(file: string, offset: number): void {
  const bytes = readFileSync(file);
  bytes[offset] = (bytes[offset] ?? 0) ^ 0x01;
  writeFileSync(file, bytes);
}

for (const encrypted of [false, true]) {
  describe(`verify --read-data (${encrypted ? 'encrypted' : 'plain'})`, () => {
    const password = encrypted ? 'pw' : undefined;
    test('an intact repository verifies clean, every chunk read', async () => {
      const { store } = await oneBackup(password);
      const report = await verifyStore(store, { readData: true });
      assert.deepEqual(report.problems, []);
      assert.equal(report.chunksRead, CHUNKS);
    });
    for (const where of ['salt', 'chunk', 'trailer'] as const) {
      test(`a flipped byte in a pack's ${where} is found`, async () => {
        const { store, root, packId } = await oneBackup(password);
        const file = join(root, packKey(packId));
        const size = statSync(file).size;
        flip(file, where === 'salt' ? 3 : where === 'chunk' ? 16 + 100 : size - 10);
        const again = await Store.open(new LocalBackend(root), { password });
        const report = await verifyStore(again, { readData: true });
        if (where === 'chunk') {
          // The damaged chunk explains the pack's hash: it is named, with the backups using it.
          assert.deepEqual(report.problems.map((p) => [p.object.slice(0, 6), p.backups]), [['chunk ', ['vm/20260101T000000.000Z-0001']]], JSON.stringify(report.problems));
        } else if (where === 'salt') {
          assert.deepEqual(report.problems.map((p) => [p.object, p.backups]), [[`pack ${packId}`, ['vm/20260101T000000.000Z-0001']]], JSON.stringify(report.problems));
          assert.match(report.problems[0]?.problem ?? '', /does not|not to its id/);
        } else {
          // The trailer is the embedded copy of the pack's index: the pack no longer hashes to its id, and its index object no longer equals it.
          const pack = report.problems.find((p) => p.object === `pack ${packId}`);
          assert.ok(pack !== undefined, JSON.stringify(report.problems));
          assert.match(pack.problem, /does not|not to its id/);
          assert.ok(report.problems.some((p) => p.object === `index ${packId}`), JSON.stringify(report.problems));
        }
        // Without reading data, no chunk is read: only the metadata check (each pack index against its pack's trailer) can speak.
        const quick = (await verifyStore(again)).problems.map((p) => p.object);
        assert.deepEqual(quick, where === 'trailer' ? [`index ${packId}`] : []);
      });
    }
    test('a lost pack index: the missing chunks name the pack (repair rebuilds it); a pack without index and no chunk missing is no problem', async () => {
      const { store, root, packId } = await oneBackup(password);
      // Garbage of a killed writer: a pack whose index was never written, holding nothing any backup uses.
      const writer = store.chunkWriter();
      const stray = randomBytes(C);
      await writer.add(store.chunkId(stray), stray);
      await writer.flush();
      const strayPack = (await store.backend.list('index/')).map((o) => o.key.slice(6)).find((id) => id !== packId) ?? '';
      rmSync(join(root, 'index', strayPack));
      assert.deepEqual((await verifyStore(await Store.open(new LocalBackend(root), { password }))).problems, []);
      rmSync(join(root, 'index', packId));
      const report = await verifyStore(await Store.open(new LocalBackend(root), { password }));
      assert.ok(report.problems.length > 0);
      for (const p of report.problems) assert.match(p.problem, new RegExp(`its pack "${packId}" has lost its index`));
    });
  });
}
