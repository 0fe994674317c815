// End to end through qbackup's own client of libvirt's RPC protocol, against
// the real libvirtd (started by the tests when none runs): define and start
// a two-disk domain, write as a guest would (HMP qemu-io through libvirt's
// monitor passthrough), take a full pull backup with a new checkpoint and
// read every byte with our NBD client, write again, take an incremental pull
// backup since that checkpoint and read only the dirty extents libvirt
// exports, end each job and receive its job-completed event, list and
// delete the checkpoints (virsh as the independent reference), and the
// errors a user meets, each in one sentence.

import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { LIBVIRT, LibvirtClient, type LibvirtDomainRef, type LibvirtEvent } from '../../src/drivers/libvirt/index.js';
import { isQbackupError } from '../../src/errors.js';
import { NbdClient } from '../../src/nbd/index.js';
import {
  createTestDisks,
  guestWrite,
  libvirtTestDir,
  mergeAdjacent,
  removeTestDomain,
  startLibvirt,
  tearDownLibvirtTest,
  testDomainName,
  testDomainXml,
  tool,
  virsh,
  type Extent,
  type LibvirtDaemon,
} from '../helpers/libvirt.js';

const DISK_BYTES = 8 << 20;
const CLUSTER = 64 << 10;

/** What each disk holds, as the test wrote it. */
class DiskModel {
  readonly bytes = Buffer.alloc(DISK_BYTES);
  write(pattern: number, offset: number, length: number): string {
    this.bytes.fill(pattern, offset, offset + length);
    return `write -P 0x${pattern.toString(16)} ${offset} ${length}`;
  }
}

/** Whole clusters a write touches. */
function clustersOf(writes: ReadonlyArray<[number, number]>): Extent[] {
  return mergeAdjacent(
    writes.map(([offset, length]) => {
      const start = Math.floor(offset / CLUSTER) * CLUSTER;
      const end = Math.ceil((offset + length) / CLUSTER) * CLUSTER;
      return { offset: start, length: end - start };
    }),
  );
}

function pullBackupXml(socket: string, incremental?: string): string {
  return `<domainbackup mode='pull'>
  ${incremental === undefined ? '' : `<incremental>${incremental}</incremental>`}
  <server transport='unix' socket='${socket}'/>
</domainbackup>`;
}

const checkpointXml = (name: string): string => `<domaincheckpoint><name>${name}</name></domaincheckpoint>`;

async function readExport(socket: string, target: string): Promise<Buffer> {
  await using nbd = await NbdClient.connect({ socket }, { exportName: target });
  assert.equal(nbd.size, DISK_BYTES);
  return nbd.read(0, nbd.size);
}

describe('libvirt RPC client against the real libvirtd', () => {
  let daemon: LibvirtDaemon;
  let client: LibvirtClient;

  before(async () => {
    daemon = await startLibvirt();
    client = await LibvirtClient.connect(daemon.uri);
  });

  after(async () => {
    await tearDownLibvirtTest({ client, daemon });
  });

  it('opens the connection and reports libvirt 9 or newer', async () => {
    const version = await client.getLibVersion();
    assert.ok(version >= 9_000_000, `libvirt version ${version}`);
  });

  it('full and incremental pull backups of a running two-disk domain, read with our NBD client', async () => {
    const name = testDomainName('pull');
    const { dir, socketDir, remove } = libvirtTestDir();
    try {
      const disks = await createTestDisks(dir, ['sda', 'sdb'], DISK_BYTES);
      const defined = await client.defineXml(testDomainXml(name, disks));
      assert.equal(defined.name, name);
      assert.ok((await client.listAllDomains()).some((d) => d.name === name));
      const dom = await client.create(defined);
      assert.equal((await client.getState(dom)).state, LIBVIRT.VIR_DOMAIN_RUNNING);
      const byUuid = await client.lookupDomainByUuid(dom.uuid);
      assert.equal(byUuid.name, name);

      const models = { sda: new DiskModel(), sdb: new DiskModel() };
      await guestWrite(client, dom, 'sda', models.sda.write(0xab, 0, 64 << 10));
      await guestWrite(client, dom, 'sdb', models.sdb.write(0x5c, 192 << 10, 128 << 10));

      const callbackId = await client.registerDomainEvent(LIBVIRT.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, dom);
      const socket = join(socketDir, 'backup.sock');

      // Full: every byte of each export equals what the guest wrote.
      await client.backupBegin(dom, pullBackupXml(socket), checkpointXml('c1'));
      const fullXml = await client.backupGetXmlDesc(dom);
      assert.match(fullXml, /<domainbackup mode='pull'>/);
      for (const target of ['sda', 'sdb'] as const) {
        assert.ok((await readExport(socket, target)).equals(models[target].bytes), `full export of ${target}`);
      }
      await endJobAndAwaitEvent(client, dom, callbackId);

      // Incremental since c1: only the clusters written since are dirty, and they read right.
      const writes: Record<'sda' | 'sdb', Array<[number, number]>> = { sda: [[1 << 20, 4096], [3 << 20, 64 << 10]], sdb: [[(2 << 20) + (64 << 10), 128 << 10]] };
      await guestWrite(client, dom, 'sda', models.sda.write(0xcd, 1 << 20, 4096));
      await guestWrite(client, dom, 'sda', models.sda.write(0x11, 3 << 20, 64 << 10));
      await guestWrite(client, dom, 'sdb', models.sdb.write(0xef, (2 << 20) + (64 << 10), 128 << 10));
      await client.backupBegin(dom, pullBackupXml(socket, 'c1'), checkpointXml('c2'));
      const stats = await client.getJobStats(dom);
      assert.equal(stats.type, LIBVIRT.VIR_DOMAIN_JOB_UNBOUNDED);
      assert.equal(stats.fields['operation'], LIBVIRT.VIR_DOMAIN_JOB_OPERATION_BACKUP);
      assert.equal((await client.getJobInfo(dom)).type, LIBVIRT.VIR_DOMAIN_JOB_UNBOUNDED);
      const incXml = await client.backupGetXmlDesc(dom);
      for (const target of ['sda', 'sdb'] as const) {
        assert.match(incXml, new RegExp(`exportbitmap='backup-${target}'`));
        const context = `qemu:dirty-bitmap:backup-${target}`;
        await using nbd = await NbdClient.connect({ socket }, { exportName: target, metaContexts: [context] });
        const dirty = mergeAdjacent((await nbd.extents(context)).filter((e) => (e.flags & 1) === 1).map((e) => ({ offset: e.offset, length: e.length })));
        assert.deepEqual(dirty, clustersOf(writes[target]), `dirty extents of ${target}`);
        for (const e of dirty) {
          assert.ok((await nbd.read(e.offset, e.length)).equals(models[target].bytes.subarray(e.offset, e.offset + e.length)), `bytes of ${target} at ${e.offset}`);
        }
      }
      const completed = await endJobAndAwaitEvent(client, dom, callbackId);
      assert.equal(completed.kind === 'job-completed' ? completed.params.find((p) => p.field === 'operation')?.value : undefined, LIBVIRT.VIR_DOMAIN_JOB_OPERATION_BACKUP);
      await client.deregisterDomainEvent(callbackId);
      assert.equal((await client.getJobStats(dom, LIBVIRT.VIR_DOMAIN_JOB_STATS_COMPLETED)).type, LIBVIRT.VIR_DOMAIN_JOB_COMPLETED);
      // No job left: libvirt says so, and the backup's XML is gone with it.
      await assert.rejects(client.abortJob(dom), (err: unknown) => isQbackupError(err, 'LIBVIRT_ERROR') && /no job is active/.test(err.message));
      await assert.rejects(client.backupGetXmlDesc(dom), (err: unknown) => isQbackupError(err, 'JOB_NOT_FOUND'));

      // Checkpoints: ours, as virsh sees them too; deleted through the client.
      const listed = (await client.listAllCheckpoints(dom)).map((c) => c.name).sort();
      assert.deepEqual(listed, ['c1', 'c2']);
      assert.deepEqual(virshNames(await virsh(['checkpoint-list', name, '--name'])), ['c1', 'c2']);
      const c1 = await client.checkpointLookupByName(dom, 'c1');
      const c1Xml = await client.checkpointGetXmlDesc(c1);
      assert.match(c1Xml, /<name>c1<\/name>/);
      // Redefine: drop c2's metadata only (its bitmaps stay), then define it again from its XML.
      const c2 = await client.checkpointLookupByName(dom, 'c2');
      const c2Xml = await client.checkpointGetXmlDesc(c2);
      await client.checkpointDelete(c2, LIBVIRT.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY);
      assert.deepEqual(virshNames(await virsh(['checkpoint-list', name, '--name'])), ['c1']);
      const redefined = await client.checkpointCreateXml(dom, c2Xml, LIBVIRT.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE);
      assert.equal(redefined.name, 'c2');
      assert.deepEqual(virshNames(await virsh(['checkpoint-list', name, '--name'])), ['c1', 'c2']);
      await client.checkpointDelete(c1);
      await client.checkpointDelete(await client.checkpointLookupByName(dom, 'c2'));
      assert.deepEqual(await client.listAllCheckpoints(dom), []);
      assert.deepEqual(virshNames(await virsh(['checkpoint-list', name, '--name'])), []);
    } finally {
      await removeTestDomain(client, name);
      remove();
    }
  });

  it('block copy with pivot, block pull and their events, block resize; quiescing without an agent is GUEST_AGENT', async () => {
    const name = testDomainName('blockjobs');
    const { dir, remove } = libvirtTestDir();
    try {
      // sdb's image has a backing file holding data; block pull moves it into the overlay.
      const [sda] = await createTestDisks(dir, ['sda'], DISK_BYTES);
      const base = join(dir, 'base.qcow2');
      const overlay = join(dir, 'sdb.qcow2');
      await tool('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(DISK_BYTES)]);
      await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 0 1M', base]);
      await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', overlay]);
      assert.ok(sda !== undefined);
      let dom = await client.defineXml(testDomainXml(name, [sda, { target: 'sdb', file: overlay }]));
      dom = await client.create(dom);
      await assert.rejects(client.fsFreeze(dom), (err: unknown) => isQbackupError(err, 'GUEST_AGENT') && /guest agent/i.test(err.message));
      const callbackId = await client.registerDomainEvent(LIBVIRT.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, dom);
      const blockEvent = (dst: string, status: number, after: number) =>
        client.waitForEvent((e) => e.kind === 'block-job-2' && e.callbackID === callbackId && e.dst === dst && e.status === status, 60_000, after);

      // Block copy of sda to a new image, pivoted once it is ready.
      await guestWrite(client, dom, 'sda', 'write -P 0x77 0 1M');
      const copy = join(dir, 'sda-copy.qcow2');
      let cursor = client.eventCursor();
      await client.blockCopy(dom, 'sda', `<disk type='file'><source file='${copy}'/><driver type='qcow2'/></disk>`, [], LIBVIRT.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB);
      const ready = await blockEvent('sda', LIBVIRT.VIR_DOMAIN_BLOCK_JOB_READY, cursor);
      assert.equal(ready.kind === 'block-job-2' ? ready.type : -1, LIBVIRT.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY);
      const info = await client.getBlockJobInfo(dom, 'sda');
      assert.equal(info?.type, LIBVIRT.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY);
      assert.equal(info?.cur, info?.end);
      cursor = client.eventCursor();
      await client.blockJobAbort(dom, 'sda', LIBVIRT.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT);
      await blockEvent('sda', LIBVIRT.VIR_DOMAIN_BLOCK_JOB_COMPLETED, cursor);
      assert.ok((await client.getXmlDesc(dom)).includes(`<source file='${copy}'`), 'sda now reads from the copy');
      assert.equal(await client.getBlockJobInfo(dom, 'sda'), undefined);

      // Block pull of sdb: the backing file's data moves into the overlay.
      cursor = client.eventCursor();
      await client.blockPull(dom, 'sdb');
      await blockEvent('sdb', LIBVIRT.VIR_DOMAIN_BLOCK_JOB_COMPLETED, cursor);
      await client.deregisterDomainEvent(callbackId);
      // Resize through libvirt and read the new capacity back.
      await client.blockResize(dom, 'sdb', BigInt(DISK_BYTES * 2));
      assert.equal((await client.getBlockInfo(dom, 'sdb')).capacity, BigInt(DISK_BYTES * 2));
      await client.destroy(dom, LIBVIRT.VIR_DOMAIN_DESTROY_GRACEFUL);
      assert.equal((await client.getState(dom)).state, LIBVIRT.VIR_DOMAIN_SHUTOFF);
      const overlayInfo = JSON.parse(await tool('qemu-img', ['info', '--output=json', overlay])) as Record<string, unknown>;
      assert.equal(overlayInfo['backing-filename'], undefined);
      assert.match(await tool('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 0x42 0 1M', overlay]), /read 1048576\/1048576 bytes/);
      assert.doesNotMatch(await tool('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 0x77 0 1M', copy]), /Pattern verification failed/);
    } finally {
      await removeTestDomain(client, name);
      remove();
    }
  });

  it('an unknown domain is DOMAIN_NOT_FOUND with libvirt\'s message kept', async () => {
    await assert.rejects(client.lookupDomainByName('qbt-lv-no-such-domain'), (err: unknown) => {
      assert.ok(isQbackupError(err, 'DOMAIN_NOT_FOUND'), String(err));
      assert.match(err.message, /no domain with matching name 'qbt-lv-no-such-domain'/);
      assert.equal(err.details['libvirtCode'], LIBVIRT.VIR_ERR_NO_DOMAIN);
      return true;
    });
    // The connection stays usable after an error.
    assert.ok((await client.getLibVersion()) > 0);
  });

  it('a socket that does not exist is one sentence', async () => {
    const uri = 'qemu+unix:///system?socket=/nonexistent/qbt-libvirt-sock';
    await assert.rejects(LibvirtClient.connect(uri), (err: unknown) => {
      assert.ok(isQbackupError(err, 'LIBVIRT_UNAVAILABLE'), String(err));
      assert.equal(err.message, `No libvirt daemon at ${uri}: the socket /nonexistent/qbt-libvirt-sock does not exist (is libvirtd running?)`);
      return true;
    });
  });

  it('malformed domain XML is INVALID_XML, an unknown checkpoint CHECKPOINT_NOT_FOUND', async () => {
    await assert.rejects(client.defineXml("<domain type='qemu'><name>x</name>"), (err: unknown) => isQbackupError(err, 'INVALID_XML'));
    const name = testDomainName('errors');
    const { dir, remove } = libvirtTestDir();
    try {
      const dom = await client.defineXml(testDomainXml(name, await createTestDisks(dir, ['sda'], DISK_BYTES)));
      await assert.rejects(client.checkpointLookupByName(dom, 'nope'), (err: unknown) => {
        assert.ok(isQbackupError(err, 'CHECKPOINT_NOT_FOUND'), String(err));
        assert.match(err.message, /nope/);
        return true;
      });
    } finally {
      await removeTestDomain(client, name);
      remove();
    }
  });

  it('a libvirtd restart fails what was pending with LIBVIRT_DISCONNECTED and its cause; a new connection works', async (t) => {
    if (!daemon.started) {
      t.diagnostic('libvirtd was not started by the tests, so they do not restart it');
      return;
    }
    const other = await LibvirtClient.connect(daemon.uri);
    await daemon.restart();
    const cause = await other.connection.closed;
    assert.ok(isQbackupError(cause, 'LIBVIRT_DISCONNECTED'), String(cause));
    assert.match(cause.message, /libvirt at qemu:\/\/\/system closed the connection/);
    await assert.rejects(other.listAllDomains(), (err: unknown) => isQbackupError(err, 'LIBVIRT_DISCONNECTED') && err.cause === cause);
    await other.close();
    await client.close();
    client = await LibvirtClient.connect(daemon.uri);
    assert.ok((await client.getLibVersion()) >= 9_000_000);
  });
});

function virshNames(out: string): string[] {
  return out
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '')
    .sort();
}

async function endJobAndAwaitEvent(client: LibvirtClient, dom: LibvirtDomainRef, callbackId: number): Promise<LibvirtEvent> {
  const cursor = client.eventCursor();
  await client.abortJob(dom);
  const event = await client.waitForEvent((e) => e.kind === 'job-completed' && e.callbackID === callbackId, 30_000, cursor);
  assert.equal(event.kind === 'job-completed' ? event.dom.name : undefined, dom.name);
  return event;
}
