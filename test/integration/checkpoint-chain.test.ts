// The chain model against real QEMU: for every checkpoint T, "changed since T"
// (merged bitmaps read back as extents over NBD) is exactly the clusters the
// test wrote since T — after creating, after deleting a middle, the newest and
// the root checkpoint, across a clean restart and offline changes — and the
// coverage rules answer "full" with the right reason when coverage is lost.

import { formatCheckpointXml } from '../../src/libvirt/checkpoint.js';
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { DiskCoverage } from '../../src/checkpoint/coverage.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { changedSince, clustersOf, type Extent } from '../helpers/extents.js';

const MiB = 1 << 20;

describe('checkpoint chain (real QEMU)', () => {
  let env: TestEnv;
  /** Writes issued after each checkpoint was created, per target. */
  const writesSince = new Map<string, Map<string, Extent[]>>();

  async function write(target: string, cmd: string, offset: number, length: number): Promise<void> {
    await guestWrite(env.qb, 'vm', target, cmd);
    for (const perTarget of writesSince.values()) perTarget.get(target)?.push({ offset, length });
  }
  async function checkpoint(name: string, targets: readonly string[] = ['sda']): Promise<void> {
    await env.qb.checkpoints.create('vm', { name });
    writesSince.set(name, new Map(targets.map((t) => [t, []])));
  }
  async function expectExact(target: string, granularity = 65536): Promise<void> {
    for (const cp of env.qb.checkpoints.list('vm')) {
      const expected = writesSince.get(cp.name)?.get(target);
      if (expected === undefined) continue;
      const got = await changedSince(env.qb, 'vm', cp.name, target);
      assert.deepEqual(got, clustersOf(expected, granularity), `changed since ${cp.name} on ${target}`);
    }
  }
  async function coverageOf(cp: string, target: string): Promise<DiskCoverage> {
    const c = (await env.qb.checkpoints.coverage('vm', cp)).find((x) => x.target === target);
    assert.ok(c !== undefined);
    return c;
  }
  async function recordingBitmaps(target: string): Promise<string[]> {
    const disk = env.qb.domains.blockList('vm').find((d) => d.target === target);
    const nodes = (await env.qb.domains.monitorCommand('vm', JSON.stringify({ execute: 'query-named-block-nodes', arguments: { flat: true } }))) as Array<{
      'node-name': string;
      'dirty-bitmaps'?: Array<{ name: string; recording: boolean }>;
    }>;
    const node = nodes.find((n) => n['node-name'] === disk?.nodeName);
    return (node?.['dirty-bitmaps'] ?? []).filter((b) => b.recording).map((b) => b.name);
  }

  before(async () => {
    env = new TestEnv();
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 16 * MiB }]);
    await env.qb.domains.start('vm', { paused: true });
  });
  after(async () => env.cleanup());

  test('a chain of six checkpoints: only the newest records, each T sees exactly the writes since T', async () => {
    await write('sda', 'write -P 0x01 0 64k', 0, 65536); // before any checkpoint: never reported
    for (let i = 1; i <= 6; i++) {
      await checkpoint(`c${i}`);
      await write('sda', `write -P 0x1${i} ${i}M 4k`, i * MiB, 4096);
      if (i === 3) await write('sda', 'write -z 8M 128k', 8 * MiB, 128 * 1024);
      if (i === 4) await write('sda', 'discard 0 64k', 0, 65536);
    }
    assert.deepEqual(await recordingBitmaps('sda'), ['c6']);
    await expectExact('sda');
    const cov = await coverageOf('c1', 'sda');
    assert.deepEqual([cov.mode, cov.bitmaps], ['incremental', ['c1', 'c2', 'c3', 'c4', 'c5', 'c6']]);
  });

  test('deleting a middle, the newest and the root checkpoint keeps every remaining T exact', async () => {
    await env.qb.checkpoints.delete('vm', 'c3');
    writesSince.delete('c3');
    assert.equal(env.qb.checkpoints.parent('vm', 'c4'), 'c2');
    await expectExact('sda');

    await env.qb.checkpoints.delete('vm', 'c6');
    writesSince.delete('c6');
    assert.deepEqual(await recordingBitmaps('sda'), ['c5']);
    assert.equal(env.qb.checkpoints.info('vm', 'c5').current, true);
    await write('sda', 'write -P 0x77 12M 64k', 12 * MiB, 65536); // recorded by the re-enabled c5
    await expectExact('sda');

    await env.qb.checkpoints.delete('vm', 'c1');
    writesSince.delete('c1');
    assert.equal(env.qb.checkpoints.parent('vm', 'c2'), null);
    await expectExact('sda');
    assert.deepEqual(env.qb.checkpoints.list('vm').map((c) => c.name), ['c2', 'c4', 'c5']);
  });

  test('checkpoint-dumpxml --size reports the bytes changed since the checkpoint', async () => {
    const spec = await env.qb.checkpoints.describe('vm', 'c4', { size: true });
    const xml = formatCheckpointXml(spec, { includeSize: true, noDomain: true });
    const extents = await changedSince(env.qb, 'vm', 'c4', 'sda');
    assert.ok(Array.isArray(extents));
    const bytes = extents.reduce((a, e) => a + e.length, 0);
    assert.match(xml, new RegExp(`<disk name="sda" checkpoint="bitmap" bitmap="c4" size="${bytes}"/>`));
    assert.doesNotMatch(xml, /<domain[ >]/);
  });

  test('a disk hot-plugged after T is not-in-checkpoint; from a later checkpoint it is incremental', async () => {
    const file = await env.image('hot.qcow2', 8 * MiB, 'qcow2', 512 * 1024);
    await env.qb.domains.attachDisk('vm', { source: file, target: 'sdb', format: 'qcow2' });
    const cov = await coverageOf('c4', 'sdb');
    assert.equal(cov.mode, 'full');
    assert.deepEqual(cov.reasons.map((r) => r.code), ['not-in-checkpoint']);
    assert.equal((await coverageOf('c4', 'sda')).mode, 'incremental');

    await checkpoint('c7', ['sda', 'sdb']);
    await write('sdb', 'write -P 0x33 3M 4k', 3 * MiB, 4096);
    // QEMU caps the default bitmap granularity at 64 KiB, whatever the cluster size.
    await expectExact('sdb', 65536);
    assert.equal((await coverageOf('c7', 'sdb')).mode, 'incremental');
  });

  test('a disk detached and re-attached is detached-since, even with no checkpoint in between', async () => {
    const before = env.qb.domains.blockList('vm').find((d) => d.target === 'sdb');
    await env.qb.domains.detachDisk('vm', 'sdb');
    await env.qb.domains.attachDisk('vm', { source: before?.source ?? '', target: 'sdb', format: 'qcow2' });
    assert.equal(env.qb.domains.blockList('vm').find((d) => d.target === 'sdb')?.diskId, before?.diskId, 'same image keeps its disk id');
    const cov = await coverageOf('c7', 'sdb');
    assert.equal(cov.mode, 'full');
    assert.ok(cov.reasons.some((r) => r.code === 'detached-since'), JSON.stringify(cov.reasons));
    assert.equal((await coverageOf('c7', 'sda')).mode, 'incremental');
    await checkpoint('c8', ['sda', 'sdb']);
    assert.equal((await coverageOf('c8', 'sdb')).mode, 'incremental');
  });

  test('shutdown + start keeps coverage intact', async () => {
    await env.qb.domains.shutdown('vm');
    await env.qb.domains.start('vm', { paused: true });
    for (const cp of env.qb.checkpoints.list('vm')) {
      for (const c of await env.qb.checkpoints.coverage('vm', cp.name)) {
        if (c.target === 'sda') assert.equal(c.mode, 'incremental', `${cp.name}: ${JSON.stringify(c.reasons)}`);
      }
    }
    await expectExact('sda');
    assert.deepEqual(await recordingBitmaps('sda'), ['c8']);
  });

  test('offline: checkpoint create and delete on a shut-off domain keep the chain exact', async () => {
    await env.qb.domains.shutdown('vm');
    await checkpoint('c9', ['sda', 'sdb']);
    await env.qb.checkpoints.delete('vm', 'c7');
    writesSince.delete('c7');
    await env.qb.domains.start('vm', { paused: true });
    await write('sda', 'write -P 0x44 5M 64k', 5 * MiB, 65536);
    assert.deepEqual(await recordingBitmaps('sda'), ['c9']);
    await expectExact('sda');
  });

  test('destroy + start: every checkpoint reports the lost bitmaps, and a new checkpoint starts fresh', async () => {
    await checkpoint('c10', ['sda', 'sdb']); // created in this run: lost by the kill
    await write('sda', 'write -P 0x55 6M 4k', 6 * MiB, 4096);
    await env.qb.domains.destroy('vm');
    await env.qb.domains.start('vm', { paused: true });
    for (const cp of env.qb.checkpoints.list('vm')) {
      for (const c of await env.qb.checkpoints.coverage('vm', cp.name)) {
        assert.equal(c.mode, 'full', `${cp.name} ${c.target}`);
        if (c.reasons.some((r) => r.code === 'not-in-checkpoint' || r.code === 'detached-since')) continue;
        assert.ok(
          c.reasons.some((r) => r.code === 'bitmap-missing' || r.code === 'bitmap-inconsistent'),
          `${cp.name} ${c.target}: ${JSON.stringify(c.reasons)}`,
        );
      }
    }
    // c9's bitmap was loaded at start, so it was inconsistent after the kill; c10's never reached the file.
    const reasons9 = (await coverageOf('c9', 'sda')).reasons.map((r) => r.code);
    assert.ok(reasons9.includes('bitmap-inconsistent'), JSON.stringify(reasons9));
    assert.ok((await coverageOf('c10', 'sda')).reasons.some((r) => r.code === 'bitmap-missing'));

    await checkpoint('c11', ['sda', 'sdb']);
    await write('sda', 'write -P 0x66 7M 4k', 7 * MiB, 4096);
    const cov = await coverageOf('c11', 'sda');
    assert.equal(cov.mode, 'incremental');
    assert.deepEqual(await changedSince(env.qb, 'vm', 'c11', 'sda'), clustersOf([{ offset: 7 * MiB, length: 4096 }]));
  });

  test('list, tree, parent and info through the CLI', async () => {
    const names = (await env.cliOk(['checkpoint-list', 'vm', '--name'])).trim().split('\n');
    assert.deepEqual(names, ['c2', 'c4', 'c5', 'c8', 'c9', 'c10', 'c11']);
    assert.equal((await env.cliOk(['checkpoint-parent', 'vm', 'c4'])).trim(), 'c2');
    assert.deepEqual((await env.cliOk(['checkpoint-list', 'vm', '--roots', '--name'])).trim(), 'c2');
    assert.deepEqual((await env.cliOk(['checkpoint-list', 'vm', '--leaves', '--name'])).trim(), 'c11');
    assert.match(await env.cliOk(['checkpoint-list', 'vm', '--tree']), /^c2\n {2}└── c4\n {6}└── c5/);
    const info = JSON.parse(await env.cliOk(['checkpoint-info', 'vm', 'c11', '--json'])) as { current: boolean; parent: string };
    assert.deepEqual([info.current, info.parent], [true, 'c10']);
    const cov = JSON.parse(await env.cliOk(['checkpoint-coverage', 'vm', 'c10', '--json'])) as Array<{ target: string; mode: string }>;
    assert.deepEqual(cov.map((c) => c.mode), ['full', 'full']);
  });
});
