// The NBD server against hostile raw-socket clients (bad magic, huge option
// lengths, unknown options and commands, reads past the end, writes to a
// read-only export, disconnects mid-reply, pipelined requests answered out
// of order) and against qbackup's own NbdClient. The export is an in-memory
// disk with holes; the server is the real NbdServer on a unix socket.
// Interoperability with nbdinfo, nbdcopy, qemu-img and QEMU is in
// test/integration/serve-backup.test.ts.

import { strict as assert } from 'node:assert';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  BASE_ALLOCATION_ID,
  ByteBudget,
  ByteQueue,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_CONTEXT_BASE_ALLOCATION,
  NBD_EINVAL,
  NBD_EIO,
  NBD_EPERM,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_MAGIC,
  NBD_NEW_VERSION,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  NbdClient,
  NbdCommandError,
  NbdExportError,
  NbdServer,
  NbdServerSession,
  encodeGoOption,
  encodeMetaContextOption,
  encodeOption,
  encodeRequest,
  type NbdBlockDescriptor,
  type NbdExportSegment,
  type NbdServerExport,
} from '../../src/nbd/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCK = 64 * KiB;

/** An in-memory disk of `blocks` 64 KiB blocks; `holes` are zero blocks, `bad` blocks fail to read (EIO), `delayMs` slows reads per block. */
class MemoryExport implements NbdServerExport {
  readonly size: number;
  readonly preferredBlockBytes = BLOCK;
  readonly data: Buffer;
  delayMs: (offset: number) => number = () => 0;

  constructor(
    readonly name: string,
    blocks: number,
    private readonly holes: ReadonlySet<number>,
    private readonly bad: ReadonlySet<number> = new Set(),
  ) {
    this.size = blocks * BLOCK;
    this.data = Buffer.alloc(this.size);
    for (let b = 0; b < blocks; b++) if (!holes.has(b)) this.data.fill((b % 250) + 1, b * BLOCK, (b + 1) * BLOCK);
  }

  async read(offset: number, length: number): Promise<NbdExportSegment[]> {
    const ms = this.delayMs(offset);
    if (ms > 0) await new Promise((r) => setTimeout(r, ms));
    const out: NbdExportSegment[] = [];
    for (let at = offset; at < offset + length; ) {
      const b = Math.floor(at / BLOCK);
      if (this.bad.has(b)) throw new NbdExportError(NBD_EIO, `block ${b} is damaged`);
      const end = Math.min(offset + length, (b + 1) * BLOCK);
      out.push({ offset: at, length: end - at, data: this.holes.has(b) ? undefined : this.data.subarray(at, end) });
      at = end;
    }
    return out;
  }

  async blockStatus(offset: number, length: number, max: number): Promise<NbdBlockDescriptor[]> {
    const out: NbdBlockDescriptor[] = [];
    for (let at = offset; at < offset + length && out.length < max; ) {
      const b = Math.floor(at / BLOCK);
      const end = Math.min(offset + length, (b + 1) * BLOCK);
      out.push({ length: end - at, flags: this.holes.has(b) ? NBD_STATE_HOLE | NBD_STATE_ZERO : 0 });
      at = end;
    }
    return out;
  }
}

/** A client that speaks raw bytes: it reads exactly what a test asks for, and notices when the server hangs up. */
class RawClient {
  private readonly queue = new ByteQueue();
  private waiter: (() => void) | undefined;
  ended = false;
  readonly closed: Promise<void>;

  private constructor(readonly socket: Socket) {
    socket.on('data', (b: Buffer) => {
      this.queue.push(b);
      this.waiter?.();
    });
    this.closed = new Promise((resolve) => {
      socket.on('close', () => {
        this.ended = true;
        this.waiter?.();
        resolve();
      });
    });
    socket.on('error', () => undefined);
  }

  static connect(path: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = connect(path, () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  /** Exactly n bytes; undefined if the server hung up first. */
  async read(n: number): Promise<Buffer | undefined> {
    for (;;) {
      const got = this.queue.take(n);
      if (got !== undefined) return got;
      if (this.ended) return undefined;
      await new Promise<void>((r) => (this.waiter = r));
    }
  }

  write(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  /** Reads the greeting and sends fixed-newstyle client flags. */
  async hello(flags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES): Promise<Buffer> {
    const greeting = await this.read(18);
    assert.ok(greeting !== undefined, 'the server greets');
    const f = Buffer.alloc(4);
    f.writeUInt32BE(flags);
    this.write(f);
    return greeting;
  }

  async optionReply(): Promise<{ option: number; reply: number; payload: Buffer }> {
    const head = await this.read(20);
    assert.ok(head !== undefined, 'an option reply, not a hang-up');
    const payload = await this.read(head.readUInt32BE(16));
    assert.ok(payload !== undefined);
    return { option: head.readUInt32BE(8), reply: head.readUInt32BE(12), payload };
  }

  /** Option replies up to and including the first that is not NBD_REP_INFO / SERVER / META_CONTEXT. */
  async optionReplies(): Promise<Array<{ option: number; reply: number; payload: Buffer }>> {
    const out = [];
    for (;;) {
      const r = await this.optionReply();
      out.push(r);
      if (r.reply !== NBD_REP_INFO && r.reply !== NBD_REP_SERVER && r.reply !== NBD_REP_META_CONTEXT) return out;
    }
  }

  /** Handshake up to transmission on `name`, with structured replies and base:allocation when asked. */
  async go(name: string, structured: boolean): Promise<number> {
    await this.hello();
    if (structured) {
      this.write(encodeOption(NBD_OPT_STRUCTURED_REPLY));
      assert.equal((await this.optionReply()).reply, NBD_REP_ACK);
      this.write(encodeMetaContextOption(name, [NBD_CONTEXT_BASE_ALLOCATION]));
      const meta = await this.optionReplies();
      assert.deepEqual(meta.map((r) => r.reply), [NBD_REP_META_CONTEXT, NBD_REP_ACK]);
    }
    this.write(encodeGoOption(name, []));
    const replies = await this.optionReplies();
    assert.equal(replies.at(-1)?.reply, NBD_REP_ACK);
    const info = replies.find((r) => r.payload.readUInt16BE(0) === 0);
    assert.ok(info !== undefined, 'NBD_INFO_EXPORT');
    assert.ok((info.payload.readUInt16BE(10) & NBD_FLAG_READ_ONLY) !== 0, 'the export is read-only');
    return Number(info.payload.readBigUInt64BE(2));
  }

  request(type: number, cookie: bigint, offset: number, length: number, flags = 0): void {
    this.write(encodeRequest({ type, flags, cookie, offset, length }));
  }

  /** One structured chunk. */
  async chunk(): Promise<{ flags: number; type: number; cookie: bigint; payload: Buffer }> {
    const head = await this.read(20);
    assert.ok(head !== undefined, 'a reply chunk, not a hang-up');
    const payload = await this.read(head.readUInt32BE(16));
    assert.ok(payload !== undefined);
    return { flags: head.readUInt16BE(4), type: head.readUInt16BE(6), cookie: head.readBigUInt64BE(8), payload };
  }

  /** Every chunk of one reply (until NBD_REPLY_FLAG_DONE). */
  async reply(): Promise<Array<{ flags: number; type: number; cookie: bigint; payload: Buffer }>> {
    const out = [];
    for (;;) {
      const c = await this.chunk();
      out.push(c);
      if ((c.flags & NBD_REPLY_FLAG_DONE) !== 0) return out;
    }
  }

  async errorOf(): Promise<number> {
    const [c, ...rest] = await this.reply();
    assert.ok(c !== undefined);
    assert.equal(rest.length, 0);
    assert.equal(c.type, NBD_REPLY_TYPE_ERROR, 'an error chunk');
    return c.payload.readUInt32BE(0);
  }

  destroy(): void {
    this.socket.destroy();
  }
}

/** Reassembles a structured read reply into bytes, checking chunks stay inside the request. */
function assemble(chunks: ReadonlyArray<{ type: number; payload: Buffer }>, offset: number, length: number): Buffer {
  const out = Buffer.alloc(length, 0xee);
  for (const c of chunks) {
    const at = Number(c.payload.readBigUInt64BE(0)) - offset;
    if (c.type === NBD_REPLY_TYPE_OFFSET_DATA) c.payload.copy(out, at, 8);
    else if (c.type === NBD_REPLY_TYPE_OFFSET_HOLE) out.fill(0, at, at + c.payload.readUInt32BE(8));
    else assert.fail(`unexpected chunk type ${c.type}`);
  }
  return out;
}

describe('NBD server', () => {
  let dir: string;
  let server: NbdServer;
  const logs: string[] = [];
  // Blocks 2, 3 and 10 are holes; block 7 fails to read.
  const disk = new MemoryExport('sda', 16, new Set([2, 3, 10]), new Set([7]));
  const other = new MemoryExport('sdb', 4, new Set());
  const socket = (): string => join(dir, 'nbd.sock');

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'qbt-nbdsrv-'));
    server = await NbdServer.start({ exports: [disk, other], listen: { transport: 'unix', socket: socket() }, log: (l) => logs.push(l), handshakeTimeoutMs: 2_000 });
  });
  after(async () => {
    await server.close();
    await server.close(); // idempotent
    rmSync(dir, { recursive: true, force: true });
  });

  /** The server still serves a fresh client correctly (after whatever a test did to it). */
  async function stillServes(): Promise<void> {
    await using c = await NbdClient.connect({ socket: socket() }, { exportName: 'sdb' });
    assert.ok((await c.read(0, BLOCK)).equals(other.data.subarray(0, BLOCK)));
  }

  it('greets with NBDMAGIC, IHAVEOPT and fixed newstyle; the socket is 0600', async () => {
    assert.equal(statSync(socket()).mode & 0o777, 0o600);
    const c = await RawClient.connect(socket());
    const g = await c.read(18);
    assert.ok(g !== undefined);
    assert.equal(g.readBigUInt64BE(0), NBD_MAGIC);
    assert.equal(g.readBigUInt64BE(8), NBD_NEW_VERSION);
    assert.equal(g.readUInt16BE(16), 3, 'FIXED_NEWSTYLE | NO_ZEROES');
    c.destroy();
  });

  it('hangs up on a client without fixed newstyle, with unknown client flags, or with a bad option magic', async () => {
    for (const flags of [0, NBD_FLAG_C_FIXED_NEWSTYLE | 0x80]) {
      const c = await RawClient.connect(socket());
      await c.hello(flags);
      await c.closed;
      assert.equal(await c.read(1), undefined);
    }
    const c = await RawClient.connect(socket());
    await c.hello();
    c.write(Buffer.concat([Buffer.from('NOTMAGIC'), Buffer.alloc(8)]));
    await c.closed;
    await stillServes();
  });

  it('refuses an option with a huge length (NBD_REP_ERR_TOO_BIG) and hangs up without reading it', async () => {
    const c = await RawClient.connect(socket());
    await c.hello();
    const head = Buffer.alloc(16);
    head.writeBigUInt64BE(NBD_NEW_VERSION, 0);
    head.writeUInt32BE(NBD_OPT_GO, 8);
    head.writeUInt32BE(0xffffffff, 12);
    c.write(head);
    const r = await c.optionReply();
    assert.equal(r.reply, NBD_REP_ERR_TOO_BIG);
    await c.closed;
    await stillServes();
  });

  it('answers unknown and malformed options with errors and keeps haggling', async () => {
    const c = await RawClient.connect(socket());
    await c.hello();
    c.write(encodeOption(99, Buffer.from('junk')));
    assert.equal((await c.optionReply()).reply, NBD_REP_ERR_UNSUP);
    // GO whose name length runs past the option's data
    const bad = Buffer.alloc(8);
    bad.writeUInt32BE(1000, 0);
    c.write(encodeOption(NBD_OPT_GO, bad));
    assert.equal((await c.optionReply()).reply, NBD_REP_ERR_INVALID);
    // a 5000-byte export name
    const long = Buffer.alloc(4 + 5000 + 2);
    long.writeUInt32BE(5000, 0);
    c.write(encodeOption(NBD_OPT_INFO, long));
    assert.equal((await c.optionReply()).reply, NBD_REP_ERR_TOO_BIG);
    // trailing bytes after a GO's info requests
    c.write(encodeOption(NBD_OPT_GO, Buffer.concat([encodeGoOption('sda', []).subarray(16), Buffer.from([1])])));
    assert.equal((await c.optionReply()).reply, NBD_REP_ERR_INVALID);
    // an export that does not exist
    c.write(encodeGoOption('sdz', []));
    const unknown = await c.optionReply();
    assert.equal(unknown.reply, NBD_REP_ERR_UNKNOWN);
    assert.match(unknown.payload.toString(), /export "sdz" does not exist/);
    // data on an option that takes none; SET_META_CONTEXT before structured replies; STARTTLS without TLS
    c.write(encodeOption(NBD_OPT_STRUCTURED_REPLY, Buffer.from([0])));
    assert.equal((await c.optionReply()).reply, NBD_REP_ERR_INVALID);
    c.write(encodeMetaContextOption('sda', [NBD_CONTEXT_BASE_ALLOCATION]));
    assert.equal((await c.optionReply()).reply, NBD_REP_ERR_INVALID);
    c.write(encodeOption(NBD_OPT_STARTTLS));
    assert.equal((await c.optionReply()).reply, NBD_REP_ERR_POLICY);
    // NBD_OPT_LIST names both exports, NBD_OPT_INFO gives the size, and ABORT is acknowledged
    c.write(encodeOption(NBD_OPT_LIST));
    const list = await c.optionReplies();
    assert.deepEqual(list.map((r) => r.reply), [NBD_REP_SERVER, NBD_REP_SERVER, NBD_REP_ACK]);
    assert.deepEqual(list.slice(0, 2).map((r) => r.payload.subarray(4, 4 + r.payload.readUInt32BE(0)).toString()), ['sda', 'sdb']);
    c.write(encodeGoOption('sda', [], NBD_OPT_INFO));
    const info = await c.optionReplies();
    assert.equal(Number(info[0]?.payload.readBigUInt64BE(2)), disk.size);
    c.write(encodeOption(NBD_OPT_LIST_META_CONTEXT, encodeMetaContextOption('sda', []).subarray(16)));
    const listed = await c.optionReplies();
    assert.deepEqual(listed.map((r) => r.reply), [NBD_REP_META_CONTEXT, NBD_REP_ACK]);
    assert.equal(listed[0]?.payload.subarray(4).toString(), NBD_CONTEXT_BASE_ALLOCATION);
    c.write(encodeOption(NBD_OPT_ABORT));
    assert.equal((await c.optionReply()).reply, NBD_REP_ACK);
    await c.closed;
  });

  it('NBD_OPT_EXPORT_NAME: an unknown name is a hang-up, a known one enters transmission', async () => {
    const c = await RawClient.connect(socket());
    await c.hello();
    c.write(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from('nope')));
    await c.closed;
    const d = await RawClient.connect(socket());
    await d.hello();
    d.write(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from('sdb')));
    const r = await d.read(10);
    assert.equal(Number(r?.readBigUInt64BE(0)), other.size);
    d.request(NBD_CMD_READ, 5n, 0, 512);
    const head = await d.read(16);
    assert.equal(head?.readUInt32BE(0), NBD_SIMPLE_REPLY_MAGIC);
    assert.equal(head?.readUInt32BE(4), 0);
    assert.ok((await d.read(512))?.equals(other.data.subarray(0, 512)));
    d.destroy();
  });

  it('refuses bad requests with the right errno and keeps the connection: past the end, too large, writes, unknown commands and flags', async () => {
    const c = await RawClient.connect(socket());
    assert.equal(await c.go('sda', true), disk.size);
    c.request(NBD_CMD_READ, 1n, disk.size - 512, 1024);
    assert.equal(await c.errorOf(), NBD_EINVAL, 'a read past the end');
    c.request(NBD_CMD_READ, 2n, 0, 33 * MiB);
    assert.equal(await c.errorOf(), NBD_EINVAL, 'a read over 32 MiB');
    // a write's payload is consumed, then refused; the next request is read correctly
    c.write(Buffer.concat([encodeRequest({ type: NBD_CMD_WRITE, flags: 0, cookie: 3n, offset: 0, length: 4096 }), Buffer.alloc(4096, 0x77)]));
    assert.equal(await c.errorOf(), NBD_EPERM);
    c.request(NBD_CMD_TRIM, 4n, 0, 4096);
    assert.equal(await c.errorOf(), NBD_EPERM);
    c.request(NBD_CMD_WRITE_ZEROES, 5n, 0, 4096);
    assert.equal(await c.errorOf(), NBD_EPERM);
    c.request(99, 6n, 0, 4096);
    assert.equal(await c.errorOf(), NBD_EINVAL, 'an unknown command');
    c.request(NBD_CMD_READ, 7n, 0, 4096, NBD_CMD_FLAG_FUA | 0x100);
    assert.equal(await c.errorOf(), NBD_EINVAL, 'unknown flags');
    // an offset beyond 2^53 is refused, not mangled
    const huge = encodeRequest({ type: NBD_CMD_READ, flags: 0, cookie: 8n, offset: 0, length: 512 });
    huge.writeBigUInt64BE(0xfffffffffffffe00n, 16);
    c.write(huge);
    assert.equal(await c.errorOf(), NBD_EINVAL);
    // the disk is untouched and still reads
    c.request(NBD_CMD_READ, 9n, 0, 4096);
    assert.ok(assemble(await c.reply(), 0, 4096).equals(disk.data.subarray(0, 4096)));
    c.request(NBD_CMD_DISC, 10n, 0, 0);
    await c.closed;
  });

  it('structured reads send holes as OFFSET_HOLE; base:allocation marks them hole|zero', async () => {
    const c = await RawClient.connect(socket());
    await c.go('sda', true);
    c.request(NBD_CMD_READ, 1n, BLOCK, 4 * BLOCK);
    const chunks = await c.reply();
    assert.deepEqual(chunks.map((x) => x.type), [NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REPLY_TYPE_OFFSET_DATA]);
    assert.ok(assemble(chunks, BLOCK, 4 * BLOCK).equals(disk.data.subarray(BLOCK, 5 * BLOCK)));
    c.request(NBD_CMD_BLOCK_STATUS, 2n, 0, 5 * BLOCK);
    const [bs] = await c.reply();
    assert.ok(bs !== undefined);
    assert.equal(bs.type, NBD_REPLY_TYPE_BLOCK_STATUS);
    assert.equal(bs.payload.readUInt32BE(0), BASE_ALLOCATION_ID);
    const flags = [];
    for (let p = 4; p < bs.payload.length; p += 8) flags.push(bs.payload.readUInt32BE(p + 4));
    assert.deepEqual(flags, [0, 0, 3, 3, 0]);
    c.destroy();
  });

  it('simple replies when structured replies were not negotiated; BLOCK_STATUS then fails EINVAL', async () => {
    const c = await RawClient.connect(socket());
    await c.go('sda', false);
    c.request(NBD_CMD_READ, 1n, 2 * BLOCK - 100, 200);
    const head = await c.read(16);
    assert.equal(head?.readUInt32BE(4), 0);
    assert.ok((await c.read(200))?.equals(disk.data.subarray(2 * BLOCK - 100, 2 * BLOCK + 100)));
    c.request(NBD_CMD_BLOCK_STATUS, 2n, 0, BLOCK);
    const err = await c.read(16);
    assert.equal(err?.readUInt32BE(4), NBD_EINVAL);
    c.request(NBD_CMD_READ, 3n, 7 * BLOCK, 512);
    const eio = await c.read(16);
    assert.equal(eio?.readUInt32BE(4), NBD_EIO, 'a failed read is a simple EIO reply without data');
    c.destroy();
  });

  it('answers pipelined requests out of order, each with its own cookie and bytes', async () => {
    disk.delayMs = (offset) => (offset < 8 * BLOCK ? 60 - Math.floor(offset / BLOCK) * 5 : 0);
    try {
      const c = await RawClient.connect(socket());
      await c.go('sda', true);
      const order = [0, 1, 4, 5, 6, 8, 9, 11, 12, 13];
      for (const b of order) c.request(NBD_CMD_READ, BigInt(100 + b), b * BLOCK, BLOCK);
      const seen: number[] = [];
      for (let i = 0; i < order.length; i++) {
        const chunks = await c.reply();
        const cookie = chunks[0]?.cookie ?? 0n;
        const b = Number(cookie) - 100;
        assert.ok(chunks.every((x) => x.cookie === cookie), 'one reply, one cookie');
        assert.ok(assemble(chunks, b * BLOCK, BLOCK).equals(disk.data.subarray(b * BLOCK, (b + 1) * BLOCK)), `block ${b}`);
        seen.push(b);
      }
      assert.deepEqual([...seen].sort((x, y) => x - y), order);
      assert.notDeepEqual(seen, order, 'slow early reads were overtaken by later ones');
      c.destroy();
    } finally {
      disk.delayMs = () => 0;
    }
  });

  it('a failed read is EIO with a message and a log line; the same connection and others go on', async () => {
    logs.length = 0;
    await using c = await NbdClient.connect({ socket: socket() }, { exportName: 'sda', metaContexts: [NBD_CONTEXT_BASE_ALLOCATION] });
    await assert.rejects(c.read(7 * BLOCK, 4096), (err: unknown) => err instanceof NbdCommandError && err.error === NBD_EIO && /block 7 is damaged/.test(err.message));
    assert.equal(logs.filter((l) => /block 7 is damaged/.test(l)).length, 1, logs.join('\n'));
    assert.ok((await c.read(6 * BLOCK, BLOCK)).equals(disk.data.subarray(6 * BLOCK, 7 * BLOCK)));
    await stillServes();
  });

  it('survives a client that hangs up in the middle of a large reply', async () => {
    disk.delayMs = () => 20;
    try {
      for (let i = 0; i < 3; i++) {
        const c = await RawClient.connect(socket());
        await c.go('sda', true);
        for (let k = 0; k < 8; k++) c.request(NBD_CMD_READ, BigInt(k), 0, 7 * BLOCK); // block 7 is the damaged one
        await c.read(1000); // part of the first reply
        c.destroy();
      }
      // and one that hangs up with a request half sent
      const h = await RawClient.connect(socket());
      await h.go('sdb', false);
      h.write(encodeRequest({ type: NBD_CMD_READ, flags: 0, cookie: 1n, offset: 0, length: 512 }).subarray(0, 10));
      h.destroy();
    } finally {
      disk.delayMs = () => 0;
    }
    await stillServes();
  });

  it('a request with a bad magic ends that connection only', async () => {
    const c = await RawClient.connect(socket());
    await c.go('sdb', true);
    c.write(Buffer.alloc(28, 0x41));
    await c.closed;
    await stillServes();
  });

  it('serves qbackup\'s NbdClient: reads of every size and extents, read-only', async () => {
    await using c = await NbdClient.connect({ socket: socket() }, { exportName: 'sda', metaContexts: [NBD_CONTEXT_BASE_ALLOCATION] });
    assert.equal(c.size, disk.size);
    assert.ok(c.readOnly);
    assert.ok((await c.read(0, 7 * BLOCK)).equals(disk.data.subarray(0, 7 * BLOCK)));
    assert.ok((await c.read(BLOCK + 123, 3 * BLOCK)).equals(disk.data.subarray(BLOCK + 123, 4 * BLOCK + 123)));
    const extents = await c.extents(NBD_CONTEXT_BASE_ALLOCATION);
    const holes = extents.filter((e) => (e.flags & NBD_STATE_HOLE) !== 0).map((e) => [e.offset / BLOCK, e.length / BLOCK]);
    assert.deepEqual(holes, [[2, 2], [10, 1]]);
    await assert.rejects(c.write(0, Buffer.alloc(512)), /read-only/);
  });

  it('drops a client that has not chosen an export within the handshake timeout', async () => {
    const c = await RawClient.connect(socket());
    await c.hello();
    await c.closed;
    assert.ok(logs.some((l) => /handshake timeout/.test(l)));
  });
});

describe('NBD server session with TLS required (no socket)', () => {
  function session(): { s: NbdServerSession; out: Buffer[]; events: string[] } {
    const out: Buffer[] = [];
    const events: string[] = [];
    const exp = new MemoryExport('sda', 2, new Set());
    const s = new NbdServerSession({
      exports: new Map([['sda', exp]]),
      tls: true,
      peer: 'test',
      transport: {
        write: (bytes) => (out.push(...bytes), true),
        flow: () => undefined,
        startTls: () => events.push('starttls'),
        close: () => events.push('close'),
        log: () => undefined,
      },
    });
    return { s, out, events };
  }
  const replyType = (b: Buffer | undefined): number => b?.readUInt32BE(12) ?? -1;
  const flags = Buffer.from([0, 0, 0, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES]);

  it('refuses every option but STARTTLS with NBD_REP_ERR_TLS_REQD, and hangs up on EXPORT_NAME', () => {
    const { s, out, events } = session();
    s.push(flags);
    for (const opt of [encodeOption(NBD_OPT_LIST), encodeGoOption('sda', []), encodeOption(NBD_OPT_STRUCTURED_REPLY)]) {
      s.push(opt);
      assert.equal(replyType(out.pop()), NBD_REP_ERR_TLS_REQD);
    }
    s.push(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from('sda')));
    assert.deepEqual(events, ['close']);
    assert.equal(out.length, 0, 'nothing about the export was sent');
  });

  it('acknowledges STARTTLS, then haggles normally once TLS is up; bytes sent before the TLS handshake end the session', () => {
    const a = session();
    a.s.push(Buffer.concat([flags, encodeOption(NBD_OPT_STARTTLS)]));
    assert.equal(replyType(a.out.pop()), NBD_REP_ACK);
    assert.deepEqual(a.events, ['starttls']);
    a.s.tlsReady();
    a.s.push(encodeGoOption('sda', []));
    assert.equal(a.s.state, 'transmission');
    const b = session();
    b.s.push(Buffer.concat([flags, encodeOption(NBD_OPT_STARTTLS), Buffer.from('early')]));
    assert.deepEqual(b.events, ['close']);
  });

  it('STARTTLS twice is refused as invalid', () => {
    const { s, out } = session();
    s.push(Buffer.concat([flags, encodeOption(NBD_OPT_STARTTLS)]));
    s.tlsReady();
    s.push(encodeOption(NBD_OPT_STARTTLS));
    assert.equal(replyType(out.pop()), NBD_REP_ERR_INVALID);
    s.push(encodeOption(NBD_OPT_SET_META_CONTEXT, Buffer.alloc(0)));
    assert.equal(replyType(out.pop()), NBD_REP_ERR_INVALID);
  });
});

describe('NBD server read budget', () => {
  it('ByteBudget grants in order and never beyond its capacity', async () => {
    const b = new ByteBudget(100);
    const order: string[] = [];
    const g1 = await b.acquire(60);
    const p2 = b.acquire(50).then((g) => (order.push('second'), g));
    const p3 = b.acquire(500).then((g) => (order.push('third'), g)); // capped at the capacity
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(order, []);
    b.release(g1);
    const g2 = await p2;
    assert.deepEqual(order, ['second']);
    b.release(g2);
    assert.equal(await p3, 100);
    assert.deepEqual(order, ['second', 'third']);
  });

  it('a server whose budget holds two blocks still answers many pipelined reads from several clients', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qbt-nbdsrv-'));
    const disk = new MemoryExport('sda', 16, new Set([3]));
    disk.delayMs = () => 5;
    const server = await NbdServer.start({ exports: [disk], listen: { transport: 'unix', socket: join(dir, 's') }, readBudgetBytes: 2 * BLOCK });
    try {
      await Promise.all(
        [0, 1, 2].map(async () => {
          await using c = await NbdClient.connect({ socket: join(dir, 's') }, { exportName: 'sda' });
          const reads = Array.from({ length: 16 }, (_, b) => c.read(b * BLOCK, BLOCK).then((data) => assert.ok(data.equals(disk.data.subarray(b * BLOCK, (b + 1) * BLOCK)))));
          await Promise.all(reads);
          assert.ok((await c.read(0, 16 * BLOCK)).equals(disk.data), 'a read larger than the whole budget');
        }),
      );
    } finally {
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
