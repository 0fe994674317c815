// A FIFO of byte chunks from which protocol layers take exact-length
// pieces: the push parsers of NBD (replies, the handshake, a server's
// requests) share it.

import { assert } from '../util/assert.js';

const EMPTY = Buffer.alloc(0);

/**
 * A FIFO of byte chunks from which exact-length pieces are taken. A piece that
 * lies in one chunk is a view; otherwise it is copied once. A chunk pushed as
 * *transient* (a view of a read buffer the socket reuses) is never handed out
 * as a view: pieces of it are copied, and retain() copies what is left of it
 * before its buffer is reused.
 */
export class ByteQueue {
  private readonly chunks: Buffer[] = [];
  /** Per chunk: true when its memory is only valid until the next push. */
  private readonly transient: boolean[] = [];
  private head = 0;
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(bytes: Buffer, transient = false): void {
    if (bytes.length === 0) return;
    this.chunks.push(bytes);
    this.transient.push(transient);
    this.total += bytes.length;
  }

  /** The next 4 bytes as a big-endian u32 without consuming them; undefined if fewer are queued. */
  peekUInt32BE(): number | undefined {
    if (this.total < 4) return undefined;
    const first = this.chunks[0];
    assert(first !== undefined, 'a non-empty queue has a first chunk');
    if (first.length - this.head >= 4) return first.readUInt32BE(this.head);
    let value = 0;
    let chunkIndex = 0;
    let pos = this.head;
    for (let i = 0; i < 4; i++) {
      let chunk = this.chunks[chunkIndex];
      assert(chunk !== undefined, 'queued chunks hold at least total bytes');
      while (pos >= chunk.length) {
        chunkIndex++;
        pos = 0;
        chunk = this.chunks[chunkIndex];
        assert(chunk !== undefined, 'queued chunks hold at least total bytes');
      }
      value = value * 256 + (chunk[pos] ?? 0);
      pos++;
    }
    return value;
  }

  /** Exactly n bytes, or undefined (consuming nothing) when fewer are queued. */
  take(n: number): Buffer | undefined {
    assert(Number.isSafeInteger(n) && n >= 0, 'take() needs a non-negative integer count');
    if (n > this.total) return undefined;
    if (n === 0) return EMPTY;
    const first = this.chunks[0];
    assert(first !== undefined, 'a non-empty queue has a first chunk');
    if (first.length - this.head >= n && this.transient[0] !== true) {
      const out = first.subarray(this.head, this.head + n);
      this.consume(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    this.moveInto(out, 0, n);
    return out;
  }

  /** Moves up to `max` queued bytes into `target` at `at`; returns how many. */
  moveInto(target: Buffer, at: number, max: number): number {
    let moved = 0;
    while (moved < max && this.total > 0) {
      const chunk = this.chunks[0];
      assert(chunk !== undefined, 'queued chunks hold at least total bytes');
      const count = Math.min(chunk.length - this.head, max - moved);
      chunk.copy(target, at + moved, this.head, this.head + count);
      moved += count;
      this.consume(count);
    }
    return moved;
  }

  /** Copies what is left of transient chunks, so their buffers may be reused. */
  retain(): void {
    for (let i = 0; i < this.chunks.length; i++) {
      const chunk = this.chunks[i];
      if (chunk === undefined || this.transient[i] !== true) continue;
      const start = i === 0 ? this.head : 0;
      this.chunks[i] = Buffer.from(chunk.subarray(start));
      this.transient[i] = false;
      if (i === 0) this.head = 0;
    }
  }

  /** Everything queued, as one buffer. */
  takeAll(): Buffer {
    return this.take(this.total) ?? EMPTY;
  }

  private consume(n: number): void {
    this.head += n;
    this.total -= n;
    const first = this.chunks[0];
    if (first !== undefined && this.head === first.length) {
      this.chunks.shift();
      this.transient.shift();
      this.head = 0;
    }
  }
}
