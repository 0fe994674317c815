// The config and key files carry their own checksum (src/repository/checksum.ts):
// - a byte changed in a plain or encrypted config that still parses is named by
//   verify; reads still work; a new backup or a copy into it is refused;
// - a config written before checksums (no field) opens and verifies clean;
// - a key file whose checksum fails is named by verify; a damaged key file
//   never stops another key from opening the repository, and a passphrase whose
//   only key is damaged is told so instead of "wrong passphrase".

import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, readdirSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { checkCompatible } from '../../src/repository/copy.js';
import { Store } from '../../src/repository/store.js';
import { verifyStore } from '../../src/repository/verify.js';

const dirs: string[] = [];
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'qb-meta-'));
  dirs.push(d);
  return d;
}

/** Changes one hex digit of the config's id: still valid JSON, still a usable config. */
function changeId(dir: string): void {
  const file = join(dir, 'config');
  const text = readFileSync(file, 'utf8');
  const at = text.indexOf('"id": "') + 7;
  writeFileSync(file, text.slice(0, at) + (text[at] === 'a' ? 'b' : 'a') + text.slice(at + 1));
}

describe('config and key files are checked', () => {
  for (const encrypted of [false, true]) {
    it(`a changed ${encrypted ? 'encrypted' : 'plain'} config is named by verify, still read, and refuses new data`, async () => {
      const dir = tempDir();
      const password = encrypted ? 'pw-config' : undefined;
      await Store.init(new LocalBackend(dir), { password });
      assert.equal((await verifyStore(await Store.open(new LocalBackend(dir), { password }))).problems.length, 0);
      changeId(dir);
      const store = await Store.open(new LocalBackend(dir), { password });
      const report = await verifyStore(store);
      assert.deepEqual(report.problems.map((p) => p.object), ['config']);
      assert.match(report.problems[0]?.problem ?? '', /config of repository ".*" is damaged: its checksum does not match/);
      assert.throws(() => store.assertConfigIntact('back up domain "vm"'), (err) => isQbackupError(err) && err.code === 'REPO_DAMAGED' && /config/.test(err.message));
      const other = await Store.init(new LocalBackend(tempDir()), {});
      assert.throws(() => checkCompatible(other, store), (err) => isQbackupError(err) && err.code === 'REPO_DAMAGED');
    });
  }

  it('a config written before checksums opens and verifies clean', async () => {
    const dir = tempDir();
    await Store.init(new LocalBackend(dir));
    const config = JSON.parse(readFileSync(join(dir, 'config'), 'utf8')) as Record<string, unknown>;
    delete config['sha256'];
    writeFileSync(join(dir, 'config'), `${JSON.stringify(config, null, 2)}\n`);
    const store = await Store.open(new LocalBackend(dir));
    assert.equal((await verifyStore(store)).problems.length, 0);
    store.assertConfigIntact('back up');
  });

  it('a damaged key file is named by verify and never hides another key; its own passphrase is told it is damaged', async () => {
    const dir = tempDir();
    const store = await Store.init(new LocalBackend(dir), { password: 'first' });
    const second = await store.addKey('second');
    const first = readdirSync(join(dir, 'keys')).find((k) => k !== second) ?? '';
    // A changed host name: the key still unwraps, only the checksum tells.
    const file = join(dir, 'keys', first);
    const text = readFileSync(file, 'utf8');
    writeFileSync(file, text.replace(/"host": "(.)/, (_m, c: string) => `"host": "${c === 'x' ? 'y' : 'x'}`));
    const opened = await Store.open(new LocalBackend(dir), { password: 'first' });
    assert.deepEqual((await verifyStore(opened)).problems.map((p) => p.object), [`keys/${first}`]);
    // Truncated: the other key still opens; the damaged key's passphrase is told why it fails.
    truncateSync(file, 40);
    await Store.open(new LocalBackend(dir), { password: 'second' });
    await assert.rejects(Store.open(new LocalBackend(dir), { password: 'first' }), (err) => isQbackupError(err) && err.code === 'REPO_DAMAGED' && err.message.includes(`keys/${first}`));
    await assert.rejects(Store.open(new LocalBackend(dir), { password: 'third' }), (err) => isQbackupError(err) && err.code === 'REPO_DAMAGED');
    const problems = (await verifyStore(await Store.open(new LocalBackend(dir), { password: 'second' }))).problems;
    assert.deepEqual(problems.map((p) => p.object), [`keys/${first}`]);
    // Every key file deleted: said so, not "wrong passphrase".
    rmSync(join(dir, 'keys'), { recursive: true });
    await assert.rejects(Store.open(new LocalBackend(dir), { password: 'second' }), (err) => isQbackupError(err) && err.code === 'REPO_DAMAGED' && /holds no key file under keys\//.test(err.message));
  });
});
