// Notifications against a receiver on 127.0.0.1 and a fake sendmail: a
// webhook is retried until it answers, and given up (logged, never thrown)
// when it does not; targets get only the events they ask for; an email goes
// through sendmail -t with the outcome's sentence; a ping URL gets /fail
// after a failure.

import assert from 'node:assert/strict';
import { chmodSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { NotificationTarget } from '../../src/config/config.js';
import { Notifier, type Outcome } from '../../src/service/notifications.js';
import type { LogEvent } from '../../src/util/operation.js';

const outcome = (event: 'failure' | 'success'): Outcome => ({ event, taskId: 't1', kind: 'repository.backup', domain: 'vm1', schedule: 'nightly', repository: 'local', message: 'Domain "vm1" does not exist', timeMs: 0 });

describe('notifications', () => {
  const received: { url: string; body: string }[] = [];
  let failuresLeft = 0;
  let base = '';
  const server = createServer((req, res) => {
    let body = '';
    req.on('data', (b: Buffer) => (body += b.toString()));
    req.on('end', () => {
      received.push({ url: req.url ?? '', body });
      res.statusCode = req.url?.startsWith('/down') === true || failuresLeft-- > 0 ? 500 : 200;
      res.end();
    });
  });

  before(async () => {
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(() => server.close());

  test('a webhook is retried until it answers; one that never does is logged and given up', async () => {
    received.length = 0;
    failuresLeft = 2;
    const events: LogEvent[] = [];
    const targets: NotificationTarget[] = [
      { name: 'hook', webhook: `${base}/hook?token=s3cret`, on: ['failure'], retries: 3 },
      { name: 'down', webhook: `${base}/down?token=s3cret`, on: ['failure'], retries: 1 },
      { name: 'quiet', webhook: `${base}/quiet`, on: ['success'] },
    ];
    const n = new Notifier(() => targets, { logger: { log: (e) => events.push(e) }, retryDelayMs: 10 });
    await n.notify(outcome('failure'));
    assert.equal(received.filter((r) => r.url.startsWith('/hook')).length, 3, 'two 500s, then delivered');
    assert.equal(received.filter((r) => r.url.startsWith('/down')).length, 2, 'the first attempt and one retry');
    assert.equal(received.filter((r) => r.url.startsWith('/quiet')).length, 0, 'a success-only target hears nothing of a failure');
    const body = JSON.parse(received.find((r) => r.url.startsWith('/hook'))?.body ?? '{}') as Record<string, unknown>;
    assert.equal(body['event'], 'failure');
    assert.equal(body['schedule'], 'nightly');
    assert.equal(body['message'], 'Domain "vm1" does not exist');
    const failed = events.find((e) => e.msg === 'notification failed');
    assert.equal(failed?.fields?.['target'], 'down');
    assert.ok(!JSON.stringify(events).includes('s3cret'), 'the URL token is not logged');
    await n.notify(outcome('success'), ['hook']);
    assert.equal(received.filter((r) => r.url.startsWith('/quiet')).length, 0, 'only the named targets');
  });

  test('email through sendmail -t, and the ping URL with /fail after a failure', async () => {
    received.length = 0;
    failuresLeft = 0;
    const dir = mkdtempSync(join(tmpdir(), 'qbt-notify-'));
    const sendmail = join(dir, 'sendmail');
    writeFileSync(sendmail, `#!/bin/sh\necho "$@" > "${dir}/args"\ncat > "${dir}/mail"\n`);
    chmodSync(sendmail, 0o755);
    const n = new Notifier(() => [{ name: 'mail', email: 'root@localhost', sendmail, on: ['failure', 'success'] }], { retryDelayMs: 10 });
    await n.notify(outcome('failure'));
    const mail = readFileSync(join(dir, 'mail'), 'utf8');
    assert.equal(readFileSync(join(dir, 'args'), 'utf8').trim(), '-t -oi');
    assert.match(mail, /^To: root@localhost$/m);
    assert.match(mail, /^Subject: qbackup: repository\.backup of vm1 FAILED \(schedule nightly\)$/m);
    assert.match(mail, /^Domain "vm1" does not exist$/m);
    await n.ping(`${base}/ping/abc`, false, 'nightly');
    await n.ping(`${base}/ping/abc`, true, 'nightly');
    assert.deepEqual(received.map((r) => r.url), ['/ping/abc/fail', '/ping/abc']);
  });
});
