// Bad input at a libvirt connection gets one sentence from the CLI (exit 1)
// and touches no repository: a libvirt too old for backups, permission
// denied on the daemon's socket, and no libvirt at the URI (no socket, or a
// socket nothing listens on). The old version comes from a small fake daemon
// on a unix socket (test/helpers/fake-libvirtd.ts): no real libvirtd of
// another version can be installed beside the machine's one. A domain libvirt
// does not know is tested against the real daemon (libvirt-faults.test.ts).

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { cliPath } from '../helpers/env.js';
import { FakeLibvirtd } from '../helpers/fake-libvirtd.js';

const NOBODY = 65534;

interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

function cli(args: readonly string[], options: { uid?: number; gid?: number; home?: string } = {}): Promise<CliResult> {
  const { home, ...ids } = options;
  return new Promise((resolve, reject) => {
    const env = { ...process.env, QBACKUP_CONNECT: '', ...(home !== undefined ? { HOME: home } : {}) };
    const child = spawn(process.execPath, [cliPath, ...args], { stdio: ['ignore', 'pipe', 'pipe'], cwd: '/', env, ...ids });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    child.on('error', reject);
    child.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

/** One line `error: …` matching `pattern`, exit 1. */
function assertOneSentence(r: CliResult, pattern: RegExp): void {
  assert.equal(r.code, 1, r.stderr);
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, r.stderr);
  assert.match(lines[0] ?? '', /^error: /);
  assert.match(lines[0] ?? '', pattern);
}

/** Running the CLI as nobody needs root, and a checkout nobody may read. */
function nobodySkip(): string | false {
  if (process.getuid?.() !== 0) return 'needs root to run the CLI as another user';
  const probe = spawnSync(process.execPath, [cliPath, '--version'], { uid: NOBODY, gid: NOBODY, cwd: '/' });
  return probe.status === 0 ? false : `user ${NOBODY} cannot run ${cliPath}: ${probe.stderr.toString().trim()}`;
}

describe('bad input at a libvirt connection, through the CLI', () => {
  let work: string;
  let state: string;
  let repo: string;
  const daemons: FakeLibvirtd[] = [];

  before(() => {
    work = mkdtempSync(join(tmpdir(), 'qbt-lverr-'));
    chmodSync(work, 0o777);
    state = join(work, 'state');
    repo = join(work, 'repo');
  });

  after(async () => {
    for (const d of daemons) await d.stop();
    rmSync(work, { recursive: true, force: true });
  });

  const fake = async (version: number): Promise<FakeLibvirtd> => {
    const d = new FakeLibvirtd(version);
    daemons.push(d);
    await d.listen();
    return d;
  };

  it('a libvirt too old for backups (before 7.2.0): one sentence naming its version and the one needed', async () => {
    const old = await fake(6_010_000);
    const r = await cli(['--state-dir', state, 'backup', 'vm1', '--repo', repo, '--connect', old.uri]);
    assertOneSentence(r, /libvirt at qemu\+unix:\/\/\/system\?socket=\S+ is version 6\.10\.0, and qbackup needs libvirt 7\.2\.0 or newer/);
    assert.equal(existsSync(repo), false, 'no repository was created');
    assertOneSentence(await cli(['--state-dir', state, 'list', '--connect', old.uri]), /is version 6\.10\.0, and qbackup needs libvirt 7\.2\.0/);
    // 7.2.0 itself is enough: the same fake lists its (no) domains.
    const enough = await fake(7_002_000);
    const listed = await cli(['--state-dir', state, '--json', 'list', '--connect', enough.uri]);
    assert.equal(listed.code, 0, listed.stderr);
    assert.deepEqual(JSON.parse(listed.stdout), []);
  });

  it('permission denied on the socket (a socket only root may open, the CLI run as nobody): one sentence', async (t) => {
    const skip = nobodySkip();
    if (skip !== false) {
      t.skip(skip);
      return;
    }
    const d = await fake(9_000_000);
    chmodSync(d.path, 0o600);
    const r = await cli(['--state-dir', join(work, 'nobody-state'), 'backup', 'vm1', '--repo', join(work, 'nobody-repo'), '--connect', d.uri], { uid: NOBODY, gid: NOBODY, home: work });
    assertOneSentence(r, /^error: Permission denied on libvirt's socket \S+ for qemu\+unix:\/\/\/system\?socket=\S+: run as root or as a member of the group that owns it$/);
    assert.equal(existsSync(join(work, 'nobody-repo')), false);
    assert.deepEqual(d.calls, [], 'nothing reached the daemon');
  });

  it('no libvirt at the URI: no socket, or a socket nothing listens on: one sentence each', async () => {
    const missing = join(work, 'no-such.sock');
    assertOneSentence(await cli(['--state-dir', state, 'backup', 'vm1', '--repo', repo, '--connect', `qemu+unix:///system?socket=${missing}`]), /^error: No libvirt daemon at \S+: the socket \S+no-such\.sock does not exist \(is libvirtd running\?\)$/);
    // A socket left behind by a daemon that is gone.
    const stale = join(work, 'stale.sock');
    const server = createServer();
    await new Promise<void>((resolve) => server.listen(stale, resolve));
    // Closing a server removes its socket file; a copy of the inode stays by a hard link.
    spawnSync('ln', [stale, `${stale}.left`]);
    await new Promise((resolve) => server.close(resolve));
    assertOneSentence(await cli(['--state-dir', state, 'list', '--connect', `qemu+unix:///system?socket=${stale}.left`]), /^error: No libvirt daemon at \S+: nothing listens on \S+stale\.sock\.left \(is libvirtd running\?\)$/);
    assert.equal(existsSync(repo), false);
  });
});
