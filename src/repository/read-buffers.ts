// Reusable memory for ranged pack reads and the plaintexts decoded from them
// (the backup server's read path: serve.ts), so that a client streaming a
// disk does not make a fresh buffer, and garbage, for every read.
//
// Invariants:
// - A buffer goes back to the free list only when its count of references
//   (ref/unref: cache entries, replies being written, waiters handed a
//   chunk) falls to zero; a buffer nobody counted is never pooled (it is
//   left to the garbage collector), so a miscount can only lose memory to
//   the collector, never hand out memory still in use — as long as every
//   holder of a view takes a reference before the last one is dropped.
// - Sizes are rounded up to classes (a sixteenth of the next power of two,
//   at least 64 KiB) so that reads of slightly different lengths share
//   buffers; the free list keeps at most `maxFreeBytes`.
// - Memory that moved to a worker and back is a new ArrayBuffer over the
//   same bytes: the pool keys by ArrayBuffer object, and a detached one
//   (byteLength 0) is never kept.

const MIN_CLASS_BYTES = 64 * 1024;

export class ReadBufferPool {
  private readonly free = new Map<number, ArrayBuffer[]>();
  private freeBytes = 0;
  /** Weak: memory whose last holder never lets go (a reply the connection lost) is left to the collector, not kept here. */
  private readonly refs = new WeakMap<ArrayBufferLike, number>();
  /** Buffers handed out by take() that came from the free list, and fresh ones: for tests and benches. */
  readonly stats = { reused: 0, fresh: 0 };

  constructor(private readonly maxFreeBytes: number) {}

  /** The size class a read of `length` bytes takes. */
  static classOf(length: number): number {
    if (length <= MIN_CLASS_BYTES) return MIN_CLASS_BYTES;
    const step = 2 ** Math.ceil(Math.log2(length)) / 16;
    return Math.ceil(length / step) * step;
  }

  /**
   * `length` bytes at the start of a buffer (its ArrayBuffer the caller's
   * alone): a free one of the length's class, else of the smallest class
   * above it up to twice its size, else a fresh one of its class.
   */
  take(length: number): Buffer {
    const size = ReadBufferPool.classOf(length);
    let best: number | undefined;
    for (const [s, list] of this.free) if (s >= size && s <= 2 * size && list.length > 0 && (best === undefined || s < best)) best = s;
    const kept = best !== undefined ? this.free.get(best)?.pop() : undefined;
    if (kept !== undefined) {
      this.freeBytes -= kept.byteLength;
      this.stats.reused++;
      return Buffer.from(kept, 0, length);
    }
    this.stats.fresh++;
    return Buffer.from(new ArrayBuffer(size), 0, length);
  }

  /** One more holder of `buffer`'s memory. */
  ref(buffer: ArrayBufferLike): void {
    this.refs.set(buffer, (this.refs.get(buffer) ?? 0) + 1);
  }

  /** One holder fewer; at none, the memory goes back to the free list. */
  unref(buffer: ArrayBufferLike): void {
    const n = (this.refs.get(buffer) ?? 0) - 1;
    if (n > 0) {
      this.refs.set(buffer, n);
      return;
    }
    if (n < 0) throw new Error('a read buffer was released more often than held');
    this.refs.delete(buffer);
    this.give(buffer);
  }

  /** Bytes held in the free list. */
  get idleBytes(): number {
    return this.freeBytes;
  }

  private give(buffer: ArrayBufferLike): void {
    if (!(buffer instanceof ArrayBuffer) || buffer.byteLength === 0) return;
    const size = buffer.byteLength;
    if (ReadBufferPool.classOf(size) !== size || this.freeBytes + size > this.maxFreeBytes) return;
    let list = this.free.get(size);
    if (list === undefined) this.free.set(size, (list = []));
    list.push(buffer);
    this.freeBytes += size;
  }
}
