// The connection and client over a fake daemon on a unix socket, for what
// the real libvirtd will not do on demand: replies out of order, keepalive
// pings, events before anyone waits, a hang-up mid-call, replies that break
// the protocol, and authentication qbackup does not speak. (The real daemon
// is tested in test/integration/libvirt-rpc.test.ts.)

import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { chmodSync } from 'node:fs';
import type { Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterEach, beforeEach, describe, it } from 'node:test';
import {
  EVENT_BODIES,
  LIBVIRT,
  LibvirtClient,
  LibvirtConnection,
  PROCEDURES,
  encodeMessage,
  encodeXdr,
  type LibvirtFrame,
  type LibvirtHeader,
  type LibvirtProtocolError,
} from '../../src/drivers/libvirt/index.js';
import { isQbackupError } from '../../src/errors.js';
import { FakeLibvirtServer, remoteErrorBody, replyMessage } from '../helpers/fake-libvirtd.js';

const DOM = { name: 'vm1', uuid: Buffer.alloc(16, 1), id: 1 };

/** A daemon that hands each received call to the test's handler; bytes that break the protocol fail the test. */
class FakeDaemon extends FakeLibvirtServer {
  readonly received: LibvirtFrame[] = [];
  onCall: (frame: LibvirtFrame, peer: FakePeer) => void = () => undefined;

  protected override onFrame(frame: LibvirtFrame, socket: Socket): void {
    this.received.push(frame);
    if (frame.header.type === LIBVIRT.VIR_NET_CALL) this.onCall(frame, new FakePeer(socket));
  }

  protected override onProtocolError(error: LibvirtProtocolError): void {
    assert.fail(error);
  }
}

class FakePeer {
  constructor(readonly socket: Socket) {}

  reply(call: LibvirtHeader, payload: Buffer, status: number = LIBVIRT.VIR_NET_OK): void {
    this.socket.write(replyMessage(call, payload, status));
  }

  error(call: LibvirtHeader, code: number, message: string): void {
    this.reply(call, remoteErrorBody(code, message, 10), LIBVIRT.VIR_NET_ERROR);
  }

  send(header: LibvirtHeader, payload: Buffer): void {
    this.socket.write(encodeMessage(header, payload));
  }
}

const stateReply = (state: number) => encodeXdr(PROCEDURES.domainGetState.ret, { state, reason: 0 });

const NOBODY = 65534;
const CLIENT_MODULE = pathToFileURL(join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'src', 'drivers', 'libvirt', 'index.js')).href;

/** Running a client as another user needs root, and a checkout that user may read (a clone under /root is not). */
function permissionTestSkip(): string | false {
  if (process.getuid?.() !== 0) return 'needs root to run a client as another user';
  const probe = spawnSync(process.execPath, ['-e', `require('node:fs').accessSync(${JSON.stringify(fileURLToPath(CLIENT_MODULE))}, 4)`], { uid: NOBODY, gid: NOBODY, cwd: '/' });
  return probe.status === 0 ? false : 'the compiled client is not readable by another user here';
}

describe('libvirt connection over a fake daemon', () => {
  let daemon: FakeDaemon;

  beforeEach(async () => {
    daemon = new FakeDaemon();
    await daemon.listen();
  });

  afterEach(async () => {
    await daemon.stop();
  });

  it('routes replies by serial, in whatever order they come', async () => {
    const held: Array<[LibvirtHeader, FakePeer]> = [];
    daemon.onCall = (frame, peer) => {
      held.push([frame.header, peer]);
      if (held.length === 2) for (const [h, p] of held.reverse()) p.reply(h, stateReply(h.serial));
    };
    await using conn = await LibvirtConnection.connect(daemon.path);
    const [a, b] = await Promise.all([conn.call(PROCEDURES.domainGetState, { dom: DOM, flags: 0 }), conn.call(PROCEDURES.domainGetState, { dom: DOM, flags: 0 })]);
    assert.deepEqual([a.state, b.state], [1, 2]);
    assert.deepEqual(daemon.received.map((f) => [f.header.program, f.header.procedure, f.header.serial]), [
      [LIBVIRT.REMOTE_PROGRAM, LIBVIRT.REMOTE_PROC_DOMAIN_GET_STATE, 1],
      [LIBVIRT.REMOTE_PROGRAM, LIBVIRT.REMOTE_PROC_DOMAIN_GET_STATE, 2],
    ]);
  });

  it("fails a call with libvirt's error and stays usable", async () => {
    let n = 0;
    daemon.onCall = (frame, peer) => (++n === 1 ? peer.error(frame.header, LIBVIRT.VIR_ERR_NO_DOMAIN, "Domain not found: no domain with matching name 'x'") : peer.reply(frame.header, stateReply(5)));
    await using conn = await LibvirtConnection.connect(daemon.path);
    await assert.rejects(conn.call(PROCEDURES.domainLookupByName, { name: 'x' }), (err: unknown) => isQbackupError(err, 'DOMAIN_NOT_FOUND') && err.message === "Domain not found: no domain with matching name 'x'");
    assert.equal((await conn.call(PROCEDURES.domainGetState, { dom: DOM, flags: 0 })).state, 5);
  });

  it('answers keepalive pings and buffers events for later waiters and listeners', async () => {
    const seen: string[] = [];
    await using conn = await LibvirtConnection.connect(daemon.path);
    conn.onEvent((e) => seen.push(e.kind));
    daemon.onCall = (frame, peer) => {
      peer.send({ program: LIBVIRT.KEEPALIVE_PROGRAM, version: 1, procedure: LIBVIRT.KEEPALIVE_PROC_PING, type: LIBVIRT.VIR_NET_MESSAGE, serial: 0, status: 0 }, Buffer.alloc(0));
      const event = encodeXdr(EVENT_BODIES.jobCompletedMsg, { callbackID: 9, dom: DOM, params: [{ field: 'type', type: 'int', value: 3 }] });
      peer.send({ program: LIBVIRT.REMOTE_PROGRAM, version: 1, procedure: LIBVIRT.REMOTE_PROC_DOMAIN_EVENT_CALLBACK_JOB_COMPLETED, type: LIBVIRT.VIR_NET_MESSAGE, serial: 0, status: 0 }, event);
      peer.reply(frame.header, Buffer.alloc(0));
    };
    await conn.call(PROCEDURES.domainAbortJob, { dom: DOM });
    const event = await conn.waitForEvent((e) => e.kind === 'job-completed' && e.callbackID === 9, 1000);
    assert.equal(event.seq, 1);
    assert.deepEqual(seen, ['job-completed']);
    await new Promise((r) => setTimeout(r, 20));
    const pong = daemon.received.find((f) => f.header.program === LIBVIRT.KEEPALIVE_PROGRAM);
    assert.equal(pong?.header.procedure, LIBVIRT.KEEPALIVE_PROC_PONG);
  });

  it('fails pending calls with the cause when the daemon hangs up', async () => {
    daemon.onCall = (_frame, peer) => peer.socket.end();
    const conn = await LibvirtConnection.connect(daemon.path, { label: 'qemu:///system' });
    await assert.rejects(conn.call(PROCEDURES.domainAbortJob, { dom: DOM }), (err: unknown) => {
      assert.ok(isQbackupError(err, 'LIBVIRT_DISCONNECTED'), String(err));
      assert.match(err.message, /domain-abort-job got no reply: connection to libvirt at qemu:\/\/\/system lost: libvirt at qemu:\/\/\/system closed the connection/);
      assert.ok(err.cause instanceof Error);
      return true;
    });
    assert.ok(isQbackupError(await conn.closed, 'LIBVIRT_DISCONNECTED'));
    await assert.rejects(conn.call(PROCEDURES.domainAbortJob, { dom: DOM }), (err: unknown) => isQbackupError(err, 'LIBVIRT_DISCONNECTED'));
    await conn.close();
  });

  it('ends the connection on a reply that names another procedure, an unknown serial or a hostile length', async () => {
    const breakers: Array<(h: LibvirtHeader, p: FakePeer) => void> = [
      (h, p) => p.reply({ ...h, procedure: 999 }, Buffer.alloc(0)),
      (h, p) => p.reply({ ...h, serial: h.serial + 100 }, Buffer.alloc(0)),
      (_h, p) => p.socket.write(Buffer.from([0x7f, 0xff, 0xff, 0xff])),
      (h, p) => p.reply(h, Buffer.alloc(4)),
    ];
    for (const breaker of breakers) {
      daemon.onCall = (frame, peer) => breaker(frame.header, peer);
      const conn = await LibvirtConnection.connect(daemon.path);
      await assert.rejects(conn.call(PROCEDURES.domainAbortJob, { dom: DOM }), (err: unknown) => isQbackupError(err, 'LIBVIRT_DISCONNECTED') && isQbackupError(err.cause, 'LIBVIRT_PROTOCOL'));
      assert.ok(isQbackupError(await conn.closed, 'LIBVIRT_PROTOCOL'));
    }
  });

  it('times a call out and ends the connection', async () => {
    await using conn = await LibvirtConnection.connect(daemon.path);
    await assert.rejects(conn.call(PROCEDURES.domainAbortJob, { dom: DOM }, { timeoutMs: 50 }), (err: unknown) => isQbackupError(err, 'LIBVIRT_TIMEOUT'));
    assert.ok(isQbackupError(await conn.closed, 'LIBVIRT_TIMEOUT'));
  });

  it('opens with auth none, and refuses SASL or a polkit refusal in one sentence', async () => {
    let auth = [LIBVIRT.REMOTE_AUTH_NONE];
    daemon.onCall = (frame, peer) => {
      const h = frame.header;
      if (h.procedure === LIBVIRT.REMOTE_PROC_AUTH_LIST) peer.reply(h, encodeXdr(PROCEDURES.authList.ret, { types: auth }));
      else if (h.procedure === LIBVIRT.REMOTE_PROC_AUTH_POLKIT) peer.error(h, LIBVIRT.VIR_ERR_AUTH_FAILED, 'authentication failed: access denied by policy');
      else peer.reply(h, Buffer.alloc(0));
    };
    const uri = `qemu+unix:///system?socket=${daemon.path}`;
    const client = await LibvirtClient.connect(uri);
    await client.close();
    await client.close();
    const open = daemon.received.find((f) => f.header.procedure === LIBVIRT.REMOTE_PROC_CONNECT_OPEN);
    assert.ok(open !== undefined);
    assert.deepEqual(open.body, Buffer.concat([Buffer.from([0, 0, 0, 1, 0, 0, 0, 14]), Buffer.from('qemu:///system\0\0'), Buffer.alloc(4)]));
    assert.ok(daemon.received.some((f) => f.header.procedure === LIBVIRT.REMOTE_PROC_CONNECT_CLOSE));

    auth = [LIBVIRT.REMOTE_AUTH_SASL];
    await assert.rejects(LibvirtClient.connect(uri), (err: unknown) => isQbackupError(err, 'LIBVIRT_ACCESS_DENIED') && /authentication qbackup does not do/.test(err.message));
    auth = [LIBVIRT.REMOTE_AUTH_POLKIT];
    await assert.rejects(LibvirtClient.connect(uri), (err: unknown) => isQbackupError(err, 'LIBVIRT_ACCESS_DENIED') && /polkit refused/.test(err.message));
  });

  it('permission denied on the socket is one sentence', { skip: permissionTestSkip() }, async () => {
    // The daemon's directory is root's alone (0700): a client running as nobody cannot reach the socket.
    chmodSync(daemon.dir, 0o700);
    const uri = `qemu+unix:///system?socket=${daemon.path}`;
    const script = `import(${JSON.stringify(CLIENT_MODULE)}).then(({ LibvirtClient }) => LibvirtClient.connect(${JSON.stringify(uri)})).then(() => console.log('{}'), (e) => console.log(JSON.stringify({ code: e.code, message: e.message })))`;
    const out = await new Promise<string>((resolve, reject) =>
      execFile(process.execPath, ['-e', script], { uid: NOBODY, gid: NOBODY, cwd: '/' }, (err, stdout) => (err ? reject(err) : resolve(stdout))),
    );
    const result = JSON.parse(out) as { code?: string; message?: string };
    assert.equal(result.code, 'LIBVIRT_ACCESS_DENIED');
    assert.equal(result.message, `Permission denied on libvirt's socket ${daemon.path} for ${uri}: run as root or as a member of the group that owns it`);
  });
});

