// The HTTP API against a real daemon (listening on an ephemeral loopback
// port) over a real QEMU domain: each endpoint group (domains, disks,
// checkpoints, backup jobs, repository with tasks, schedules), the OpenAPI
// document, auth (missing, bad, revoked and read-only tokens) and bad input
// (malformed JSON, unknown fields, wrong types, a huge body, path traversal
// in names, two backups of one domain at once), each a 4xx with a
// one-sentence { code, message }.

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { startDaemon, type Daemon } from '../../src/http/daemon.js';
import { TestEnv, guestWrite, imageHasPattern } from '../helpers/env.js';
import { ApiClient, type ApiResponse } from '../helpers/http.js';

type Obj = Record<string, unknown>;
const obj = (r: ApiResponse): Obj => r.body as Obj;
const list = (r: ApiResponse): Obj[] => r.body as Obj[];

function assertError(r: ApiResponse, status: number, code: string, message?: RegExp): void {
  assert.equal(r.status, status, r.text);
  const body = obj(r);
  assert.equal(body['code'], code, r.text);
  assert.equal(typeof body['message'], 'string');
  // one sentence: no line breaks, no stack
  assert.doesNotMatch(String(body['message']), /\n|    at /);
  if (message !== undefined) assert.match(String(body['message']), message);
}

describe('HTTP API (real daemon, real QEMU)', () => {
  let env: TestEnv;
  let daemon: Daemon;
  let api: ApiClient;
  let repo: string;

  before(async () => {
    env = new TestEnv('qbt-http-');
    await env.defineDomain('vm1', [{ target: 'sda', sizeBytes: 16 << 20 }]);
    repo = env.path('repo');
    daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0 });
    assert.ok(daemon.bootstrapToken !== undefined, 'the first start creates a token');
    api = new ApiClient(daemon.url, daemon.bootstrapToken);
  });

  after(async () => {
    await daemon?.close();
    await env?.cleanup();
  });

  test('auth: no token, a bad token, a revoked token, a read-only token', async () => {
    assertError(await api.get('/api/domains', { token: undefined }), 401, 'AUTH_REQUIRED', /Authorization: Bearer/);
    assertError(await api.get('/api/domains', { token: 'qbt_nope' }), 401, 'AUTH_REQUIRED', /unknown or has been revoked/);
    const ro = daemon.service.tokens.create('viewer', { readOnly: true }).token;
    assert.equal((await api.get('/api/domains?all=true', { token: ro })).status, 200);
    assertError(await api.post('/api/domains/vm1/start', {}, { token: ro }), 403, 'READ_ONLY_TOKEN', /"viewer" is read-only/);
    assertError(await api.delete('/api/domains/vm1', { token: ro }), 403, 'READ_ONLY_TOKEN');
    const temp = daemon.service.tokens.create('temp').token;
    assert.equal((await api.get('/api/whoami', { token: temp })).status, 200);
    daemon.service.tokens.revoke('temp');
    assertError(await api.get('/api/whoami', { token: temp }), 401, 'AUTH_REQUIRED');
    // the page itself is public (it holds no data)
    const page = await api.get('/', { token: undefined });
    assert.equal(page.status, 200);
    assert.match(page.text, /<title>qbackup<\/title>/);
  });

  test('bad input: malformed JSON, unknown fields, wrong types, a huge body, path traversal, unknown routes', async () => {
    assertError(await api.request('POST', '/api/domains/vm1/checkpoints', { raw: { body: '{"name": ', type: 'application/json' } }), 400, 'INVALID_ARGUMENT');
    assertError(await api.post('/api/domains/vm1/checkpoints', { name: 'c0', colour: 'red' }), 400, 'INVALID_ARGUMENT', /unknown field "colour"/);
    assertError(await api.post('/api/domains/vm1/start', { paused: 'yes' }), 400, 'INVALID_ARGUMENT', /field "paused": expected boolean/);
    assertError(await api.post('/api/repository/backups', { domain: 'vm1' }), 400, 'INVALID_ARGUMENT', /missing field "repo"/);
    assertError(await api.post('/api/repository/backups'), 400, 'INVALID_ARGUMENT', /missing field "domain"/);
    assertError(await api.request('POST', '/api/repository/gc', { raw: { body: 'repo=/x', type: 'application/x-www-form-urlencoded' } }), 415, 'INVALID_ARGUMENT', /application\/json/);
    assertError(await api.post('/api/domains', { xml: 'x'.repeat(2 << 20) }), 413, 'REQUEST_TOO_LARGE');
    assertError(await api.get('/api/domains/..%2F..%2Fetc'), 400, 'INVALID_NAME', /Invalid domain name "..\/..\/etc"/);
    // a checkpoint name is only looked up (never a path), so a traversal is simply not found
    assertError(await api.get('/api/domains/vm1/checkpoints/..%2Fx'), 404, 'CHECKPOINT_NOT_FOUND', /no checkpoint "..\/x"/);
    assertError(await api.post('/api/domains/vm1/checkpoints', { name: '../x' }), 400, 'INVALID_NAME');
    assertError(await api.get('/api/domains/nosuch'), 404, 'DOMAIN_NOT_FOUND', /"nosuch"/);
    assertError(await api.get('/api/nothing-here'), 404, 'ROUTE_NOT_FOUND');
    assertError(await api.request('POST', '/api/domains', { raw: { body: '<domain><name>x</name>', type: 'application/xml' } }), 400, 'INVALID_XML');
    assertError(await api.get('/api/tasks/t0-00000000'), 404, 'TASK_NOT_FOUND');
  });

  test('domains and disks: define (XML and JSON), show, start, attach, detach, dumpxml', async () => {
    const xml = env.domainXml('vm2', [{ target: 'sda', file: await env.image('vm2-sda.qcow2') }]);
    const defined = await api.request('POST', '/api/domains', { raw: { body: xml, type: 'application/xml' } });
    assert.equal(defined.status, 201, defined.text);
    assert.equal(obj(defined)['name'], 'vm2');
    const again = await api.post('/api/domains', { xml: env.domainXml('vm2', [{ target: 'sda', file: env.path('other.qcow2') }]).replace('<name>vm2</name>', '<name>vm2</name><uuid>00000000-0000-4000-8000-000000000001</uuid>') });
    assert.ok(again.status === 409 || again.status === 400, again.text);
    const all = list(await api.get('/api/domains?all=true')).map((d) => d['name']);
    assert.deepEqual(all.sort(), ['vm1', 'vm2']);
    const started = await api.post('/api/domains/vm1/start', { paused: true });
    assert.equal(started.status, 200, started.text);
    assert.equal(obj(started)['state'], 'running');
    const data = await env.image('data.qcow2', 4 << 20);
    const attached = await api.post('/api/domains/vm1/disks', { source: data, target: 'sdb', format: 'qcow2' });
    assert.equal(attached.status, 201, attached.text);
    assert.deepEqual((obj(await api.get('/api/domains/vm1'))['disks'] as Obj[]).map((d) => d['target']), ['sda', 'sdb']);
    assertError(await api.post('/api/domains/vm1/disks', { source: data, target: 'sdc', format: 'qcow2' }), 409, 'DISK_EXISTS');
    assert.equal((await api.delete('/api/domains/vm1/disks/sdb')).status, 200);
    assert.match(String(obj(await api.get('/api/domains/vm1/xml'))['xml']), /<name>vm1<\/name>/);
    assert.equal((await api.delete('/api/domains/vm2')).status, 200);
    assertError(await api.get('/api/domains/vm2'), 404, 'DOMAIN_NOT_FOUND');
  });

  test('checkpoints: create (JSON and XML), list, tree, info, coverage, delete, redefine', async () => {
    assert.equal((await api.post('/api/domains/vm1/checkpoints', { name: 'c1', description: 'first' })).status, 201);
    const viaXml = await api.request('POST', '/api/domains/vm1/checkpoints', { raw: { body: '<domaincheckpoint><name>c2</name></domaincheckpoint>', type: 'application/xml' } });
    assert.equal(viaXml.status, 201, viaXml.text);
    assertError(await api.post('/api/domains/vm1/checkpoints', { name: 'c1' }), 409, 'CHECKPOINT_EXISTS');
    assert.deepEqual(list(await api.get('/api/domains/vm1/checkpoints')).map((c) => c['name']), ['c1', 'c2']);
    const tree = list(await api.get('/api/domains/vm1/checkpoint-tree'));
    assert.equal(tree[0]?.['name'], 'c1');
    assert.equal((tree[0]?.['children'] as Obj[])[0]?.['name'], 'c2');
    const c2 = obj(await api.get('/api/domains/vm1/checkpoints/c2'));
    assert.equal(c2['parent'], 'c1');
    const coverage = list(await api.get('/api/domains/vm1/checkpoints/c1/coverage'));
    assert.deepEqual(coverage.map((c) => [c['target'], c['mode']]), [['sda', 'incremental']]);
    // delete c2's metadata only, then bring it back by redefining it
    assert.deepEqual(obj(await api.delete('/api/domains/vm1/checkpoints/c2?metadata=true'))['deleted'], ['c2']);
    const redefined = await api.post('/api/domains/vm1/checkpoints/redefine', { name: 'c2', parent: 'c1', creationTime: c2['creationTime'], disks: [{ name: 'sda', checkpoint: 'bitmap', bitmap: 'c2' }] });
    assert.equal(redefined.status, 201, redefined.text);
    assert.deepEqual(obj(await api.delete('/api/domains/vm1/checkpoints/c1?children=true'))['deleted'], ['c2', 'c1']);
    assertError(await api.get('/api/domains/vm1/checkpoints/c1'), 404, 'CHECKPOINT_NOT_FOUND');
  });

  test('backup jobs: a pull job begins, shows, ends; a push job runs to its end', async () => {
    const pull = await api.post('/api/domains/vm1/job', { spec: { mode: 'pull' } });
    assert.equal(pull.status, 201, pull.text);
    const shown = obj(await api.get('/api/domains/vm1/job'));
    assert.equal(shown['id'], obj(pull)['id']);
    assert.equal(shown['mode'], 'pull');
    assertError(await api.post('/api/domains/vm1/job', { spec: { mode: 'pull' } }), 409, 'BACKUP_RUNNING');
    assert.equal((await api.delete('/api/domains/vm1/job')).status, 200);
    assertError(await api.delete('/api/domains/vm1/job'), 404, 'JOB_NOT_FOUND');
    const push = await api.request('POST', '/api/domains/vm1/job?checkpoint=j1', {
      raw: { body: `<domainbackup mode='push'><disks><disk name='sda' type='file'><target file='${env.path('push-sda.qcow2')}'/><driver type='qcow2'/></disk></disks></domainbackup>`, type: 'application/xml' },
    });
    assert.equal(push.status, 201, push.text);
    const deadline = Date.now() + 60_000;
    while ((await api.get('/api/domains/vm1/job')).status === 200 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    const done = obj(await api.get('/api/domains/vm1/job?completed=true'));
    assert.equal(done['state'], 'completed');
    assert.equal(done['checkpoint'], 'j1');
    assert.ok(existsSync(env.path('push-sda.qcow2')));
    await api.delete('/api/domains/vm1/checkpoints/j1');
  });

  test('start and shutdown need no body', async () => {
    await env.defineDomain('vm3', [{ target: 'sda' }]);
    const started = await api.post('/api/domains/vm3/start');
    assert.equal(started.status, 200, started.text);
    assert.equal(obj(started)['state'], 'running');
    assert.equal(obj(await api.post('/api/domains/vm3/shutdown'))['state'], 'shut off');
  });

  test('repository: backup as a task with live progress, one at a time per domain, list, stats, verify, restore, prune, gc', async () => {
    await guestWrite(env.qb, 'vm1', 'sda', 'write -P 0xab 0 4M');
    const accepted = await api.post('/api/repository/backups', { domain: 'vm1', repo });
    assert.equal(accepted.status, 202, accepted.text);
    const taskId = String(obj(accepted)['id']);
    assertError(await api.post('/api/repository/backups', { domain: 'vm1', repo }), 409, 'BACKUP_RUNNING', new RegExp(taskId));
    const events = await api.events(taskId);
    const last = events.at(-1);
    assert.equal(last?.['state'], 'succeeded', JSON.stringify(last));
    const progress = events.map((e) => e['progress'] as Obj | null).filter((p): p is Obj => p !== null);
    assert.ok(progress.length > 0, 'progress events were sent');
    const final = progress.at(-1) ?? {};
    assert.ok(Number(final['doneBytes']) >= 4 << 20, JSON.stringify(final));
    assert.ok(Number(final['totalBytes']) >= Number(final['doneBytes']));
    const task = obj(await api.get(`/api/tasks/${taskId}`));
    assert.ok((task['log'] as Obj[]).some((l) => /backup .* written/.test(String(l['message']))));
    const manifest = (task['result'] as Obj)['manifest'] as Obj;
    assert.equal(manifest['domain'], 'vm1');

    const backups = list(await api.get(`/api/repository/backups?repo=${encodeURIComponent(repo)}`));
    assert.deepEqual(backups.map((b) => b['id']), [manifest['id']]);
    assert.equal(obj(await api.get(`/api/repository/stats?repo=${encodeURIComponent(repo)}`))['backups'], 1);

    const verify = await api.post('/api/repository/verify', { repo, readData: true });
    assert.equal((await api.waitTask(String(obj(verify)['id'])))['state'], 'succeeded');

    const to = env.path('restored');
    const restore = await api.post('/api/repository/restore', { domain: 'vm1', repo, to, format: 'raw' });
    assert.equal(restore.status, 202, restore.text);
    assert.equal((await api.waitTask(String(obj(restore)['id'])))['state'], 'succeeded');
    assert.ok(await imageHasPattern(`${to}/sda.raw`, 'raw', 0xab, 0, 4 << 20), 'the restored disk holds what the guest wrote');

    const second = await api.post('/api/repository/backups', { domain: 'vm1', repo, retention: { keepLast: 1 } });
    const secondTask = await api.waitTask(String(obj(second)['id']));
    assert.equal(secondTask['state'], 'succeeded', JSON.stringify(secondTask['error']));
    const pruned = (secondTask['result'] as Obj)['prune'] as Obj;
    assert.deepEqual((pruned['remove'] as Obj[]).map((x) => x['id']), [manifest['id']]);
    assert.equal(list(await api.get(`/api/repository/backups?repo=${encodeURIComponent(repo)}`)).length, 1);
    const prune = await api.post('/api/repository/prune', { domain: 'vm1', repo, keepLast: 1, dryRun: true });
    assert.equal((await api.waitTask(String(obj(prune)['id'])))['state'], 'succeeded');
    const gc = await api.post('/api/repository/gc', { repo });
    assert.equal((await api.waitTask(String(obj(gc)['id'])))['state'], 'succeeded');

    const tasks = list(await api.get('/api/tasks'));
    assert.ok(tasks.some((t) => t['id'] === taskId));
    assertError(await api.delete(`/api/tasks/${taskId}`), 409, 'TASK_NOT_CANCELLABLE', /already succeeded/);
    assertError(await api.post('/api/repository/restore', { domain: 'vm1', repo }), 400, 'INVALID_ARGUMENT', /Give either to or intoDomain/);
  });

  test('instant restore: answers when the new domain runs; GET follows the copy to its end; the copy survives a destroy', async () => {
    assertError(await api.post('/api/repository/restore-instant', { domain: 'vm1', repo, backup: 'x', until: '2026-01-01T00:00:00Z' }), 400, 'INVALID_ARGUMENT', /give either a backup id or a time \(until\), not both/);
    assertError(await api.get('/api/domains/vm1/instant-restore'), 404, 'JOB_NOT_FOUND', /no instant restore/);
    const to = env.path('instant');
    const started = await api.post('/api/repository/restore-instant', { domain: 'vm1', repo, as: 'vm1i', to });
    assert.equal(started.status, 201, started.text);
    assert.equal(obj(started)['domain'], 'vm1i');
    assert.equal(obj(await api.get('/api/domains/vm1i'))['state'], 'running');
    assertError(await api.post('/api/repository/restore-instant', { domain: 'vm1', repo, as: 'vm1i', to: env.path('again') }), 409, 'DOMAIN_EXISTS');
    let info: ApiResponse;
    const deadline = Date.now() + 120_000;
    while ((info = await api.get('/api/domains/vm1i/instant-restore')).status === 200) {
      assert.ok(Date.now() < deadline, `the copy did not end: ${info.text}`);
      assert.equal(obj(info)['state'], 'streaming');
      await new Promise((r) => setTimeout(r, 300));
    }
    assertError(info, 404, 'JOB_NOT_FOUND');
    const done = obj(await api.get('/api/domains/vm1i/instant-restore?completed=true'));
    assert.equal(done['state'], 'completed', JSON.stringify(done));
    // Killed at once (no flush at shutdown): what the copy moved is on disk all the same.
    assert.equal((await api.post('/api/domains/vm1i/destroy', {})).status, 200);
    assert.ok(await imageHasPattern(`${to}/sda.qcow2`, 'qcow2', 0xab, 0, 4 << 20), 'the local image holds the backup');
  });

  test('schedules: add, list, show, remove; bad schedules are refused', async () => {
    const added = await api.post('/api/schedules', { domain: 'vm1', when: 'daily 02:00', repo, retention: { keepDaily: 7 } });
    assert.equal(added.status, 201, added.text);
    const s = obj(added);
    assert.equal(s['cron'], '0 2 * * *');
    assert.ok(typeof s['nextRunMs'] === 'number');
    assert.equal(list(await api.get('/api/schedules')).length, 1);
    assert.equal(obj(await api.get(`/api/schedules/${String(s['id'])}`))['domain'], 'vm1');
    assertError(await api.post('/api/schedules', { domain: 'vm1', when: 'at teatime', repo }), 400, 'INVALID_ARGUMENT', /Invalid schedule "at teatime"/);
    assertError(await api.post('/api/schedules', { domain: 'vm1', when: 'daily 02:00', repo, retention: { keepLast: 0 } }), 400, 'INVALID_ARGUMENT');
    assert.equal((await api.delete(`/api/schedules/${String(s['id'])}`)).status, 200);
    assertError(await api.delete(`/api/schedules/${String(s['id'])}`), 404, 'SCHEDULE_NOT_FOUND');
  });

  test('the OpenAPI document describes every route from its schemas', async () => {
    const doc = obj(await api.get('/api/openapi.json'));
    assert.equal(doc['openapi'], '3.0.3');
    const paths = Object.keys(doc['paths'] as Obj);
    for (const p of ['/api/domains', '/api/domains/{domain}/checkpoints', '/api/domains/{domain}/job', '/api/repository/backups', '/api/tasks/{id}', '/api/schedules']) assert.ok(paths.includes(p), p);
    const post = ((doc['paths'] as Obj)['/api/repository/backups'] as Obj)['post'] as Obj;
    assert.ok(post['requestBody'] !== undefined);
  });
});
