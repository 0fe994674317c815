// `qbackup copy` across backends: a local repository into an encrypted one
// on a real object store (Ceph radosgw, test/helpers/ceph.ts) and back into
// a new local directory. A full and an incremental restore identically from
// the bucket and from the final copy, copying again copies nothing, and `verify --read-data` passes on
// both targets.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { CopyReport, Manifest } from '../../src/repository/repository.js';
import { ceph, type Ceph } from '../helpers/ceph.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { KiB, MiB, imageDiffers, randomFile, referenceCopies, spawnCli } from '../helpers/repo.js';

describe('copy local → S3 → local (Ceph radosgw, real QEMU)', () => {
  let c: Ceph;
  let env: TestEnv;
  const refs = new Map<string, Map<string, string>>();
  const backups: Manifest[] = [];

  // Started from the suite's body, not from a hook: the helper registers the
  // cluster's teardown with after(), which inside a before hook of Node 20 runs
  // before the tests rather than after them.
  const cluster = ceph();
  cluster.catch(() => undefined); // awaited (and so reported) in before()

  before(async () => {
    delete process.env['QBACKUP_PASSWORD'];
    delete process.env['QBACKUP_FROM_PASSWORD'];
    c = await cluster;
    env = new TestEnv('qbt-copys3-', { backends: { s3: c.settings } });
  });
  after(async () => env?.cleanup());

  const cli = async (args: readonly string[], extra: Record<string, string> = {}): Promise<string> => {
    const r = await spawnCli(env, args, { ...c.env, ...extra }).done;
    assert.equal(r.code, 0, `qbackup ${args.join(' ')}: ${r.stderr}`);
    return r.stdout;
  };

  async function assertRestores(repo: string, m: Manifest, password?: string): Promise<void> {
    const out = await env.qb.repository.restore(m.domain, { repo, backup: m.id, to: env.path(`restore-${repo.replace(/\W/g, '')}-${m.id}`), format: 'raw', ...(password !== undefined ? { password } : {}) });
    for (const d of out.disks) {
      const why = await imageDiffers(d.file, 'raw', refs.get(m.id)?.get(d.target) ?? '');
      assert.equal(why, undefined, `backup ${m.id} disk ${d.target} from ${repo}: ${why ?? ''}`);
    }
  }

  test('a full and an incremental: local → encrypted bucket → local restore identically; again copies nothing', async () => {
    const local = env.path('local');
    const bucket = `s3://${c.bucket()}/copies`;
    const back = env.path('back');
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 16 * MiB }]);
    await env.qb.domains.start('vm', { paused: true });
    await guestWrite(env.qb, 'vm', 'sda', `write -s ${randomFile(env, 'a', 2 * MiB)} 0 2M`);
    refs.set('full', await referenceCopies(env, 'vm', 'full'));
    backups.push(await env.qb.repository.backup('vm', { repo: local }));
    await guestWrite(env.qb, 'vm', 'sda', `write -s ${randomFile(env, 'b', 128 * KiB)} 8M 128k`);
    refs.set('incr', await referenceCopies(env, 'vm', 'incr'));
    backups.push(await env.qb.repository.backup('vm', { repo: local }));
    refs.set(backups[0]?.id ?? '', refs.get('full') ?? new Map());
    refs.set(backups[1]?.id ?? '', refs.get('incr') ?? new Map());

    await cli(['init', '--repo', bucket, '--encrypt'], { QBACKUP_PASSWORD: 'bucket' });
    const up = JSON.parse(await cli(['--json', 'copy', 'vm', '--from', local, '--to', bucket], { QBACKUP_PASSWORD: 'bucket' })) as CopyReport;
    assert.equal(up.reencrypted, true);
    assert.deepEqual(up.copied.map((b) => b.id), backups.map((m) => m.id));
    const again = JSON.parse(await cli(['--json', 'copy', 'vm', '--from', local, '--to', bucket], { QBACKUP_PASSWORD: 'bucket' })) as CopyReport;
    assert.deepEqual(again.copied, []);
    assert.equal(again.chunksRead, 0);

    const down = JSON.parse(await cli(['--json', 'copy', '--from', bucket, '--to', back], { QBACKUP_FROM_PASSWORD: 'bucket' })) as CopyReport;
    assert.equal(down.targetCreated, true);
    assert.equal(down.copied.length, 2);
    for (const m of backups) {
      await assertRestores(bucket, m, 'bucket');
      await assertRestores(back, m);
    }
    assert.match(await cli(['verify', '--repo', bucket, '--read-data'], { QBACKUP_PASSWORD: 'bucket' }), /read back intact/);
    assert.match(await cli(['verify', '--repo', back, '--read-data']), /read back intact/);
  });
});
