// The configuration file without QEMU: every refusal is one sentence with the
// file and the line of the mistake; names resolve; passphrases come from the
// caller, then the configured file or command, then the environment's
// fallback; config check's view masks what may be a secret.

import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { Credentials, readCredentialsFile } from '../../src/config/credentials.js';
import { parseConfig } from '../../src/config/load.js';
import { describeConfig, effectiveConfig } from '../../src/config/show.js';
import { QbackupError } from '../../src/errors.js';

const F = '/etc/qbackup/config.yaml';

function refusal(text: string): string {
  try {
    parseConfig(text, F);
  } catch (err) {
    assert.ok(err instanceof QbackupError && err.code === 'CONFIG_INVALID', String(err));
    return err.message;
  }
  assert.fail('the configuration was accepted');
}

describe('configuration file', () => {
  test('bad files: one sentence naming the file and the line', () => {
    const cases: [string, string][] = [
      ['repositories:\n  local:\n    path: /b\n    pasword-file: /x\n', 'line 4: unknown key "pasword-file" in repositories.local'],
      ['repositories:\n  local: {}\n', 'line 2: repositories.local needs exactly one of "path" or "url"'],
      ['repositories:\n  local: {path: /a, url: "s3://b/p"}\n', 'line 2: repositories.local needs exactly one of "path" or "url"'],
      ['repositories:\n  local:\n    path: backups\n', 'line 3: repositories.local.path is "backups": expected an absolute path'],
      ['\n\nmetrics: sometimes\n', 'line 3: metrics is "sometimes": expected public or token'],
      ['metrics: token\nfoo: bar: baz\nx: 1\n', 'line 2: not valid YAML'],
      ['repositories:\n  l: {path: /b}\nschedules:\n  n:\n    domain: vm1\n    repository: l\n    when: sometimes\n', 'line 7: schedule "n": Invalid schedule "sometimes"'],
      ['repositories:\n  l: {path: /b}\nschedules:\n  n:\n    domain: vm1\n    repository: elsewhere\n    when: hourly\n', 'line 6: schedule "n" names repository "elsewhere", which is not under repositories'],
      ['repositories:\n  l: {path: /b}\ndefaults: {repository: l}\nschedules:\n  n: {domain: vm1, when: hourly, notify: [ops]}\n', 'line 5: schedule "n" notifies "ops", which is not under notifications'],
      ['repositories:\n  l: {path: /b, password-file: /p, password-command: "x"}\n', 'line 2: repository "l" gives both "password-file" and "password-command": keep one'],
      ['notifications:\n  ops: {webhook: "ftp://x"}\n', 'line 2: notifications.ops.webhook is "ftp://x": expected an http:// or https:// URL'],
      ['schedules:\n  n: {domain: vm1, when: hourly}\n', 'line 2: schedule "n" names no repository and there is no defaults.repository'],
    ];
    for (const [text, expected] of cases) {
      const message = refusal(text);
      assert.ok(message.startsWith(`Invalid configuration "${F}", ${expected}`), `${message}\n  expected: ${expected}`);
      assert.ok(!message.includes('\n'), 'one line');
    }
  });

  test('a good file: names resolved, defaults applied', () => {
    const c = parseConfig(
      'repositories:\n  local: {path: /srv/b}\n  off: {url: "s3://bk/p", endpoint: "http://127.0.0.1:7480", path-style: true}\n' +
        'connections: {libvirt: "qemu:///system"}\n' +
        'defaults: {repository: local, retention: {keep-last: 3}, quiesce: optional}\n' +
        'schedules:\n  a: {domain: vm1, when: "daily 02:00"}\n  c: {run: copy, when: "*/10 * * * * *", to: off}\n' +
        'metrics: public\n',
      F,
    );
    assert.equal(c.repositories.get('off')?.location, 's3://bk/p');
    assert.equal(c.connections.get('libvirt'), 'qemu:///system');
    assert.deepEqual(c.schedules.map((s) => [s.name, s.run, s.repository, s.retention]), [
      ['a', 'backup', 'local', { keepLast: 3 }],
      ['c', 'copy', 'local', undefined],
    ]);
    assert.equal(c.metrics, 'public');
  });

  test('credentials: the caller, then the configured file or command, then the fallback', () => {
    const dir = mkdtempSync(join(tmpdir(), 'qbt-config-'));
    writeFileSync(join(dir, 'pw'), 'from-file\n');
    writeFileSync(join(dir, 'given'), 'given\n');
    const c = parseConfig(`repositories:\n  f: {path: ${dir}/f, password-file: ${dir}/pw}\n  c: {path: ${dir}/c, password-command: "printf from-command"}\n  bad: {path: ${dir}/x, password-command: "echo secret-output; exit 3"}\n  plain: {path: ${dir}/p}\n`, F);
    const creds = new Credentials(c, { value: 'from-env' });
    assert.deepEqual(creds.access('f'), { repo: `${dir}/f`, password: 'from-file' });
    assert.deepEqual(creds.access('c'), { repo: `${dir}/c`, password: 'from-command' });
    assert.deepEqual(creds.access(`${dir}/c`), { repo: `${dir}/c`, password: 'from-command' }, 'a location finds its configured repository');
    assert.deepEqual(creds.access('f', { file: join(dir, 'given') }), { repo: `${dir}/f`, password: 'given' });
    assert.deepEqual(creds.access('plain'), { repo: `${dir}/p`, password: 'from-env' });
    assert.deepEqual(creds.access('/elsewhere', {}, {}), { repo: '/elsewhere' });
    assert.throws(() => creds.access('bad'), (err: unknown) => err instanceof QbackupError && err.code === 'PASSWORD_UNAVAILABLE' && err.message === 'The password-command of repository "bad" gave no passphrase: it exited with status 3');
    writeFileSync(join(dir, 'aws'), '[other]\naws_access_key_id = O\naws_secret_access_key = OS\n[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n');
    assert.deepEqual(readCredentialsFile(join(dir, 'aws'), 'off'), { accessKeyId: 'AK', secretAccessKey: 'SK' });
  });

  test('config check masks password commands and URL credentials', () => {
    const c = parseConfig(
      'repositories:\n  c: {path: /b, password-command: "echo hunter2"}\n  off: {url: "s3://bk/p", endpoint: "https://user:pw@s3.example.net"}\n' +
        'notifications:\n  hook: {webhook: "https://h.example.net/hook?token=abc123"}\n',
      F,
    );
    const text = `${JSON.stringify(effectiveConfig(c))}\n${describeConfig(c)}`;
    for (const secret of ['hunter2', 'abc123', 'user:pw']) assert.ok(!text.includes(secret), `${secret} is masked`);
    assert.match(text, /https:\/\/h\.example\.net\/hook/);
  });
});
