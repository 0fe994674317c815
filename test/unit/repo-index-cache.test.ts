// The pack indexes a process has read are kept (src/repository/index-cache.ts)
// and checked against the listing of index/ on every load: a pack that is
// gone is forgotten, a new one is read, a condemned one is left out, and one
// store's view never leaks into another's.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { clearPackIndexCache } from '../../src/repository/index-cache.js';
import { packIndexKey } from '../../src/repository/pack.js';
import { Store } from '../../src/repository/store.js';

const C = 64 * 1024;

async function storeChunks(s: Store, n: number): Promise<Buffer[]> {
  const w = s.chunkWriter();
  const ids: Buffer[] = [];
  for (let i = 0; i < n; i++) {
    const d = randomBytes(C);
    const id = s.chunkId(d);
    await w.add(id, d);
    ids.push(id);
  }
  await w.flush();
  return ids;
}

async function packIds(b: LocalBackend): Promise<string[]> {
  return (await b.list('index/')).map(({ key }) => key.slice(6));
}

describe('pack index cache', () => {
  it('answers like a fresh read after packs are added, removed and condemned', async () => {
    clearPackIndexCache();
    const b = new LocalBackend(mkdtempSync(join(tmpdir(), 'qb-icache-')));
    const writer = await Store.init(b);
    const first = await storeChunks(writer, 3);
    const [packA] = await packIds(b);
    assert.ok(packA !== undefined);

    const reader = await Store.open(b);
    await reader.loadChunks();
    assert.ok(first.every((id) => reader.has(id)));

    // A pack stored by another store in this process, then one stored by another process (cache cleared for it).
    const second = await storeChunks(await Store.open(b), 2);
    await reader.loadChunks();
    assert.ok(second.every((id) => reader.has(id)));

    // Condemned packs are left out of one load, and still known to the next one without `skip`.
    await reader.loadChunks(new Set([packA]));
    assert.ok(first.every((id) => !reader.has(id)));
    assert.ok(second.every((id) => reader.has(id)));
    const other = await Store.open(b);
    await other.loadChunks();
    assert.ok(first.every((id) => other.has(id)), 'one store\'s skipped packs are not another\'s');

    // A pack index removed from the repository is forgotten.
    await b.delete(packIndexKey(packA));
    await reader.loadChunks();
    assert.ok(first.every((id) => !reader.has(id)));
    assert.ok(second.every((id) => reader.has(id)));

    // The same answers as a process that never read anything.
    clearPackIndexCache();
    const fresh = await Store.open(b);
    await fresh.loadChunks();
    assert.equal(fresh.chunkCount, reader.chunkCount);
  });
});
