// The domain commands of the CLI against real QEMU: lifecycle, disks,
// monitor passthrough, crash detection, and the bad input each must refuse
// without changing metadata.

import assert from 'node:assert/strict';
import { existsSync, statSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { TestEnv, imageHasPattern } from '../helpers/env.js';

describe('domain commands (CLI, real QEMU)', () => {
  let env: TestEnv;
  let diskA: string;
  let diskB: string;

  before(async () => {
    env = new TestEnv();
    diskA = await env.image('a.qcow2');
    diskB = await env.image('b.qcow2');
  });
  after(async () => env.cleanup());

  test('define, list, dumpxml keep unknown elements', async () => {
    const xml = env.domainXml('web1', [{ target: 'sda', file: diskA }], "  <os><type arch='x86_64'>hvm</type></os>\n  <features><acpi/></features>\n");
    const file = env.writeFile('web1.xml', xml);
    assert.match(await env.cliOk(['define', file]), /Domain 'web1' defined/);
    const list = JSON.parse(await env.cliOk(['list', '--all', '--json'])) as Array<{ name: string; state: string }>;
    assert.deepEqual(list.map((d) => [d.name, d.state]), [['web1', 'shut off']]);
    assert.deepEqual(JSON.parse(await env.cliOk(['list', '--json'])), []);
    const dumped = await env.cliOk(['dumpxml', 'web1']);
    assert.match(dumped, /<features>\s*<acpi\/>\s*<\/features>/);
    assert.match(dumped, /<uuid>[0-9a-f-]{36}<\/uuid>/);
  });

  test('start, write as the guest, hot-plug and unplug a second disk, shutdown', async () => {
    await env.cliOk(['start', 'web1']);
    const info = JSON.parse(await env.cliOk(['dominfo', 'web1', '--json'])) as { state: string; pid: number };
    assert.equal(info.state, 'running');
    const sock = `${env.stateDir}/domains/web1/qmp.sock`;
    assert.equal(statSync(sock).mode & 0o777, 0o600);
    assert.equal(statSync(`${env.stateDir}/domains/web1`).mode & 0o777, 0o700);

    await env.cliOk(['qemu-monitor-command', 'web1', '--hmp', 'qemu-io -d sda "write -P 0xab 0 64k"']);
    await env.cliOk(['qemu-monitor-command', 'web1', '--hmp', 'qemu-io -d sda "flush"']);
    assert.ok(await imageHasPattern(diskA, 'qcow2', 0xab, 0, 65536), 'guest write reached the image');

    const status = JSON.parse(await env.cliOk(['qemu-monitor-command', 'web1', '{"execute":"query-status"}'])) as { return: { status: string } };
    assert.equal(status.return.status, 'running');

    const attached = JSON.parse(await env.cliOk(['attach-disk', 'web1', diskB, 'sdb', '--subdriver', 'qcow2', '--json'])) as { diskId: string };
    const blk = JSON.parse(await env.cliOk(['domblklist', 'web1', '--json'])) as Array<{ target: string; diskId: string; nodeName: string }>;
    assert.deepEqual(blk.map((d) => d.target), ['sda', 'sdb']);
    const nodes = JSON.parse(await env.cliOk(['qemu-monitor-command', 'web1', '{"execute":"query-named-block-nodes","arguments":{"flat":true}}'])) as {
      return: Array<{ 'node-name': string }>;
    };
    assert.ok(nodes.return.some((n) => n['node-name'] === `${attached.diskId}-fmt`), 'hot-plugged node exists in QEMU');
    await env.cliOk(['qemu-monitor-command', 'web1', '--hmp', 'qemu-io -d sdb "write -P 0x11 1M 64k"']);
    assert.match(await env.cliOk(['dumpxml', 'web1']), /b\.qcow2/);

    await env.cliOk(['detach-disk', 'web1', 'sdb']);
    assert.doesNotMatch(await env.cliOk(['dumpxml', 'web1']), /b\.qcow2/);
    const nodesAfter = JSON.parse(await env.cliOk(['qemu-monitor-command', 'web1', '{"execute":"query-named-block-nodes"}'])) as {
      return: Array<{ 'node-name': string }>;
    };
    assert.ok(!nodesAfter.return.some((n) => n['node-name'].startsWith(attached.diskId)), 'unplugged nodes are gone');
    assert.ok(await imageHasPattern(diskB, 'qcow2', 0x11, 1 << 20, 65536), 'write to the hot-plugged disk is in its image');

    // re-attaching the same image keeps its disk id; the journal shows both events
    const again = JSON.parse(await env.cliOk(['attach-disk', 'web1', diskB, 'sdc', '--subdriver', 'qcow2', '--json'])) as { diskId: string };
    assert.equal(again.diskId, attached.diskId);
    const events = env.qb.domains.store.diskEvents(attached.diskId).map((e) => `${e.event}:${e.target}:${e.live}`);
    assert.deepEqual(events, ['attach:sdb:1', 'detach:sdb:1', 'attach:sdc:1']);
    await env.cliOk(['detach-disk', 'web1', 'sdc']);

    assert.match(await env.cliOk(['shutdown', 'web1']), /shut off/);
    const after = JSON.parse(await env.cliOk(['dominfo', 'web1', '--json'])) as { state: string; reason: string };
    assert.deepEqual([after.state, after.reason], ['shut off', 'shutdown']);
  });

  test('attach and detach on a shut-off domain change the definition and the journal', async () => {
    const r = JSON.parse(await env.cliOk(['attach-disk', 'web1', diskB, 'sdb', '--subdriver', 'qcow2', '--json'])) as { diskId: string };
    assert.match(await env.cliOk(['dumpxml', 'web1']), /dev="sdb"/);
    await env.cliOk(['start', 'web1']);
    await env.cliOk(['qemu-monitor-command', 'web1', '--hmp', 'qemu-io -d sdb "write -P 0x22 0 4k"']);
    await env.cliOk(['shutdown', 'web1']);
    assert.ok(await imageHasPattern(diskB, 'qcow2', 0x22, 0, 4096));
    await env.cliOk(['detach-disk', 'web1', 'sdb']);
    const last = env.qb.domains.store.diskEvents(r.diskId).at(-1);
    assert.deepEqual([last?.event, last?.live], ['detach', 0]);
  });

  test('destroy is reported as shut off (destroyed); kill -9 of QEMU as crashed', async () => {
    await env.cliOk(['start', 'web1']);
    await env.cliOk(['destroy', 'web1']);
    const d = JSON.parse(await env.cliOk(['dominfo', 'web1', '--json'])) as { state: string; reason: string };
    assert.deepEqual([d.state, d.reason], ['shut off', 'destroyed']);

    await env.cliOk(['start', 'web1']);
    const running = JSON.parse(await env.cliOk(['dominfo', 'web1', '--json'])) as { pid: number };
    process.kill(running.pid, 'SIGKILL');
    await waitGone(running.pid);
    const list = JSON.parse(await env.cliOk(['list', '--json'])) as Array<{ name: string; state: string }>;
    assert.deepEqual(list.map((x) => [x.name, x.state]), [['web1', 'crashed']]);
    const r = await env.cli(['qemu-monitor-command', 'web1', '{"execute":"query-status"}']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /domain "web1": it crashed/);
    // a crashed domain can be started again
    await env.cliOk(['start', 'web1']);
    await env.cliOk(['shutdown', 'web1']);
  });

  test('bad input: one-sentence errors, non-zero exit, metadata unchanged', async () => {
    const before = await env.cliOk(['dumpxml', 'web1']);
    const cases: Array<[string[], RegExp]> = [
      [['define', env.writeFile('bad.xml', '<domain><name>x</name>')], /Invalid|malformed|XML/i],
      [['define', env.writeFile('notdomain.xml', '<pool><name>x</name></pool>')], /domain/],
      [['define', env.writeFile('slash.xml', env.domainXml('a/b', []))], /a\/b/],
      [['define', env.writeFile('dots.xml', env.domainXml('..', []))], /Invalid domain name/],
      [['define', env.writeFile('ctl.xml', env.domainXml('a&#x1;b', []))], /Invalid domain name/],
      [['define', env.writeFile('dup.xml', env.domainXml('web1', []))], /already exists/],
      [['define', env.writeFile('missing.xml', env.domainXml('m1', [{ target: 'sda', file: env.path('nope.qcow2') }]))], /nope\.qcow2.*does not exist/],
      [['define', env.path('no-such-file.xml')], /does not exist/],
      [['start', 'nosuch'], /Domain "nosuch" does not exist/],
      [['start', '../etc'], /Invalid domain name/],
      [['shutdown', 'web1'], /not running/],
      [['detach-disk', 'web1', 'sdz'], /has no disk "sdz"/],
      [['attach-disk', 'web1', env.path('nope.qcow2'), 'sdb'], /does not exist/],
      [['attach-disk', 'web1', diskA, 'sdb', '--subdriver', 'qcow2'], /already disk "sda"/],
      [['attach-disk', 'web1', diskA, 'sdb'], /starts with a qcow2 header/],
      [['attach-disk', 'web1', diskB, 'sda'], /target "sda" is already in use/],
      [['attach-disk', 'web1', diskB, 'xyz'], /Invalid disk target/],
      [['attach-disk', 'web1', diskB, 'sdb', '--subdriver', 'vmdk'], /--subdriver/],
    ];
    for (const [args, pattern] of cases) {
      const r = await env.cli(args);
      assert.notEqual(r.code, 0, `${args.join(' ')} should fail`);
      assert.match(r.stderr, pattern, `${args.join(' ')}: ${r.stderr}`);
      assert.equal(r.stderr.trim().split('\n').length, 1, `one line for ${args.join(' ')}: ${r.stderr}`);
      assert.doesNotMatch(r.stderr, /internal error/);
    }
    assert.equal(await env.cliOk(['dumpxml', 'web1']), before);
    assert.deepEqual(
      (JSON.parse(await env.cliOk(['list', '--all', '--json'])) as Array<{ name: string }>).map((d) => d.name),
      ['web1'],
    );
  });

  test('starting twice, a QEMU that refuses to start, and undefine', async () => {
    await env.cliOk(['start', 'web1']);
    const twice = await env.cli(['start', 'web1']);
    assert.equal(twice.code, 1);
    assert.match(twice.stderr, /already running/);
    const undef = await env.cli(['undefine', 'web1']);
    assert.match(undef.stderr, /it is running/);
    await env.cliOk(['shutdown', 'web1']);

    // An image that cannot be opened as qcow2 (corrupted header): checked before
    // QEMU runs (qemu-img -f qcow2), and the tool's own text is shown.
    const broken = await env.image('broken.qcow2');
    await env.cliOk(['define', env.writeFile('b.xml', env.domainXml('broken', [{ target: 'sda', file: broken }]))]);
    const { openSync, writeSync, closeSync } = await import('node:fs');
    const fd = openSync(broken, 'r+');
    writeSync(fd, Buffer.from([0, 0, 0, 99]), 0, 4, 4); // qcow2 version field
    closeSync(fd);
    const r = await env.cli(['start', 'broken']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /Cannot start domain "broken": image ".*broken\.qcow2" of disk "sda" cannot be opened as qcow2: .*version/i);
    assert.equal((JSON.parse(await env.cliOk(['dominfo', 'broken', '--json'])) as { state: string }).state, 'shut off');
    // A QEMU that exits during start-up (it cannot allocate 64 TiB): QEMU's own text is shown, the domain is shut off (failed).
    const huge = env.domainXml('huge', []).replace("<memory unit='MiB'>64</memory>", "<memory unit='TiB'>64</memory>");
    await env.cliOk(['define', env.writeFile('huge.xml', huge)]);
    const h = await env.cli(['start', 'huge']);
    assert.equal(h.code, 1);
    assert.match(h.stderr, /Cannot start domain "huge": QEMU exited: .*memory/i);
    const hugeInfo = JSON.parse(await env.cliOk(['dominfo', 'huge', '--json'])) as { state: string; reason: string };
    assert.deepEqual([hugeInfo.state, hugeInfo.reason], ['shut off', 'failed']);

    await env.cliOk(['undefine', 'web1']);
    assert.ok(!existsSync(`${env.stateDir}/domains/web1`));
    assert.match((await env.cli(['dumpxml', 'web1'])).stderr, /does not exist/);
  });
});

async function waitGone(pid: number): Promise<void> {
  for (let i = 0; i < 200; i++) {
    try {
      process.kill(pid, 0);
    } catch {
      return;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}
