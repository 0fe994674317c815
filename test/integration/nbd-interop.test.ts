// NbdClient and copyExtents against real servers and tools: qemu-nbd serves
// qcow2 images (with and without backing files and dirty bitmaps), qemu-io
// writes the content, and qemu-img, nbdinfo and byte-for-byte comparisons
// judge the outcome. Every qemu-nbd is started here as a child process and
// stopped by its PID in the after hooks.

import { strict as assert } from 'node:assert';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createConnection, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, afterEach, before, describe, it } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import { runTool } from '../../src/image/tools.js';
import {
  NBD_CONTEXT_BASE_ALLOCATION,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  NbdClient,
  copyExtents,
  type CopyExtentsResult,
  type NbdAddress,
  type NbdExtent,
} from '../../src/nbd/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

// ---- Processes ---------------------------------------------------------------

interface Server {
  child: ChildProcess;
  address: NbdAddress;
  exportName: string;
  stderr: () => string;
}

let dir: string;
const running = new Set<Server>();

/** Starts qemu-nbd on a unix socket (or TCP when `port` is given) and waits until it accepts connections. */
async function startQemuNbd(image: string, exportName: string, extra: string[] = [], port?: number): Promise<Server> {
  const socket = join(dir, `${exportName}-${running.size}.sock`);
  const listen = port === undefined ? [`--socket=${socket}`] : ['--bind=127.0.0.1', `--port=${port}`];
  const child = spawn('qemu-nbd', [...listen, '--format=qcow2', '--persistent', '--shared=4', `--export-name=${exportName}`, ...extra, image], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr?.on('data', (b: Buffer) => (stderr += b.toString()));
  const address: NbdAddress = port === undefined ? { socket } : { host: '127.0.0.1', port };
  const server: Server = { child, address, exportName, stderr: () => stderr };
  running.add(server);
  let exited = false;
  child.once('exit', () => (exited = true));
  for (let attempt = 0; ; attempt++) {
    if (exited) throw new Error(`qemu-nbd exited early: ${stderr}`);
    if (await canConnect(address)) return server;
    if (attempt > 500) throw new Error(`qemu-nbd did not listen: ${stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

function canConnect(address: NbdAddress): Promise<boolean> {
  return new Promise((resolve) => {
    const s = 'socket' in address ? createConnection({ path: address.socket }) : createConnection({ host: address.host, port: address.port });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/** Stops one qemu-nbd by its PID and waits for it to exit (so the image is closed and flushed). */
async function stop(server: Server): Promise<void> {
  running.delete(server);
  const { child } = server;
  if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  process.kill(child.pid, 'SIGTERM');
  const timer = setTimeout(() => {
    if (child.pid !== undefined && child.exitCode === null) process.kill(child.pid, 'SIGKILL');
  }, 10_000);
  await exited;
  clearTimeout(timer);
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  assert.ok(address !== null && typeof address === 'object');
  return address.port;
}

// ---- Images ------------------------------------------------------------------

interface Write {
  offset: number;
  length: number;
  /** Byte value; 'zero' writes with `write -z`, 'discard' with `discard`. */
  pattern: number | 'zero' | 'discard';
}

async function createQcow2(name: string, sizeBytes: number, backing?: string): Promise<string> {
  const file = join(dir, name);
  const args = ['create', '-q', '-f', 'qcow2'];
  if (backing !== undefined) args.push('-b', backing, '-F', 'qcow2');
  await runTool('qemu-img', [...args, file, String(sizeBytes)]);
  return file;
}

async function qemuIo(file: string, writes: readonly Write[]): Promise<void> {
  const commands = writes.map((w) =>
    w.pattern === 'zero' ? `write -z ${w.offset} ${w.length}` : w.pattern === 'discard' ? `discard ${w.offset} ${w.length}` : `write -P ${w.pattern} ${w.offset} ${w.length}`,
  );
  const { stdout } = await runTool('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), file]);
  if (/error|failed/i.test(stdout)) throw new Error(`qemu-io: ${stdout}`);
}

/** What the guest sees after `writes`, starting from `base`. */
function apply(base: Buffer, writes: readonly Write[]): Buffer {
  const out = Buffer.from(base);
  for (const w of writes) out.fill(typeof w.pattern === 'number' ? w.pattern : 0, w.offset, w.offset + w.length);
  return out;
}

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  zero: boolean;
  data: boolean;
}

async function qemuImgMap(file: string): Promise<MapEntry[]> {
  const { stdout } = await runTool('qemu-img', ['map', '--output=json', file]);
  return JSON.parse(stdout) as MapEntry[];
}

/** The map entries overlapping [offset, offset + length). */
function mapOf(entries: readonly MapEntry[], offset: number, length: number): MapEntry[] {
  return entries.filter((e) => e.start < offset + length && e.start + e.length > offset);
}

async function nbdinfoMap(server: Server, context: string): Promise<NbdExtent[]> {
  assert.ok('socket' in server.address);
  const uri = `nbd+unix:///${server.exportName}?socket=${server.address.socket}`;
  const { stdout } = await runTool('nbdinfo', ['--json', `--map=${context}`, uri]);
  const entries = JSON.parse(stdout) as Array<{ offset: number; length: number; type: number }>;
  return merge(entries.map((e) => ({ offset: e.offset, length: e.length, flags: e.type })));
}

function merge(extents: readonly NbdExtent[]): NbdExtent[] {
  const out: NbdExtent[] = [];
  for (const e of extents) {
    const last = out.at(-1);
    if (last !== undefined && last.flags === e.flags && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ ...e });
  }
  return out;
}

async function compareImages(expected: string, expectedFormat: 'raw' | 'qcow2', actual: string): Promise<string> {
  const { stdout } = await runTool('qemu-img', ['compare', '-f', expectedFormat, '-F', 'qcow2', expected, actual]);
  return stdout.trim();
}

// ---- Tests ---------------------------------------------------------------------

before(() => {
  dir = mkdtempSync(join(tmpdir(), 'qbt-nbd-interop-'));
});

afterEach(async () => {
  for (const server of [...running]) await stop(server);
});

after(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe('NbdClient with qemu-nbd', () => {
  const SIZE = 16 * MiB;
  const writes: Write[] = [
    { offset: 0, length: 4096, pattern: 0x11 },
    { offset: 64 * KiB + 512, length: 3000, pattern: 0x22 },
    { offset: 1 * MiB, length: 1 * MiB, pattern: 0x33 },
    { offset: 5 * MiB - 100, length: 200, pattern: 0x44 },
    { offset: 9 * MiB, length: 512 * KiB, pattern: 0x66 },
    { offset: 9 * MiB + 128 * KiB, length: 128 * KiB, pattern: 'zero' },
    { offset: SIZE - 4096, length: 4096, pattern: 0x55 },
  ];
  let image: string;

  before(async () => {
    image = await createQcow2('sparse.qcow2', SIZE);
    await qemuIo(image, writes);
  });

  it('reads back what qemu-io wrote, whole and in many pipelined pieces', async () => {
    const expected = apply(Buffer.alloc(SIZE), writes);
    const server = await startQemuNbd(image, 'sparse', ['--read-only']);
    await using client = await NbdClient.connect(server.address, { exportName: 'sparse' });
    assert.equal(client.size, SIZE);
    assert.equal(client.readOnly, true);
    assert.ok(client.negotiated.structuredReplies);
    assert.ok((await client.read(0, SIZE)).equals(expected));
    const pieces = Array.from({ length: 256 }, (_, i) => ({ offset: i * 64 * KiB + (i % 7) * 100, length: 60 * KiB }));
    const results = await Promise.all(pieces.map((p) => client.read(p.offset, p.length)));
    results.forEach((data, i) => {
      const p = pieces[i];
      assert.ok(p !== undefined && data.equals(expected.subarray(p.offset, p.offset + p.length)), `piece ${i}`);
    });
  });

  it('reports base:allocation extents of a sparse image as nbdinfo --map does', async () => {
    const server = await startQemuNbd(image, 'sparse', ['--read-only']);
    await using client = await NbdClient.connect(server.address, { exportName: 'sparse', metaContexts: [NBD_CONTEXT_BASE_ALLOCATION] });
    const extents = await client.extents(NBD_CONTEXT_BASE_ALLOCATION);
    assert.deepEqual(extents, await nbdinfoMap(server, NBD_CONTEXT_BASE_ALLOCATION));
    // Clusters qemu-io wrote are data; the rest of the 16 MiB is a hole that reads as zeroes.
    const at = (offset: number): number => extents.find((e) => e.offset <= offset && offset < e.offset + e.length)?.flags ?? -1;
    assert.equal(at(0), 0);
    assert.equal(at(1 * MiB + 5), 0);
    assert.equal(at(3 * MiB), NBD_STATE_HOLE | NBD_STATE_ZERO);
    assert.equal(at(9 * MiB + 128 * KiB) & NBD_STATE_ZERO, NBD_STATE_ZERO);
    assert.equal(at(SIZE - 1), 0);
    assert.equal(extents.reduce((n, e) => n + e.length, 0), SIZE);
    // blockStatus alone answers one request, clipped to what was asked.
    const one = await client.blockStatus(NBD_CONTEXT_BASE_ALLOCATION, 1 * MiB + 4096, 4096);
    assert.deepEqual(one, [{ offset: 1 * MiB + 4096, length: 4096, flags: 0 }]);
  });

  it('reports an unknown export as not found', async () => {
    const server = await startQemuNbd(image, 'sparse', ['--read-only']);
    await assert.rejects(NbdClient.connect(server.address, { exportName: 'nope' }), (err: unknown) => isQbackupError(err, 'NBD_EXPORT_NOT_FOUND') && /"nope" not found/.test(err.message));
  });

  it('connects over TCP', async () => {
    const server = await startQemuNbd(image, 'sparse', ['--read-only'], await freePort());
    await using client = await NbdClient.connect(server.address, { exportName: 'sparse' });
    assert.ok((await client.read(1 * MiB - 4096, 8192)).equals(Buffer.concat([Buffer.alloc(4096), Buffer.alloc(4096, 0x33)])));
  });
});

describe('dirty bitmaps over qemu-nbd', () => {
  it('reports exactly the clusters written since the bitmap was added, as nbdinfo does', async () => {
    const image = await createQcow2('bitmap.qcow2', 16 * MiB);
    await qemuIo(image, [{ offset: 0, length: 8 * MiB, pattern: 0x01 }]);
    await runTool('qemu-img', ['bitmap', '--add', image, 'b0']);
    await qemuIo(image, [
      { offset: 3 * MiB, length: 10 * KiB, pattern: 0x02 },
      { offset: 7 * MiB + 100, length: 1, pattern: 0x03 },
      { offset: 12 * MiB, length: 200 * KiB, pattern: 0x04 },
    ]);
    const server = await startQemuNbd(image, 'bm', ['--read-only', '--bitmap=b0']);
    const context = 'qemu:dirty-bitmap:b0';
    await using client = await NbdClient.connect(server.address, { exportName: 'bm', metaContexts: [context, NBD_CONTEXT_BASE_ALLOCATION] });
    assert.deepEqual([...client.contexts.keys()].sort(), [NBD_CONTEXT_BASE_ALLOCATION, context]);
    const extents = await client.extents(context);
    assert.deepEqual(
      extents.filter((e) => e.flags === 1).map((e) => [e.offset, e.length]),
      [
        [3 * MiB, 64 * KiB],
        [7 * MiB, 64 * KiB],
        [12 * MiB, 256 * KiB],
      ],
    );
    assert.deepEqual(extents, await nbdinfoMap(server, context));
  });
});

describe('writing into a qcow2 with a backing file', () => {
  it('leaves written zeroes as zero clusters that hide the backing data', async () => {
    const SIZE = 16 * MiB;
    const base = await createQcow2('base.qcow2', SIZE);
    await qemuIo(base, [{ offset: 0, length: SIZE, pattern: 0x11 }]);
    const top = await createQcow2('top.qcow2', SIZE, base);
    const server = await startQemuNbd(top, 'top');
    const client = await NbdClient.connect(server.address, { exportName: 'top' });
    assert.equal(client.readOnly, false);
    assert.ok(client.canWriteZeroes && client.canFlush);

    const data = Buffer.alloc(1 * MiB);
    for (let i = 0; i < data.length; i++) data[i] = (i * 11) & 0xff;
    await Promise.all([
      client.write(1 * MiB, data),
      client.writeZeroes(4 * MiB, 2 * MiB),
      client.writeZeroes(8 * MiB + 64 * KiB, 64 * KiB, { noHole: true }),
      client.writeZeroes(10 * MiB + 4096, 8192),
    ]);
    await client.flush();
    assert.ok((await client.read(4 * MiB, 2 * MiB)).equals(Buffer.alloc(2 * MiB)));
    await client.close();
    await stop(server);

    const map = await qemuImgMap(top);
    for (const [offset, length] of [
      [4 * MiB, 2 * MiB],
      [8 * MiB + 64 * KiB, 64 * KiB],
    ] as const) {
      const entries = mapOf(map, offset, length);
      assert.ok(entries.length > 0);
      for (const e of entries) {
        assert.equal(e.depth, 0, `[${offset}, +${length}) falls through to the backing file: ${JSON.stringify(e)}`);
        assert.equal(e.zero, true, JSON.stringify(e));
        assert.equal(e.data, false, JSON.stringify(e));
      }
    }
    // Untouched ranges still come from the backing file.
    assert.ok(mapOf(map, 12 * MiB, 1 * MiB).every((e) => e.depth === 1));

    const expected = Buffer.alloc(SIZE, 0x11);
    data.copy(expected, 1 * MiB);
    expected.fill(0, 4 * MiB, 6 * MiB);
    expected.fill(0, 8 * MiB + 64 * KiB, 8 * MiB + 128 * KiB);
    expected.fill(0, 10 * MiB + 4096, 10 * MiB + 4096 + 8192);
    const raw = join(dir, 'top-expected.raw');
    writeFileSync(raw, expected);
    assert.equal(await compareImages(raw, 'raw', top), 'Images are identical.');
  });
});

describe('copyExtents between qemu-nbd exports', () => {
  const SIZE = 16 * MiB;

  it('copies only dirty extents into a qcow2 backed by the previous backup', async () => {
    const disk = await createQcow2('disk.qcow2', SIZE);
    await qemuIo(disk, [
      { offset: 0, length: 6 * MiB, pattern: 0xa1 },
      { offset: 10 * MiB, length: 2 * MiB, pattern: 0xa2 },
    ]);
    const backup0 = join(dir, 'backup0.qcow2');
    await runTool('qemu-img', ['convert', '-O', 'qcow2', disk, backup0]);
    await runTool('qemu-img', ['bitmap', '--add', disk, 'b0']);
    await qemuIo(disk, [
      { offset: 1 * MiB, length: 128 * KiB, pattern: 0xb1 },
      // Zeroes over data the previous backup holds: must not show through.
      { offset: 3 * MiB, length: 1 * MiB, pattern: 'zero' },
      { offset: 5 * MiB, length: 128 * KiB, pattern: 'discard' },
      { offset: 8 * MiB, length: 64 * KiB, pattern: 0xb2 },
      // Written as data, but all zero bytes: must become a zero write too.
      { offset: 11 * MiB, length: 64 * KiB, pattern: 0 },
    ]);
    const backup1 = await createQcow2('backup1.qcow2', SIZE, backup0);

    const dirtyContext = 'qemu:dirty-bitmap:b0';
    const sourceServer = await startQemuNbd(disk, 'src', ['--read-only', '--bitmap=b0']);
    const targetServer = await startQemuNbd(backup1, 'dst');
    const source = await NbdClient.connect(sourceServer.address, { exportName: 'src', metaContexts: [NBD_CONTEXT_BASE_ALLOCATION, dirtyContext] });
    const target = await NbdClient.connect(targetServer.address, { exportName: 'dst' });
    const progress: Array<[number, number]> = [];
    let result: CopyExtentsResult | undefined;
    try {
      result = await copyExtents(source, target, {
        dirtyContext,
        maxInFlight: 4,
        chunkBytes: 64 * KiB,
        onProgress: (doneBytes, totalBytes) => progress.push([doneBytes, totalBytes]),
      });
    } finally {
      await source.close();
      await target.close();
    }
    await stop(sourceServer);
    await stop(targetServer);

    assert.deepEqual(result, { dataBytes: 128 * KiB + 64 * KiB, zeroBytes: 1 * MiB + 128 * KiB + 64 * KiB });
    const total = 128 * KiB + 1 * MiB + 128 * KiB + 64 * KiB + 64 * KiB;
    assert.deepEqual(progress.at(-1), [total, total]);
    assert.ok(progress.every(([done, all], i) => all === total && done > (progress[i - 1]?.[0] ?? 0)));

    assert.equal(await compareImages(disk, 'qcow2', backup1), 'Images are identical.');
    const map = await qemuImgMap(backup1);
    for (const [offset, length] of [
      [3 * MiB, 1 * MiB],
      [5 * MiB, 128 * KiB],
      [11 * MiB, 64 * KiB],
    ] as const) {
      for (const e of mapOf(map, offset, length)) {
        assert.equal(e.depth, 0, `zeroed dirty range at ${offset} falls through to the backing file: ${JSON.stringify(e)}`);
        assert.equal(e.zero, true, JSON.stringify(e));
      }
    }
    for (const [offset, length] of [
      [1 * MiB, 128 * KiB],
      [8 * MiB, 64 * KiB],
    ] as const) {
      assert.ok(mapOf(map, offset, length).every((e) => e.depth === 0 && e.data), `data at ${offset} was copied`);
    }
    // Clean ranges were not touched: they still come from backup0.
    for (const [offset, length] of [
      [0, 1 * MiB],
      [2 * MiB, 1 * MiB],
      [10 * MiB, 1 * MiB],
    ] as const) {
      assert.ok(mapOf(map, offset, length).every((e) => e.depth === 1), `clean range at ${offset} was written`);
    }
  });

  it('copies a whole disk, sending zero extents as zero writes', async () => {
    const disk = await createQcow2('full-src.qcow2', SIZE);
    await qemuIo(disk, [
      { offset: 512 * KiB, length: 3 * MiB, pattern: 0xc1 },
      { offset: 9 * MiB, length: 64 * KiB, pattern: 0 },
      { offset: 14 * MiB, length: 1 * MiB, pattern: 0xc2 },
    ]);
    const copy = await createQcow2('full-dst.qcow2', SIZE);
    const sourceServer = await startQemuNbd(disk, 'src', ['--read-only']);
    const targetServer = await startQemuNbd(copy, 'dst');
    const source = await NbdClient.connect(sourceServer.address, { exportName: 'src', metaContexts: [NBD_CONTEXT_BASE_ALLOCATION] });
    const target = await NbdClient.connect(targetServer.address, { exportName: 'dst' });
    let result: CopyExtentsResult | undefined;
    try {
      result = await copyExtents(source, target);
    } finally {
      await source.close();
      await target.close();
    }
    await stop(sourceServer);
    await stop(targetServer);
    assert.deepEqual(result, { dataBytes: 4 * MiB, zeroBytes: SIZE - 4 * MiB });
    assert.equal(await compareImages(disk, 'qcow2', copy), 'Images are identical.');
    assert.ok(mapOf(await qemuImgMap(copy), 9 * MiB, 64 * KiB).every((e) => !e.data));
  });
});
