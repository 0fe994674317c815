// NbdClient and NbdConnection against a scripted NBD server on a unix
// socket. The fake server exists for what real servers never do: refuse in
// odd ways, reorder chunks, lie about lengths and offsets, hang up mid-reply.
// Interoperability with real servers is tested in
// test/integration/nbd-interop.test.ts.

import { strict as assert } from 'node:assert';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, before, beforeEach, describe, it, mock } from 'node:test';
import { TLSSocket } from 'node:tls';
import { isQbackupError, QbackupError } from '../../src/errors.js';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EIO,
  NBD_ESHUTDOWN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_OPT_ABORT,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NbdClient,
  NbdCommandError,
  NbdConnectionState,
  NbdProtocolError,
  type NbdTlsOptions,
} from '../../src/nbd/index.js';
import { readClientCredentials } from '../../src/util/pki.js';
import { makePki } from '../helpers/pki.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const EXPORT = 'vm1-sda';

// ---- The scripted server --------------------------------------------------

interface FakeRequest {
  type: number;
  flags: number;
  cookie: bigint;
  offset: number;
  length: number;
}

interface FakeScript {
  hello?: 'newstyle' | 'oldstyle' | 'not-fixed';
  structured?: boolean;
  size?: number;
  transmissionFlags?: number;
  blockSizes?: [number, number, number];
  /** Contexts the server selects when asked: name → id. */
  contexts?: Record<string, number>;
  /** Answer NBD_OPT_SET_META_CONTEXT with NBD_REP_ERR_POLICY. */
  refuseContexts?: boolean;
  /** Handles a request; default: the in-memory disk below. */
  onRequest?: (request: FakeRequest, peer: Peer) => void;
  /**
   * NBD_OPT_STARTTLS: upgrade with this server identity (every other option
   * before it gets NBD_REP_ERR_TLS_REQD, as QEMU does), or answer it with
   * this refusal, or ACK it and then talk in the clear.
   */
  tls?: { cert: Buffer; key: Buffer; ca?: Buffer } | { refuse: number } | 'plaintext-after-ack';
}

/** Reads exact byte counts from a socket; undefined at end of stream. */
class Reader {
  private buffered = Buffer.alloc(0);
  private ended = false;
  private waiter: (() => void) | undefined;

  constructor(socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, d]);
      this.waiter?.();
    });
    socket.on('close', () => {
      this.ended = true;
      this.waiter?.();
    });
    socket.on('error', () => undefined);
  }

  async read(n: number): Promise<Buffer | undefined> {
    while (this.buffered.length < n) {
      if (this.ended) return undefined;
      await new Promise<void>((resolve) => {
        this.waiter = resolve;
      });
      this.waiter = undefined;
    }
    const out = this.buffered.subarray(0, n);
    this.buffered = this.buffered.subarray(n);
    return out;
  }
}

/** The server's side of one connection: helpers that write replies. */
class Peer {
  constructor(
    readonly socket: Socket,
    readonly server: FakeServer,
  ) {}

  write(bytes: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(bytes);
  }

  simple(cookie: bigint, error: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    h.writeUInt32BE(0x67446698, 0);
    h.writeUInt32BE(error, 4);
    h.writeBigUInt64BE(cookie, 8);
    this.write(Buffer.concat([h, data]));
  }

  chunk(cookie: bigint, flags: number, type: number, payload: Buffer, length = payload.length): void {
    const h = Buffer.alloc(20);
    h.writeUInt32BE(0x668e33ef, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeUInt32BE(length, 16);
    this.write(Buffer.concat([h, payload]));
  }

  data(cookie: bigint, offset: number, bytes: Buffer, done = false): void {
    this.chunk(cookie, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([u64(offset), bytes]));
  }

  hole(cookie: bigint, offset: number, length: number, done = false): void {
    this.chunk(cookie, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_HOLE, Buffer.concat([u64(offset), u32(length)]));
  }

  none(cookie: bigint): void {
    this.chunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, Buffer.alloc(0));
  }

  status(cookie: bigint, contextId: number, descriptors: Array<[number, number]>, done = false): void {
    this.chunk(cookie, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_BLOCK_STATUS, u32(contextId, ...descriptors.flat()));
  }

  error(cookie: bigint, errno: number, message: string): void {
    const text = Buffer.from(message);
    const fixed = Buffer.alloc(6);
    fixed.writeUInt32BE(errno, 0);
    fixed.writeUInt16BE(text.length, 4);
    this.chunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, Buffer.concat([fixed, text]));
  }
}

function u64(value: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(value));
  return b;
}

function u32(...values: number[]): Buffer {
  const b = Buffer.alloc(4 * values.length);
  values.forEach((v, i) => b.writeUInt32BE(v, 4 * i));
  return b;
}

function optionReply(option: number, reply: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(20);
  h.writeBigUInt64BE(0x3e889045565a9n, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(reply >>> 0, 12);
  h.writeUInt32BE(payload.length, 16);
  return Buffer.concat([h, payload]);
}

class FakeServer {
  readonly path: string;
  readonly script: FakeScript;
  readonly disk: Buffer;
  /** Options received, in order. */
  readonly options: number[] = [];
  /** Options received over TLS, in order. */
  readonly tlsOptions: number[] = [];
  /** Transmission requests received, in order (NBD_CMD_DISC included). */
  readonly requests: FakeRequest[] = [];
  readonly sockets = new Set<Socket>();
  private readonly server: Server;

  private constructor(path: string, script: FakeScript) {
    this.path = path;
    this.script = script;
    this.disk = Buffer.alloc(script.size ?? 1 * MiB);
    for (let i = 0; i < this.disk.length; i++) this.disk[i] = (i * 7 + (i >> 12)) & 0xff;
    this.server = createServer((socket) => {
      this.sockets.add(socket);
      socket.on('close', () => this.sockets.delete(socket));
      void this.serve(socket);
    });
  }

  static async start(dir: string, script: FakeScript = {}): Promise<FakeServer> {
    const server = new FakeServer(join(dir, `nbd-${Math.random().toString(36).slice(2)}.sock`), script);
    await new Promise<void>((resolve) => server.server.listen(server.path, resolve));
    return server;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  get size(): number {
    return this.disk.length;
  }

  private async serve(socket: Socket): Promise<void> {
    let reader = new Reader(socket);
    let peer = new Peer(socket, this);
    let secure = false;
    const script = this.script;
    const hello = script.hello ?? 'newstyle';
    if (hello === 'oldstyle') {
      const greeting = Buffer.alloc(152);
      greeting.writeBigUInt64BE(0x4e42444d41474943n, 0);
      greeting.writeBigUInt64BE(0x00420281861253n, 8);
      greeting.writeBigUInt64BE(BigInt(this.size), 16);
      peer.write(greeting);
      return;
    }
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(0x4e42444d41474943n, 0);
    greeting.writeBigUInt64BE(0x49484156454f5054n, 8);
    greeting.writeUInt16BE(hello === 'not-fixed' ? 0 : 3, 16);
    peer.write(greeting);
    if ((await reader.read(4)) === undefined) return;

    const contextIds = new Map<number, string>();
    for (;;) {
      const header = await reader.read(16);
      if (header === undefined) return;
      const option = header.readUInt32BE(8);
      const data = await reader.read(header.readUInt32BE(12));
      if (data === undefined) return;
      this.options.push(option);
      if (secure) this.tlsOptions.push(option);
      const tls = script.tls;
      if (option === NBD_OPT_STARTTLS && tls !== undefined) {
        if (tls === 'plaintext-after-ack') {
          peer.write(Buffer.concat([optionReply(option, 1), Buffer.from('hello in the clear')]));
        } else if ('refuse' in tls) {
          peer.write(optionReply(option, tls.refuse, Buffer.from('no TLS here')));
        } else {
          peer.write(optionReply(option, 1));
          const upgraded = new TLSSocket(socket, { isServer: true, cert: tls.cert, key: tls.key, ...(tls.ca !== undefined ? { ca: tls.ca, requestCert: true, rejectUnauthorized: true } : {}) });
          upgraded.on('error', () => socket.destroy());
          reader = new Reader(upgraded);
          peer = new Peer(upgraded, this);
          secure = true;
        }
        continue;
      }
      if (tls !== undefined && !secure && option !== NBD_OPT_ABORT) {
        peer.write(optionReply(option, 0x80000005, Buffer.from('TLS first')));
        continue;
      }
      if (option === NBD_OPT_STRUCTURED_REPLY) {
        peer.write(optionReply(option, script.structured === false ? 0x80000001 : 1));
      } else if (option === NBD_OPT_SET_META_CONTEXT) {
        if (script.refuseContexts === true) {
          peer.write(optionReply(option, 0x80000002, Buffer.from('contexts are not for you')));
          continue;
        }
        const nameLength = data.readUInt32BE(0);
        let pos = 4 + nameLength;
        const count = data.readUInt32BE(pos);
        pos += 4;
        for (let i = 0; i < count; i++) {
          const length = data.readUInt32BE(pos);
          const query = data.toString('utf8', pos + 4, pos + 4 + length);
          pos += 4 + length;
          const id = script.contexts?.[query];
          if (id !== undefined) {
            contextIds.set(id, query);
            peer.write(optionReply(option, 4, Buffer.concat([u32(id), Buffer.from(query)])));
          }
        }
        peer.write(optionReply(option, 1));
      } else if (option === NBD_OPT_GO) {
        const name = data.toString('utf8', 4, 4 + data.readUInt32BE(0));
        if (name !== EXPORT) {
          peer.write(optionReply(option, 0x80000006, Buffer.from(`no export named ${name}`)));
          continue;
        }
        const exportInfo = Buffer.alloc(12);
        exportInfo.writeUInt16BE(0, 0);
        exportInfo.writeBigUInt64BE(BigInt(this.size), 2);
        exportInfo.writeUInt16BE(script.transmissionFlags ?? NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_WRITE_ZEROES, 10);
        peer.write(optionReply(option, 3, exportInfo));
        if (script.blockSizes !== undefined) {
          const sizes = Buffer.alloc(14);
          sizes.writeUInt16BE(3, 0);
          script.blockSizes.forEach((v, i) => sizes.writeUInt32BE(v, 2 + 4 * i));
          peer.write(optionReply(option, 3, sizes));
        }
        peer.write(optionReply(option, 1));
        break;
      } else if (option === NBD_OPT_ABORT) {
        peer.write(optionReply(option, 1));
        socket.end();
        return;
      } else {
        peer.write(optionReply(option, 0x80000001));
      }
    }

    for (;;) {
      const header = await reader.read(28);
      if (header === undefined) return;
      const request: FakeRequest = {
        flags: header.readUInt16BE(4),
        type: header.readUInt16BE(6),
        cookie: header.readBigUInt64BE(8),
        offset: Number(header.readBigUInt64BE(16)),
        length: header.readUInt32BE(24),
      };
      this.requests.push(request);
      if (request.type === NBD_CMD_DISC) {
        socket.end();
        return;
      }
      if (request.type === NBD_CMD_WRITE) {
        const data = await reader.read(request.length);
        if (data === undefined) return;
        if (script.onRequest === undefined) data.copy(this.disk, request.offset);
      }
      if (script.onRequest !== undefined) script.onRequest(request, peer);
      else this.memoryDisk(request, peer, contextIds);
    }
  }

  private memoryDisk(request: FakeRequest, peer: Peer, contextIds: Map<number, string>): void {
    const { cookie, offset, length } = request;
    switch (request.type) {
      case NBD_CMD_READ:
        if (this.script.structured === false) peer.simple(cookie, 0, this.disk.subarray(offset, offset + length));
        else peer.data(cookie, offset, this.disk.subarray(offset, offset + length), true);
        return;
      case NBD_CMD_WRITE_ZEROES:
        this.disk.fill(0, offset, offset + length);
        peer.simple(cookie, 0);
        return;
      case NBD_CMD_BLOCK_STATUS: {
        const ids = [...contextIds.keys()];
        ids.forEach((id, i) => peer.status(cookie, id, [[length, 0]], i === ids.length - 1));
        return;
      }
      default:
        peer.simple(cookie, 0);
    }
  }
}

// ---- Helpers ----------------------------------------------------------------

/** Certificates made once for the TLS tests: ours, and another CA's. */
interface TestPki {
  server: { cert: Buffer; key: Buffer; ca: Buffer };
  client: NbdTlsOptions;
  otherCaClient: NbdTlsOptions;
}
let pkiCache: TestPki | undefined;
function testPki(): TestPki {
  if (pkiCache !== undefined) return pkiCache;
  const root = mkdtempSync(join(tmpdir(), 'qbt-nbd-pki-'));
  try {
    const ours = makePki(join(root, 'ours'));
    const other = makePki(join(root, 'other'));
    const file = (name: string): Buffer => readFileSync(join(ours.dir, name));
    pkiCache = {
      server: { cert: file('server-cert.pem'), key: file('server-key.pem'), ca: file('ca-cert.pem') },
      client: readClientCredentials(ours.dir, 'test'),
      otherCaClient: readClientCredentials(other.dir, 'test'),
    };
    return pkiCache;
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}

let dir: string;
let servers: FakeServer[];
let clients: NbdClient[];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'qbt-nbd-'));
  servers = [];
  clients = [];
});

afterEach(async () => {
  for (const c of clients) await c.close();
  for (const s of servers) await s.close();
  rmSync(dir, { recursive: true, force: true });
});

async function serve(script: FakeScript = {}): Promise<FakeServer> {
  const server = await FakeServer.start(dir, script);
  servers.push(server);
  return server;
}

async function connect(
  server: FakeServer,
  options: { exportName?: string; metaContexts?: string[]; timeoutMs?: number; requestTimeoutMs?: number; tls?: NbdTlsOptions } = {},
): Promise<NbdClient> {
  const client = await NbdClient.connect({ socket: server.path }, { exportName: options.exportName ?? EXPORT, ...options });
  clients.push(client);
  return client;
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (i * 13 + seed) & 0xff;
  return b;
}

/** Waits until the server has seen `count` requests. */
async function requestsSeen(server: FakeServer, count: number): Promise<void> {
  while (server.requests.length < count) await new Promise((resolve) => setImmediate(resolve));
}

/** Asserts a rejection with NBD_DISCONNECTED whose cause is a protocol error naming the export; returns the cause. */
async function failsWithProtocolError(promise: Promise<unknown>, pattern: RegExp): Promise<NbdProtocolError> {
  let cause: unknown;
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(isQbackupError(err, 'NBD_DISCONNECTED'), `expected NBD_DISCONNECTED, got ${String(err)}`);
    cause = err.cause;
    return true;
  });
  assert.ok(cause instanceof NbdProtocolError, `cause is ${String(cause)}`);
  assert.equal(cause.exportName, EXPORT);
  assert.match(cause.message, new RegExp(`export "${EXPORT}"`));
  assert.match(cause.message, pattern);
  return cause;
}

// ---- Tests ----------------------------------------------------------------------

describe('NbdClient handshake', () => {
  it('negotiates structured replies, the accepted contexts and block sizes', async () => {
    const server = await serve({ size: 4 * MiB, blockSizes: [512, 4096, 64 * KiB], contexts: { 'base:allocation': 7 } });
    const client = await connect(server, { metaContexts: ['base:allocation', 'qemu:dirty-bitmap:backup-sda'] });
    assert.equal(client.exportName, EXPORT);
    assert.equal(client.size, 4 * MiB);
    assert.equal(client.readOnly, false);
    assert.equal(client.canWriteZeroes, true);
    assert.equal(client.canFlush, true);
    assert.deepEqual(client.blockSizes, { minimum: 512, preferred: 4096, maximum: 64 * KiB });
    assert.deepEqual([...client.contexts], [['base:allocation', 7]]);
    assert.equal(client.negotiated.structuredReplies, true);
    assert.equal(client.state, NbdConnectionState.Ready);
    assert.deepEqual(server.options, [NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT, NBD_OPT_GO]);
  });

  it('refuses an oldstyle server', async () => {
    const server = await serve({ hello: 'oldstyle' });
    await assert.rejects(connect(server), (err: unknown) => {
      assert.ok(isQbackupError(err, 'NBD_HANDSHAKE'), String(err));
      assert.match(err.message, /oldstyle/);
      assert.match(err.message, /"vm1-sda"/);
      return true;
    });
  });

  it('refuses a server without fixed newstyle', async () => {
    const server = await serve({ hello: 'not-fixed' });
    await assert.rejects(connect(server), (err: unknown) => isQbackupError(err, 'NBD_HANDSHAKE') && /fixed newstyle/.test(err.message));
  });

  it('reports an unknown export clearly and aborts negotiation politely', async () => {
    const server = await serve();
    await assert.rejects(connect(server, { exportName: 'vm1-sdz' }), (err: unknown) => {
      assert.ok(isQbackupError(err, 'NBD_EXPORT_NOT_FOUND'), String(err));
      assert.match(err.message, /NBD export "vm1-sdz" not found on unix:.*: no export named vm1-sdz/);
      return true;
    });
    assert.equal(server.options.at(-1), NBD_OPT_ABORT);
  });

  it('connects without contexts when the server refuses them, and says so on use', async () => {
    const server = await serve({ refuseContexts: true });
    const client = await connect(server, { metaContexts: ['base:allocation'] });
    assert.equal(client.contexts.size, 0);
    await assert.rejects(client.blockStatus('base:allocation', 0, 4096), (err: unknown) => {
      assert.ok(isQbackupError(err, 'NOT_SUPPORTED'));
      assert.match(err.message, /"base:allocation" was not negotiated with NBD export "vm1-sda" \(negotiated: none\)/);
      return true;
    });
    assert.equal(server.requests.length, 0);
  });

  it('works with simple replies when structured replies are refused', async () => {
    const server = await serve({ structured: false, contexts: { 'base:allocation': 1 } });
    const client = await connect(server, { metaContexts: ['base:allocation'] });
    assert.equal(client.negotiated.structuredReplies, false);
    assert.equal(client.contexts.size, 0);
    assert.deepEqual(await client.read(1000, 3000), server.disk.subarray(1000, 4000));
    assert.ok(!server.options.includes(NBD_OPT_SET_META_CONTEXT));
  });

  it('fails cleanly when nothing listens', async () => {
    await assert.rejects(
      NbdClient.connect({ socket: join(dir, 'absent.sock') }, { exportName: EXPORT }),
      (err: unknown) => isQbackupError(err, 'NBD_DISCONNECTED') && /Cannot connect to NBD export "vm1-sda" at unix:.*ENOENT/.test(err.message),
    );
  });

  it('times out a server that never finishes the handshake', async () => {
    const path = join(dir, 'silent.sock');
    const silent = createServer((socket) => socket.on('error', () => undefined));
    await new Promise<void>((resolve) => silent.listen(path, resolve));
    try {
      await assert.rejects(
        NbdClient.connect({ socket: path }, { exportName: EXPORT, timeoutMs: 100 }),
        (err: unknown) => isQbackupError(err, 'NBD_TIMEOUT') && /did not complete within 100 ms/.test(err.message),
      );
    } finally {
      silent.close();
    }
  });
});

describe('NbdClient requests', () => {
  it('assembles a read from out-of-order data and hole chunks', async () => {
    const server = await serve({
      onRequest: (request, peer) => {
        const { cookie, offset } = request;
        peer.data(cookie, offset + 12 * KiB, pattern(4 * KiB, 3));
        peer.hole(cookie, offset + 4 * KiB, 8 * KiB);
        peer.data(cookie, offset, pattern(4 * KiB, 1));
        peer.none(cookie);
      },
    });
    const client = await connect(server);
    const data = await client.read(64 * KiB, 16 * KiB);
    assert.deepEqual(data, Buffer.concat([pattern(4 * KiB, 1), Buffer.alloc(8 * KiB), pattern(4 * KiB, 3)]));
  });

  it('keeps many requests in flight and routes replies answered in reverse order', async () => {
    const held: Array<() => void> = [];
    const server = await serve({
      onRequest: (request, peer) => {
        held.push(() => peer.data(request.cookie, request.offset, pattern(request.length, request.offset & 0xff), true));
        if (held.length === 8) for (const reply of held.reverse()) reply();
      },
    });
    const client = await connect(server);
    const offsets = Array.from({ length: 8 }, (_, i) => i * 4096 + i);
    const results = await Promise.all(offsets.map((o) => client.read(o, 1000)));
    results.forEach((data, i) => assert.deepEqual(data, pattern(1000, (offsets[i] ?? 0) & 0xff)));
    assert.equal(new Set(server.requests.map((r) => r.cookie)).size, 8);
  });

  it('splits reads and writes larger than the maximum block size', async () => {
    const server = await serve({ blockSizes: [512, 4096, 64 * KiB] });
    const client = await connect(server);
    assert.equal(client.maxTransferBytes, 64 * KiB);
    const data = pattern(200 * KiB, 5);
    await client.write(512, data);
    assert.deepEqual(await client.read(512, 200 * KiB), data);
    assert.deepEqual(server.disk.subarray(512, 512 + 200 * KiB), data);
    const lengths = server.requests.map((r) => r.length);
    assert.ok(lengths.every((l) => l <= 64 * KiB && l % 512 === 0), `lengths ${lengths.join(',')}`);
    assert.equal(server.requests.filter((r) => r.type === NBD_CMD_WRITE).length, 4);
  });

  it('checks ranges and alignment before sending anything', async () => {
    const server = await serve({ size: 1 * MiB, blockSizes: [512, 4096, 64 * KiB] });
    const client = await connect(server);
    await assert.rejects(client.read(1 * MiB - 512, 1024), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT') && /beyond the end/.test(err.message));
    await assert.rejects(client.read(100, 512), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT') && /minimum block size 512/.test(err.message));
    await assert.rejects(client.write(-1, Buffer.alloc(1)), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT'));
    assert.equal(server.requests.length, 0);
    assert.deepEqual(await client.read(0, 0), Buffer.alloc(0));
  });

  it('sends write zeroes with and without NBD_CMD_FLAG_NO_HOLE, and flush', async () => {
    const server = await serve();
    const client = await connect(server);
    await client.writeZeroes(0, 64 * KiB);
    await client.writeZeroes(64 * KiB, 4 * KiB, { noHole: true });
    await client.flush();
    assert.deepEqual(
      server.requests.map((r) => [r.type, r.flags, r.offset, r.length]),
      [
        [NBD_CMD_WRITE_ZEROES, 0, 0, 64 * KiB],
        [NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 64 * KiB, 4 * KiB],
        [NBD_CMD_FLUSH, 0, 0, 0],
      ],
    );
    assert.ok(server.disk.subarray(0, 68 * KiB).every((b) => b === 0));
  });

  it('refuses writes to a read-only export and commands the export lacks', async () => {
    const server = await serve({ transmissionFlags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY });
    const client = await connect(server);
    assert.equal(client.readOnly, true);
    assert.equal(client.canWriteZeroes, false);
    assert.equal(client.canFlush, false);
    await assert.rejects(client.write(0, Buffer.alloc(512)), (err: unknown) => isQbackupError(err, 'NOT_SUPPORTED') && /read-only/.test(err.message));
    await assert.rejects(client.writeZeroes(0, 512), (err: unknown) => isQbackupError(err, 'NOT_SUPPORTED'));
    await assert.rejects(client.flush(), (err: unknown) => isQbackupError(err, 'NOT_SUPPORTED'));
    assert.equal(server.requests.length, 0);
  });

  it('reports a server error for one request and stays usable', async () => {
    const server = await serve({
      onRequest: (request, peer) => {
        if (request.offset === 0) peer.error(request.cookie, NBD_EIO, 'sector 0 unreadable');
        else peer.data(request.cookie, request.offset, Buffer.alloc(request.length, 1), true);
      },
    });
    const client = await connect(server);
    await assert.rejects(client.read(0, 512), (err: unknown) => {
      assert.ok(err instanceof NbdCommandError);
      assert.equal(err.code, 'NBD_ERROR');
      assert.equal(err.error, NBD_EIO);
      assert.match(err.message, /NBD_CMD_READ of 512 bytes at offset 0 on export "vm1-sda" failed: EIO \(input\/output error\): sector 0 unreadable/);
      return true;
    });
    assert.deepEqual(await client.read(512, 512), Buffer.alloc(512, 1));
    assert.equal(client.state, NbdConnectionState.Ready);
  });

  it('clips block status to the request and loops extents until the range is covered', async () => {
    const server = await serve({
      size: 1 * MiB,
      contexts: { 'base:allocation': 1, 'qemu:dirty-bitmap:b': 2 },
      onRequest: (request, peer) => {
        const { cookie, offset, length } = request;
        // Context 1: at most 64 KiB per reply, alternating flags every 16 KiB, last extent past the request.
        const descriptors: Array<[number, number]> = [];
        for (let pos = offset; pos < offset + Math.min(length, 64 * KiB); pos += 16 * KiB) descriptors.push([16 * KiB, (pos / (16 * KiB)) % 4 < 2 ? 3 : 0]);
        peer.status(cookie, 2, [[Math.min(length, 1 * MiB - offset), 1]]);
        peer.status(cookie, 1, descriptors, true);
      },
    });
    const client = await connect(server, { metaContexts: ['base:allocation', 'qemu:dirty-bitmap:b'] });
    // One request: the server's descriptors as sent (not merged), the last clipped to the asked range.
    const one = await client.blockStatus('base:allocation', 8 * KiB, 20 * KiB);
    assert.deepEqual(one, [
      { offset: 8 * KiB, length: 16 * KiB, flags: 3 },
      { offset: 24 * KiB, length: 4 * KiB, flags: 3 },
    ]);
    const extents = await client.extents('base:allocation', 0, 256 * KiB);
    assert.deepEqual(extents, [
      { offset: 0, length: 32 * KiB, flags: 3 },
      { offset: 32 * KiB, length: 32 * KiB, flags: 0 },
      { offset: 64 * KiB, length: 32 * KiB, flags: 3 },
      { offset: 96 * KiB, length: 32 * KiB, flags: 0 },
      { offset: 128 * KiB, length: 32 * KiB, flags: 3 },
      { offset: 160 * KiB, length: 32 * KiB, flags: 0 },
      { offset: 192 * KiB, length: 32 * KiB, flags: 3 },
      { offset: 224 * KiB, length: 32 * KiB, flags: 0 },
    ]);
    assert.deepEqual(await client.extents('qemu:dirty-bitmap:b'), [{ offset: 0, length: 1 * MiB, flags: 1 }]);
  });
});

describe('NbdClient against a hostile server', () => {
  /** A server whose first read reply is `misbehave`, sent after `hold` requests have arrived. */
  async function hostile(misbehave: (request: FakeRequest, peer: Peer) => void, hold = 2, script: FakeScript = {}): Promise<FakeServer> {
    const seen: FakeRequest[] = [];
    return serve({
      ...script,
      onRequest: (request, peer) => {
        seen.push(request);
        const first = seen[0];
        if (seen.length === hold && first !== undefined) misbehave(first, peer);
      },
    });
  }

  async function expectFailure(server: FakeServer, pattern: RegExp, metaContexts?: string[], blockStatus = false): Promise<void> {
    const client = await connect(server, metaContexts === undefined ? {} : { metaContexts });
    const first = blockStatus ? client.blockStatus('base:allocation', 0, 64 * KiB) : client.read(0, 64 * KiB);
    const second = client.read(64 * KiB, 4 * KiB);
    const cause = await failsWithProtocolError(first, pattern);
    // The other request in flight fails with the same root cause.
    await assert.rejects(second, (err: unknown) => isQbackupError(err, 'NBD_DISCONNECTED') && (err as QbackupError).cause === cause);
    assert.equal(await client.closed, cause);
    assert.equal(client.state, NbdConnectionState.Closed);
    await assert.rejects(client.read(0, 512), (err: unknown) => isQbackupError(err, 'NBD_DISCONNECTED') && (err as QbackupError).cause === cause);
  }

  it('fails the connection on an oversized chunk length', async () => {
    const server = await hostile((r, peer) => peer.chunk(r.cookie, 0, NBD_REPLY_TYPE_OFFSET_DATA, Buffer.alloc(0), 0xfffffff0));
    await expectFailure(server, /length 4294967280/);
  });

  it('fails the connection on data outside the request', async () => {
    const server = await hostile((r, peer) => peer.data(r.cookie, 1 * MiB - 4096, Buffer.alloc(4096), true));
    await expectFailure(server, /outside the read \[0, 65536\)/);
  });

  it('fails the connection on a reply for an unknown cookie', async () => {
    const server = await hostile((r, peer) => peer.simple(r.cookie + 1000n, 0));
    await expectFailure(server, /cookie 1001, which is not in flight/);
  });

  it('fails the connection on bad magic', async () => {
    const server = await hostile((_r, peer) => peer.write(Buffer.from('\xde\xad\xbe\xef garbage', 'latin1')));
    await expectFailure(server, /unknown magic 0xdeadbeef/);
  });

  it('fails the connection on block status beyond the request', async () => {
    const server = await hostile(
      (r, peer) =>
        peer.status(
          r.cookie,
          1,
          [
            [64 * KiB, 0],
            [4 * KiB, 3],
          ],
          true,
        ),
      2,
      { contexts: { 'base:allocation': 1 } },
    );
    await expectFailure(server, /descriptor 1 starts at 65536, past the request/, ['base:allocation'], true);
  });

  it('fails pending requests when the server hangs up mid-reply', async () => {
    const server = await hostile((r, peer) => {
      peer.data(r.cookie, 0, Buffer.alloc(4 * KiB));
      peer.write(Buffer.from([0x66, 0x8e]));
      setImmediate(() => peer.socket.destroy());
    });
    const client = await connect(server);
    const first = client.read(0, 64 * KiB);
    const second = client.read(64 * KiB, 4 * KiB);
    for (const pending of [first, second]) {
      await assert.rejects(pending, (err: unknown) => {
        assert.ok(isQbackupError(err, 'NBD_DISCONNECTED'), String(err));
        assert.match(err.message, /got no reply: connection to unix:.* lost: NBD server at .* closed the connection to export "vm1-sda" in the middle of a message/);
        return true;
      });
    }
    const reason = await client.closed;
    assert.ok(isQbackupError(reason, 'NBD_DISCONNECTED'));
  });

  it('fails the connection when a request times out', async () => {
    const server = await serve({ onRequest: () => undefined });
    const client = await connect(server, { timeoutMs: 200 });
    const first = client.read(0, 4096);
    const second = client.flush();
    await assert.rejects(first, (err: unknown) => isQbackupError(err, 'NBD_TIMEOUT') && /NBD_CMD_READ of 4096 bytes at offset 0 on export "vm1-sda" got no reply within 200 ms/.test(err.message));
    await assert.rejects(second, (err: unknown) => isQbackupError(err, 'NBD_DISCONNECTED') && isQbackupError((err as QbackupError).cause, 'NBD_TIMEOUT'));
    assert.equal(client.state, NbdConnectionState.Closed);
  });
});

describe('NbdClient request timeouts', () => {
  // Timers are mocked, so "60 s" passes at once and the outcome does not depend on the machine's speed.
  afterEach(() => mock.timers.reset());

  /** Whether `promise` is still pending after everything already queued has run. */
  async function isPending(promise: Promise<unknown>): Promise<boolean> {
    const marker = Symbol('pending');
    const winner = await Promise.race([promise.then(() => 'settled', () => 'settled'), new Promise((resolve) => setImmediate(() => resolve(marker)))]);
    return winner === marker;
  }

  it('fails a read the server never answers with NBD_TIMEOUT after the default 60 s, naming the export', async () => {
    const server = await serve({ onRequest: () => undefined });
    const client = await connect(server);
    mock.timers.enable({ apis: ['setTimeout'] });
    const read = client.read(0, 4096);
    const outcome = read.then(
      () => undefined,
      (err: unknown) => err,
    );
    await requestsSeen(server, 1);
    mock.timers.tick(59_999);
    assert.equal(await isPending(read), true, 'still waiting just before 60 s');
    mock.timers.tick(1);
    const err = await outcome;
    assert.ok(isQbackupError(err, 'NBD_TIMEOUT'), String(err));
    assert.equal(err.message, 'NBD_CMD_READ of 4096 bytes at offset 0 on export "vm1-sda" got no reply within 60000 ms');
    assert.equal(err.details['exportName'], EXPORT);
    assert.equal(await client.closed, err, 'the timeout is the root cause of the connection ending');
    assert.equal(client.state, NbdConnectionState.Closed);
    await assert.rejects(client.read(0, 512), (e: unknown) => isQbackupError(e, 'NBD_DISCONNECTED') && (e as QbackupError).cause === err);
  });

  it('uses requestTimeoutMs over timeoutMs, and 0 waits as long as it takes', async () => {
    let release: (() => void) | undefined;
    const server = await serve({
      onRequest: (request, peer) => {
        release = () => peer.data(request.cookie, request.offset, Buffer.alloc(request.length, 4), true);
      },
    });
    const patient = await connect(server, { timeoutMs: 1000, requestTimeoutMs: 0 });
    mock.timers.enable({ apis: ['setTimeout'] });
    const read = patient.read(0, 4096);
    await requestsSeen(server, 1);
    mock.timers.tick(24 * 3600 * 1000);
    assert.equal(await isPending(read), true, 'no timeout with requestTimeoutMs 0');
    release?.();
    assert.deepEqual(await read, Buffer.alloc(4096, 4));
    assert.equal(patient.state, NbdConnectionState.Ready);
  });

  it('refuses a negative requestTimeoutMs before connecting', async () => {
    const server = await serve();
    await assert.rejects(connect(server, { requestTimeoutMs: -1 }), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT') && /requestTimeoutMs/.test(err.message));
    assert.equal(server.options.length, 0);
  });
});

describe('NbdClient close', () => {
  it('waits for requests in flight, then sends NBD_CMD_DISC once', async () => {
    let release: (() => void) | undefined;
    const server = await serve({
      onRequest: (request, peer) => {
        release = () => peer.data(request.cookie, request.offset, Buffer.alloc(request.length, 9), true);
      },
    });
    const client = await connect(server);
    const read = client.read(0, 4096);
    await requestsSeen(server, 1);
    const closing = client.close();
    const again = client.close();
    assert.equal(client.state, NbdConnectionState.Closing);
    await assert.rejects(client.read(0, 512), (err: unknown) => isQbackupError(err, 'NBD_STATE') && /is closing/.test(err.message));
    release?.();
    assert.deepEqual(await read, Buffer.alloc(4096, 9));
    await Promise.all([closing, again]);
    await client.close();
    assert.equal(client.state, NbdConnectionState.Closed);
    assert.equal(await client.closed, undefined);
    assert.deepEqual(
      server.requests.map((r) => r.type),
      [NBD_CMD_READ, NBD_CMD_DISC],
    );
    await assert.rejects(client.read(0, 512), (err: unknown) => isQbackupError(err, 'NBD_STATE') && /is closed/.test(err.message));
  });

  it('disconnects softly after NBD_ESHUTDOWN', async () => {
    const server = await serve({ onRequest: (request, peer) => peer.error(request.cookie, NBD_ESHUTDOWN, 'going down') });
    const client = await connect(server);
    await assert.rejects(client.read(0, 512), (err: unknown) => err instanceof NbdCommandError && err.error === NBD_ESHUTDOWN);
    assert.equal(await client.closed, undefined);
    assert.equal(server.requests.at(-1)?.type, NBD_CMD_DISC);
  });

  it('supports await using', async () => {
    const server = await serve();
    {
      await using client = await NbdClient.connect({ socket: server.path }, { exportName: EXPORT });
      assert.equal((await client.read(0, 16)).length, 16);
    }
    await requestsSeen(server, 2);
    assert.equal(server.requests[1]?.type, NBD_CMD_DISC);
  });
});

describe('NbdClient TLS', () => {
  before(() => {
    testPki();
  });

  it('sends NBD_OPT_STARTTLS first, then negotiates and reads over TLS', async () => {
    const pki = testPki();
    const server = await serve({ tls: pki.server, contexts: { 'base:allocation': 5 } });
    const client = await connect(server, { tls: pki.client, metaContexts: ['base:allocation'] });
    assert.equal(client.negotiated.tls, true);
    assert.deepEqual(server.options, [NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT, NBD_OPT_GO]);
    assert.deepEqual(server.tlsOptions, [NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT, NBD_OPT_GO], 'everything after STARTTLS went over TLS');
    assert.ok((await client.read(4096, 64 * KiB)).equals(server.disk.subarray(4096, 4096 + 64 * KiB)));
    await client.close();
    assert.equal(server.requests.at(-1)?.type, NBD_CMD_DISC);
  });

  it('never falls back to plain when the server refuses STARTTLS: NBD_TLS, and only NBD_OPT_ABORT follows', async () => {
    const pki = testPki();
    for (const [refuse, why] of [
      [0x80000001, /the server does not support TLS, and qbackup does not fall back to an unencrypted connection \(server: no TLS here\)$/],
      [0x80000002, /the server refused TLS by policy/],
      [0x80000003, /refused NBD_OPT_STARTTLS as invalid/],
    ] as const) {
      const server = await serve({ tls: { refuse } });
      await assert.rejects(connect(server, { tls: pki.client }), (err: unknown) => {
        assert.ok(isQbackupError(err, 'NBD_TLS'), String(err));
        assert.match(err.message, new RegExp(`^Cannot open NBD export "${EXPORT}" on unix:.* with TLS: `));
        assert.match(err.message, why);
        return true;
      });
      assert.deepEqual(server.options, [NBD_OPT_STARTTLS, NBD_OPT_ABORT]);
    }
  });

  it('a server that talks in the clear after accepting STARTTLS breaks the protocol', async () => {
    const server = await serve({ tls: 'plaintext-after-ack' });
    await assert.rejects(connect(server, { tls: testPki().client }), (err: unknown) => {
      assert.ok(err instanceof NbdProtocolError, String(err));
      assert.match(err.message, /sent 18 bytes in the clear after accepting NBD_OPT_STARTTLS/);
      return true;
    });
  });

  it('a certificate from another CA is refused before any option goes out', async () => {
    const pki = testPki();
    const server = await serve({ tls: pki.server });
    await assert.rejects(connect(server, { tls: pki.otherCaClient }), (err: unknown) => {
      assert.ok(isQbackupError(err, 'NBD_TLS'), String(err));
      assert.match(err.message, /with TLS: the server's certificate is not trusted by the CA in ".*other"/);
      return true;
    });
    assert.deepEqual(server.options, [NBD_OPT_STARTTLS]);
  });

  it('checks the server name: the default over a unix socket is localhost; another name fails', async () => {
    const pki = testPki();
    const server = await serve({ tls: pki.server });
    await assert.rejects(connect(server, { tls: { ...pki.client, servername: 'backup.example' } }), (err: unknown) => {
      assert.ok(isQbackupError(err, 'NBD_TLS'), String(err));
      assert.match(err.message, /certificate is not for "backup\.example"/);
      return true;
    });
  });

  it('a server that verifies clients refuses one without a certificate, with one sentence', async () => {
    const pki = testPki();
    const server = await serve({ tls: pki.server });
    const { cert: _c, key: _k, ...caOnly } = pki.client;
    await assert.rejects(connect(server, { tls: caOnly }), (err: unknown) => {
      assert.ok(isQbackupError(err, 'NBD_TLS'), String(err));
      assert.match(err.message, new RegExp(`^Cannot open NBD export "${EXPORT}" on unix:.* with TLS: .*client certificate`));
      assert.doesNotMatch(err.message, /not trusted/);
      return true;
    });
  });

  it('without TLS, a server that requires it is reported as such', async () => {
    const server = await serve({ tls: testPki().server });
    await assert.rejects(connect(server), (err: unknown) => {
      assert.ok(isQbackupError(err, 'NBD_HANDSHAKE'), String(err));
      assert.match(err.message, /the server requires TLS, and this connection was not asked to use it/);
      return true;
    });
  });

  it('checks TLS options before connecting', async () => {
    const pki = testPki();
    const server = await serve();
    await assert.rejects(connect(server, { tls: { ca: Buffer.alloc(0) } }), /needs a CA certificate/);
    await assert.rejects(connect(server, { tls: { ca: pki.server.ca, cert: pki.server.cert } }), /both a client certificate and its key/);
  });
});
