// Direct I/O (O_DIRECT) for large writes: packs and restored images go from
// our memory to the device without passing through the page cache; and for
// restore's ranged reads of packs (readRangeSync). A
// buffered write of GiBs costs the kernel seconds of CPU finding and filling
// pages when the cache is full of other data, and evicts what the VMs of the
// host had cached; a direct write costs neither.
//
// Direct I/O needs the buffer's address, the file offset and the length
// aligned (DIRECT_ALIGNMENT). JavaScript cannot see an address, so aligned
// memory comes from WebAssembly memories, which V8 maps page-aligned; such
// memory is registered here, and only it is ever written directly.
//
// Invariants:
// - Every byte handed to a writer lands at its position, direct or not: the
//   aligned middle of a write goes through the direct descriptor, its
//   unaligned head and tail (and everything, where direct I/O is refused)
//   through the file's own buffered descriptor. Linux keeps the two coherent
//   (a direct write invalidates the cached pages of its range), and no page
//   is ever written partly by each.
// - Where direct I/O is refused (opening with O_DIRECT fails, or a direct
//   write fails with EINVAL), the writer falls back to buffered writes for
//   the rest of that file; the bytes of a refused write go buffered.
// - Direct writes do not make the file's size or extents durable: callers
//   fsync (or fdatasync) the file as before.
// - A writer owns only its direct descriptor: closing it never closes the
//   buffered one, which stays the caller's.

import { close, closeSync, constants, open, openSync, readSync, write, writev } from 'node:fs';
import { promisify } from 'node:util';

/** The alignment of direct writes: address, file offset and length (the page size; a multiple of every common logical block size). */
export const DIRECT_ALIGNMENT = 4096;
/** Below this, a write is not worth a second system call: it goes buffered whole. */
const MIN_DIRECT_BYTES = 64 * 1024;
/** A staging buffer of writev. */
const STAGING_BYTES = 4 * 1024 * 1024;
const WASM_PAGE_BYTES = 64 * 1024;
/** O_DIRECT where the platform has it (Linux), else 0: no direct I/O. */
const O_DIRECT: number = (constants as { O_DIRECT?: number }).O_DIRECT ?? 0;

const openAsync = promisify(open);
const closeAsync = promisify(close);
const writeAsync = promisify(write);
const writevAsync = promisify(writev);

/** The part of the WebAssembly API used here (its types are not in this project's libraries). */
interface WasmMemoryConstructor {
  new (descriptor: { initial: number; maximum: number; shared: boolean }): { readonly buffer: ArrayBuffer | SharedArrayBuffer };
}
/** Absent where WebAssembly is (node --jitless): then no memory is known aligned and every write is buffered. */
const WasmMemory = (globalThis as unknown as { WebAssembly?: { Memory: WasmMemoryConstructor } }).WebAssembly?.Memory;

/** Memory known to start at a page boundary (see alignedBuffer). */
const alignedMemory = new WeakSet<ArrayBufferLike>();

/**
 * A zero-filled buffer of at least `bytes` (rounded up to 64 KiB) that starts
 * at a page boundary; shared memory (a SharedArrayBuffer, usable from
 * workers) when `shared`. Without WebAssembly (or when V8 cannot reserve the memory), a plain buffer of that size
 * (not known aligned: written buffered).
 */
export function alignedBuffer(bytes: number, options: { shared?: boolean | undefined } = {}): Buffer {
  const pages = Math.max(1, Math.ceil(bytes / WASM_PAGE_BYTES));
  const plain = (): Buffer => Buffer.from(options.shared === true ? new SharedArrayBuffer(pages * WASM_PAGE_BYTES) : new ArrayBuffer(pages * WASM_PAGE_BYTES));
  if (WasmMemory === undefined) return plain();
  let buffer: ArrayBuffer | SharedArrayBuffer;
  try {
    buffer = new WasmMemory({ initial: pages, maximum: pages, shared: options.shared === true }).buffer;
  } catch {
    // A memory V8 cannot reserve (address space capped with ulimit -v, or
    // too many reservations alive): plain memory, written buffered.
    return plain();
  }
  alignedMemory.add(buffer);
  return Buffer.from(buffer);
}

/** True when `view`'s memory comes from alignedBuffer (of this thread), so its address is known modulo DIRECT_ALIGNMENT. */
export function isAlignedMemory(view: Uint8Array): boolean {
  return alignedMemory.has(view.buffer);
}

/** The direct part of a write of `length` bytes at `position` from memory at `byteOffset`: [start, end) of the data, or undefined. */
function directRange(byteOffset: number, position: number, length: number): { start: number; end: number } | undefined {
  if (byteOffset % DIRECT_ALIGNMENT !== position % DIRECT_ALIGNMENT) return undefined;
  const start = (DIRECT_ALIGNMENT - (position % DIRECT_ALIGNMENT)) % DIRECT_ALIGNMENT;
  const end = start + Math.floor(Math.max(0, length - start) / DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT;
  return end - start >= MIN_DIRECT_BYTES ? { start, end } : undefined;
}

function isInvalid(err: unknown): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === 'EINVAL';
}

/** Staging buffers of writev kept for reuse, and writers waiting for one (at most STAGING_IN_FLIGHT exist per thread). */
const STAGING_IN_FLIGHT = 4;
const freeStaging: Buffer[] = [];
const stagingWaiters: Array<(b: Buffer) => void> = [];
let stagingMade = 0;

/** A staging buffer now if one is free or may be made, else undefined (then wait with waitForStaging). */
function takeStaging(): Buffer | undefined {
  const b = freeStaging.pop();
  if (b !== undefined) return b;
  if (stagingMade >= STAGING_IN_FLIGHT) return undefined;
  stagingMade++;
  return alignedBuffer(STAGING_BYTES);
}

function waitForStaging(): Promise<Buffer> {
  return new Promise((resolve) => stagingWaiters.push(resolve));
}

function releaseStaging(b: Buffer): void {
  const waiter = stagingWaiters.shift();
  if (waiter !== undefined) waiter(b);
  else freeStaging.push(b);
}

/**
 * Reads `length` bytes at `offset` of the open file `fd` into `scratch`
 * (reused when large enough and aligned, else replaced), directly where the
 * file takes it: the aligned pages around the range are read through a
 * second descriptor opened with O_DIRECT, so the file's pages are neither
 * looked for nor left in the page cache. Returns a view of the range and
 * how many of its bytes the file had (fewer at its end), and the scratch
 * buffer to reuse.
 */
export function readRangeSync(fd: number, offset: number, length: number, scratch: Buffer | undefined): { bytes: Buffer; done: number; scratch: Buffer } {
  const start = offset - (offset % DIRECT_ALIGNMENT);
  const end = Math.ceil((offset + length) / DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT;
  let direct: number | undefined;
  if (O_DIRECT !== 0 && length >= MIN_DIRECT_BYTES) {
    try {
      direct = openSync(`/proc/self/fd/${fd}`, constants.O_RDONLY | O_DIRECT);
    } catch {
      direct = undefined;
    }
  }
  if (direct !== undefined) {
    const buffer = scratch !== undefined && scratch.length >= end - start && isAlignedMemory(scratch) && scratch.byteOffset === 0 ? scratch : alignedBuffer(Math.max(end - start, scratch?.length ?? 0));
    try {
      let got = 0;
      while (got < end - start) {
        const n = readSync(direct, buffer, got, end - start - got, start + got);
        if (n === 0) break;
        got += n;
        if (got % DIRECT_ALIGNMENT !== 0) break; // the file's end
      }
      // A short read of a regular file is its end: the range is cut there.
      const skip = offset - start;
      return { bytes: buffer.subarray(skip, skip + length), done: Math.max(0, Math.min(length, got - skip)), scratch: buffer };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
    } finally {
      closeSync(direct);
    }
  }
  const buffer = scratch !== undefined && scratch.length >= length ? scratch : Buffer.allocUnsafeSlow(Math.max(length, scratch?.length ?? 0));
  let done = 0;
  while (done < length) {
    const n = readSync(fd, buffer, done, length - done, offset + done);
    if (n === 0) break;
    done += n;
  }
  return { bytes: buffer.subarray(0, length), done, scratch: buffer };
}

/**
 * Writes to an open file, the large aligned parts directly. Made with
 * `open` (a direct descriptor of its own) or `over` (one the caller owns).
 */
export class DirectWriter {
  private direct: number | undefined;
  private closed = false;

  private constructor(
    /** The file's buffered descriptor (the caller's). */
    readonly fd: number,
    direct: number | undefined,
    private readonly ownsDirect: boolean,
  ) {
    this.direct = direct;
  }

  /**
   * A writer for the open file `fd`: a second descriptor of the same file is
   * opened for direct writes (through /proc/self/fd, so it reaches exactly
   * that file); where that is refused, every write is buffered.
   */
  static async open(fd: number): Promise<DirectWriter> {
    if (O_DIRECT === 0) return new DirectWriter(fd, undefined, true);
    const direct = await openAsync(`/proc/self/fd/${fd}`, constants.O_WRONLY | O_DIRECT).catch(() => undefined);
    return new DirectWriter(fd, direct, true);
  }

  /** A writer over descriptors the caller owns and closes (e.g. a worker's view of its caller's files). */
  static over(fd: number, direct: number | undefined): DirectWriter {
    return new DirectWriter(fd, direct, false);
  }

  /** The direct descriptor, while direct writes are possible (to hand to another thread with `fd`). */
  get directFd(): number | undefined {
    return this.direct;
  }

  /** Writes all of `data` at `position`; directly where `data` is aligned memory (see alignedBuffer) and its alignment matches the position's. */
  async write(data: Uint8Array, position: number): Promise<void> {
    const range = this.direct !== undefined && isAlignedMemory(data) ? directRange(data.byteOffset, position, data.byteLength) : undefined;
    if (range === undefined) {
      await writeAllAsync(this.fd, data, 0, data.byteLength, position);
      return;
    }
    await writeAllAsync(this.fd, data, 0, range.start, position);
    const done = await this.tryDirect((fd) => writeAllAsync(fd, data, range.start, range.end - range.start, position + range.start, true));
    // Refused (EINVAL) or cut short: the rest of the range goes buffered.
    if (done < range.end - range.start) await writeAllAsync(this.fd, data, range.start + done, range.end - range.start - done, position + range.start + done);
    await writeAllAsync(this.fd, data, range.end, data.byteLength - range.end, position + range.end);
  }

  /**
   * Writes `parts` back to back from `position` (any memory): the aligned
   * middle is copied into this thread's aligned staging buffers piece by
   * piece (up to STAGING_IN_FLIGHT pieces in flight at once) and each piece
   * written directly on the thread pool while the caller goes on; the head
   * and tail go buffered (one pwritev each). Settles once every byte is
   * written. `parts` must stay
   * unchanged until then. The first failure is thrown, after every write
   * has settled.
   */
  async writev(parts: readonly Uint8Array[], position: number): Promise<void> {
    const total = parts.reduce((n, p) => n + p.byteLength, 0);
    const range = this.direct !== undefined ? directRange(position, position, total) : undefined;
    if (range === undefined) {
      await writevAllAsync(this.fd, parts, position);
      return;
    }
    const writes: Array<Promise<unknown>> = [writevAllAsync(this.fd, sliceParts(parts, 0, range.start), position)];
    try {
      for (let at = range.start; at < range.end; ) {
        const from = at;
        const n = Math.min(STAGING_BYTES, range.end - from);
        // Taken without yielding when one is free, so the first pieces go out before the caller's next step.
        const stage = takeStaging() ?? (await waitForStaging());
        let k = 0;
        for (const p of sliceParts(parts, from, from + n)) {
          stage.set(p, k);
          k += p.byteLength;
        }
        writes.push(
          this.tryDirect((fd) => writeAllAsync(fd, stage, 0, n, position + from, true))
            .then(async (done) => {
              // Refused or cut short: the rest of the piece goes buffered.
              if (done < n) await writevAllAsync(this.fd, sliceParts(parts, from + done, from + n), position + from + done);
            })
            .finally(() => releaseStaging(stage)),
        );
        at += n;
      }
      writes.push(writevAllAsync(this.fd, sliceParts(parts, range.end, total), position + range.end));
    } finally {
      const failed = (await Promise.allSettled(writes)).find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed !== undefined) throw failed.reason;
    }
  }

  /** Closes the direct descriptor if this writer opened it; idempotent. The buffered one stays open. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const direct = this.direct;
    this.direct = undefined;
    if (this.ownsDirect && direct !== undefined) await closeAsync(direct);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** Runs a direct write; EINVAL (direct I/O refused for this file) turns direct writes off. Returns the bytes written. */
  private async tryDirect(fn: (fd: number) => Promise<number>): Promise<number> {
    const fd = this.direct;
    if (fd === undefined) return 0;
    try {
      return await fn(fd);
    } catch (err) {
      if (!isInvalid(err)) throw err;
      this.dropDirect();
      return 0;
    }
  }

  private dropDirect(): void {
    const direct = this.direct;
    this.direct = undefined;
    if (this.ownsDirect && direct !== undefined) {
      try {
        closeSync(direct);
      } catch {
        // Nothing was written through it that a close could lose.
      }
    }
  }
}

/**
 * Writes `length` bytes of `data` from `offset` at `position`, looping on
 * short writes; returns the bytes written. Through a direct descriptor
 * (`direct`), a write that makes no progress or leaves the rest unaligned
 * stops early and the caller writes the rest buffered; a buffered write
 * that makes no progress throws.
 */
async function writeAllAsync(fd: number, data: Uint8Array, offset: number, length: number, position: number, direct = false): Promise<number> {
  let done = 0;
  while (done < length) {
    const { bytesWritten } = await writeAsync(fd, data, offset + done, length - done, position + done);
    done += bytesWritten;
    if (done < length && (bytesWritten === 0 || (direct && done % DIRECT_ALIGNMENT !== 0))) {
      if (direct) break;
      throw noProgress(length - done, position + done);
    }
  }
  return done;
}

function noProgress(bytes: number, position: number): Error {
  return new Error(`Writing ${bytes} bytes at offset ${position} made no progress`);
}

async function writevAllAsync(fd: number, parts: readonly Uint8Array[], position: number): Promise<void> {
  const total = parts.reduce((n, p) => n + p.byteLength, 0);
  let done = 0;
  while (done < total) {
    const { bytesWritten } = await writevAsync(fd, done === 0 ? [...parts] : sliceParts(parts, done, total), position + done);
    if (bytesWritten === 0) throw noProgress(total - done, position + done);
    done += bytesWritten;
  }
}

/** The bytes [start, end) of `parts` laid back to back, as views. */
export function sliceParts(parts: readonly Uint8Array[], start: number, end: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  let at = 0;
  for (const p of parts) {
    const from = Math.max(start, at);
    const to = Math.min(end, at + p.byteLength);
    if (from < to) out.push(p.subarray(from - at, to - at));
    at += p.byteLength;
    if (at >= end) break;
  }
  return out;
}
