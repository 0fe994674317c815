// Format 2 building blocks without QEMU: keys, the chunk codec, packs, disk
// indexes and the store, including hostile and damaged objects.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { decodeChunk, encodeChunk, isZero, ZERO_ID } from '../../src/repository/chunk.js';
import { ChunkCompressor } from '../../src/repository/compress.js';
import { chunkId, newMasterKey, unwrapMasterKey, wrapMasterKey } from '../../src/repository/crypto.js';
import { decodeIndex, encodeIndex, resolveChain, type DeltaIndex, type FullIndex } from '../../src/repository/disk-index.js';
import { PackBuilder, parsePack } from '../../src/repository/pack.js';
import { Store } from '../../src/repository/store.js';

const C = 64 * 1024;
const compressor = new ChunkCompressor();
const damaged = (err: unknown): boolean => isQbackupError(err, 'REPO_DAMAGED');

function backend(): LocalBackend {
  return new LocalBackend(mkdtempSync(join(tmpdir(), 'qb-store-')));
}

describe('keys', () => {
  it('a wrapped master key opens with its passphrase only', () => {
    const key = newMasterKey();
    const file = wrapMasterKey(key, 'correct horse', 'h');
    const back = unwrapMasterKey(file, 'correct horse');
    assert.ok(back !== undefined);
    assert.ok(back.dataKey.equals(key.dataKey) && back.idKey.equals(key.idKey));
    assert.equal(unwrapMasterKey(file, 'wrong'), undefined);
  });
  it('chunk ids are SHA-256 plain, HMAC under a key (equal content, equal id; other key, other id)', () => {
    const data = randomBytes(C);
    const k1 = newMasterKey();
    assert.ok(chunkId(data, undefined).equals(chunkId(data, undefined)));
    assert.ok(chunkId(data, k1).equals(chunkId(data, k1)));
    assert.ok(!chunkId(data, k1).equals(chunkId(data, undefined)));
    assert.ok(!chunkId(data, k1).equals(chunkId(data, newMasterKey())));
  });
});

describe('chunk codec', () => {
  for (const key of [undefined, newMasterKey()]) {
    const label = key === undefined ? 'plain' : 'encrypted';
    it(`${label}: round trips compressible and random chunks, and catches any flipped byte`, () => {
      for (const data of [Buffer.alloc(C, 'abc'), randomBytes(C)]) {
        const id = chunkId(data, key);
        const blob = encodeChunk(data, { compressor, key });
        assert.deepEqual(decodeChunk(blob, id, C, { compressor, key }, 'chunk'), data);
        for (const at of [0, 1, blob.length >> 1, blob.length - 1]) {
          const bad = Buffer.from(blob);
          bad[at] = (bad[at] ?? 0) ^ 0x40;
          assert.throws(() => decodeChunk(bad, id, C, { compressor, key }, 'chunk'), damaged);
        }
      }
    });
  }
  it('stores compressible data compressed and random data raw', () => {
    assert.ok(encodeChunk(Buffer.alloc(C, 'abc'), { compressor, key: undefined }).length < C / 10);
    assert.equal(encodeChunk(randomBytes(C), { compressor, key: undefined }).length, C + 1);
  });
  it('knows zero chunks', () => {
    assert.ok(isZero(Buffer.alloc(C)));
    const b = Buffer.alloc(C);
    b[C - 1] = 1;
    assert.ok(!isZero(b));
  });
});

describe('packs', () => {
  it('header and trailer describe every blob; a damaged header is refused', () => {
    const p = new PackBuilder();
    const blobs = [randomBytes(100), randomBytes(2000), randomBytes(7)];
    blobs.forEach((b, i) => p.add(Buffer.alloc(32, i + 1), b, 5000));
    const { pack, packId } = p.finish(undefined);
    assert.match(packId, /^[0-9a-f]{64}$/);
    const entries = parsePack(pack, undefined, 'pack', C);
    assert.deepEqual(entries.map((e) => pack.subarray(e.offset, e.offset + e.length)), blobs);
    const bad = Buffer.from(pack);
    bad.writeUInt32LE(0xffffffff, bad.length - 4);
    assert.throws(() => parsePack(bad, undefined, 'pack', C), damaged);
    const big = Buffer.from(pack);
    big.writeUInt32LE(10_000_000, pack.length - 4 - (pack.readUInt32LE(pack.length - 4)) + 4);
    assert.throws(() => parsePack(big, undefined, 'pack', C), damaged);
  });
});

describe('disk indexes', () => {
  const full = (slots: number, fill: (i: number) => number): FullIndex => {
    const ids = Buffer.alloc(slots * 32);
    for (let i = 0; i < slots; i++) ids.fill(fill(i), i * 32, i * 32 + 32);
    return { kind: 'full', chunkSize: C, virtualSize: slots * C, ids };
  };
  it('a delta chain resolves to the newest table; ids check the content', () => {
    const base = full(10, (i) => i);
    const b = encodeIndex(base, compressor, undefined);
    const delta: DeltaIndex = { kind: 'delta', chunkSize: C, virtualSize: 10 * C, parent: b.indexId, slots: Uint32Array.from([2, 7]), ids: Buffer.concat([Buffer.alloc(32, 99), Buffer.alloc(32, 0)]) };
    const d = encodeIndex(delta, compressor, undefined);
    const back = decodeIndex(d.stored, d.indexId, compressor, undefined, 'index', 1 << 30);
    assert.equal(back.kind, 'delta');
    const table = resolveChain([decodeIndex(b.stored, b.indexId, compressor, undefined, 'index', 1 << 30), back], 'index');
    assert.equal(table.ids[2 * 32], 99);
    assert.equal(table.ids[7 * 32], 0);
    assert.equal(table.ids[3 * 32], 3);
    assert.equal(base.ids[2 * 32], 2, 'the base table is not changed');
    const bad = Buffer.from(d.stored);
    bad[bad.length - 1] = (bad[bad.length - 1] ?? 0) ^ 1;
    assert.throws(() => decodeIndex(bad, d.indexId, compressor, undefined, 'index', 1 << 30), damaged);
  });
  it('refuses out-of-order or out-of-range delta slots and a chain without a full index', () => {
    const mk = (slots: number[]): DeltaIndex => ({ kind: 'delta', chunkSize: C, virtualSize: 4 * C, parent: '00'.repeat(32), slots: Uint32Array.from(slots), ids: Buffer.alloc(slots.length * 32) });
    for (const slots of [[2, 1], [4], [1, 1]]) {
      const e = encodeIndex(mk(slots), compressor, undefined);
      assert.throws(() => decodeIndex(e.stored, e.indexId, compressor, undefined, 'index', 1 << 30), damaged, slots.join(','));
    }
    assert.throws(() => resolveChain([mk([1])], 'index'), damaged);
  });
});

describe('store', () => {
  it('init, write chunks in packs, read them back by id; a second init is refused', async () => {
    const b = backend();
    const s = await Store.init(b);
    await assert.rejects(Store.init(b), (err: unknown) => isQbackupError(err, 'REPO_INVALID'));
    const w = s.chunkWriter();
    const data = [randomBytes(C), Buffer.alloc(C, 7)];
    const ids = data.map((d) => s.chunkId(d));
    for (const [i, d] of data.entries()) await w.add(ids[i] ?? ZERO_ID, d);
    await w.flush();
    const again = await Store.open(b);
    await again.loadChunks();
    assert.equal(again.chunkCount, 2);
    for (const [i, d] of data.entries()) assert.deepEqual(await again.readChunk(ids[i] ?? ZERO_ID), d);
    assert.deepEqual(await again.readChunk(ZERO_ID), Buffer.alloc(C));
  });

  it('encrypted: needs the passphrase, refuses a wrong one, keys can be added and removed', async () => {
    const b = backend();
    const s = await Store.init(b, { password: 'one' });
    await assert.rejects(Store.open(b), (err: unknown) => isQbackupError(err, 'WRONG_PASSWORD'));
    await assert.rejects(Store.open(b, { password: 'two' }), (err: unknown) => isQbackupError(err, 'WRONG_PASSWORD'));
    const second = await s.addKey('two');
    await Store.open(b, { password: 'two' });
    const first = (await s.listKeys()).find((k) => k.id !== second);
    assert.ok(first !== undefined);
    await assert.rejects(s.removeKey(first.id, 'one'), /current passphrase/);
    const viaTwo = await Store.open(b, { password: 'two' });
    await viaTwo.removeKey(first.id, 'two');
    await assert.rejects(Store.open(b, { password: 'one' }), (err: unknown) => isQbackupError(err, 'WRONG_PASSWORD'));
    // nothing readable in plain text: a chunk of a known pattern is not in any pack file
    const w = viaTwo.chunkWriter();
    const secret = Buffer.alloc(C, 'SECRET-PATTERN-');
    await w.add(viaTwo.chunkId(secret), secret);
    await w.flush();
    const dataDir = join(b.root, 'data');
    for (const sub of readdirSync(dataDir)) for (const f of readdirSync(join(dataDir, sub))) assert.ok(!readFileSync(join(dataDir, sub, f)).includes('SECRET-PATTERN-'));
  });

  it('a chunk whose stored bytes were changed is reported as damaged, naming it', async () => {
    const b = backend();
    const s = await Store.init(b);
    const w = s.chunkWriter();
    const data = randomBytes(C);
    const id = s.chunkId(data);
    await w.add(id, data);
    await w.flush();
    const loc = s.locate(id);
    assert.ok(loc !== undefined);
    const file = join(b.root, 'data', loc.packId.slice(0, 2), loc.packId);
    const bytes = readFileSync(file);
    bytes[loc.offset + 10] = (bytes[loc.offset + 10] ?? 0) ^ 1;
    writeFileSync(file, bytes);
    await assert.rejects(s.readChunk(id), (err: unknown) => damaged(err) && new RegExp(id.toString('hex')).test((err as Error).message));
  });

  it('a repository of a newer format or a damaged config is refused with one sentence', async () => {
    const b = backend();
    await b.putIfAbsent('config', Buffer.from(JSON.stringify({ format: 3 })));
    await assert.rejects(Store.open(b), /format 3, newer/);
    const c = backend();
    await c.putIfAbsent('config', Buffer.from('null'));
    await assert.rejects(Store.open(c), (err: unknown) => isQbackupError(err) && !/\n/.test((err as Error).message));
    await assert.rejects(Store.open(backend()), /not a qbackup repository/);
  });
});
