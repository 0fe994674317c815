// Disk operations that need a guest that answers (the real Linux guest of
// scripts/guest/, idle workload, commands run through its agent's guest-exec):
// - fstrim in the guest discards a deleted file's clusters: the next
//   incremental reads none of them, stores almost nothing, and restores to
//   exactly the disk's bytes, zeroes where the file was;
// - a virtio-blk disk is hot-plugged, seen by the guest, and hot-unplugged
//   with the guest releasing it (without a guest the unplug times out).

import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Manifest } from '../../src/repository/repository.js';
import { sleep } from '../../src/util/proc.js';
import { TestEnv } from '../helpers/env.js';
import { alignedInside, ext4Disk, fileRanges, fsck, guestBoot, guestDomainXml, guestRun, isZero, readRange, waitForConsole } from '../helpers/guest.js';
import { MiB } from '../helpers/repo.js';

describe('a real Linux guest: fstrim and virtio-blk hot-unplug', () => {
  let env: TestEnv;

  before(async () => {
    guestBoot();
    env = new TestEnv('qbgd-', { accel: 'tcg', detachTimeoutMs: 60_000 });
    const disk = await ext4Disk(env, 'g-data');
    await env.qb.domains.define(guestDomainXml('g', { workload: 'idle', disk }));
    await env.qb.domains.start('g');
    await waitForConsole(env, 'g', /qb: ready/);
  });

  after(async () => {
    await env.cleanup();
  });

  test('fstrim: the incremental after a deleted file is trimmed reads and stores almost nothing and restores zeroes where the file was', async () => {
    const repo = env.path('repo');
    const backup = async (): Promise<Manifest> => JSON.parse(await env.cliOk(['--json', 'backup', 'g', '--repo', repo, '--quiesce'])) as Manifest;
    const restore = async (m: Manifest): Promise<string> => {
      const dir = env.path(`restore-${m.id}`);
      await env.cliOk(['restore', 'g', '--repo', repo, '--backup', m.id, '--to', dir, '--format', 'raw']);
      return join(dir, 'sda.raw');
    };
    const written = await guestRun(env, 'g', 'dd if=/dev/urandom of=/mnt/big bs=1M count=16 2>&1 && sync');
    assert.equal(written.exitcode, 0, written.out);
    const full = await backup();
    assert.ok((full.disks[0]?.bytesStored ?? 0) >= 16 * MiB, `the full backup stored ${full.disks[0]?.bytesStored ?? 0} bytes`);
    // Where /big lives, read from the (quiesced, so checkpointed) full backup.
    const fullImage = await restore(full);
    const ranges = fileRanges(fullImage, '/big');
    assert.equal(ranges.reduce((n, r) => n + r.length, 0), 16 * MiB);
    assert.ok(ranges.some((r) => !isZero(readRange(fullImage, r))), 'the full backup holds the file');

    const trimmed = await guestRun(env, 'g', 'rm /mnt/big && sync && fstrim -v /mnt');
    assert.equal(trimmed.exitcode, 0, trimmed.out);
    const inc = await backup();
    const d = inc.disks[0];
    assert.equal(d?.level, 'incremental');
    assert.ok((d?.bytesRead ?? Infinity) < 2 * MiB, `the incremental read ${d?.bytesRead ?? 0} bytes`);
    assert.ok((d?.bytesStored ?? Infinity) < 1 * MiB, `the incremental stored ${d?.bytesStored ?? 0} bytes`);
    const incImage = await restore(inc);
    // qcow2 discards whole clusters (64 KiB): a cluster the file shared with other data keeps its bytes.
    const discarded = ranges.map((r) => alignedInside(r, 64 * 1024)).filter((r) => r.length > 0);
    assert.ok(discarded.reduce((n, r) => n + r.length, 0) >= 15 * MiB);
    for (const r of discarded) assert.ok(isZero(readRange(incImage, r)), `bytes ${r.offset}+${r.length} are zeroes after the trim`);
    assert.equal(fsck(incImage, '-fn').status, 0);
  });

  test('a virtio-blk disk is hot-unplugged with the guest answering', async () => {
    const image = await env.image('g-vdb.qcow2', 8 * MiB);
    await env.qb.domains.attachDisk('g', { source: image, target: 'vdb', format: 'qcow2' });
    // The guest sees it (as its first virtio disk, vda) before it is asked to let go.
    let seen = '';
    for (let i = 0; i < 100 && seen === ''; i++) {
      seen = (await guestRun(env, 'g', 'cat /sys/block/vda/size 2>/dev/null')).out.trim();
      if (seen === '') await sleep(200);
    }
    assert.equal(seen, String((8 * MiB) / 512));
    await env.qb.domains.detachDisk('g', 'vdb');
    assert.deepEqual(env.qb.domains.blockList('g').map((d) => d.target), ['sda']);
    assert.equal((await guestRun(env, 'g', 'test -e /sys/block/vda && echo present || echo gone')).out.trim(), 'gone');
  });
});
