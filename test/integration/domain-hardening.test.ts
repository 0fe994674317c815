// Hardening of domains against hostile images and unlucky operators (issue 14),
// against real QEMU: an image's header never chooses a host file, a format is
// never probed, encrypted disks are refused rather than ignored, a hard link
// is the same image, files qbackup creates are private whatever the umask, and
// a `start` killed at any moment leaves no QEMU that qbackup does not know.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, linkSync, mkdirSync, openSync, readFileSync, readdirSync, statSync, writeSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import { runTool } from '../../src/image/tools.js';
import { TestEnv, cliPath, guestWrite } from '../helpers/env.js';

const MiB = 1 << 20;

/** Pids of the processes whose command line contains `needle` (our QEMU: its QMP socket path). */
function pidsWithArg(needle: string): number[] {
  const out: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmdline = readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      if (cmdline.includes(needle) && !cmdline.includes(cliPath)) out.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/\) [ZX] /.test(stat);
  } catch {
    return false;
  }
}

async function waitUntil(what: string, fn: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!fn()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Reads as the guest (HMP qemu-io, whose output lands in the QEMU log); true when the bytes match. */
async function guestReads(env: TestEnv, domain: string, target: string, pattern: number, offset: number, length: number): Promise<boolean> {
  const log = `${env.stateDir}/domains/${domain}/qemu.log`;
  const from = statSync(log).size;
  await guestWrite(env.qb, domain, target, `read -P ${pattern} ${offset} ${length}`);
  const text = readFileSync(log, 'utf8').slice(from);
  assert.match(text, /read \d+\/\d+ bytes/, `qemu-io ran: ${text}`);
  return !/Pattern verification failed/.test(text);
}

function oneSentence(stderr: string): void {
  assert.equal(stderr.trim().split('\n').length, 1, stderr);
  assert.doesNotMatch(stderr, /internal error|\n\s+at /);
}

describe('domain hardening (real QEMU)', () => {
  let env: TestEnv;
  let secret: string;
  before(async () => {
    env = new TestEnv('qbh-');
    // A host file the images below try to reach: 1 MiB of 0x5e.
    secret = env.path('host-secret.raw');
    const fd = openSync(secret, 'w');
    writeSync(fd, Buffer.alloc(MiB, 0x5e));
    closeSync(fd);
    await env.defineDomain('vm', [{ target: 'sda' }]);
  });
  after(async () => env.cleanup());

  test('a qcow2 naming a backing file is refused at define, attach and start, naming the image and the file', async () => {
    const evil = env.path('evil.qcow2');
    await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', '/etc/shadow', '-F', 'raw', evil, '16M']);
    const attach = await env.cli(['attach-disk', 'vm', evil, 'sdb', '--subdriver', 'qcow2']);
    assert.equal(attach.code, 1);
    oneSentence(attach.stderr);
    assert.match(attach.stderr, /evil\.qcow2.*backing file "\/etc\/shadow"/);
    // Without --subdriver (the issue's own example), refused too: never guessed, never opened as qcow2.
    const bare = await env.cli(['attach-disk', 'vm', evil, 'sdb']);
    assert.equal(bare.code, 1);
    oneSentence(bare.stderr);
    assert.match(bare.stderr, /evil\.qcow2.*qcow2 header/);
    const xml = env.writeFile('evil.xml', env.domainXml('evil', [{ target: 'sda', file: evil }]));
    const define = await env.cli(['define', xml]);
    assert.equal(define.code, 1);
    oneSentence(define.stderr);
    assert.match(define.stderr, /evil\.qcow2.*backing file "\/etc\/shadow"/);
    assert.equal(env.qb.domains.list({ all: true }).length, 1);

    // An image that gains a backing file after define (an offline rebase) is refused at start.
    const later = await env.image('later.qcow2', 16 * MiB);
    await env.cliOk(['define', env.writeFile('later.xml', env.domainXml('later', [{ target: 'sda', file: later }]))]);
    await runTool('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', secret, '-F', 'raw', later]);
    const start = await env.cli(['start', 'later']);
    assert.equal(start.code, 1);
    oneSentence(start.stderr);
    assert.match(start.stderr, /Cannot start domain "later": image ".*later\.qcow2" of disk "sda" names the backing file ".*host-secret\.raw"/);
    assert.equal(env.qb.domains.info('later').state, 'shut off');
    await env.cliOk(['undefine', 'later']);
  });

  test('a <backingStore> chain and <encryption> in domain XML are refused, not ignored', async () => {
    const img = await env.image('enc.qcow2');
    const enc = `<domain><name>enc</name><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${img}'/>
      <target dev='sda'/><encryption format='luks'><secret type='passphrase' uuid='0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f'/></encryption></disk></devices></domain>`;
    const r = await env.cli(['define', env.writeFile('enc.xml', enc)]);
    assert.equal(r.code, 1);
    oneSentence(r.stderr);
    assert.match(r.stderr, /disk "sda" of domain "enc".*encryption/);
    const chain = `<domain><name>chain</name><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${img}'/>
      <target dev='sda'/><backingStore type='file'><format type='raw'/><source file='${secret}'/></backingStore></disk></devices></domain>`;
    const c = await env.cli(['define', env.writeFile('chain.xml', chain)]);
    assert.equal(c.code, 1);
    oneSentence(c.stderr);
    assert.match(c.stderr, /disk "sda" of domain "chain".*<backingStore>/);
    assert.deepEqual(env.qb.domains.list({ all: true }).map((d) => d.name), ['vm']);
  });

  test('without a format a disk is raw: a guest-written qcow2 header stays raw bytes after re-attach, and an ambiguous image needs a format', async () => {
    // The guest of a raw disk writes a qcow2 header naming a host file (here: the header of a real qcow2).
    const raw = await env.image('guest.raw', 16 * MiB, 'raw');
    const evil = env.path('header.qcow2');
    await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', secret, '-F', 'raw', evil, '16M']);
    const header = readFileSync(evil);
    const fd = openSync(raw, 'r+');
    writeSync(fd, header, 0, header.length, 0);
    closeSync(fd);

    await env.cliOk(['attach-disk', 'vm', raw, 'sdb', '--subdriver', 'raw']);
    await env.cliOk(['detach-disk', 'vm', 'sdb']);
    // Re-attached without a format, an image that starts with a qcow2 header is not guessed at: refused.
    const ambiguous = await env.cli(['attach-disk', 'vm', raw, 'sdb']);
    assert.equal(ambiguous.code, 1);
    oneSentence(ambiguous.stderr);
    assert.match(ambiguous.stderr, /starts with a qcow2 header; give its format, qcow2 .* or raw/);
    await env.cliOk(['attach-disk', 'vm', raw, 'sdb', '--subdriver', 'raw']);
    const blk = JSON.parse(await env.cliOk(['domblklist', 'vm', '--json'])) as Array<{ target: string; format: string }>;
    assert.deepEqual(blk.map((d) => [d.target, d.format]), [['sda', 'qcow2'], ['sdb', 'raw']]);
    assert.match(await env.cliOk(['dumpxml', 'vm']), /type="raw"/);

    await env.cliOk(['start', 'vm', '--paused']);
    try {
      assert.ok(await guestReads(env, 'vm', 'sdb', 0x51, 0, 1), 'the guest reads the "Q" of the qcow2 magic');
      assert.ok(!(await guestReads(env, 'vm', 'sdb', 0x5e, 0, 512)), 'the guest does not read the host file');
      assert.ok(!(await guestReads(env, 'vm', 'sdb', 0x5e, 512 * 1024, 512)), 'nor past the header');
      // A write lands at the same offset of the file: raw, not a qcow2 cluster.
      await guestWrite(env.qb, 'vm', 'sdb', 'write -P 0xc3 4M 64k');
      await guestWrite(env.qb, 'vm', 'sdb', 'flush');
    } finally {
      await env.cliOk(['destroy', 'vm']);
    }
    const bytes = readFileSync(raw);
    assert.ok(bytes.subarray(4 * MiB, 4 * MiB + 65536).every((b) => b === 0xc3));
    const { stdout } = await runTool('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x51 0 1', raw]);
    assert.doesNotMatch(stdout, /Pattern verification failed/);
    await env.cliOk(['detach-disk', 'vm', 'sdb']);
  });

  test('an image declared qcow2 must be qcow2 (checked with -f qcow2, not probed)', async () => {
    const raw = await env.image('plain.raw', 8 * MiB, 'raw');
    const r = await env.cli(['attach-disk', 'vm', raw, 'sdb', '--subdriver', 'qcow2']);
    assert.equal(r.code, 1);
    oneSentence(r.stderr);
    assert.match(r.stderr, /plain\.raw.*not.*qcow2/i);
  });

  test('a hard link to another domain\'s image is the same image', async () => {
    const sda = env.qb.domains.blockList('vm')[0]?.source ?? '';
    const link = env.path('hardlink.qcow2');
    linkSync(sda, link);
    const r = await env.cli(['define', env.writeFile('hl.xml', env.domainXml('hl', [{ target: 'sda', file: link }]))]);
    assert.equal(r.code, 1);
    oneSentence(r.stderr);
    assert.match(r.stderr, /hardlink\.qcow2.*disk "sda" of domain "vm"/);
    const twin = await env.cli(['attach-disk', 'vm', link, 'sdc', '--subdriver', 'qcow2']);
    assert.equal(twin.code, 1);
    assert.match(twin.stderr, /already disk "sda"/);
  });

  test('backup targets, scratch images and their directories are owner-only whatever the umask', async () => {
    const old = process.umask(0);
    try {
      await env.qb.domains.start('vm', { paused: true });
      const job = await env.qb.backups.begin('vm', { mode: 'push' }, { targetDir: env.path('bk/new/dir') });
      await env.qb.backups.wait('vm', job.id);
      const file = job.disks[0]?.targetFile ?? '';
      assert.equal(statSync(file).mode & 0o777, 0o600, 'push target');
      assert.equal(statSync(env.path('bk/new/dir')).mode & 0o777, 0o700);
      assert.equal(statSync(env.path('bk/new')).mode & 0o777, 0o700);
      mkdirSync(env.path('scratch-parent'), { mode: 0o755 });
      const pull = await env.qb.backups.begin('vm', { mode: 'pull', disks: [{ target: 'sda', scratchFile: env.path('scratch-parent/s/sda.qcow2') }] });
      try {
        assert.equal(statSync(env.path('scratch-parent/s/sda.qcow2')).mode & 0o777, 0o600, 'scratch image');
        assert.equal(statSync(env.path('scratch-parent/s')).mode & 0o777, 0o700);
      } finally {
        await env.qb.backups.abort('vm');
        void pull;
      }
      assert.equal(statSync(`${env.stateDir}/domains/vm`).mode & 0o777, 0o700);
    } finally {
      process.umask(old);
      await env.qb.domains.destroy('vm');
    }
  });

  for (const signal of ['SIGKILL', 'SIGTERM', 'SIGINT'] as const) {
    test(`a start killed by ${signal} while QEMU starts leaves no unknown QEMU`, async () => {
      const socket = `${env.stateDir}/domains/vm/qmp.sock`;
      assert.deepEqual(pidsWithArg(socket), []);
      const child = spawn(process.execPath, [cliPath, '--state-dir', env.stateDir, 'start', 'vm'], { stdio: 'ignore' });
      const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
      // Kill the CLI as soon as its QEMU exists (QMP is not up yet); the QEMU is detached and lives on.
      await waitUntil('QEMU to be spawned', () => pidsWithArg(socket).length > 0);
      child.kill(signal);
      await exited;
      const [qemu] = pidsWithArg(socket);
      assert.ok(qemu !== undefined && alive(qemu), 'QEMU outlived the killed start');

      const info = JSON.parse(await env.cliOk(['dominfo', 'vm', '--json'])) as { state: string; pid?: number };
      assert.deepEqual([info.state, info.pid], ['running', qemu], 'dominfo sees the QEMU the start left');
      if (signal === 'SIGTERM') {
        // destroy adopts and kills it
        await env.cliOk(['destroy', 'vm']);
      } else {
        // start finds it (adopted: it answers QMP) and says it runs; destroy then kills it
        const again = await env.cli(['start', 'vm']);
        assert.equal(again.code, 1, again.stderr);
        assert.match(again.stderr, /already running/);
        const adopted = JSON.parse(await env.cliOk(['dominfo', 'vm', '--json'])) as { state: string; pid?: number };
        assert.deepEqual([adopted.state, adopted.pid], ['running', qemu]);
        await env.cliOk(['destroy', 'vm']);
      }
      await waitUntil('QEMU to exit', () => !alive(qemu));
      assert.deepEqual(pidsWithArg(socket), [], 'no QEMU left behind');
      await env.cliOk(['start', 'vm']);
      await env.cliOk(['destroy', 'vm']);
      assert.deepEqual(pidsWithArg(socket).filter(alive), []);
    });
  }

  test('a start killed at 0.4 s: the next commands work and no QEMU is left', async () => {
    const socket = `${env.stateDir}/domains/vm/qmp.sock`;
    const child = spawn(process.execPath, [cliPath, '--state-dir', env.stateDir, 'start', 'vm'], { stdio: 'ignore' });
    const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
    await new Promise((r) => setTimeout(r, 400));
    child.kill('SIGKILL');
    await exited;
    const r = await env.cli(['destroy', 'vm']);
    assert.ok(r.code === 0 || /not running/.test(r.stderr), r.stderr);
    assert.deepEqual(pidsWithArg(socket).filter(alive), [], 'no QEMU left behind');
    await env.cliOk(['start', 'vm']);
    await env.cliOk(['destroy', 'vm']);
  });

  test('a starting QEMU that never answers QMP is killed and recorded as failed', async () => {
    // A stand-in process recorded as a starting QEMU by a start that died.
    const sleeper = spawn('sleep', ['600'], { detached: true, stdio: 'ignore' });
    sleeper.unref();
    const pid = sleeper.pid ?? -1;
    const pidStart = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.split(' ')[19] ?? '';
    env.qb.domains.store.setRuntime({ domain: 'vm', state: 'starting', reason: 'starting', pid, pid_start: pidStart, qmp_socket: env.path('nosuch.sock') });
    const { Qbackup } = await import('../../src/qbackup.js');
    const quick = Qbackup.open({ stateDir: env.stateDir, startTimeoutMs: 500 });
    try {
      await assert.rejects(quick.domains.destroy('vm'), (err: unknown) => isQbackupError(err, 'DOMAIN_NOT_RUNNING'));
    } finally {
      quick.close();
    }
    await waitUntil('the stand-in to be killed', () => !alive(pid));
    assert.deepEqual([env.qb.domains.info('vm').state, env.qb.domains.info('vm').reason], ['shut off', 'failed']);
  });
});
