// The daemon and repository passphrases (no QEMU needed): relative repository
// paths are refused (they would resolve against the daemon's own working
// directory), and wrong passphrases in X-Repository-Password are counted per
// client and per repository: past a few failures every attempt with a
// passphrase waits out a growing back-off (429 RATE_LIMITED), on the direct
// routes and on those that answer with a task alike.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { startDaemon, type Daemon } from '../../src/http/daemon.js';
import { TestEnv } from '../helpers/env.js';
import { ApiClient, type ApiResponse } from '../helpers/http.js';
import { eventually } from '../helpers/repo.js';

const code = (r: ApiResponse): string => String((r.body as Record<string, unknown> | undefined)?.['code']);

describe('daemon: repository paths and passphrase attempts', () => {
  let env: TestEnv;
  let daemon: Daemon;
  let api: ApiClient;
  let repo: string;
  let other: string;

  before(async () => {
    env = new TestEnv('qbt-pass-');
    repo = env.path('secure');
    other = env.path('secure2');
    await env.qb.repository.init({ repo, password: 'right' });
    await env.qb.repository.init({ repo: other, password: 'right' });
    daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0, passphraseBackoff: { freeFailures: 3, baseDelayMs: 2000, maxDelayMs: 4000 } });
    assert.ok(daemon.bootstrapToken !== undefined);
    api = new ApiClient(daemon.url, daemon.bootstrapToken);
  });
  after(async () => {
    await daemon?.close();
    await env?.cleanup();
  });

  test('a relative repository path is refused in one sentence', async () => {
    for (const r of [await api.get('/api/repository/backups?repo=backups/here'), await api.post('/api/repository/verify', { repo: './x' }), await api.post('/api/repository/init', { repo: 'rel' })]) {
      assert.equal(r.status, 400, r.text);
      assert.equal(code(r), 'INVALID_ARGUMENT');
      assert.match(String((r.body as Record<string, unknown>)['message']), /^Invalid repository ".*": the daemon takes a configured repository name, an absolute path or an s3:\/\/ location$/);
    }
  });

  test('wrong passphrases: counted per client and per repository, then a back-off; the right one works after it', async () => {
    const list = (r: string, pw: string, token?: string): Promise<ApiResponse> =>
      api.get(`/api/repository/backups?repo=${encodeURIComponent(r)}`, { headers: { 'x-repository-password': pw }, ...(token !== undefined ? { token } : {}) });
    assert.equal((await list(repo, 'right')).status, 200);
    // Three free failures (one through a task route), then every attempt waits.
    assert.equal(code(await list(repo, 'guess1')), 'WRONG_PASSWORD');
    assert.equal(code(await api.post('/api/repository/verify', { repo }, { headers: { 'x-repository-password': 'guess2' } })), 'WRONG_PASSWORD');
    assert.equal(code(await list(repo, 'guess3')), 'WRONG_PASSWORD');
    const held = await list(repo, 'right');
    assert.equal(held.status, 429, held.text);
    assert.equal(code(held), 'RATE_LIMITED');
    assert.match(String((held.body as Record<string, unknown>)['message']), /wrong passphrases/);
    // Another client, same repository: held too. Same client, another repository: held too.
    const second = daemon.service.tokens.create('second').token;
    assert.equal((await list(repo, 'guess4', second)).status, 429);
    assert.equal((await list(other, 'guess5')).status, 429);
    // A request without a passphrase is not held.
    assert.equal(code(await api.get(`/api/repository/backups?repo=${encodeURIComponent(repo)}`)), 'WRONG_PASSWORD');
    // Once the back-off has passed, the right passphrase works (and clears the count).
    assert.ok(await eventually(async () => (await list(repo, 'right')).status === 200, 30_000), 'the right passphrase works after the back-off');
    assert.equal((await list(other, 'right')).status, 200);
  });
});
