// Restore to a new image from a local repository (the copy path: decode
// workers read the packs and write the image themselves) without QEMU: for
// plain and encrypted stores and chunk sizes below, at and above the qcow2
// cluster, with random, compressible, repeated and zero chunks and a short
// last chunk, the raw and the qcow2 image hold exactly the disk's bytes
// (qcow2 checked by qemu-img), raw holes and unallocated clusters stay where
// the disk had zero chunks; a damaged chunk fails the restore in one
// sentence naming it and leaves no file. From a backend whose packs the
// workers cannot open (object storage), the same images come through
// readChunks and this thread's writes.

import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import type { Backend } from '../../src/repository/backend/backend.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { isZero, ZERO_ID } from '../../src/repository/chunk.js';
import { chunkId } from '../../src/repository/crypto.js';
import type { FullIndex } from '../../src/repository/disk-index.js';
import { restoreToFile } from '../../src/repository/restore.js';
import { Store } from '../../src/repository/store.js';
import { flipByte } from '../helpers/repo.js';
import { seededRandom } from './seeded.js';

const KiB = 1024;

describe('restore to a new image through the copy path', () => {
  const dir = mkdtempSync(join(tmpdir(), 'qb-restore-copy-'));
  after(() => rmSync(dir, { recursive: true, force: true }));
  let n = 0;

  /** A disk of `slots` chunks (the last one short) stored in a new repository; its bytes, store and index. */
  async function storedDisk(chunkSize: number, password: string | undefined): Promise<{ disk: Buffer; store: Store; table: FullIndex }> {
    const random = seededRandom(chunkSize + (password === undefined ? 0 : 1));
    const slots = 96;
    const virtualSize = slots * chunkSize - 512;
    const disk = Buffer.alloc(virtualSize);
    const repeated = randomBytes(chunkSize);
    for (let s = 0; s < slots; s++) {
      const kind = random.int(4);
      const at = s * chunkSize;
      const end = Math.min(at + chunkSize, virtualSize);
      if (kind === 0) continue; // a zero chunk
      if (kind === 1) randomBytes(end - at).copy(disk, at);
      if (kind === 2) disk.fill(`line ${s} of a log that compresses well\n`, at, end);
      if (kind === 3) repeated.copy(disk, at, 0, end - at);
    }
    const store = await Store.init(new LocalBackend(join(dir, `repo-${n++}`)), { chunkSize, password });
    const ids = Buffer.alloc(slots * 32);
    const writer = store.chunkWriter();
    for (let s = 0; s < slots; s++) {
      const data = Buffer.alloc(chunkSize);
      disk.copy(data, 0, s * chunkSize, Math.min((s + 1) * chunkSize, virtualSize));
      if (isZero(data)) {
        ZERO_ID.copy(ids, s * 32);
        continue;
      }
      const id = chunkId(data, store.key);
      id.copy(ids, s * 32);
      await writer.add(id, data);
    }
    await writer.flush();
    return { disk, store, table: { kind: 'full', chunkSize, virtualSize, ids } };
  }

  for (const chunkSize of [4 * KiB, 64 * KiB, 256 * KiB]) {
    for (const password of [undefined, 'secret']) {
      test(`${chunkSize / KiB} KiB chunks, ${password === undefined ? 'plain' : 'encrypted'}: raw and qcow2 hold exactly the disk's bytes`, async () => {
        const { disk, store, table } = await storedDisk(chunkSize, password);
        assert.ok(store.copiesToFiles);
        const raw = join(dir, `r${n}.raw`);
        await restoreToFile(store, table, raw, 'raw', { what: 'disk "sda" of backup "b"' });
        assert.ok(readFileSync(raw).equals(disk), 'the raw image holds the disk');
        const qcow2 = join(dir, `r${n}.qcow2`);
        await restoreToFile(store, table, qcow2, 'qcow2', { what: 'disk "sda" of backup "b"' });
        const check = spawnSync('qemu-img', ['check', '-f', 'qcow2', qcow2], { encoding: 'utf8' });
        assert.equal(check.status, 0, check.stdout + check.stderr);
        const converted = join(dir, `r${n}.converted`);
        execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow2, converted]);
        assert.ok(readFileSync(converted).equals(disk), 'the qcow2 image holds the disk');
        // Zero chunks stay holes: the qcow2 image allocates no cluster that only zero chunks cover.
        const map = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', '-f', 'qcow2', qcow2], { encoding: 'utf8' })) as Array<{ start: number; length: number; data: boolean }>;
        const clusterBytes = 64 * KiB;
        for (const m of map.filter((x) => x.data)) {
          for (let c = m.start; c < m.start + m.length; c += clusterBytes) {
            assert.ok(!isZero(disk.subarray(c, Math.min(c + clusterBytes, disk.length))) || chunkSize > clusterBytes, `cluster at ${c} holds data`);
          }
        }
        assert.ok(statSync(raw).blocks * 512 < disk.length + 64 * KiB);
        for (const f of [raw, qcow2, converted]) rmSync(f);
      });
    }
  }

  test('from a backend whose packs workers cannot open (object storage), raw and qcow2 are written from this thread, byte-exact', async () => {
    const { disk, store: local, table } = await storedDisk(64 * KiB, undefined);
    const inner = local.backend;
    const remote: Backend = {
      location: inner.location,
      putIfAbsent: (k, d) => inner.putIfAbsent(k, d),
      get: (k, r) => inner.get(k, r),
      stat: (k) => inner.stat(k),
      list: (p) => inner.list(p),
      delete: (k) => inner.delete(k),
    };
    const store = await Store.open(remote);
    await store.loadChunks();
    assert.ok(!store.copiesToFiles);
    for (const format of ['raw', 'qcow2'] as const) {
      const file = join(dir, `remote-${n++}.${format}`);
      await restoreToFile(store, table, file, format, { what: 'disk "sda" of backup "b"' });
      const raw = format === 'raw' ? file : `${file}.raw`;
      if (format === 'qcow2') execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', file, raw]);
      assert.ok(readFileSync(raw).equals(disk), `the ${format} image holds the disk`);
    }
  });

  test('a damaged chunk fails the restore in one sentence naming it, and no file is left', async () => {
    const { store, table } = await storedDisk(64 * KiB, undefined);
    let slot = 0;
    while (table.ids.subarray(slot * 32, slot * 32 + 32).equals(ZERO_ID)) slot++;
    const id = table.ids.subarray(slot * 32, slot * 32 + 32);
    const loc = store.locate(id);
    assert.ok(loc !== undefined);
    flipByte(join(store.location, 'data', loc.packId.slice(0, 2), loc.packId), loc.offset + Math.floor(loc.length / 2));
    const out = join(dir, 'damaged');
    for (const format of ['raw', 'qcow2'] as const) {
      await assert.rejects(restoreToFile(store, table, join(out, `sda.${format}`), format, { what: 'disk "sda" of backup "b"' }), (err: unknown) => {
        assert.ok(isQbackupError(err, 'REPO_DAMAGED'));
        assert.match(err.message, new RegExp(`^Cannot restore disk "sda" of backup "b": Chunk ${id.toString('hex')} in pack "${loc.packId}" is damaged`));
        return true;
      });
      assert.deepEqual(existsSync(out) ? readdirSync(out) : [], [], 'no restored or partial file is left');
    }
  });
});
