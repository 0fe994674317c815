// The libvirt driver's way to a guest agent (virDomainQemuAgentCommand over
// libvirt's RPC) says in one sentence why it cannot be used: a domain with
// no agent channel, and one whose channel has no agent behind it (no guest
// OS there). Through the real test guest's agent (scripts/guest/) a file
// written with guest-file-write reads back equal. Whole files of a backup
// written through an agent are tested on qbackup's own QEMU
// (files-into-guest.test.ts); that code is the same for every driver.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { copyFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { QbackupError } from '../../src/errors.js';
import { LibvirtClient } from '../../src/drivers/libvirt/index.js';
import { Qbackup } from '../../src/qbackup.js';
import { sleep } from '../../src/util/proc.js';
import { guestBoot, guestDomainXml } from '../helpers/guest.js';
import { createTestDisks, libvirtTestDir, startLibvirt, tearDownLibvirtTest, testDomainName, testDomainXml, type LibvirtDaemon } from '../helpers/libvirt.js';

const MiB = 1024 * 1024;
const AGENT_CHANNEL = `    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>`;

describe('the libvirt driver reaches guest agents through libvirt, or says why not', () => {
  let daemon: LibvirtDaemon;
  let client: LibvirtClient;
  let qb: Qbackup;
  let work: string;
  const { dir, remove } = libvirtTestDir();
  const plain = testDomainName('ga-none');
  const withChannel = testDomainName('ga-chan');
  const real = testDomainName('ga-real');

  before(async () => {
    daemon = await startLibvirt();
    client = await LibvirtClient.connect(daemon.uri);
    work = mkdtempSync(join(tmpdir(), 'qbt-lvga-'));
    qb = Qbackup.open({ stateDir: join(work, 'state'), connect: daemon.uri });
    const [a] = await createTestDisks(dir, ['sda'], 8 * MiB);
    const [b] = await createTestDisks(dir, ['sdb'], 8 * MiB);
    await client.create(await client.defineXml(testDomainXml(plain, [a!])));
    await client.create(await client.defineXml(testDomainXml(withChannel, [b!]).replace('  </devices>', AGENT_CHANNEL)));
    // The real guest, its kernel and initramfs copied where libvirt's QEMU reads them.
    const boot = guestBoot();
    const kernel = join(dir, 'vmlinuz');
    const initrd = join(dir, 'initrd.gz');
    copyFileSync(boot.kernel, kernel);
    copyFileSync(boot.initrd, initrd);
    const xml = guestDomainXml(real, { workload: 'idle' }).replace("type='kvm'", "type='qemu'").replace(boot.kernel, kernel).replace(boot.initrd, initrd);
    await client.create(await client.defineXml(xml));
  });

  after(async () => {
    await tearDownLibvirtTest({ qb, client, domains: [plain, withChannel, real], daemon, remove, dirs: [work] });
  });

  const refused = (domain: string, pattern: RegExp) => (err: unknown) => {
    assert.ok(err instanceof QbackupError && err.code === 'GUEST_AGENT', String(err));
    assert.match(err.message, new RegExp(`^The guest agent of domain "${domain}" failed "guest-ping": `));
    assert.match(err.message, pattern);
    assert.ok(!err.message.includes('\n'));
    return true;
  };

  it('a domain without an agent channel, and one with no agent behind its channel, get one sentence', async () => {
    assert.ok(qb.driver.guestAgent !== undefined);
    await assert.rejects(qb.driver.guestAgent(plain), refused(plain, /guest agent is not configured/i));
    await assert.rejects(qb.driver.guestAgent(withChannel), refused(withChannel, /not (connected|responding)/i));
  });

  it("a file written through the real guest's agent reads back equal", async () => {
    // The guest boots, then its agent answers; until then libvirt says it is not connected.
    const deadline = Date.now() + 300_000;
    let agent;
    for (;;) {
      try {
        agent = await qb.driver.guestAgent!(real);
        break;
      } catch (err) {
        if (Date.now() > deadline) throw err;
        await sleep(1000);
      }
    }
    const bytes = randomBytes(100_000);
    const path = '/qb-libvirt-agent.bin';
    const w = await agent.execute<number>('guest-file-open', { path, mode: 'w' });
    assert.equal((await agent.execute<{ count: number }>('guest-file-write', { handle: w, 'buf-b64': bytes.toString('base64') })).count, bytes.length);
    await agent.execute('guest-file-close', { handle: w });
    const r = await agent.execute<number>('guest-file-open', { path, mode: 'r' });
    const parts: Buffer[] = [];
    for (;;) {
      const got = await agent.execute<{ count: number; 'buf-b64': string; eof: boolean }>('guest-file-read', { handle: r, count: 65536 });
      parts.push(Buffer.from(got['buf-b64'], 'base64'));
      if (got.eof || got.count === 0) break;
    }
    await agent.execute('guest-file-close', { handle: r });
    await agent.close();
    assert.deepEqual(Buffer.concat(parts), bytes);
  });
});
