// Instant restore through libvirt while a user keeps looking at it: QEMU 7.2
// crashes if the node graph is read (query-named-block-nodes, which libvirt
// sends for virDomainGetBlockInfo and after finishing a pull) between a
// block pull's last step and its dismissal. A three-disk backup is restored
// instantly (twice), and from the first byte of the copy to well after its
// end the test does what users do, over and over: the progress of
// `restore --instant --wait` and `domjobinfo` (library and CLI), the disk
// list, and a backup (refused while a disk reads from the backup, taken once
// none does). Then QEMU is the same process that started, and the restored
// disks equal the backup plus the guest's writes, byte for byte.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { LIBVIRT, LibvirtClient, type LibvirtDomainRef } from '../../src/drivers/libvirt/index.js';
import { Qbackup } from '../../src/qbackup.js';
import { isProcessAlive } from '../../src/util/proc.js';
import { cliPath } from '../helpers/env.js';
import { createTestDisks, guestWrite, libvirtCli, libvirtTestDir, removeTestDomain, startLibvirt, tearDownLibvirtTest, testDomainName, testDomainXml, tool, virsh, type LibvirtDaemon, writePattern } from '../helpers/libvirt.js';

const MiB = 1 << 20;
const DISK_BYTES = 4 * MiB;
const TARGETS = ['sda', 'sdb', 'sdc'];
/** The copies start held (a disk's pull sleeps after its first chunk) so the looking starts mid-copy; the loop lifts the cap. */
const HELD = 10 * 1024;

describe('instant restore of a libvirt domain while its progress, job info and backups are asked for', () => {
  let daemon: LibvirtDaemon;
  let client: LibvirtClient;
  let qb: Qbackup;
  let work: string;
  let repo: string;
  const source = testDomainName('ists');
  const restored: string[] = [];
  const { dir, remove } = libvirtTestDir();
  const atBackup = new Map<string, Buffer>();

  /** The CLI with --connect; exit code, stdout and stderr. */
  const cli = (args: readonly string[]): Promise<{ code: number; stdout: string; stderr: string }> => libvirtCli(join(work, 'state'), daemon.uri, args);

  const write = (dom: LibvirtDomainRef, model: Map<string, Buffer>, target: string, pattern: number, offset: number, length: number): Promise<void> => writePattern(client, dom, model, target, pattern, offset, length);

  const qemuPid = (name: string): number => Number(readFileSync(`/run/libvirt/qemu/${name}.pid`, 'utf8').trim());

  before(async () => {
    daemon = await startLibvirt();
    client = await LibvirtClient.connect(daemon.uri);
    work = mkdtempSync(join(tmpdir(), 'qbt-lvists-'));
    repo = join(work, 'repo');
    qb = Qbackup.open({ stateDir: join(work, 'state'), connect: daemon.uri });
    const dom = await client.create(await client.defineXml(testDomainXml(source, await createTestDisks(dir, TARGETS, DISK_BYTES))));
    // Equal disks with data in several chunks each: their pulls take alike long, so run together they would end together.
    for (const [i, t] of TARGETS.entries()) {
      atBackup.set(t, Buffer.alloc(DISK_BYTES));
      await write(dom, atBackup, t, 0xa0 + i, 0, 3 * MiB);
      await write(dom, atBackup, t, 0xb0 + i, 3 * MiB + 512 * 1024, 4096);
    }
    const r = await cli(['backup', source, '--repo', repo]);
    assert.equal(r.code, 0, r.stderr);
  });

  after(async () => {
    for (const name of restored) {
      const server = qb?.instant.loadRecord(name)?.server?.pid;
      if (server !== undefined && isProcessAlive(server)) process.kill(server, 'SIGKILL');
      if (client !== undefined) await removeTestDomain(client, name).catch(() => undefined);
      rmSync(join('/var/lib/libvirt/images', name), { recursive: true, force: true });
    }
    await tearDownLibvirtTest({ qb, client, domains: [source], daemon, remove, dirs: [work] });
  });

  for (const round of [1, 2]) {
    it(`round ${round}: QEMU survives the copy's end under steady looking, and the disks equal the backup`, async () => {
      const name = `${source}-r${round}`;
      restored.push(name);
      let serverPid: number | null;
      if (round === 1) {
        serverPid = (await qb.instant.restore(source, { repo, as: name, speedBytesPerSec: HELD })).serverPid;
      } else {
        // As a user starts it: the CLI says the disks are copied one at a time and who starts the next.
        const r = await cli(['restore', source, '--repo', repo, '--instant', '--as', name, '--bandwidth', String(HELD / MiB)]);
        assert.equal(r.code, 0, r.stderr);
        assert.match(r.stdout, /its disks are copied one at a time, the next one started by the next command on it \(domjobinfo/);
        assert.match(r.stdout, /Disk sdb: +waiting, 0%/);
        serverPid = qb.instant.loadRecord(name)?.server?.pid ?? null;
      }
      const dom = await client.lookupDomainByName(name);
      const pid = qemuPid(name);
      const want = new Map([...atBackup].map(([t, b]) => [t, Buffer.from(b)]));
      for (const [i, t] of TARGETS.entries()) {
        await write(dom, want, t, 0x70 + i, 2 * MiB + i * 8192, 8192);
        await guestWrite(client, dom, t, 'flush');
      }

      // Held, and nothing lifts the cap yet: the disks still read from the backup.
      const mid = await cli(['domjobinfo', name]);
      assert.equal(mid.code, 0, mid.stderr);
      assert.match(mid.stdout, /Instant restore \(streaming\)/);
      const refused = await cli(['backup', name, '--repo', join(work, `repo-${name}`)]);
      assert.equal(refused.code, 1);
      assert.match(refused.stderr, /still reads from its backup while an instant restore copies the data in/);

      // What a waiting CLI does (its progress polls), while others look too and lift every cap as pulls start.
      let done = false;
      const waiting = qb.instant.wait(name, { pollMs: 20 }).finally(() => {
        done = true;
      });
      // The library, as domjobinfo, the daemon's page and the disk list ask.
      const library = (async () => {
        for (let extra = 0; extra < 30; extra += done ? 1 : 0) {
          await qb.instant.info(name);
          await qb.driver.disks(name);
          for (const t of TARGETS) await virsh(['blockjob', name, t, '--bandwidth', '0']).catch(() => undefined);
        }
      })();
      // The CLI: domjobinfo, and a backup (refused while a disk reads from the backup, taken once none does).
      const commands = (async () => {
        for (let extra = 0; extra < 2; extra += done ? 1 : 0) {
          const info = await cli(['domjobinfo', name]);
          assert.equal(info.code, 0, info.stderr);
          const b = await cli(['backup', name, '--repo', join(work, `repo-${name}`)]);
          if (b.code !== 0) assert.match(b.stderr, /still reads from its backup while an instant restore copies the data in/);
        }
      })();
      const [waited, ...looked] = await Promise.allSettled([waiting, library, commands]);
      for (const l of looked) if (l.status === 'rejected') throw l.reason;
      if (waited.status === 'rejected') throw waited.reason;
      const result = waited.value;

      assert.equal(result.state, 'completed');
      assert.ok(result.disks.every((d) => d.status === 'completed' && d.doneBytes === DISK_BYTES && d.totalBytes === DISK_BYTES), JSON.stringify(result.disks));
      assert.equal((await client.getState(dom)).state, LIBVIRT.VIR_DOMAIN_RUNNING, 'the restored domain still runs');
      assert.equal(qemuPid(name), pid, 'the QEMU that started is the one running (it never died)');
      assert.ok(isProcessAlive(pid));
      for (const flags of [0, LIBVIRT.VIR_DOMAIN_XML_INACTIVE]) assert.doesNotMatch(await client.getXmlDesc(dom, flags), /protocol=['"]nbd['"]/);
      assert.ok(serverPid !== null && !isProcessAlive(serverPid), 'the backup is no longer served');

      await client.destroy(dom, LIBVIRT.VIR_DOMAIN_DESTROY_GRACEFUL);
      for (const d of result.disks) {
        const raw = join(work, `${name}-${d.target}.raw`);
        await tool('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', d.overlay, raw]);
        assert.ok(readFileSync(raw).equals(want.get(d.target) ?? Buffer.alloc(0)), `disk ${d.target} of ${name} equals the backup plus the guest's writes`);
      }
    });
  }
});
