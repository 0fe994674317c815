// Writing into a guest refuses, before touching it: a guest directory that
// is relative or has "." or ".." components, and an agent that does not
// allow the file API (its guest-info says so).

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { QbackupError } from '../../src/errors.js';
import type { GuestAgentSession } from '../../src/drivers/driver.js';
import { checkGuestDir, putIntoGuest, type FileSession } from '../../src/files/index.js';

describe('writing into a guest: what is refused up front', () => {
  test('a guest directory must be absolute without "." or ".."', () => {
    assert.equal(checkGuestDir('/'), '/');
    assert.equal(checkGuestDir('/srv/restored/'), '/srv/restored');
    for (const bad of ['srv', '/srv/../etc', '/srv/./x', '/srv//x', '/..', '/a\0b', '']) {
      assert.throws(() => checkGuestDir(bad), (err: unknown) => err instanceof QbackupError && err.code === 'INVALID_ARGUMENT' && /give an absolute path without/.test(err.message), bad);
    }
  });

  test('an agent without guest-file-write is refused in one sentence, and nothing else is asked of it', async () => {
    const asked: string[] = [];
    const agent: GuestAgentSession = {
      domain: 'vm1',
      execute: async <T>(command: string): Promise<T> => {
        asked.push(command);
        return { supported_commands: [{ name: 'guest-file-open', enabled: true }, { name: 'guest-file-write', enabled: false }, { name: 'guest-file-close', enabled: true }] } as T;
      },
      close: async () => undefined,
    };
    await assert.rejects(putIntoGuest({} as FileSession, ['/etc/hostname'], agent, '/restored'), {
      code: 'GUEST_AGENT',
      message: 'The guest agent of domain "vm1" does not allow guest-file-write, so files cannot be written into its guest',
    });
    assert.deepEqual(asked, ['guest-info']);
  });
});
