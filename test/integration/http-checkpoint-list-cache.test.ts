// The daemon keeps the serialized checkpoint list and tree until the metadata
// changes (src/http/body-cache.ts): every change shows up in the very next
// request, whichever way it was made (the API, the library in the daemon's
// process, another connection to the same state directory, a CLI process),
// and a client that sends back the ETag it got is told 304 only while the
// list is the same.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { startDaemon, type Daemon } from '../../src/http/daemon.js';
import { Qbackup } from '../../src/qbackup.js';
import { TestEnv } from '../helpers/env.js';
import { ApiClient, type ApiResponse } from '../helpers/http.js';

type Obj = Record<string, unknown>;
const names = (r: ApiResponse): string[] => {
  assert.equal(r.status, 200, r.text);
  return (r.body as Obj[]).map((c) => String(c['name']));
};

describe('checkpoint list through the daemon: kept bodies follow every change', () => {
  let env: TestEnv;
  let daemon: Daemon;
  let api: ApiClient;

  before(async () => {
    env = new TestEnv('qbt-http-list-');
    await env.defineDomain('vm1', [{ target: 'sda', sizeBytes: 8 << 20 }]);
    daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0 });
    assert.ok(daemon.bootstrapToken !== undefined);
    api = new ApiClient(daemon.url, daemon.bootstrapToken);
  });

  after(async () => {
    await daemon?.close();
    await env?.cleanup();
  });

  test('a change made by any path is in the next list, tree and filtered list', async () => {
    const path = '/api/domains/vm1/checkpoints';
    assert.deepEqual(names(await api.get(path)), []);
    assert.deepEqual(names(await api.get(path)), [], 'the kept body of the empty list');

    assert.equal((await api.post(path, { name: 'c1' })).status, 201);
    assert.deepEqual(names(await api.get(path)), ['c1'], 'created through the API');

    await env.qb.checkpoints.create('vm1', { name: 'c2' });
    assert.deepEqual(names(await api.get(path)), ['c1', 'c2'], "created through the library in the daemon's process");

    const other = Qbackup.open({ stateDir: env.stateDir, lockTimeoutMs: 5_000 });
    try {
      await other.checkpoints.create('vm1', { name: 'c3' });
    } finally {
      other.close();
    }
    assert.deepEqual(names(await api.get(path)), ['c1', 'c2', 'c3'], 'created through another connection to the metadata');

    await env.cliOk(['checkpoint-create-as', 'vm1', '--name', 'c4']);
    assert.deepEqual(names(await api.get(path)), ['c1', 'c2', 'c3', 'c4'], 'created by a CLI process');
    assert.deepEqual(names(await api.get(`${path}?leaves=true`)), ['c4']);

    await env.cliOk(['checkpoint-delete', 'vm1', 'c4']);
    assert.deepEqual(names(await api.get(path)), ['c1', 'c2', 'c3'], 'deleted by a CLI process');
    assert.deepEqual(names(await api.get(`${path}?leaves=true`)), ['c3']);

    assert.equal((await api.delete(`${path}/c2`)).status, 200);
    const list = (await api.get(path)).body as Obj[];
    assert.deepEqual(list.map((c) => [c['name'], c['parent'], c['current']]), [['c1', null, false], ['c3', 'c1', true]], 'deleted through the API: c3 is now the child of c1');
    const tree = (await api.get('/api/domains/vm1/checkpoint-tree')).body as Obj[];
    assert.deepEqual(tree.map((n) => [n['name'], (n['children'] as Obj[]).map((c) => c['name'])]), [['c1', ['c3']]]);

    // The same answer as the library gives, field for field.
    assert.deepEqual(list, JSON.parse(JSON.stringify(env.qb.checkpoints.list('vm1'))));
  });

  test('If-None-Match: 304 while the list is unchanged, the new list after a change', async () => {
    const path = '/api/domains/vm1/checkpoints';
    const first = await api.get(path);
    const etag = first.headers.get('etag');
    assert.ok(etag !== null && etag !== '', 'the list has an ETag');
    const again = await api.get(path, { headers: { 'if-none-match': etag } });
    assert.equal(again.status, 304);
    assert.equal(again.text, '');

    await env.qb.checkpoints.create('vm1', { name: 'c5' });
    const changed = await api.get(path, { headers: { 'if-none-match': etag } });
    assert.equal(changed.status, 200, 'a change makes the old ETag stale');
    assert.ok(names(changed).includes('c5'));
    assert.notEqual(changed.headers.get('etag'), etag);

    // An error is not kept: an unknown domain is refused each time, and a new one is listed once defined.
    assert.equal((await api.get('/api/domains/vm2/checkpoints')).status, 404);
    await env.defineDomain('vm2', [{ target: 'sda', sizeBytes: 8 << 20 }]);
    assert.deepEqual(names(await api.get('/api/domains/vm2/checkpoints')), []);
  });
});
