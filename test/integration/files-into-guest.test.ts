// Files of a backup written into a running domain's guest through its guest
// agent (the real test guest: Debian's kernel, busybox, qemu-ga), by the
// same call the CLI's `files get --into-guest` and the API's files/restore
// with intoGuest use.
// - A file of several agent chunks and a directory with a file in it land in
//   a new guest directory; read back through the agent (guest-file-read)
//   they equal the backup's bytes, with the backup's modes and owners.
// - The CLI's files get --into-guest does the same.
// - Nothing is overwritten: writing the same file again is refused.
// - Bad input gets one sentence: a guest directory with "..", a domain that
//   is not running, one without an agent channel, one whose agent does not
//   answer (its guest paused).

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { QbackupError } from '../../src/errors.js';
import { CHUNK_BYTES, FileSession, copyIntoGuest } from '../../src/files/index.js';
import { runTool } from '../../src/image/tools.js';
import type { GuestAgentClient } from '../../src/qemu/guest-agent.js';
import { TestEnv } from '../helpers/env.js';
import { MiB, ext4Image, writeTree } from '../helpers/guest-fs.js';
import { guestAgent, guestBoot, guestDomainXml, guestRun, waitForConsole } from '../helpers/guest.js';

const BIG = randomBytes(2 * CHUNK_BYTES + 12_345);
const NOTE = 'restored through the agent\n';

async function readInGuest(agent: GuestAgentClient, path: string): Promise<Buffer> {
  const handle = await agent.execute<number>('guest-file-open', { path, mode: 'r' });
  const parts: Buffer[] = [];
  try {
    for (;;) {
      const r = await agent.execute<{ count: number; 'buf-b64': string; eof: boolean }>('guest-file-read', { handle, count: 65536 });
      parts.push(Buffer.from(r['buf-b64'], 'base64'));
      if (r.eof || r.count === 0) break;
    }
  } finally {
    await agent.execute('guest-file-close', { handle });
  }
  return Buffer.concat(parts);
}

describe('files of a backup written into a running guest through its agent', () => {
  let env: TestEnv;
  let repo: string;
  let session: FileSession;

  before(async () => {
    guestBoot();
    env = new TestEnv('qbfg-', { accel: 'tcg' });
    repo = env.path('repo');
    const tree = env.path('tree');
    writeTree(tree, [
      { path: 'etc', dir: true, mode: 0o755 },
      { path: 'etc/note.txt', data: NOTE, mode: 0o640, uid: 1000, gid: 100 },
      { path: 'data', dir: true, mode: 0o750, uid: 1001, gid: 1001 },
      { path: 'data/big.bin', data: BIG, mode: 0o600, uid: 1001, gid: 1001 },
      { path: 'data/link', link: '/etc/shadow' },
    ]);
    const raw = env.path('fs.raw');
    await ext4Image(raw, tree, 16 * MiB, 'qbdata', '4a1c7e52-8d1f-4a63-9a0c-0d6c2b7e9f10');
    const disk = env.path('fs.qcow2');
    await runTool('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, disk]);
    await env.qb.domains.define(guestDomainXml('g1', { workload: 'idle', disk }));
    await env.qb.domains.start('g1');
    await waitForConsole(env, 'g1', /qb: ready after/);
    await env.cliOk(['backup', 'g1', '--repo', repo]);
    session = await FileSession.open(env.qb.repository, { repo, domain: 'g1', runDir: env.qb.domains.runDir(), appliance: { backendSettings: ['force_tcg'] } });
  });

  after(async () => {
    await session?.close();
    await env.cleanup();
  });

  test('a file and a directory land in the guest with the backup bytes, modes and owners', async () => {
    const r = await copyIntoGuest(session, ['/etc/note.txt', '/data'], env.qb.repository.driver, 'g1', '/restored/here');
    assert.equal(r.files, 2);
    assert.equal(r.bytes, BIG.length + NOTE.length);
    assert.deepEqual(r.skipped.map((s) => s.path), ['/data/link']);
    assert.deepEqual(r.notKept, ['times']);
    const agent = await guestAgent(env, 'g1');
    try {
      assert.deepEqual(await readInGuest(agent, '/restored/here/data/big.bin'), BIG);
      assert.equal((await readInGuest(agent, '/restored/here/note.txt')).toString(), NOTE);
    } finally {
      agent.close();
    }
    const st = await guestRun(env, 'g1', 'stat -c "%n %a %u:%g" /restored/here/note.txt /restored/here/data /restored/here/data/big.bin; test -e /restored/here/data/link || echo nolink');
    assert.equal(st.exitcode, 0, st.out);
    assert.equal(st.out, '/restored/here/note.txt 640 1000:100\n/restored/here/data 750 1001:1001\n/restored/here/data/big.bin 600 1001:1001\nnolink\n');
  });

  test('the CLI writes a file into the guest with files get --into-guest', async () => {
    const out = await env.cliOk(['files', 'g1', '--repo', repo, 'get', '/data/big.bin', '--to', '/cli', '--into-guest', 'g1']);
    assert.match(out, /^Wrote 1 file\(s\) and 0 directory\(ies\), \d+ bytes, from backup \S+ into \/cli in the guest of domain g1\n {2}not kept: times$/m);
    const agent = await guestAgent(env, 'g1');
    try {
      assert.deepEqual(await readInGuest(agent, '/cli/big.bin'), BIG);
    } finally {
      agent.close();
    }
  });

  test('nothing is overwritten, and a bad guest directory or domain gets one sentence', async () => {
    await assert.rejects(copyIntoGuest(session, ['/etc/note.txt'], env.qb.repository.driver, 'g1', '/restored/here'), (err: unknown) => {
      assert.ok(err instanceof QbackupError && err.code === 'INVALID_ARGUMENT', String(err));
      assert.match(err.message, /^Cannot write "\/etc\/note.txt" to "\/restored\/here\/note.txt" in the guest of domain "g1": it exists/);
      return true;
    });
    const agent = await guestAgent(env, 'g1');
    try {
      assert.equal((await readInGuest(agent, '/restored/here/note.txt')).toString(), NOTE);
    } finally {
      agent.close();
    }
    await assert.rejects(copyIntoGuest(session, ['/etc/note.txt'], env.qb.repository.driver, 'g1', '/restored/../etc'), /give an absolute path without "\." or "\.\." components/);

    await env.qb.domains.define(guestDomainXml('noagent', { workload: 'idle', noAgent: true }));
    await assert.rejects(copyIntoGuest(session, ['/etc/note.txt'], env.qb.repository.driver, 'noagent', '/x'), /Cannot reach the guest agent of domain "noagent": it is not running/);
    await env.qb.domains.start('noagent', { paused: true });
    await assert.rejects(copyIntoGuest(session, ['/etc/note.txt'], env.qb.repository.driver, 'noagent', '/x'), (err: unknown) => {
      assert.ok(err instanceof QbackupError && err.code === 'GUEST_AGENT', String(err));
      assert.match(err.message, /domain "noagent": it has no guest agent channel/);
      return true;
    });
    // A paused guest's agent never answers.
    await env.qb.domains.define(guestDomainXml('paused', { workload: 'idle' }));
    await env.qb.domains.start('paused', { paused: true });
    await assert.rejects(copyIntoGuest(session, ['/etc/note.txt'], env.qb.repository.driver, 'paused', '/x'), (err: unknown) => {
      assert.ok(err instanceof QbackupError && err.code === 'GUEST_AGENT', String(err));
      assert.match(err.message, /^The guest agent of domain "paused" does not answer/);
      return true;
    });
  });
});
