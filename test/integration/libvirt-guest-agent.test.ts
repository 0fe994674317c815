// The libvirt driver's way to a guest agent (virDomainQemuAgentCommand over
// libvirt's RPC) says in one sentence why it cannot be used: a domain with
// no agent channel, and one whose channel has no agent behind it (no guest
// OS here). Files written through a live agent are tested with the real
// guest on qbackup's own QEMU (files-into-guest.test.ts).

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { QbackupError } from '../../src/errors.js';
import { LibvirtClient } from '../../src/drivers/libvirt/index.js';
import { Qbackup } from '../../src/qbackup.js';
import { createTestDisks, libvirtTestDir, removeTestDomain, startLibvirt, testDomainName, testDomainXml, type LibvirtDaemon } from '../helpers/libvirt.js';

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

  before(async () => {
    daemon = await startLibvirt();
    client = await LibvirtClient.connect(daemon.uri);
    work = mkdtempSync(join(tmpdir(), 'qbt-lvga-'));
    qb = Qbackup.open({ stateDir: join(work, 'state'), connect: daemon.uri });
    const [a] = await createTestDisks(dir, ['sda'], 8 * MiB);
    const [b] = await createTestDisks(dir, ['sdb'], 8 * MiB);
    await client.create(await client.defineXml(testDomainXml(plain, [a!])));
    await client.create(await client.defineXml(testDomainXml(withChannel, [b!]).replace('  </devices>', AGENT_CHANNEL)));
  });

  after(async () => {
    qb?.close();
    await qb?.driver.close?.();
    for (const name of [plain, withChannel]) if (client !== undefined) await removeTestDomain(client, name).catch(() => undefined);
    await client?.close();
    await daemon?.stop();
    remove();
    if (work !== undefined) rmSync(work, { recursive: true, force: true });
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
});
