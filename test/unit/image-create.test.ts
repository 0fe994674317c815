// createImage (src/image/qemu-img.ts) never writes through a planted symlink:
// a push target or scratch image named by a link someone else placed is
// refused and the file the link points at is left as it was.

import assert from 'node:assert/strict';
import { closeSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import { createImage } from '../../src/image/qemu-img.js';
import { openLogFile } from '../../src/util/safe-create.js';

describe('createImage', () => {
  const dir = mkdtempSync(join(tmpdir(), 'qb-image-create-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  test('a planted symlink is refused and its target keeps its bytes', async () => {
    const victim = join(dir, 'victim');
    writeFileSync(victim, 'precious bytes that must stay');
    const link = join(dir, 'target.qcow2');
    symlinkSync(victim, link);
    await assert.rejects(createImage(link, 'qcow2', 1 << 20), (err: unknown) => isQbackupError(err, 'TOOL_FAILED'));
    assert.equal(readFileSync(victim, 'utf8'), 'precious bytes that must stay');
  });

  test('a new file is created 0600 as a qcow2 image', async () => {
    const file = join(dir, 'new.qcow2');
    await createImage(file, 'qcow2', 1 << 20);
    assert.equal(statSync(file).mode & 0o777, 0o600);
    assert.equal(readFileSync(file).subarray(0, 4).toString('latin1'), 'QFI\xfb');
  });

  test('LUKS images are created every time, although QEMU often fails to time its key derivation on the first try', async () => {
    // qemu-img gives up about one run in three here ("Unable to get accurate
    // CPU usage"); six images in a row would see that almost surely.
    const secret = join(dir, 'luks.secret');
    writeFileSync(secret, 'a passphrase', { mode: 0o600 });
    for (let i = 0; i < 6; i++) {
      const file = join(dir, `luks-${i}.qcow2`);
      await createImage(file, 'qcow2', 1 << 20, { luksSecretFile: secret });
      assert.equal(readFileSync(file).subarray(0, 4).toString('latin1'), 'QFI\xfb');
    }
  });

  test('log files (QEMU, console, the backup server) are never opened through a planted symlink', () => {
    const victim = join(dir, 'victim-log');
    writeFileSync(victim, 'keep me');
    const link = join(dir, 'qemu.log');
    symlinkSync(victim, link);
    for (const how of ['truncate', 'append'] as const) assert.throws(() => openLogFile(link, how), /ELOOP/);
    assert.equal(readFileSync(victim, 'utf8'), 'keep me');
    const fresh = join(dir, 'fresh.log');
    closeSync(openLogFile(fresh, 'append'));
    assert.equal(statSync(fresh).mode & 0o777, 0o600);
  });
});
