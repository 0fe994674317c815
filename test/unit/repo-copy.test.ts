// The planning parts of `qbackup copy`, without QEMU: which backups are
// copied or skipped, which index links the target already has, and how a
// link is rewritten with the target's chunk ids and parent. Then a copy
// between two repositories of in-memory chunks on local directories: ids
// translated, chains kept, a second copy a no-op.

import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync, utimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { QbackupError } from '../../src/errors.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { ZERO_ID } from '../../src/repository/chunk.js';
import { collectGarbage } from '../../src/repository/gc.js';
import { acquireLock } from '../../src/repository/locks.js';
import { chainIds, copyBackups, firstLinkToWrite, knownIndexes, planCopy, translateIndex } from '../../src/repository/copy.js';
import type { DiskIndex, FullIndex } from '../../src/repository/disk-index.js';
import type { Manifest } from '../../src/repository/manifest.js';
import { Store } from '../../src/repository/store.js';

const hex = (n: number): string => n.toString(16).padStart(64, '0');

function manifest(domain: string, id: string, time: string, index: string): Manifest {
  return {
    format: 2, id, domain, uuid: 'u', time, endTime: time, checkpoint: `qb-${id}`, consistency: 'crash', domainXml: '<domain/>',
    disks: [{ target: 'sda', diskId: 'dk00000001', virtualSize: 4 * 65536, level: 'full', fullReason: null, index, bytesRead: 0, bytesStored: 0, chunks: 0, newChunks: 0 }],
  };
}

const A1 = manifest('a', '20260101T000000.000Z-0001', '2026-01-01T00:00:00.000Z', hex(1));
const A2 = manifest('a', '20260102T000000.000Z-0002', '2026-01-02T00:00:00.000Z', hex(2));
const B1 = manifest('b', '20260101T120000.000Z-0003', '2026-01-01T12:00:00.000Z', hex(3));

describe('copy planning', () => {
  test('copies what the target lacks, oldest first; skips what it holds; refuses unknown ids', () => {
    const plan = planCopy([A2, B1, A1], [{ ...A1, disks: [{ ...(A1.disks[0] as Manifest['disks'][number]), index: hex(11) }] }], {});
    assert.deepEqual(plan.copy.map((m) => m.id), [B1.id, A2.id]);
    assert.deepEqual(plan.skip, [{ domain: 'a', id: A1.id, reason: 'already in the target repository' }]);
    assert.deepEqual(planCopy([A1, A2, B1], [], { domain: 'a' }).copy.map((m) => m.id), [A1.id, A2.id]);
    assert.deepEqual(planCopy([A1, A2, B1], [], { backups: [B1.id] }).copy.map((m) => m.id), [B1.id]);
    assert.deepEqual(planCopy([A1, A2, B1], [A1, A2, B1], {}).copy, [], 'a second copy copies nothing');
    assert.throws(() => planCopy([A1, B1], [], { domain: 'a', backups: [B1.id] }), (e: unknown) => e instanceof QbackupError && e.code === 'BACKUP_NOT_FOUND' && /of domain "a"/.test(e.message));
  });

  test('known indexes pair the disks of backups both hold; writing starts after the newest known link', () => {
    const known = knownIndexes([A1, A2, B1], [{ ...A1, disks: [{ ...(A1.disks[0] as Manifest['disks'][number]), index: hex(11) }] }]);
    assert.deepEqual([...known], [[hex(1), hex(11)]]);
    // A disk that changed identity or size in the target is not paired.
    assert.equal(knownIndexes([A1], [{ ...A1, disks: [{ ...(A1.disks[0] as Manifest['disks'][number]), diskId: 'dk00000002' }] }]).size, 0);
    assert.equal(firstLinkToWrite([hex(1), hex(2), hex(4)], known), 1);
    assert.equal(firstLinkToWrite([hex(5), hex(6)], known), 0);
    assert.equal(firstLinkToWrite([hex(1)], known), 1, 'nothing to write');
  });

  test('chain ids follow the parents back to the full index; a link is rewritten with mapped ids and the new parent', () => {
    const full: FullIndex = { kind: 'full', chunkSize: 65536, virtualSize: 3 * 65536, ids: Buffer.concat([Buffer.alloc(32, 1), ZERO_ID, Buffer.alloc(32, 2)]) };
    const delta: DiskIndex = { kind: 'delta', chunkSize: 65536, virtualSize: 3 * 65536, parent: hex(7), slots: Uint32Array.of(1), ids: Buffer.alloc(32, 3) };
    assert.deepEqual(chainIds(hex(8), [full, delta]), [hex(7), hex(8)]);
    const map = (id: Buffer): Buffer => Buffer.alloc(32, (id[0] ?? 0) + 100);
    const f2 = translateIndex(full, undefined, map);
    assert.deepEqual([...f2.ids.subarray(0, 32)], new Array(32).fill(101));
    assert.ok(f2.ids.subarray(32, 64).equals(ZERO_ID), 'holes stay holes');
    const d2 = translateIndex(delta, hex(9), map);
    assert.equal(d2.kind, 'delta');
    assert.equal(d2.kind === 'delta' ? d2.parent : '', hex(9));
    assert.deepEqual([...(d2.kind === 'delta' ? d2.slots : [])], [1]);
    assert.throws(() => translateIndex(delta, undefined, map), /has a parent in the target/);
  });
});

describe('copy between two local repositories (no QEMU)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'qbt-copyunit-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  /** Writes a backup of one 4-chunk disk: a full index, or a delta on `parent`. */
  async function write(store: Store, id: string, slots: Array<Buffer | null>, parent?: string): Promise<Manifest> {
    const writer = store.chunkWriter();
    const ids: Buffer[] = [];
    for (const data of slots) {
      const cid = data === null ? ZERO_ID : store.chunkId(data);
      if (data !== null) await writer.add(cid, data);
      ids.push(cid);
    }
    await writer.flush();
    const index: DiskIndex =
      parent === undefined
        ? { kind: 'full', chunkSize: 65536, virtualSize: 4 * 65536, ids: Buffer.concat(ids) }
        : { kind: 'delta', chunkSize: 65536, virtualSize: 4 * 65536, parent, slots: Uint32Array.from(slots.map((_, i) => i).filter((i) => slots[i] !== null)), ids: Buffer.concat(ids.filter((_, i) => slots[i] !== null)) };
    const m = manifest('a', id, `2026-01-0${id.slice(-1)}T00:00:00.000Z`, await store.putIndex(index));
    await store.putManifest(m);
    return m;
  }

  test('encrypted source into a plain target: ids translated, the delta stays a delta, restored tables equal, again a no-op', async () => {
    const source = await Store.init(new LocalBackend(join(dir, 's')), { password: 'pw' });
    const target = await Store.init(new LocalBackend(join(dir, 't')));
    const c = (n: number): Buffer => Buffer.alloc(65536, n);
    const m1 = await write(source, '20260101T000000.000Z-0001', [c(1), c(2), null, c(3)]);
    const m2 = await write(source, '20260102T000000.000Z-0002', [null, c(4), null, null], m1.disks[0]?.index);
    const r = await copyBackups(source, target, {});
    assert.equal(r.reencrypted, true);
    assert.deepEqual(r.copied.map((b) => b.id), [m1.id, m2.id]);
    assert.equal(r.chunksRead, 4);
    assert.equal(r.chunksStored, 4);
    const t2 = await target.getManifest('a', m2.id);
    assert.equal((await target.getIndex(t2.disks[0]?.index ?? '')).kind, 'delta');
    await target.loadChunks();
    const table = await target.resolveIndex(t2.disks[0]?.index ?? '');
    const want = [c(1), c(4), null, c(3)].map((d) => (d === null ? ZERO_ID : target.chunkId(d)));
    assert.ok(table.ids.equals(Buffer.concat(want)));
    for (const d of [c(1), c(4), c(3)]) assert.ok((await target.readChunk(target.chunkId(d))).equals(d));
    const again = await copyBackups(source, target, {});
    assert.deepEqual(again.copied, []);
    assert.equal(again.skipped.length, 2);
    assert.equal(again.chunksRead, 0);
  });

  test('copy locks on the source: two coexist; gc under them condemns garbage instead of deleting it', async () => {
    const store = await Store.init(new LocalBackend(join(dir, 'g')));
    const c = (n: number): Buffer => Buffer.alloc(65536, n);
    await write(store, '20260101T000000.000Z-0001', [c(1), null, null, null]);
    const gone = await write(store, '20260102T000000.000Z-0002', [c(2), c(3), null, null]);
    await store.deleteManifest('a', gone.id);
    // gc leaves alone what was written after the newest manifest it lists (a stale listing may hide its manifest, gc.ts step 7): date the garbage back.
    const past = new Date(Date.now() - 60_000);
    for (const sub of ['data', 'index', 'indexes']) for (const f of readdirSync(join(dir, 'g', sub), { recursive: true, withFileTypes: true })) if (f.isFile()) utimesSync(join(f.parentPath, f.name), past, past);
    const first = await acquireLock(store.backend, 'copy', null);
    const second = await acquireLock(store.backend, 'copy', null);
    try {
      const held = await collectGarbage(store);
      assert.equal(held.packsDeleted, 0, 'a copy may still read it');
      assert.equal(held.condemned, 2, 'its pack and its index wait');
    } finally {
      await second.release();
      await first.release();
    }
    const free = await collectGarbage(store);
    assert.equal(free.packsDeleted, 1);
    assert.equal(free.indexesDeleted, 1);
  });
});
