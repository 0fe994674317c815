// Encrypted repositories against real QEMU: a backup restores exactly with
// the passphrase (from QBACKUP_PASSWORD or --password-file), no plaintext
// reaches the repository's files, a wrong or missing passphrase is refused
// (WRONG_PASSWORD) without touching anything, and keys are added and removed
// through the CLI (QBACKUP_NEW_PASSWORD, --new-password-file).
//
// No test relies on an earlier one: the repository and its first backup are
// made in `before`. Needles searched for in ciphertext are at least 16 bytes
// long (a shorter one occurs in a few MiB of random bytes by chance), and each
// is first shown to be findable in an unencrypted control repository.

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
  // A long name: it is searched for in the repository's files (3 bytes such
  // as "sec" would occur in a few MiB of ciphertext about one run in ten).
  const DOMAIN = 'secret-domain-name-9c4e1b';
  let init: { code: number; stdout: string; stderr: string };
  let first: { code: number; stdout: string; stderr: string };
  let ref1: Map<string, string>;

  /** Restores the latest (or given) backup with the given environment and checks it against `ref`. */
  async function assertRestores(ref: Map<string, string>, extraArgs: string[], extraEnv: Record<string, string>, backup?: string): Promise<void> {
    const dir = env.path(`restore-${++restores}`);
    const r = await env.cli(['restore', DOMAIN, '--repo', repo, '--to', dir, '--format', 'raw', ...(backup !== undefined ? ['--backup', backup] : []), ...extraArgs], { env: extraEnv });
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
    await env.defineDomain(DOMAIN, [{ target: 'sda', sizeBytes: 16 * MiB }]);
    await env.qb.domains.start(DOMAIN, { paused: true });
    await guestWrite(env.qb, DOMAIN, 'sda', `write -s ${randomFile(env, 'r1', 2 * MiB)} 0 2M`);
    await guestWrite(env.qb, DOMAIN, 'sda', 'write -P 0x5a 4M 64k');
    init = await env.cli(['init', '--repo', repo, '--encrypt'], { env: pw('correct horse') });
    assert.equal(init.code, 0, init.stderr);
    ref1 = await referenceCopies(env, DOMAIN, 'e1');
    first = await env.cli(['--json', 'backup', DOMAIN, '--repo', repo], { env: pw('correct horse') });
    assert.equal(first.code, 0, first.stderr);
  });
  after(async () => env.cleanup());

  test('init --encrypt, backup and restore with the passphrase; no plaintext in the repository', async () => {
    const refused = env.path('refused');
    const noPw = await env.cli(['--json', 'init', '--repo', refused, '--encrypt']);
    assert.equal(noPw.code, 1);
    assert.match(cliError(noPw).message, /needs a passphrase: set QBACKUP_PASSWORD/);
    assert.ok(!existsSync(join(refused, 'config')), 'a refused init creates nothing');
    assert.match(init.stdout, /Created encrypted repository [0-9a-f]+ at /);

    const m1 = JSON.parse(first.stdout) as Manifest;
    assert.equal(m1.disks[0]?.level, 'full');
    assert.equal(m1.disks[0]?.bytesRead, 2 * MiB + 64 * KiB);
    await assertRestores(ref1, [], pw('correct horse'), m1.id);

    // Incremental through --password-file, restored through the library.
    await guestWrite(env.qb, DOMAIN, 'sda', `write -s ${randomFile(env, 'r2', 64 * KiB)} 8M 64k`);
    const ref2 = await referenceCopies(env, DOMAIN, 'e2');
    const pwFile = env.writeFile('pw1', 'correct horse\n');
    const b2 = JSON.parse(await env.cliOk(['--json', 'backup', DOMAIN, '--repo', repo, '--password-file', pwFile])) as Manifest;
    assert.equal(b2.disks[0]?.level, 'incremental');
    assert.equal(b2.disks[0]?.bytesRead, 64 * KiB);
    const r = await env.qb.repository.restore(DOMAIN, { repo, password: 'correct horse', to: env.path('lib-restore'), format: 'qcow2' });
    assert.equal(r.backup, b2.id);
    assert.equal(await imageDiffers(r.disks[0]?.file ?? '', 'qcow2', ref2.get('sda') ?? ''), undefined);
    await assertRestores(ref1, ['--password-file', pwFile], {}, m1.id);

    // Neither the data (random chunks are stored as they are, unless sealed)
    // nor the manifests (domain XML) are readable in the repository's files.
    // Each needle is at least 16 bytes and lies inside one chunk; it must be
    // found in the unencrypted control and nowhere in the encrypted repository.
    const guest = readFileSync(env.path('r1'));
    const needles: Array<[string, Buffer]> = [0, 1, 3, 5, 7].map((i) => [`guest bytes at ${i * 256 + 1} KiB`, guest.subarray(i * 256 * KiB + KiB, i * 256 * KiB + KiB + 32)]);
    needles.push(['the domain name', Buffer.from(DOMAIN)], ['the domain XML', Buffer.from(`<name>${DOMAIN}</name>`)]);
    const holds = (dir: string, needle: Buffer): string[] => [...fileTree(dir).keys()].filter((f) => readFileSync(join(dir, f)).includes(needle));
    const plain = env.path('plain');
    await env.qb.repository.backup(DOMAIN, { repo: plain });
    for (const [what, needle] of needles) {
      assert.ok(needle.length >= 16, what);
      assert.ok(holds(plain, needle).length >= 1, `${what} shows in the unencrypted control`);
      assert.deepEqual(holds(repo, needle), [], `no file of the encrypted repository holds ${what}`);
    }

    const v = await env.cli(['verify', '--repo', repo, '--read-data'], { env: pw('correct horse') });
    assert.equal(v.code, 0, v.stderr);
  });

  test('a wrong or missing passphrase is refused (WRONG_PASSWORD) and changes nothing', async () => {
    const tree = fileTree(repo);
    const checkpoints = env.qb.checkpoints.list(DOMAIN).map((c) => c.name);
    const commands = [['backup-list'], ['backup', DOMAIN], ['restore', DOMAIN, '--to', env.path('never')], ['verify', '--read-data'], ['gc'], ['key', 'list']];
    for (const [i, args] of commands.entries()) {
      wrongPassword(await env.cli(['--json', ...args, '--repo', repo], { env: pw('wrong') }), /Cannot open repository ".*": wrong passphrase/);
      if (i < 3) wrongPassword(await env.cli(['--json', ...args, '--repo', repo]), /is encrypted: give its passphrase/);
    }
    wrongPassword(await env.cli(['--json', 'backup-list', '--repo', repo, '--password-file', env.writeFile('pw-wrong', 'correct horse battery\n')]), /wrong passphrase/);
    assert.ok(!existsSync(env.path('never')), 'a refused restore writes nothing');
    assert.deepEqual(fileTree(repo), tree, 'refused commands change no file');
    assert.deepEqual(env.qb.checkpoints.list(DOMAIN).map((c) => c.name), checkpoints, 'a refused backup leaves no checkpoint');
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
    const ref = await referenceCopies(env, DOMAIN, 'keys');
    await cliOkEnv(['backup', DOMAIN, '--repo', repo], pw('second'));
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
    const plainRepo = env.path('plain-keys');
    await env.cliOk(['init', '--repo', plainRepo]);
    const plainAdd = await env.cli(['--json', 'key', 'add', '--repo', plainRepo], { env: { QBACKUP_NEW_PASSWORD: 'x' } });
    assert.equal(plainAdd.code, 1);
    assert.match(cliError(plainAdd).message, /it is not encrypted/);
  });
});
