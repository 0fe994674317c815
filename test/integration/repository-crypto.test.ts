// Encrypted repositories against real QEMU: a backup restores exactly with
// the passphrase (from QBACKUP_PASSWORD or --password-file), no plaintext
// reaches the repository's files, a wrong or missing passphrase is refused
// (WRONG_PASSWORD) without touching anything, and keys are added and removed
// through the CLI (QBACKUP_NEW_PASSWORD, --new-password-file).

import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import type { Manifest } from '../../src/repository/repository.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { KiB, MiB, cliError, fileTree, imageDiffers, randomFile, referenceCopies } from '../helpers/repo.js';

describe('encrypted repository (real QEMU)', () => {
  let env: TestEnv;
  let repo: string;
  const pw = (p: string): Record<string, string> => ({ QBACKUP_PASSWORD: p });
  let restores = 0;

  /** Restores the latest (or given) backup with the given environment and checks it against `ref`. */
  async function assertRestores(ref: Map<string, string>, extraArgs: string[], extraEnv: Record<string, string>, backup?: string): Promise<void> {
    const dir = env.path(`restore-${++restores}`);
    const r = await env.cli(['restore', 'sec', '--repo', repo, '--to', dir, '--format', 'raw', ...(backup !== undefined ? ['--backup', backup] : []), ...extraArgs], { env: extraEnv });
    assert.equal(r.code, 0, r.stderr);
    const why = await imageDiffers(join(dir, 'sda.raw'), 'raw', ref.get('sda') ?? '');
    assert.equal(why, undefined, why);
  }
  function wrongPassword(r: { code: number; stderr: string }, pattern: RegExp): void {
    assert.equal(r.code, 1, r.stderr);
    const e = cliError({ ...r, stdout: '', signal: null });
    assert.equal(e.code, 'WRONG_PASSWORD');
    assert.match(e.message, pattern);
  }

  before(async () => {
    // "Missing passphrase" must mean missing, whatever the caller's environment.
    delete process.env['QBACKUP_PASSWORD'];
    delete process.env['QBACKUP_NEW_PASSWORD'];
    env = new TestEnv('qbt-crypto-');
    repo = env.path('repo');
    await env.defineDomain('sec', [{ target: 'sda', sizeBytes: 16 * MiB }]);
    await env.qb.domains.start('sec', { paused: true });
    await guestWrite(env.qb, 'sec', 'sda', `write -s ${randomFile(env, 'r1', 2 * MiB)} 0 2M`);
    await guestWrite(env.qb, 'sec', 'sda', 'write -P 0x5a 4M 64k');
  });
  after(async () => env.cleanup());

  test('init --encrypt, backup and restore with the passphrase; no plaintext in the repository', async () => {
    const noPw = await env.cli(['--json', 'init', '--repo', repo, '--encrypt']);
    assert.equal(noPw.code, 1);
    assert.match(cliError(noPw).message, /needs a passphrase: set QBACKUP_PASSWORD/);
    assert.ok(!existsSync(join(repo, 'config')), 'a refused init creates nothing');

    const init = await env.cli(['init', '--repo', repo, '--encrypt'], { env: pw('correct horse') });
    assert.equal(init.code, 0, init.stderr);
    assert.match(init.stdout, /Created encrypted repository [0-9a-f]+ at /);

    const ref1 = await referenceCopies(env, 'sec', 'e1');
    const b1 = await env.cli(['--json', 'backup', 'sec', '--repo', repo], { env: pw('correct horse') });
    assert.equal(b1.code, 0, b1.stderr);
    const m1 = JSON.parse(b1.stdout) as Manifest;
    assert.equal(m1.disks[0]?.level, 'full');
    assert.equal(m1.disks[0]?.bytesRead, 2 * MiB + 64 * KiB);
    await assertRestores(ref1, [], pw('correct horse'), m1.id);

    // Incremental through --password-file, restored through the library.
    await guestWrite(env.qb, 'sec', 'sda', `write -s ${randomFile(env, 'r2', 64 * KiB)} 8M 64k`);
    const ref2 = await referenceCopies(env, 'sec', 'e2');
    const pwFile = env.writeFile('pw1', 'correct horse\n');
    const b2 = JSON.parse(await env.cliOk(['--json', 'backup', 'sec', '--repo', repo, '--password-file', pwFile])) as Manifest;
    assert.equal(b2.disks[0]?.level, 'incremental');
    assert.equal(b2.disks[0]?.bytesRead, 64 * KiB);
    const r = await env.qb.repository.restore('sec', { repo, password: 'correct horse', to: env.path('lib-restore'), format: 'qcow2' });
    assert.equal(r.backup, b2.id);
    assert.equal(await imageDiffers(r.disks[0]?.file ?? '', 'qcow2', ref2.get('sda') ?? ''), undefined);
    await assertRestores(ref1, ['--password-file', pwFile], {}, m1.id);

    // Neither the data (random chunks are stored as they are, unless sealed)
    // nor the manifests (domain XML) are readable in the repository's files.
    const sample = readFileSync(env.path('r1')).subarray(100 * KiB, 100 * KiB + 64);
    const holds = (dir: string, needle: Buffer | string): string[] => [...fileTree(dir).keys()].filter((f) => readFileSync(join(dir, f)).includes(needle));
    assert.deepEqual(holds(repo, sample), [], 'no file holds guest data in the clear');
    assert.deepEqual(holds(repo, '<domain'), [], 'no file holds the domain XML in the clear');
    assert.deepEqual(holds(repo, 'sec'), [], 'no file names the domain in its content');
    // The control: unencrypted, both are there to be found.
    const plain = env.path('plain');
    await env.qb.repository.backup('sec', { repo: plain });
    assert.equal(holds(plain, sample).length, 1, 'the sample shows in one pack of an unencrypted repository');
    assert.equal(holds(plain, '<domain').length, 1, 'and the domain XML in its manifest');

    const v = await env.cli(['verify', '--repo', repo, '--read-data'], { env: pw('correct horse') });
    assert.equal(v.code, 0, v.stderr);
  });

  test('a wrong or missing passphrase is refused (WRONG_PASSWORD) and changes nothing', async () => {
    const tree = fileTree(repo);
    const checkpoints = env.qb.checkpoints.list('sec').map((c) => c.name);
    const commands = [['backup-list'], ['backup', 'sec'], ['restore', 'sec', '--to', env.path('never')], ['verify', '--read-data'], ['gc'], ['key', 'list']];
    for (const [i, args] of commands.entries()) {
      wrongPassword(await env.cli(['--json', ...args, '--repo', repo], { env: pw('wrong') }), /Cannot open repository ".*": wrong passphrase/);
      if (i < 3) wrongPassword(await env.cli(['--json', ...args, '--repo', repo]), /is encrypted: give its passphrase/);
    }
    wrongPassword(await env.cli(['--json', 'backup-list', '--repo', repo, '--password-file', env.writeFile('pw-wrong', 'correct horse battery\n')]), /wrong passphrase/);
    assert.ok(!existsSync(env.path('never')), 'a refused restore writes nothing');
    assert.deepEqual(fileTree(repo), tree, 'refused commands change no file');
    assert.deepEqual(env.qb.checkpoints.list('sec').map((c) => c.name), checkpoints, 'a refused backup leaves no checkpoint');
    await assert.rejects(env.qb.repository.list({ repo, password: 'Correct horse' }), (err: unknown) => isQbackupError(err, 'WRONG_PASSWORD'));
    await assert.rejects(env.qb.repository.list({ repo }), (err: unknown) => isQbackupError(err, 'WRONG_PASSWORD'));
  });

  test('keys: add with QBACKUP_NEW_PASSWORD or --new-password-file, remove, and only the remaining passphrases open', async () => {
    const listKeys = async (env2: Record<string, string>): Promise<string[]> => (JSON.parse(await cliOkEnv(['--json', 'key', 'list', '--repo', repo], env2)) as Array<{ id: string }>).map((k) => k.id);
    const cliOkEnv = async (args: string[], e: Record<string, string>): Promise<string> => {
      const r = await env.cli(args, { env: e });
      assert.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`);
      return r.stdout;
    };
    const [k1] = await listKeys(pw('correct horse'));
    assert.ok(k1 !== undefined);
    const add2 = await env.cli(['--json', 'key', 'add', '--repo', repo], { env: pw('correct horse') });
    assert.equal(add2.code, 1, 'add without a new passphrase is refused');
    assert.match(cliError(add2).message, /key add needs a passphrase: set QBACKUP_NEW_PASSWORD/);
    const k2 = (JSON.parse(await cliOkEnv(['--json', 'key', 'add', '--repo', repo], { ...pw('correct horse'), QBACKUP_NEW_PASSWORD: 'second' })) as { id: string }).id;
    const newFile = env.writeFile('pw3', 'third\n');
    const k3 = (JSON.parse(await cliOkEnv(['--json', 'key', 'add', '--repo', repo, '--password-file', env.writeFile('pw2', 'second\n'), '--new-password-file', newFile], {})) as { id: string }).id;
    assert.deepEqual((await listKeys(pw('third'))).sort(), [k1, k2, k3].sort());

    // The key opened with the current passphrase cannot be removed with it.
    const self = await env.cli(['--json', 'key', 'remove', k1, '--repo', repo], { env: pw('correct horse') });
    assert.equal(self.code, 1);
    assert.match(cliError(self).message, new RegExp(`Cannot remove key "${k1}": it is the key opened with the current passphrase`));
    await cliOkEnv(['key', 'remove', k1, '--repo', repo], pw('second'));
    wrongPassword(await env.cli(['--json', 'backup-list', '--repo', repo], { env: pw('correct horse') }), /wrong passphrase/);
    const ref = await referenceCopies(env, 'sec', 'keys');
    await assertRestores(ref, [], pw('third'));
    await assertRestores(ref, ['--password-file', newFile], {});

    await cliOkEnv(['key', 'remove', k3, '--repo', repo], pw('second'));
    const last = await env.cli(['--json', 'key', 'remove', k2, '--repo', repo], { env: pw('second') });
    assert.equal(last.code, 1);
    assert.match(cliError(last).message, /it is the repository's last key/);
    assert.deepEqual(await listKeys(pw('second')), [k2]);
    const v = await env.cli(['verify', '--repo', repo, '--read-data'], { env: pw('second') });
    assert.equal(v.code, 0, v.stderr);

    // An unencrypted repository has no keys to add.
    const plainAdd = await env.cli(['--json', 'key', 'add', '--repo', env.path('plain')], { env: { QBACKUP_NEW_PASSWORD: 'x' } });
    assert.equal(plainAdd.code, 1);
    assert.match(cliError(plainAdd).message, /it is not encrypted/);
  });
});
