// The one conformance suite every repository backend must pass. A backend's
// test file only constructs it and hands it here, so all backends are held
// to the same behaviour (atomic put-if-absent, ranges, listings, idempotent
// delete, key rules).

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import type { Backend } from '../../src/repository/backend/backend.js';
import { isQbackupError } from '../../src/errors.js';

export function backendConformance(name: string, open: () => Promise<Backend>): void {
  describe(`backend conformance: ${name}`, () => {
    it('stores and reads back an object, whole and by range', async () => {
      const b = await open();
      const data = randomBytes(300_000);
      assert.equal(await b.putIfAbsent('data/ab/obj1', data), true);
      assert.deepEqual(await b.get('data/ab/obj1'), data);
      assert.deepEqual(await b.get('data/ab/obj1', { offset: 1000, length: 5000 }), data.subarray(1000, 6000));
      assert.deepEqual(await b.stat('data/ab/obj1'), { key: 'data/ab/obj1', size: data.length });
    });

    it('put-if-absent never replaces: the second writer gets false and the first content stays', async () => {
      const b = await open();
      assert.equal(await b.putIfAbsent('config', Buffer.from('one')), true);
      assert.equal(await b.putIfAbsent('config', Buffer.from('two')), false);
      assert.equal((await b.get('config')).toString(), 'one');
    });

    it('of 16 racing writers on one key exactly one wins, and its bytes are whole', async () => {
      const b = await open();
      const bodies = Array.from({ length: 16 }, (_, i) => Buffer.alloc(64 * 1024, i));
      const won = await Promise.all(bodies.map((body) => b.putIfAbsent('locks/race', body)));
      assert.equal(won.filter(Boolean).length, 1);
      const winner = bodies[won.indexOf(true)];
      assert.deepEqual(await b.get('locks/race'), winner);
    });

    it('a missing object is REPO_OBJECT_NOT_FOUND on get, undefined on stat', async () => {
      const b = await open();
      await assert.rejects(b.get('data/00/missing'), (err: unknown) => isQbackupError(err, 'REPO_OBJECT_NOT_FOUND'));
      assert.equal(await b.stat('data/00/missing'), undefined);
    });

    it('a range past the end is REPO_DAMAGED, not short data', async () => {
      const b = await open();
      await b.putIfAbsent('short', Buffer.alloc(10));
      await assert.rejects(b.get('short', { offset: 5, length: 10 }), (err: unknown) => isQbackupError(err, 'REPO_DAMAGED'));
    });

    it('lists by prefix, recursively, and nothing else', async () => {
      const b = await open();
      await b.putIfAbsent('snapshots/vm1/a', Buffer.from('1'));
      await b.putIfAbsent('snapshots/vm1/b', Buffer.from('22'));
      await b.putIfAbsent('snapshots/vm2/c', Buffer.from('333'));
      await b.putIfAbsent('snapshotsx', Buffer.from('x'));
      const all = (await b.list('snapshots/')).map((o) => `${o.key}:${o.size}`).sort();
      assert.deepEqual(all, ['snapshots/vm1/a:1', 'snapshots/vm1/b:2', 'snapshots/vm2/c:3']);
      assert.deepEqual((await b.list('snapshots/vm2/')).map((o) => o.key), ['snapshots/vm2/c']);
      assert.deepEqual(await b.list('nothing/'), []);
    });

    it('delete removes, and deleting again is fine', async () => {
      const b = await open();
      await b.putIfAbsent('index/x1', Buffer.from('x'));
      await b.delete('index/x1');
      assert.equal(await b.stat('index/x1'), undefined);
      await b.delete('index/x1');
      assert.equal(await b.putIfAbsent('index/x1', Buffer.from('y')), true);
    });

    it('refuses keys that could leave the repository or hide', async () => {
      const b = await open();
      for (const key of ['../x', 'a/../../x', '/etc/passwd', '.hidden', 'a//b', 'a b', 'a/', '', 'a/.tmp-1', 'x\\y']) {
        await assert.rejects(b.putIfAbsent(key, Buffer.from('x')), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT'), key);
        await assert.rejects(b.get(key), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT'), key);
        await assert.rejects(b.delete(key), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT'), key);
      }
      await assert.rejects(b.list('../'), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT'));
    });
  });
}
