// Two qbackup processes backing up two domains into one repository at the
// same time: both succeed, both restore exactly, the repository verifies,
// and a later backup of a clone deduplicates against what both stored.
// (Two processes in lockstep over the same data may both store a chunk
// before either sees the other's pack; that costs space, never correctness,
// and gc keeps only what is referenced.)

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { Manifest } from '../../src/repository/repository.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { MiB, imageDiffers, randomFile, referenceCopies, spawnCli } from '../helpers/repo.js';

describe('two processes, one repository (real QEMU)', () => {
  let env: TestEnv;
  before(async () => {
    env = new TestEnv();
  });
  after(async () => env.cleanup());

  test('concurrent backups of two domains both restore exactly; verify --read-data passes', async () => {
    const repo = env.path('shared-repo');
    const data = randomFile(env, 'shared', 24 * MiB);
    const refs = new Map<string, Map<string, string>>();
    for (const name of ['a', 'b']) {
      await env.defineDomain(name, [{ target: 'sda', sizeBytes: 32 * MiB }]);
      await env.qb.domains.start(name, { paused: true });
      await guestWrite(env.qb, name, 'sda', `write -s ${data} 0 24M`);
      await guestWrite(env.qb, name, 'sda', `write -P ${name === 'a' ? 0x11 : 0x22} 28M 1M`);
      refs.set(name, await referenceCopies(env, name, `ref-${name}`));
    }
    const runs = ['a', 'b'].map((name) => spawnCli(env, ['--json', 'backup', name, '--repo', repo]));
    const results = await Promise.all(runs.map((r) => r.done));
    const manifests: Manifest[] = [];
    for (const r of results) {
      assert.equal(r.code, 0, r.stderr);
      manifests.push(JSON.parse(r.stdout) as Manifest);
    }
    for (const m of manifests) {
      const out = await env.qb.repository.restore(m.domain, { repo, backup: m.id, to: env.path(`r-${m.domain}`), format: 'raw' });
      for (const d of out.disks) {
        const ref = refs.get(m.domain)?.get(d.target) ?? '';
        assert.equal(await imageDiffers(d.file, 'raw', ref), undefined, `domain ${m.domain} disk ${d.target}`);
      }
    }
    const report = await env.qb.repository.verify({ repo }, { readData: true });
    assert.deepEqual(report.problems, []);
    assert.equal(report.backupsChecked, 2);
    // A third domain, a clone of a: its backup stores (almost) nothing new.
    await env.defineDomain('c', [{ target: 'sda', sizeBytes: 32 * MiB }]);
    await env.qb.domains.start('c', { paused: true });
    await guestWrite(env.qb, 'c', 'sda', `write -s ${data} 0 24M`);
    await guestWrite(env.qb, 'c', 'sda', 'write -P 0x11 28M 1M');
    const m = await env.qb.repository.backup('c', { repo });
    assert.equal(m.disks[0]?.newChunks, 0);
    assert.equal(m.disks[0]?.bytesStored, 0);
  });
});
