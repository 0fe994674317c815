// Running qbackup as an admin does, against real QEMU: `qbackup serve
// --config F` with two named repositories (one encrypted, its passphrase from
// a password-command) and schedules from the file. The backup schedule runs
// and /metrics shows its backup; a schedule that cannot run fires the
// webhook (which fails once and is retried), the fake sendmail and the dead
// man's switch's /fail URL, all received on 127.0.0.1; SIGHUP picks up a
// changed retention; a bad file is one sentence with its name and line,
// whether for `config check` or a reload; the passphrase and the webhook's
// token never appear in the log, the metrics or `config check`.

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { cliPath, TestEnv } from '../helpers/env.js';

const PASSPHRASE = 'pass-Zq81-never-logged';
const HOOK_TOKEN = 'hooktoken-Zq81';

interface Received { method: string; url: string; body: string }

/** A small HTTP receiver: records every request; answers 503 to the first POST of /hook (so the daemon must retry). */
function receiver(): Promise<{ server: Server; port: number; received: Received[] }> {
  const received: Received[] = [];
  let hookCalls = 0;
  const server = createServer((req, res) => {
    let body = '';
    req.on('data', (b: Buffer) => (body += b.toString()));
    req.on('end', () => {
      received.push({ method: req.method ?? '', url: req.url ?? '', body });
      const first = req.url?.startsWith('/hook') === true && hookCalls++ === 0;
      res.statusCode = first ? 503 : 200;
      res.end('ok');
    });
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, port: (server.address() as AddressInfo).port, received })));
}

async function until<T>(what: string, check: () => T | undefined | Promise<T | undefined>, timeoutMs = 120_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

describe('qbackup serve --config (named repositories, schedules, metrics, notifications, SIGHUP)', () => {
  let env: TestEnv;
  let hooks: Awaited<ReturnType<typeof receiver>>;
  let child: ChildProcess | undefined;
  let stderr = '';
  let configFile: string;
  let config: (keepLast: number) => string;

  before(async () => {
    env = new TestEnv('qbt-admin-');
    await env.defineDomain('vm1', [{ target: 'sda', sizeBytes: 4 << 20 }]);
    hooks = await receiver();
    const pwFile = env.writeFile('pw', `${PASSPHRASE}\n`);
    const sendmail = env.writeFile('sendmail', `#!/bin/sh\ncat > "${env.path('mail')}-$$.txt"\necho "$@" > "${env.path('mail')}-$$.args"\n`);
    chmodSync(sendmail, 0o755);
    const base = `http://127.0.0.1:${hooks.port}`;
    config = (keepLast) => `# qbackup test configuration
repositories:
  local:
    path: ${env.path('repo-local')}
  vault:
    path: ${env.path('repo-vault')}
    password-command: cat ${pwFile}
defaults:
  repository: local
  retention:
    keep-last: ${keepLast}
schedules:
  vm1-often:
    domain: vm1
    when: "*/2 * * * * *"
  ghost-often:
    domain: ghost
    repository: vault
    when: "*/2 * * * * *"
    ping-url: ${base}/ping/ghost
notifications:
  hook:
    webhook: ${base}/hook?token=${HOOK_TOKEN}
    on: [failure]
    retries: 2
  mail:
    email: root@localhost
    sendmail: ${sendmail}
metrics: token
`;
    configFile = env.writeFile('config.yaml', config(3));
    await env.cliOk(['--config', configFile, 'init', '--repo', 'vault', '--encrypt']);
  });

  after(async () => {
    if (child !== undefined && child.exitCode === null) {
      child.kill('SIGTERM');
      await new Promise((r) => child?.once('exit', r));
    }
    hooks?.server.close();
    await env?.cleanup();
  });

  test('config check prints the effective configuration without secrets; a bad file is one sentence with file and line', async () => {
    const r = await env.cli(['--config', configFile, 'config', 'check']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /is valid/);
    assert.match(r.stdout, /vm1-often/);
    assert.ok(!r.stdout.includes(HOOK_TOKEN), 'the webhook token is masked');
    assert.ok(!r.stdout.includes('cat '), 'the password command is masked');
    const bad = env.writeFile('bad.yaml', 'repositories:\n  local:\n    path: /x\n    pasword-file: /y\n');
    const b = await env.cli(['--config', bad, 'config', 'check']);
    assert.equal(b.code, 1);
    assert.equal(b.stderr, `error: Invalid configuration "${bad}", line 4: unknown key "pasword-file" in repositories.local\n`);
    const missing = await env.cli(['--config', env.path('nope.yaml'), 'config', 'check']);
    assert.equal(missing.stderr, `error: Cannot read the configuration file "${env.path('nope.yaml')}": it does not exist\n`);
  });

  test('serve runs the schedules of the file, shows the backup in /metrics, notifies a failing schedule, and reloads retention on SIGHUP', async () => {
    const proc = spawn(process.execPath, [cliPath, '--state-dir', env.stateDir, '--config', configFile, '--json', 'serve', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, QBACKUP_LOCK_TIMEOUT: '5' } });
    child = proc;
    proc.stderr?.on('data', (b: Buffer) => (stderr += b.toString()));
    let out = '';
    const started = await new Promise<{ url: string; token: string }>((resolve, reject) => {
      proc.stdout?.on('data', (b: Buffer) => {
        out += b.toString();
        try {
          const j = JSON.parse(out) as { url: string; bootstrapToken: { token: string } };
          resolve({ url: j.url, token: j.bootstrapToken.token });
        } catch {
          // not complete yet
        }
      });
      proc.once('exit', () => reject(new Error(`serve exited: ${stderr}`)));
    });
    const get = async (path: string, token?: string): Promise<{ status: number; text: string }> => {
      const res = await fetch(`${started.url}${path}`, { headers: token !== undefined ? { authorization: `Bearer ${token}` } : {} });
      return { status: res.status, text: await res.text() };
    };
    const backups = async (repo: string): Promise<string[]> => {
      const r = await get(`/api/repository/backups?repo=${repo}&domain=vm1`, started.token);
      return r.status === 200 ? (JSON.parse(r.text) as { id: string }[]).map((m) => m.id) : [];
    };

    // The backup schedule runs into "local" and retention keeps 3.
    await until('three backups of vm1 in "local"', async () => ((await backups('local')).length >= 3 ? true : undefined)).catch((err: unknown) => {
      throw new Error(`${(err as Error).message}; the daemon's log:\n${stderr.slice(-4000)}`);
    });
    const metrics = await until('the backup in /metrics', async () => {
      const m = await get('/metrics', started.token);
      return /qbackup_backup_last_success\{domain="vm1"\} 1/.test(m.text) && /qbackup_repository_size_bytes\{repository="local"\} [1-9]/.test(m.text) ? m.text : undefined;
    });
    assert.match(metrics, /qbackup_backup_last_bytes_read\{domain="vm1"\} \d+/);
    assert.match(metrics, /qbackup_tasks\{kind="repository\.backup",state="succeeded"\} [1-9]/);
    assert.match(metrics, /qbackup_schedule_next_run_timestamp_seconds\{schedule="vm1-often",action="backup",domain="vm1"\} \d+/);
    assert.equal((await get('/metrics')).status, 401, 'metrics need a token unless public');

    // The failing schedule: the webhook (after one 503), the fake sendmail and the ping's /fail.
    const hook = await until('the webhook', () => hooks.received.find((r) => r.url.startsWith('/hook') && r.body.includes('ghost-often') && hooks.received.filter((x) => x.url.startsWith('/hook')).length >= 2));
    const body = JSON.parse(hook.body) as { event: string; schedule: string; message: string };
    assert.equal(body.event, 'failure');
    assert.equal(body.schedule, 'ghost-often');
    assert.match(body.message, /ghost/);
    await until('the dead man\'s switch', () => hooks.received.find((r) => r.method === 'GET' && r.url === '/ping/ghost/fail'));

    // Paused from the API: /metrics says so, with no lag for it.
    const ghost = (JSON.parse((await get('/api/schedules', started.token)).text) as { id: string; name?: string }[]).find((s) => s.name === 'ghost-often');
    assert.ok(ghost !== undefined);
    const paused = await fetch(`${started.url}/api/schedules/${ghost.id}/pause`, { method: 'POST', headers: { authorization: `Bearer ${started.token}` } });
    assert.equal(paused.status, 200, await paused.text());
    const afterPause = (await get('/metrics', started.token)).text;
    assert.match(afterPause, /qbackup_schedule_paused\{schedule="ghost-often",action="backup",domain="ghost"\} 1/);
    assert.match(afterPause, /qbackup_schedule_lag_seconds\{schedule="ghost-often",action="backup",domain="ghost"\} 0/);
    assert.match(afterPause, /qbackup_schedule_paused\{schedule="vm1-often",action="backup",domain="vm1"\} 0/);
    const mail = await until('a mail', () => {
      const f = readdirSync(env.dir).find((n) => n.startsWith('mail-') && n.endsWith('.txt'));
      const text = f !== undefined ? readFileSync(join(env.dir, f), 'utf8') : '';
      return text.includes('Subject:') && text.includes('\n\n') ? text : undefined;
    });
    assert.match(mail, /^To: root@localhost$/m);
    assert.match(mail, /^Subject: qbackup: .*FAILED \(schedule ghost-often\)$/m);

    // SIGHUP: retention keep-last 1 applies from the next run.
    writeFileSync(configFile, config(1));
    proc.kill('SIGHUP');
    await until('the reload', () => (stderr.includes('"msg":"configuration reloaded"') ? true : undefined));
    await until('retention keep-last 1', async () => ((await backups('local')).length === 1 ? true : undefined));
    const schedules = JSON.parse((await get('/api/schedules', started.token)).text) as { name?: string; retention?: { keepLast?: number } }[];
    assert.equal(schedules.find((s) => s.name === 'vm1-often')?.retention?.keepLast, 1);

    // A broken file on SIGHUP: one line naming file and line; the previous configuration stays.
    writeFileSync(configFile, `${config(1)}metrics: sometimes\n`);
    proc.kill('SIGHUP');
    const refused = await until('the refused reload', () => stderr.split('\n').find((l) => l.includes('configuration not reloaded')));
    assert.match(refused, new RegExp(`Invalid configuration \\\\"${configFile.replace(/[/.]/g, '\\$&')}\\\\", line \\d+: `));
    assert.equal((await get('/metrics', started.token)).status, 200);

    proc.kill('SIGTERM');
    await new Promise((r) => proc.once('exit', r));
    // No secret anywhere: the log, the metrics.
    for (const [where, text] of [['log', stderr], ['metrics', metrics]] as const) {
      assert.ok(!text.includes(PASSPHRASE), `the passphrase is not in the ${where}`);
      assert.ok(!text.includes(HOOK_TOKEN), `the webhook token is not in the ${where}`);
      assert.ok(!text.includes(started.token), `the API token is not in the ${where}`);
    }
    for (const line of stderr.trim().split('\n')) assert.doesNotThrow(() => JSON.parse(line), `one JSON object per log line: ${line}`);
  });
});
