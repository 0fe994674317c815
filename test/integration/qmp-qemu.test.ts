import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import { promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient, QmpCommandError, type QmpVersion } from '../../src/qmp/index.js';
import { isQbackupError } from '../../src/errors.js';

const execFileAsync = promisify(execFile);
const TEST_TIMEOUT_MS = 120_000;

interface RunningQemu {
  process: ChildProcess;
  pid: number;
  dir: string;
  socketPath: string;
  stderr: () => string;
}

// Every QEMU started here, so the after hook can stop any a failed test left behind.
const started = new Set<RunningQemu>();

after(async () => {
  for (const qemu of started) await stopQemu(qemu);
});

async function startQemu(): Promise<RunningQemu> {
  const dir = await mkdtemp(join(tmpdir(), 'qmp-qemu-'));
  const socketPath = join(dir, 'qmp.sock');
  const child = spawn(
    'qemu-system-x86_64',
    [
      '-M', 'q35',
      '-accel', 'tcg',
      '-nodefaults',
      '-display', 'none',
      '-m', '64',
      '-qmp', `unix:${socketPath},server=on,wait=off`,
      '-device', 'virtio-scsi-pci,id=scsi0',
    ],
    { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (text: string) => {
    stderr += text;
  });
  if (child.pid === undefined) {
    await once(child, 'error').catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
    throw new Error('could not start qemu-system-x86_64');
  }
  const qemu: RunningQemu = { process: child, pid: child.pid, dir, socketPath, stderr: () => stderr };
  started.add(qemu);
  return qemu;
}

function hasExited(child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

/** Kills by PID (never by name) if still running, then removes its directory. */
async function stopQemu(qemu: RunningQemu): Promise<void> {
  if (!hasExited(qemu.process)) {
    const exited = once(qemu.process, 'exit');
    try {
      process.kill(qemu.pid, 'SIGKILL');
    } catch {
      // Already gone between the check and the kill.
    }
    await exited;
  }
  started.delete(qemu);
  await rm(qemu.dir, { recursive: true, force: true });
}

/** Retries connect until QEMU's socket accepts; fails early if QEMU exits. */
async function connectWhenReady(qemu: RunningQemu): Promise<QmpClient> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (hasExited(qemu.process)) throw new Error(`QEMU exited early: ${qemu.stderr()}`);
    try {
      return await QmpClient.connect(qemu.socketPath, { connectTimeoutMs: 5000, defaultTimeoutMs: 20_000 });
    } catch (err) {
      const code = isQbackupError(err, 'QMP_DISCONNECTED') ? (err.cause as NodeJS.ErrnoException | undefined)?.code : undefined;
      if ((code !== 'ENOENT' && code !== 'ECONNREFUSED') || Date.now() > deadline) throw err;
    }
    await sleep(50);
  }
}

function asRecord(value: unknown, what: string): Record<string, unknown> {
  assert.ok(typeof value === 'object' && value !== null && !Array.isArray(value), `${what} is an object`);
  return value as Record<string, unknown>;
}

async function bitmapNames(qmp: QmpClient, nodeName: string): Promise<string[]> {
  const nodes = await qmp.execute('query-named-block-nodes', { flat: true });
  assert.ok(Array.isArray(nodes));
  const node = nodes.map((n) => asRecord(n, 'block node')).find((n) => n['node-name'] === nodeName);
  assert.ok(node, `node ${nodeName} is listed`);
  const bitmaps = node['dirty-bitmaps'] ?? [];
  assert.ok(Array.isArray(bitmaps));
  return bitmaps.map((b) => String(asRecord(b, 'bitmap')['name'])).sort();
}

test('QMP against a real QEMU: version, errors, transaction, HMP, quit', { timeout: TEST_TIMEOUT_MS }, async () => {
  const qemu = await startQemu();
  try {
    const qmp = await connectWhenReady(qemu);
    try {
      assert.equal(qmp.state, 'ready');
      assert.equal(qmp.greeting.version.qemu.major, 7);
      assert.equal(qmp.greeting.version.qemu.minor, 2);

      const version = await qmp.execute<QmpVersion>('query-version');
      assert.deepEqual(version.qemu, qmp.greeting.version.qemu);

      await assert.rejects(qmp.execute('no-such-command'), (err: unknown) => {
        assert.ok(err instanceof QmpCommandError);
        assert.equal(err.errorClass, 'CommandNotFound');
        assert.match(err.message, /^QMP command "no-such-command" failed: /);
        return true;
      });
      await assert.rejects(qmp.execute('blockdev-del', { 'node-name': 'missing' }), (err: unknown) => {
        assert.ok(err instanceof QmpCommandError);
        assert.ok(['GenericError', 'CommandNotFound'].includes(err.errorClass), err.errorClass);
        assert.equal(err.command, 'blockdev-del');
        return true;
      });
      assert.equal(qmp.state, 'ready', 'a failed command leaves the connection usable');

      const image = join(qemu.dir, 'disk0.qcow2');
      await execFileAsync('qemu-img', ['create', '-f', 'qcow2', image, '64M']);
      await qmp.execute('blockdev-add', {
        driver: 'qcow2',
        'node-name': 'disk0',
        file: { driver: 'file', filename: image },
      });
      await qmp.transaction([
        { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b1', persistent: true } },
        { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b2', persistent: true } },
      ]);
      assert.deepEqual(await bitmapNames(qmp, 'disk0'), ['b1', 'b2']);

      // A transaction is atomic: b3 must not appear when adding b1 again fails.
      await assert.rejects(
        qmp.transaction([
          { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b3' } },
          { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b1' } },
        ]),
        (err: unknown) => err instanceof QmpCommandError && err.errorClass === 'GenericError',
      );
      assert.deepEqual(await bitmapNames(qmp, 'disk0'), ['b1', 'b2']);

      const hmp = await qmp.humanMonitorCommand('info version');
      assert.match(hmp, /^7\.2\./);

      const cursor = qmp.eventCursor();
      const pendingWaiter = qmp.waitForEvent('NEVER_EMITTED', undefined, 60_000);
      const waiterOutcome = pendingWaiter.then(
        () => undefined,
        (err: unknown) => err,
      );
      const exited = once(qemu.process, 'exit');
      // QEMU may close the socket right after its reply; either outcome is correct for quit itself.
      const quitOutcome = await qmp.execute('quit').then(
        () => 'returned',
        (err: unknown) => err,
      );
      assert.ok(quitOutcome === 'returned' || isQbackupError(quitOutcome, 'QMP_DISCONNECTED'), String(quitOutcome));

      const shutdown = await qmp.waitForEvent('SHUTDOWN', undefined, 20_000, cursor);
      assert.equal(shutdown.data['reason'], 'host-qmp-quit');
      assert.ok(shutdown.seq > cursor);

      const reason = await qmp.closed;
      assert.ok(reason instanceof Error, 'closed reports why');
      assert.equal(qmp.state, 'closed');
      const waiterError = await waiterOutcome;
      assert.ok(isQbackupError(waiterError, 'QMP_DISCONNECTED'), String(waiterError));
      assert.equal(waiterError.cause, reason);
      await assert.rejects(qmp.execute('query-status'), (err: unknown) => isQbackupError(err, 'QMP_STATE'));

      const [code] = await exited;
      assert.equal(code, 0, qemu.stderr());
    } finally {
      await qmp.close();
    }
  } finally {
    await stopQemu(qemu);
  }
});

test('kill -9 of QEMU fails a pending waitForEvent with QMP_DISCONNECTED', { timeout: TEST_TIMEOUT_MS }, async () => {
  const qemu = await startQemu();
  try {
    await using qmp = await connectWhenReady(qemu);
    assert.equal((await qmp.execute<{ status: string }>('query-status')).status, 'running');
    const waiter = qmp.waitForEvent('NEVER_EMITTED', undefined, 60_000);
    const outcome = waiter.then(
      () => undefined,
      (err: unknown) => err,
    );
    process.kill(qemu.pid, 'SIGKILL');
    const err = await outcome;
    assert.ok(isQbackupError(err, 'QMP_DISCONNECTED'), String(err));
    const reason = await qmp.closed;
    assert.ok(reason instanceof Error);
    assert.equal(err.cause, reason);
    assert.equal(qmp.state, 'closed');
  } finally {
    await stopQemu(qemu);
  }
});
