// Two commands on one domain never interleave, and a QEMU that dies while a
// command waits on it turns into a clear error with the domain marked crashed
// and its definition unchanged.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import { Qbackup } from '../../src/qbackup.js';
import { acquireDomainLock } from '../../src/store/lock.js';
import { TestEnv } from '../helpers/env.js';

describe('domain locking and QEMU death', () => {
  let env: TestEnv;
  before(async () => {
    env = new TestEnv();
    await env.defineDomain('vm', [{ target: 'sda' }]);
    const vd = await env.image('vd.qcow2');
    await env.qb.domains.attachDisk('vm', { source: vd, target: 'vda', format: 'qcow2' });
  });
  after(async () => env.cleanup());

  test('a second process waits for the lock, then fails with the holder named', async () => {
    const lock = await acquireDomainLock(env.qb.db, 'vm', 'test-holder', { timeoutMs: 1000 });
    try {
      const r = await env.cli(['--lock-timeout', '0.5', 'start', 'vm']);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /Domain "vm" is busy: command "test-holder" \(pid \d+\)/);
      assert.equal(env.qb.domains.info('vm').state, 'shut off');
    } finally {
      lock.release();
    }
  });

  test('a lock left by a dead process is taken over', async () => {
    env.qb.db
      .prepare('INSERT INTO locks (domain, owner_pid, owner_token, command, acquired_ms) VALUES (?, ?, ?, ?, ?)')
      .run('vm', 2 ** 22 + 12345, '1:dead', 'killed-command', Date.now());
    await env.cliOk(['list']);
    const r = await env.cli(['--lock-timeout', '1', 'dominfo', 'vm']);
    assert.equal(r.code, 0, r.stderr);
    const lock = await acquireDomainLock(env.qb.db, 'vm', 'after-stale', { timeoutMs: 1000 });
    lock.release();
  });

  test('two starts at once: exactly one starts the domain, the other is told it runs', async () => {
    const [a, b] = await Promise.all([env.cli(['start', 'vm']), env.cli(['start', 'vm'])]);
    const codes = [a.code, b.code].sort();
    assert.deepEqual(codes, [0, 1], `${a.stderr} ${b.stderr}`);
    assert.match(a.code === 1 ? a.stderr : b.stderr, /already running/);
  });

  test('virtio detach without a guest OS times out with the reason, and changes nothing', async () => {
    const before = env.qb.domains.dumpXml('vm');
    await assert.rejects(env.qb.domains.detachDisk('vm', 'vda'), (err: unknown) => {
      assert.ok(isQbackupError(err, 'QMP_TIMEOUT'));
      assert.match(err.message, /virtio disks are released only by a guest OS/);
      return true;
    });
    assert.equal(env.qb.domains.dumpXml('vm'), before);
  });

  test('QEMU killed while a command waits: QEMU_DIED, domain crashed, definition unchanged', async () => {
    const before = env.qb.domains.dumpXml('vm');
    const pid = env.qb.domains.info('vm').pid;
    assert.ok(pid !== undefined);
    // A second library instance on the same state directory that waits long for the guest.
    const patient = Qbackup.open({ stateDir: env.stateDir, detachTimeoutMs: 20_000 });
    setTimeout(() => process.kill(pid, 'SIGKILL'), 300);
    await assert.rejects(patient.domains.detachDisk('vm', 'vda').finally(() => patient.close()), (err: unknown) => {
      assert.ok(isQbackupError(err, 'QEMU_DIED'), String(err));
      assert.match(err.message, /Domain "vm" crashed during detach-disk/);
      return true;
    });
    assert.equal(env.qb.domains.info('vm').state, 'crashed');
    assert.equal(env.qb.domains.dumpXml('vm'), before);
  });
});

