// An incremental with nothing dirty (real QEMU): the QEMU driver makes the
// backup's checkpoint alone, with no job or export, and the repository writes
// an empty delta. What must hold, with guest writes (HMP qemu-io) placed
// exactly around the checkpoint's instant by a proxy on QEMU's monitor socket:
// - the empty backup restores byte-exact, reads nothing, and its checkpoint is
//   the current one; the next backup after a write has exactly that write;
// - a write that lands after the first look at the bitmaps but before the
//   checkpoint is in this backup (the checkpoint is taken back and the full
//   job runs), and the chain is as if nothing had been tried;
// - a write that lands just after the checkpoint is not in this backup but is
//   in the next one;
// - a backup killed right after the checkpoint was made lists nothing, and the
//   next backup of the domain restores byte-exact (its checkpoint merged away).

import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { after, before, describe, test } from 'node:test';
import type { Manifest } from '../../src/repository/repository.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { imageDiffers, referenceCopies } from '../helpers/repo.js';
import { SocketInterposer } from '../helpers/socket-interposer.js';

/**
 * Sits on a domain's QMP socket and runs HMP qemu-io writes around the first
 * checkpoint-only transaction (bitmap changes, no backup job) a connection
 * sends: `before`, just before QEMU gets it; `after`, just after QEMU
 * answered it and before qbackup hears the answer. Everything else passes
 * untouched.
 */
class WriteAroundCheckpoint {
  /** How many of the writes were made. */
  fired = 0;
  private seen = false;

  private interposer: SocketInterposer | undefined;

  private constructor(private readonly writes: { before?: string; after?: string }) {}

  static async install(path: string, writes: { before?: string; after?: string }): Promise<WriteAroundCheckpoint> {
    const proxy = new WriteAroundCheckpoint(writes);
    proxy.interposer = await SocketInterposer.install(path, (client, upstream) => proxy.relay(client, upstream));
    return proxy;
  }

  private relay(client: Socket, upstream: Socket): void {
    const toQemu: string[] = [];
    let waitingWrite: (() => void) | undefined;
    let heldReplyId: unknown;
    let fromClient = '';
    let fromQemu = '';
    const injectWrite = (hmp: string, then: () => void): void => {
      this.fired++;
      waitingWrite = then;
      upstream.write(`${JSON.stringify({ execute: 'human-monitor-command', arguments: { 'command-line': hmp }, id: 'write-around-checkpoint' })}\n`);
    };
    const pump = (): void => {
      while (waitingWrite === undefined && toQemu.length > 0) {
        const line = toQemu.shift() ?? '';
        const msg = JSON.parse(line) as { execute?: string; id?: unknown; arguments?: { actions?: Array<{ type: string }> } };
        const actions = msg.execute === 'transaction' ? (msg.arguments?.actions ?? []) : [];
        const checkpointOnly = actions.some((a) => a.type === 'block-dirty-bitmap-add') && !actions.some((a) => a.type === 'blockdev-backup');
        if (!this.seen && checkpointOnly) {
          this.seen = true;
          if (this.writes.after !== undefined) heldReplyId = msg.id;
          if (this.writes.before !== undefined) {
            injectWrite(this.writes.before, () => upstream.write(line));
            return;
          }
        }
        upstream.write(line);
      }
    };
    client.on('data', (chunk) => {
      fromClient += chunk.toString('utf8');
      for (let nl = fromClient.indexOf('\n'); nl >= 0; nl = fromClient.indexOf('\n')) {
        toQemu.push(fromClient.slice(0, nl + 1));
        fromClient = fromClient.slice(nl + 1);
      }
      pump();
    });
    upstream.on('data', (chunk) => {
      fromQemu += chunk.toString('utf8');
      for (let nl = fromQemu.indexOf('\n'); nl >= 0; nl = fromQemu.indexOf('\n')) {
        const line = fromQemu.slice(0, nl + 1);
        fromQemu = fromQemu.slice(nl + 1);
        const msg = JSON.parse(line) as { id?: unknown; return?: unknown };
        if (msg.id === 'write-around-checkpoint') {
          const then = waitingWrite;
          waitingWrite = undefined;
          then?.();
          pump();
          continue;
        }
        if (heldReplyId !== undefined && msg.id === heldReplyId) {
          heldReplyId = undefined;
          injectWrite(this.writes.after ?? '', () => client.write(line));
          continue;
        }
        client.write(line);
      }
    });
    const end = (): void => {
      client.destroy();
      upstream.destroy();
    };
    client.on('close', end).on('error', end);
    upstream.on('close', end).on('error', end);
  }

  async remove(): Promise<void> {
    await this.interposer?.remove();
  }
}

describe('an incremental with nothing dirty (real QEMU)', () => {
  let env: TestEnv;
  let repo: string;
  const refs = new Map<string, Map<string, string>>();

  before(async () => {
    env = new TestEnv('qbt-unchanged-');
    repo = env.path('repo');
    await env.defineDomain('vm', [
      { target: 'sda', sizeBytes: 8 << 20 },
      { target: 'sdb', sizeBytes: 4 << 20 },
    ]);
    await env.qb.domains.start('vm', { paused: true });
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x11 0 3M');
    await guestWrite(env.qb, 'vm', 'sdb', 'write -P 0x22 1M 1M');
  });
  after(async () => env.cleanup());

  /** A backup through the library, with a reference copy of each disk taken `refAt` it (the bytes it must restore). */
  async function backup(tag: string, refAt: 'before' | 'after' = 'before'): Promise<Manifest> {
    const early = refAt === 'before' ? await referenceCopies(env, 'vm', tag) : undefined;
    const m = await env.qb.repository.backup('vm', { repo });
    refs.set(m.id, early ?? (await referenceCopies(env, 'vm', tag)));
    return m;
  }

  async function assertRestores(m: Manifest, tag: string): Promise<void> {
    const r = await env.qb.repository.restore('vm', { repo, backup: m.id, to: env.path(`restore-${tag}`), format: 'raw' });
    for (const d of r.disks) {
      const want = refs.get(m.id)?.get(d.target);
      assert.ok(want !== undefined, `a reference of ${d.target} for ${m.id}`);
      assert.equal(await imageDiffers(d.file, 'raw', want), undefined, `backup ${m.id} (${tag}) disk ${d.target}`);
    }
  }

  function bytesRead(m: Manifest): number {
    return m.disks.reduce((n, d) => n + d.bytesRead, 0);
  }

  function qmpSocket(): string {
    const socket = env.qb.domains.loadContext('vm').runtime?.qmp_socket;
    assert.ok(typeof socket === 'string' && socket !== '', 'the domain runs with a QMP socket');
    return socket;
  }

  function currentCheckpoint(): string | undefined {
    return env.qb.checkpoints.list('vm').find((c) => c.current)?.name;
  }

  test('an empty incremental reads nothing, restores byte-exact and makes the current checkpoint', async () => {
    const full = await backup('full');
    assert.ok(full.disks.every((d) => d.level === 'full'));
    const empty = await backup('empty');
    assert.deepEqual(empty.disks.map((d) => [d.target, d.level, d.bytesRead, d.chunks]), [['sda', 'incremental', 0, 0], ['sdb', 'incremental', 0, 0]]);
    assert.equal(currentCheckpoint(), empty.checkpoint);
    assert.deepEqual(env.qb.checkpoints.list('vm').map((c) => c.name), [full.checkpoint, empty.checkpoint]);
    await assertRestores(full, 'full');
    await assertRestores(empty, 'empty');
  });

  test('after an empty incremental, the next backup has exactly the write made since', async () => {
    await guestWrite(env.qb, 'vm', 'sdb', 'write -P 0x33 64k 64k');
    const m = await backup('after-empty');
    assert.deepEqual(m.disks.map((d) => [d.target, d.level, d.bytesRead]), [['sda', 'incremental', 0], ['sdb', 'incremental', 65536]]);
    await assertRestores(m, 'after-empty');
  });

  test('a write landing between the look at the bitmaps and the checkpoint is in the backup', async () => {
    const before = env.qb.checkpoints.list('vm').map((c) => c.name);
    const dev = env.qb.domains.blockList('vm').find((d) => d.target === 'sda')?.qemuIoDevice ?? '';
    const proxy = await WriteAroundCheckpoint.install(qmpSocket(), { before: `qemu-io -d ${dev} "write -P 0x44 5M 64k"` });
    let m: Manifest;
    try {
      m = await backup('write-before', 'after');
    } finally {
      await proxy.remove();
    }
    assert.equal(proxy.fired, 1, 'the write was made before the checkpoint transaction');
    assert.deepEqual(m.disks.map((d) => [d.target, d.level, d.bytesRead]), [['sda', 'incremental', 65536], ['sdb', 'incremental', 0]]);
    // One checkpoint more, the backup's own, current; the one taken back left nothing.
    assert.deepEqual(env.qb.checkpoints.list('vm').map((c) => c.name), [...before, m.checkpoint]);
    assert.equal(currentCheckpoint(), m.checkpoint);
    await assertRestores(m, 'write-before');
    const next = await backup('after-write-before');
    assert.equal(bytesRead(next), 0, 'the write is not read twice');
    await assertRestores(next, 'after-write-before');
  });

  test('a write landing just after the checkpoint is not in the empty backup but in the next one', async () => {
    const dev = env.qb.domains.blockList('vm').find((d) => d.target === 'sdb')?.qemuIoDevice ?? '';
    const proxy = await WriteAroundCheckpoint.install(qmpSocket(), { after: `qemu-io -d ${dev} "write -P 0x55 3M 128k"` });
    let m: Manifest;
    try {
      m = await backup('write-after', 'before');
    } finally {
      await proxy.remove();
    }
    assert.equal(proxy.fired, 1, 'the write was made right after the checkpoint transaction');
    assert.equal(bytesRead(m), 0, 'the backup had nothing to read');
    await assertRestores(m, 'write-after');
    const next = await backup('after-write-after');
    assert.deepEqual(next.disks.map((d) => [d.target, d.bytesRead]), [['sda', 0], ['sdb', 131072]]);
    await assertRestores(next, 'after-write-after');
  });

  test('writes on both sides of a checkpoint taken back are all in the backup (the new bitmap is merged back)', async () => {
    const dev = (target: string): string => env.qb.domains.blockList('vm').find((d) => d.target === target)?.qemuIoDevice ?? '';
    const proxy = await WriteAroundCheckpoint.install(qmpSocket(), {
      before: `qemu-io -d ${dev('sdb')} "write -P 0x77 0 64k"`,
      after: `qemu-io -d ${dev('sda')} "write -P 0x78 6M 192k"`,
    });
    let m: Manifest;
    try {
      m = await backup('write-both', 'after');
    } finally {
      await proxy.remove();
    }
    assert.equal(proxy.fired, 2, 'both writes were made');
    assert.deepEqual(m.disks.map((d) => [d.target, d.bytesRead]), [['sda', 196608], ['sdb', 65536]]);
    await assertRestores(m, 'write-both');
    const next = await backup('after-write-both');
    assert.equal(bytesRead(next), 0, 'nothing is read twice');
    await assertRestores(next, 'after-write-both');
  });

  test('a backup killed just after its checkpoint was made lists nothing; the next one restores byte-exact', async () => {
    const listed = (await env.qb.repository.list({ repo })).length;
    const checkpoints = env.qb.checkpoints.list('vm').map((c) => c.name);
    const r = await env.cli(['backup', 'vm', '--repo', repo], { env: { QBACKUP_CRASH_AT: 'backup-unchanged:after-qemu' } });
    assert.equal(r.signal, 'SIGKILL', `the backup was killed at the fault point (it ended with ${r.code}: ${r.stderr})`);
    assert.equal((await env.qb.repository.list({ repo })).length, listed, 'the killed backup is not listed');
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x66 7M 64k');
    const m = await backup('after-kill');
    assert.deepEqual(m.disks.map((d) => [d.target, d.level, d.bytesRead]), [['sda', 'incremental', 65536], ['sdb', 'incremental', 0]]);
    assert.deepEqual(env.qb.checkpoints.list('vm').map((c) => c.name), [...checkpoints, m.checkpoint], 'the killed backup\'s checkpoint was merged away');
    await assertRestores(m, 'after-kill');
  });
});
