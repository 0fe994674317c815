// verify --read-data on a real local store: every pack is hashed whole
// against its id, so a flipped byte anywhere in it is found — in a chunk
// (named as that chunk), in the salt before the chunks or in the trailer
// (the embedded copy of the pack's index; named as the pack) — plain and
// encrypted; an intact repository verifies clean; chunks whose pack lost its
// index are named with that pack; a damaged chunk is named with the sentence
// a restore of it gives, and only it, whether its pack is checked on a
// worker (a large pack) or on the calling thread (a small one).

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { LocalBackend } from '../../src/repository/backend/local.js';
import type { Manifest } from '../../src/repository/manifest.js';
import { describeError } from '../../src/errors.js';
import { INLINE_DECODE_BYTES } from '../../src/repository/decode.js';
import { packKey } from '../../src/repository/pack.js';
import { Store } from '../../src/repository/store.js';
import { verifyStore } from '../../src/repository/verify.js';

const C = 64 * 1024;
const CHUNKS = 40;

/** A store with one backup of CHUNKS chunks (half random, half compressible) in one pack. */
async function oneBackup(password?: string, chunks = CHUNKS): Promise<{ store: Store; root: string; packId: string }> {
  const root = mkdtempSync(join(tmpdir(), 'qb-verify-'));
  const store = await Store.init(new LocalBackend(root), { password });
  const writer = store.chunkWriter();
  const table = Buffer.alloc(chunks * 32);
  for (let i = 0; i < chunks; i++) {
    const data = i % 2 === 0 ? randomBytes(C) : Buffer.alloc(C, `chunk ${i} `);
    const id = store.chunkId(data);
    await writer.add(id, data);
    id.copy(table, i * 32);
  }
  await writer.flush();
  const index = await store.putIndex({ kind: 'full', chunkSize: C, virtualSize: chunks * C, ids: table });
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
    disks: [{ target: 'sda', diskId: 'dk00000001', virtualSize: chunks * C, level: 'full', fullReason: 'first', index, bytesRead: chunks * C, bytesStored: 1, chunks, newChunks: chunks }],
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
    for (const chunks of [3, CHUNKS]) {
      test(`damaged chunks in a pack of ${chunks} chunks are each named with the sentence a restore gives, the others certified`, async () => {
        const { store, root, packId } = await oneBackup(password, chunks);
        const file = join(root, packKey(packId));
        assert.equal(statSync(file).size < INLINE_DECODE_BYTES, chunks === 3, 'the small pack is checked on the calling thread, the large one on a worker');
        const entries = (await store.packEntries(packId)).sort((a, b) => a.offset - b.offset);
        // A random chunk (stored raw) and a compressible one (zstd), each with one byte flipped in its middle.
        const hit = [entries[0], entries[1]].map((e) => {
          assert.ok(e !== undefined);
          flip(file, e.offset + Math.floor(e.length / 2));
          return e.id;
        });
        const again = await Store.open(new LocalBackend(root), { password });
        await again.loadChunks();
        const expected = await Promise.all(hit.map(async (id) => [`chunk ${id.toString('hex')}`, await again.readChunk(id).then(() => 'intact', describeError)] as const));
        const report = await verifyStore(again, { readData: true });
        const byObject = (a: readonly string[], b: readonly string[]): number => (a[0] ?? '').localeCompare(b[0] ?? '');
        assert.deepEqual(report.problems.map((p) => [p.object, p.problem]).sort(byObject), expected.map((e) => [...e]).sort(byObject));
        for (const p of report.problems) assert.deepEqual(p.backups, ['vm/20260101T000000.000Z-0001']);
        assert.equal(report.chunksRead, chunks);
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
