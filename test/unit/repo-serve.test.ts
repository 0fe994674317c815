// serveBackup on a real local store built in the test (no QEMU): an
// encrypted repository with a disk whose size is not a multiple of the chunk
// size, holes, a chunk used twice. Reads through NbdClient decrypt,
// decompress and check every chunk; base:allocation marks holes; the serve
// lock is held while serving (gc condemns instead of deleting) and released
// on close; the default socket lives in a private directory under runDir.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync, utimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { NBD_CONTEXT_BASE_ALLOCATION, NBD_STATE_HOLE, NbdClient } from '../../src/nbd/index.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { ZERO_ID } from '../../src/repository/chunk.js';
import { collectGarbage } from '../../src/repository/gc.js';
import { liveLocks } from '../../src/repository/locks.js';
import { serveBackup } from '../../src/repository/serve.js';
import { Store } from '../../src/repository/store.js';
import { oneDiskFullManifest } from '../helpers/repo.js';

const C = 64 * 1024;

describe('serveBackup on an encrypted store', () => {
  let dir: string;
  let store: Store;
  let disk: Buffer;
  const SIZE = 5 * C + 1000; // the last slot is partial
  const manifestId = '20260101T000000.000Z-0001';

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'qbt-reposerve-'));
    store = await Store.init(new LocalBackend(join(dir, 'repo')), { password: 'secret' });
    disk = Buffer.alloc(SIZE);
    randomBytes(C).copy(disk, 0); // slot 0
    disk.fill(0x5a, C, 2 * C); // slot 1
    // slot 2 and 3: zero (holes)
    disk.fill(0x5a, 4 * C, 5 * C); // slot 4 = slot 1's chunk
    randomBytes(1000).copy(disk, 5 * C); // slot 5, partial
    const writer = store.chunkWriter();
    const ids = Buffer.alloc(6 * 32);
    for (let s = 0; s < 6; s++) {
      const data = Buffer.alloc(C);
      disk.copy(data, 0, s * C, Math.min(SIZE, (s + 1) * C));
      if (data.equals(Buffer.alloc(C))) continue;
      const id = store.chunkId(data);
      await writer.add(id, data);
      id.copy(ids, s * 32);
    }
    await writer.flush();
    const index = await store.putIndex({ kind: 'full', chunkSize: C, virtualSize: SIZE, ids });
    await store.putManifest(oneDiskFullManifest(manifestId, index, SIZE, { total: 4, new: 3 }));
    assert.ok(ids.subarray(2 * 32, 3 * 32).equals(ZERO_ID), 'slot 2 is a hole');
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('without block status (blockStatus: false) offers no base:allocation and still reads every byte', async () => {
    const opened = await Store.open(new LocalBackend(join(dir, 'repo')), { password: 'secret' });
    await using server = await serveBackup(opened, { domain: 'vm', listen: { transport: 'unix' }, runDir: join(dir, 'state', 'run'), blockStatus: false });
    const socket = server.listen.transport === 'unix' ? server.listen.socket : '';
    await using c = await NbdClient.connect({ socket }, { exportName: 'vda', metaContexts: [NBD_CONTEXT_BASE_ALLOCATION] });
    assert.equal(c.contexts.size, 0);
    assert.ok((await c.read(0, SIZE)).equals(disk));
  });

  it('reads every byte (decrypted, checked), maps holes, holds a serve lock gc respects, and cleans up on close', async () => {
    const opened = await Store.open(new LocalBackend(join(dir, 'repo')), { password: 'secret' });
    const runDir = join(dir, 'state', 'run');
    const server = await serveBackup(opened, { domain: 'vm', listen: { transport: 'unix' }, runDir });
    assert.equal(server.backup, manifestId);
    const socket = server.listen.transport === 'unix' ? server.listen.socket : '';
    assert.equal(statSync(dirname(socket)).mode & 0o777, 0o700);
    assert.deepEqual(server.exports.map((e) => [e.name, e.size]), [['vda', SIZE]]);
    {
      await using c = await NbdClient.connect({ socket }, { exportName: 'vda', metaContexts: [NBD_CONTEXT_BASE_ALLOCATION] });
      assert.ok((await c.read(0, SIZE)).equals(disk));
      assert.ok((await c.read(C - 10, 3 * C)).equals(disk.subarray(C - 10, 4 * C - 10)));
      assert.ok((await c.read(SIZE - 7, 7)).equals(disk.subarray(SIZE - 7)));
      const extents = await c.extents(NBD_CONTEXT_BASE_ALLOCATION);
      assert.deepEqual(extents.filter((e) => (e.flags & NBD_STATE_HOLE) !== 0).map((e) => [e.offset, e.length]), [[2 * C, 2 * C]]);
      assert.equal(extents.reduce((n, e) => n + e.length, 0), SIZE);
    }
    const locks = await liveLocks(opened.backend);
    assert.deepEqual(locks.map((l) => [l.info.kind, l.info.domain]), [['serve', 'vm']]);
    // The backup is deleted (as prune would); gc must not free its data while it is served.
    await opened.deleteManifest('vm', manifestId);
    // With no manifest left, gc takes for garbage only what is older than a listing may lag (gc.ts step 7): date the repository back.
    const past = new Date(Date.now() - 3_600_000);
    for (const f of readdirSync(join(dir, 'repo'), { recursive: true, withFileTypes: true })) if (f.isFile()) utimesSync(join(f.parentPath, f.name), past, past);
    const report = await collectGarbage(opened);
    assert.equal(report.packsDeleted + report.indexesDeleted + report.packsRepacked, 0);
    assert.ok(report.condemned > 0);
    {
      await using c = await NbdClient.connect({ socket }, { exportName: 'vda' });
      assert.ok((await c.read(0, SIZE)).equals(disk), 'still served whole');
    }
    await server.close();
    await server.close();
    assert.equal(existsSync(dirname(socket)), false);
    assert.deepEqual(await liveLocks(opened.backend), []);
    const after = await collectGarbage(opened);
    assert.ok(after.packsDeleted > 0, 'the data goes once serving stopped');
  });

  it('(after the first test deleted the only backup) a missing backup and TCP without TLS are refused, leaving no lock', async () => {
    const opened = await Store.open(new LocalBackend(join(dir, 'repo')), { password: 'secret' });
    await assert.rejects(serveBackup(opened, { domain: 'vm', listen: { transport: 'unix' }, runDir: join(dir, 'run2') }), /no backup of domain "vm"/);
    await assert.rejects(serveBackup(opened, { domain: 'vm', listen: { transport: 'tcp', host: '127.0.0.1', port: 0 } }), (err: Error & { code?: string }) => err.code === 'NOT_SUPPORTED');
    assert.deepEqual(await liveLocks(opened.backend), []);
  });
});
