// Resizes lose coverage (src/checkpoint/resize.ts): QEMU 7.2 does not mark
// the area a disk grows into as dirty, so a disk shrunk and grown back reads
// zeroes where an incremental since an older checkpoint would restore the old
// bytes. Every way qbackup sees a resize — QMP through
// qemu-monitor-command, blockresize running or shut off, a size changed
// behind its back — must make the next backup of that disk full, with reason
// "resized", and the backup must equal what the guest reads.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { runTool } from '../../src/image/tools.js';
import { TestEnv, guestWrite } from '../helpers/env.js';

const MiB = 1 << 20;

describe('resizes lose coverage (real QEMU)', () => {
  let env: TestEnv;

  before(async () => {
    env = new TestEnv();
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 48 * MiB }]);
  });
  after(async () => env.cleanup());

  async function coverage(cp: string): Promise<{ mode: string; codes: string[] }> {
    const [c] = await env.qb.checkpoints.coverage('vm', cp);
    assert.ok(c !== undefined);
    return { mode: c.mode, codes: c.reasons.map((r) => r.code) };
  }
  const nodeName = (): string => env.qb.domains.blockList('vm')[0]?.nodeName ?? '';

  test('shrink and grow back through QMP: coverage says resized, and the backup equals the guest view', async () => {
    await env.qb.domains.start('vm', { paused: true });
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0xab 40M 64k');
    await env.qb.checkpoints.create('vm', { name: 'c1' });
    assert.equal((await coverage('c1')).mode, 'incremental');
    for (const size of [32 * MiB, 48 * MiB]) {
      await env.qb.domains.monitorCommand('vm', JSON.stringify({ execute: 'block_resize', arguments: { 'node-name': nodeName(), size } }));
    }
    // The guest now reads zeroes where it wrote 0xab.
    await guestWrite(env.qb, 'vm', 'sda', 'read -P 0 40M 64k');
    assert.deepEqual(await coverage('c1'), { mode: 'full', codes: ['resized'] });

    const job = await env.qb.backups.wait('vm', (await env.qb.backups.begin('vm', { mode: 'push', since: 'c1' }, { checkpoint: { name: 'c2' }, targetDir: env.path('bk') })).id);
    assert.equal(job.state, 'completed');
    const disk = job.disks[0];
    assert.equal(disk?.mode, 'full');
    assert.deepEqual(disk?.fullReasons?.map((r) => r.code), ['resized']);
    await guestWrite(env.qb, 'vm', 'sda', 'flush');
    const source = env.qb.domains.blockList('vm')[0]?.source ?? '';
    await runTool('qemu-img', ['compare', '-U', disk?.targetFile ?? '', source]);
    // A checkpoint taken after the resize starts clean.
    assert.equal((await coverage('c2')).mode, 'incremental');
  });

  test('the blockresize command is seen too, and refuses to shrink unless asked', async () => {
    // (HMP's block_resize cannot name a -blockdev node, so QMP is the monitor's only way.)
    await env.qb.checkpoints.create('vm', { name: 'c4' });
    const r = await env.cli(['blockresize', 'vm', 'sda', '64M']);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(await coverage('c4'), { mode: 'full', codes: ['resized'] });
    const shrink = await env.cli(['blockresize', 'vm', 'sda', '32M']);
    assert.equal(shrink.code, 1);
    assert.match(shrink.stderr, /without --shrink/);
  });

  test('shut off: blockresize, and an image resized behind qbackup\'s back, lose coverage', async () => {
    await env.qb.checkpoints.create('vm', { name: 'c5' });
    await env.qb.domains.shutdown('vm');
    assert.equal((await coverage('c5')).mode, 'incremental');
    await env.qb.domains.blockResize('vm', 'sda', 72 * MiB);
    assert.deepEqual(await coverage('c5'), { mode: 'full', codes: ['resized'] });
    await env.qb.checkpoints.create('vm', { name: 'c6' });
    const source = env.qb.domains.blockList('vm')[0]?.source ?? '';
    await runTool('qemu-img', ['resize', '-f', 'qcow2', source, String(80 * MiB)]);
    assert.deepEqual(await coverage('c6'), { mode: 'full', codes: ['resized'] });
    await env.qb.domains.start('vm', { paused: true });
    assert.deepEqual(await coverage('c6'), { mode: 'full', codes: ['resized'] });
    await env.qb.domains.destroy('vm');
  });
});
