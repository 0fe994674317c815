// One damaged manifest stays local (plain repository, real QEMU):
// - a byte flipped inside a manifest (the JSON still valid) is detected by
//   its checksum: verify names the manifest, and no restore uses it;
// - a truncated manifest is reported by name by backup-list and verify, and
//   never stops listing, restoring or verifying the other backups of the
//   domain, nor taking a new one.
// Each test builds its own repository.

import assert from 'node:assert/strict';
import { existsSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Manifest } from '../../src/repository/repository.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { MiB, flipByte, imageDiffers, referenceCopies, repoObjects } from '../helpers/repo.js';

describe('a damaged manifest stays local (real QEMU)', () => {
  let env: TestEnv;
  let n = 0;

  /** A fresh repository with three backups of "vm"; the reference of the newest. */
  async function threeBackups(): Promise<{ repo: string; backups: Manifest[]; ref: Map<string, string> }> {
    const repo = env.path(`repo-${++n}`);
    const backups: Manifest[] = [];
    let ref = new Map<string, string>();
    for (let i = 0; i < 3; i++) {
      await guestWrite(env.qb, 'vm', 'sda', `write -P ${0x30 + n * 4 + i} ${i}M 64k`);
      ref = await referenceCopies(env, 'vm', `r${n}-${i}`);
      backups.push(JSON.parse(await env.cliOk(['--json', 'backup', 'vm', '--repo', repo, ...(i === 0 ? ['--full'] : [])])) as Manifest);
    }
    return { repo, backups, ref };
  }
  const manifestFile = (repo: string, id: string): string => join(repo, 'snapshots', 'vm', id);

  before(async () => {
    env = new TestEnv('qbt-damage-', { accel: 'tcg' });
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 8 * MiB }]);
    await env.qb.domains.start('vm', { paused: true });
  });
  after(async () => env.cleanup());

  test('a byte flipped inside a plain manifest is detected: verify names it', async () => {
    const { repo, backups } = await threeBackups();
    const victim = backups[1] as Manifest;
    const file = manifestFile(repo, victim.id);
    const text = readFileSync(file, 'utf8');
    // Change the domain's memory in the stored XML: still valid JSON, still a plausible manifest.
    const at = text.indexOf('<memory');
    assert.ok(at > 0);
    const digit = text.slice(at).search(/[0-9]/) + at;
    writeFileSync(file, text.slice(0, digit) + (text[digit] === '9' ? '8' : '9') + text.slice(digit + 1));
    const v = await env.cli(['--json', 'verify', '--repo', repo]);
    assert.equal(v.code, 1, `verify fails: ${v.stdout}`);
    assert.match(v.stdout + v.stderr, new RegExp(`${victim.id}.*damaged|damaged.*${victim.id}`));
    // The others still list and restore.
    const list = JSON.parse(await env.cliOk(['--json', 'backup-list', '--repo', repo])) as Manifest[];
    assert.deepEqual(list.map((m) => m.id), [backups[0]?.id, backups[2]?.id]);
  });

  test('a byte flipped in a plain pack index (an offset) is found by verify without reading data', async () => {
    const { repo } = await threeBackups();
    const { packIndexes } = repoObjects(repo);
    const first = [...packIndexes][0];
    assert.ok(first !== undefined);
    const file = join(repo, 'index', first);
    flipByte(file, 8 + 32); // the low byte of entry 0's offset
    const v = await env.cli(['--json', 'verify', '--repo', repo]);
    assert.equal(v.code, 1, `verify fails: ${v.stdout}`);
    assert.match(v.stdout + v.stderr, /differs from the header in its pack's trailer/);
  });

  test('a truncated manifest of the oldest backup: list, restore, verify of the others and a new backup all work, and it is named', async () => {
    const { repo, backups, ref } = await threeBackups();
    const oldest = backups[0] as Manifest;
    truncateSync(manifestFile(repo, oldest.id), 40);

    const list = await env.cli(['--json', 'backup-list', '--repo', repo]);
    assert.equal(list.code, 0, list.stderr);
    assert.deepEqual((JSON.parse(list.stdout) as Manifest[]).map((m) => m.id), [backups[1]?.id, backups[2]?.id]);
    assert.match(list.stderr, new RegExp(`Manifest of backup "${oldest.id}".*is damaged`));

    const to = env.path(`restore-${n}`);
    await env.cliOk(['restore', 'vm', '--repo', repo, '--to', to, '--format', 'raw']);
    assert.equal(await imageDiffers(join(to, 'sda.raw'), 'raw', ref.get('sda') ?? ''), undefined);

    const v = await env.cli(['--json', 'verify', '--repo', repo]);
    assert.equal(v.code, 1);
    assert.match(v.stdout + v.stderr, new RegExp(oldest.id));

    const b = await env.cli(['--json', 'backup', 'vm', '--repo', repo]);
    assert.equal(b.code, 0, b.stderr);
  });

  test('verify --repair: asks first; then quarantines the damaged manifest, rebuilds a lost pack index, says what was lost, and verify passes', async () => {
    const { repo, backups, ref } = await threeBackups();
    const oldest = backups[0] as Manifest;
    truncateSync(manifestFile(repo, oldest.id), 40);
    const { packIndexes } = repoObjects(repo);
    const lostIndex = [...packIndexes][0] ?? '';
    rmSync(join(repo, 'index', lostIndex));
    assert.equal((await env.cli(['verify', '--repo', repo])).code, 1);

    const declined = await env.cli(['verify', '--repo', repo, '--repair'], { input: 'n\n' });
    assert.equal(declined.code, 1);
    assert.match(declined.stderr, /Repair plan:/);
    assert.match(declined.stderr, /Repair not confirmed: nothing changed/);
    assert.ok(existsSync(manifestFile(repo, oldest.id)) && !existsSync(join(repo, 'index', lostIndex)), 'nothing changed');

    const r = await env.cli(['verify', '--repo', repo, '--repair', '--yes']);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stderr, new RegExp(`1 pack index\\(es\\) rebuilt, 1 manifest\\(s\\) quarantined; lost backups: vm/${oldest.id}`));
    assert.ok(existsSync(join(repo, 'quarantine', 'vm', oldest.id)), 'the damaged manifest is kept aside');
    assert.ok(existsSync(join(repo, 'index', lostIndex)), 'the index is back');
    const v = await env.cli(['verify', '--repo', repo, '--read-data']);
    assert.equal(v.code, 0, v.stdout + v.stderr);
    const list = await env.cli(['--json', 'backup-list', '--repo', repo]);
    assert.equal(list.stderr, '');
    const to = env.path(`repaired-${n}`);
    await env.cliOk(['restore', 'vm', '--repo', repo, '--to', to, '--format', 'raw']);
    assert.equal(await imageDiffers(join(to, 'sda.raw'), 'raw', ref.get('sda') ?? ''), undefined);
  });
});
