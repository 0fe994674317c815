// The service's CLI commands: `token` (create prints the secret once, list
// never shows it, revoke), `schedule` (add, list, remove, bad input as one
// sentence), and `serve`'s refusal to listen off loopback without TLS; with
// TLS, the daemon answers over HTTPS.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { request } from 'node:https';
import { after, before, describe, test } from 'node:test';
import { startDaemon } from '../../src/http/daemon.js';
import { TestEnv } from '../helpers/env.js';

function httpsGet(url: string, token: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { headers: { authorization: `Bearer ${token}` }, rejectUnauthorized: false }, (res) => {
      let body = '';
      res.on('data', (b: Buffer) => (body += b.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

describe('service CLI: token, schedule, serve', () => {
  let env: TestEnv;

  before(async () => {
    env = new TestEnv('qbt-httpcli-');
    await env.defineDomain('vm1', [{ target: 'sda' }]);
  });

  after(async () => {
    await env?.cleanup();
  });

  test('token create / list / revoke', async () => {
    const created = await env.cliOk(['token', 'create', 'ops']);
    const secret = /^(qbt_\S+)$/m.exec(created)?.[1];
    assert.ok(secret !== undefined, created);
    const ro = JSON.parse(await env.cliOk(['--json', 'token', 'create', 'viewer', '--read-only'])) as { name: string; readOnly: boolean; token: string };
    assert.deepEqual([ro.name, ro.readOnly], ['viewer', true]);
    const listed = await env.cliOk(['token', 'list']);
    assert.match(listed, /ops\s+full/);
    assert.match(listed, /viewer\s+read-only/);
    assert.ok(!listed.includes(secret), 'list never shows a secret');
    assert.equal((await env.cliOk(['token', 'revoke', 'viewer'])).trim(), 'Revoked token "viewer"');
    const again = await env.cli(['token', 'revoke', 'viewer']);
    assert.equal(again.code, 1);
    assert.equal(again.stderr, 'error: Cannot revoke token "viewer": there is no token of that name\n');
    const bad = await env.cli(['token', 'create', '../x']);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /^error: Invalid token name "..\/x"/);
  });

  test('schedule add / list / remove', async () => {
    const added = JSON.parse(await env.cliOk(['--json', 'schedule', 'add', 'vm1', '--when', 'daily 02:00', '--repo', env.path('repo'), '--keep-daily', '7', '--keep-last', '2'])) as { id: string; cron: string; retention: object };
    assert.equal(added.cron, '0 2 * * *');
    assert.deepEqual(added.retention, { keepLast: 2, keepDaily: 7 });
    assert.match(await env.cliOk(['schedule', 'list']), new RegExp(`${added.id}\\s+backup\\s+vm1\\s+-\\s+daily 02:00`));
    const bad = await env.cli(['schedule', 'add', 'vm1', '--when', 'sometimes', '--repo', env.path('repo')]);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /^error: Invalid schedule "sometimes": use a cron pattern/);
    const badKeep = await env.cli(['schedule', 'add', 'vm1', '--when', 'hourly', '--repo', env.path('repo'), '--keep-last', 'x']);
    assert.match(badKeep.stderr, /^error: Invalid retention keepLast NaN/);
    const gc = JSON.parse(await env.cliOk(['--json', 'schedule', 'add', '--run', 'gc', '--when', 'weekly sun 04:00', '--repo', env.path('repo')])) as { action: string; domain?: string };
    assert.deepEqual([gc.action, gc.domain], ['gc', undefined]);
    const verify = JSON.parse(await env.cliOk(['--json', 'schedule', 'add', 'vm1', '--run', 'verify', '--read-data-subset', '10%', '--when', 'daily 05:00', '--repo', env.path('repo')])) as { readDataPercent: number };
    assert.equal(verify.readDataPercent, 10);
    assert.match(await env.cliOk(['schedule', 'list']), /gc\s+-\s+-\s+weekly sun 04:00/);
    await env.cliOk(['schedule', 'remove', added.id]);
    assert.equal((await env.cli(['schedule', 'remove', added.id])).stderr, `error: Schedule "${added.id}" does not exist\n`);
  });

  test('serve refuses a non-loopback address without TLS; with TLS it serves HTTPS', async () => {
    const r = await env.cli(['serve', '--listen', '0.0.0.0:0']);
    assert.equal(r.code, 1);
    assert.equal(r.stderr, 'error: Cannot listen on "0.0.0.0" without TLS: give --tls-cert and --tls-key, or listen on 127.0.0.1\n');
    const bad = await env.cli(['serve', '--listen', 'nowhere']);
    assert.equal(bad.stderr, 'error: Invalid --listen "nowhere": expected HOST:PORT such as 127.0.0.1:8470\n');
    const key = env.path('key.pem');
    const cert = env.path('cert.pem');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=127.0.0.1'], { stdio: 'ignore' });
    const daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', tlsCertFile: cert, tlsKeyFile: key, schedulerIntervalMs: 0 });
    try {
      assert.match(daemon.url, /^https:\/\/127\.0\.0\.1:\d+$/);
      const token = daemon.service.tokens.create('tls').token;
      const res = await httpsGet(`${daemon.url}/api/domains?all=true`, token);
      assert.equal(res.status, 200, res.body);
      assert.deepEqual((JSON.parse(res.body) as Array<{ name: string }>).map((d) => d.name), ['vm1']);
    } finally {
      await daemon.close();
    }
  });

  test('a client over its rate limit gets 429 with one sentence', async () => {
    const daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0, rateLimit: { ratePerSec: 0.001, burst: 2 } });
    try {
      const token = daemon.service.tokens.create('rl').token;
      const get = (): Promise<Response> => fetch(`${daemon.url}/api/domains`, { headers: { authorization: `Bearer ${token}` } });
      assert.equal((await get()).status, 200);
      assert.equal((await get()).status, 200);
      const limited = await get();
      assert.equal(limited.status, 429);
      assert.deepEqual(await limited.json(), { code: 'RATE_LIMITED', message: 'Too many requests from 127.0.0.1: at most 0.001 a second (bursts of 2); retry later' });
    } finally {
      await daemon.close();
    }
  });
});
