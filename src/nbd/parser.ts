// A push parser for the transmission phase of NBD: it takes the server's
// bytes in whatever pieces the socket delivers and emits each complete reply
// (a simple reply or one structured chunk), checked against the request it
// answers. It owns no socket, so every edge case can be tested with bytes.
//
// Invariants:
// - Bytes from the server are hostile. Every header is validated before its
//   payload is buffered, so no payload longer than the request it answers
//   (and never more than maxPayloadBytes + chunk overhead) is ever held.
// - Only cookies registered with expect() are accepted; a cookie leaves the
//   table with its final reply (a simple reply or a chunk with
//   NBD_REPLY_FLAG_DONE), so late or repeated replies are protocol errors.
// - Content chunks lie inside their request and never overlap; a successful
//   read covers its whole range; block status names only negotiated
//   contexts, once each, with descriptors that start inside the request and
//   end inside the export.
// - The first violation is reported once through onError as an
//   NbdProtocolError naming the export; after that the parser ignores input.
//   push() throws only what a callback throws.

import { assert } from '../util/assert.js';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_READ,
  NBD_EXTENDED_REPLY_MAGIC,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_SIMPLE_REPLY_SIZE,
  NBD_STRUCTURED_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_SIZE,
  isNbdReplyTypeError,
  nbdCommandName,
  nbdReplyTypeName,
} from './constants.js';
import {
  decodeBlockStatus,
  decodeErrorChunk,
  decodeOffsetData,
  decodeOffsetHole,
  decodeSimpleReplyHeader,
  decodeStructuredReplyHeader,
  readU64,
  type NbdBlockDescriptor,
  type NbdSimpleReplyHeader,
  type NbdStructuredReplyHeader,
} from './codec.js';
import { NbdProtocolError } from './errors.js';
import { ByteQueue } from './byte-queue.js';
import { RangeSet } from './range-set.js';

/** Largest data payload accepted in one reply: 64 MiB, twice the largest request we send. */
export const DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024 * 1024;
/** Fixed bytes a chunk may add to its variable part (the 8-byte offset of OFFSET_DATA). */
export const CHUNK_OVERHEAD_BYTES = 8;
/** The spec asks servers for at most 2^20 descriptors per block status chunk. */
export const DEFAULT_MAX_DESCRIPTORS = 1 << 20;
/** Error chunks carry a message of at most 4096 bytes plus a few fixed fields. */
const MAX_ERROR_CHUNK_BYTES = 64 * 1024;

const EMPTY = Buffer.alloc(0);

/** What the parser must know about a request to check its replies. */
export interface NbdRequestInfo {
  /** NBD_CMD_* */
  readonly command: number;
  /** NBD_CMD_FLAG_* */
  readonly flags: number;
  readonly offset: number;
  readonly length: number;
  /**
   * NBD_CMD_READ only: the caller's buffer of `length` bytes for the data.
   * Data chunks are then written straight into it (their `data` is a view of
   * it) and nothing else is allocated for them; holes are left for the caller
   * to zero. On a failed read its content is undefined.
   */
  readonly into?: Buffer;
}

export type NbdReplyChunk =
  | { readonly type: 'none' }
  /** Data for [offset, offset + data.length); a view into received bytes. */
  | { readonly type: 'data'; readonly offset: number; readonly data: Buffer }
  /** [offset, offset + length) reads as zeroes. */
  | { readonly type: 'hole'; readonly offset: number; readonly length: number }
  /** Consecutive extents starting at the request's offset; the last may end past the request. */
  | { readonly type: 'block-status'; readonly contextId: number; readonly descriptors: readonly NbdBlockDescriptor[] }
  /** replyType is undefined for a simple reply's error. */
  | {
      readonly type: 'error';
      readonly replyType: number | undefined;
      readonly error: number;
      readonly message: string;
      readonly offset: number | undefined;
    };

export interface NbdReply {
  readonly cookie: bigint;
  readonly request: NbdRequestInfo;
  /** True for a simple reply and for a chunk with NBD_REPLY_FLAG_DONE: the request is complete. */
  readonly final: boolean;
  readonly chunk: NbdReplyChunk;
}

export interface NbdReplyParserOptions {
  /** Named in every protocol error. */
  exportName: string;
  exportSize: number;
  /** Whether NBD_OPT_STRUCTURED_REPLY was acknowledged. */
  structuredReplies: boolean;
  /** Context ids the server assigned in NBD_OPT_SET_META_CONTEXT. */
  contextIds: Iterable<number>;
  maxPayloadBytes?: number;
  maxDescriptors?: number;
  onReply: (reply: NbdReply) => void;
  onError: (error: NbdProtocolError) => void;
}

interface Tracked {
  readonly request: NbdRequestInfo;
  /** Content seen so far (reads only). */
  readonly content: RangeSet;
  /** Contexts that already sent their block status chunk. */
  readonly contexts: Set<number>;
  sawError: boolean;
}

type PendingHeader = (
  | { kind: 'simple'; header: NbdSimpleReplyHeader; tracked: Tracked; payloadLength: number }
  | { kind: 'structured'; header: NbdStructuredReplyHeader; tracked: Tracked; payloadLength: number }
) & {
  /**
   * Where the payload is gathered as its bytes arrive (one copy, however the
   * socket splits it): a large payload's own buffer, or for a read with
   * `into` the data's place in the caller's buffer.
   */
  sink?: Buffer;
  filled?: number;
  /** The offset of an OFFSET_DATA chunk whose data goes into the caller's buffer (its prefix is consumed first). */
  dataOffset?: number;
};

/**
 * A payload at least this long that has not fully arrived is gathered into
 * its own buffer as its bytes come in, instead of queueing the socket's
 * pieces and copying them together at the end.
 */
const SINK_MIN_BYTES = 64 * 1024;

export class NbdReplyParser {
  readonly exportName: string;
  readonly exportSize: number;
  readonly structuredReplies: boolean;
  readonly maxPayloadBytes: number;
  readonly maxDescriptors: number;
  private readonly contextIds: ReadonlySet<number>;
  private readonly onReply: (reply: NbdReply) => void;
  private readonly onError: (error: NbdProtocolError) => void;
  private readonly queue = new ByteQueue();
  private readonly inFlight = new Map<bigint, Tracked>();
  private pending: PendingHeader | undefined;
  private stopped = false;

  constructor(options: NbdReplyParserOptions) {
    this.exportName = options.exportName;
    this.exportSize = options.exportSize;
    this.structuredReplies = options.structuredReplies;
    this.contextIds = new Set(options.contextIds);
    this.maxPayloadBytes = options.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES;
    this.maxDescriptors = options.maxDescriptors ?? DEFAULT_MAX_DESCRIPTORS;
    this.onReply = options.onReply;
    this.onError = options.onError;
    assert(Number.isSafeInteger(this.exportSize) && this.exportSize >= 0, 'exportSize must be a non-negative integer');
    assert(Number.isSafeInteger(this.maxPayloadBytes) && this.maxPayloadBytes > 0, 'maxPayloadBytes must be a positive integer');
    assert(Number.isSafeInteger(this.maxDescriptors) && this.maxDescriptors > 0, 'maxDescriptors must be a positive integer');
  }

  /** Requests whose final reply has not arrived. */
  get inFlightCount(): number {
    return this.inFlight.size;
  }

  /** Bytes received but not yet part of an emitted reply. */
  get bufferedBytes(): number {
    const pending = this.pending;
    if (pending === undefined) return this.queue.length;
    return this.queue.length + (pending.filled ?? 0) + (pending.kind === 'simple' ? NBD_SIMPLE_REPLY_SIZE : NBD_STRUCTURED_REPLY_SIZE);
  }

  /** True once a violation was reported or stop() was called. */
  get isStopped(): boolean {
    return this.stopped;
  }

  /** Registers a request before it is sent, so that its replies are accepted. A cookie in flight must not be reused. */
  expect(cookie: bigint, request: NbdRequestInfo): void {
    assert(!this.inFlight.has(cookie), `NBD cookie ${cookie} is already in flight`);
    assert(Number.isSafeInteger(request.offset) && request.offset >= 0, 'request offset must be a non-negative integer');
    assert(Number.isSafeInteger(request.length) && request.length >= 0, 'request length must be a non-negative integer');
    this.inFlight.set(cookie, { request, content: new RangeSet(), contexts: new Set(), sawError: false });
  }

  /**
   * Feeds bytes from the server; replies and errors come out through the
   * callbacks. With `transient`, `bytes` is only valid during this call (a
   * read buffer the socket reuses): nothing emitted is a view of it, and
   * what is left of it is copied before push returns.
   */
  push(bytes: Buffer, transient = false): void {
    if (this.stopped) return;
    if (this.isReadTarget(bytes)) {
      // The socket read straight into the pending payload's buffer (readTarget): nothing to copy.
      const pending = this.pending;
      assert(pending !== undefined, 'a read target belongs to a pending payload');
      pending.filled = (pending.filled ?? 0) + bytes.length;
      transient = false;
    } else {
      this.queue.push(bytes, transient);
    }
    try {
      while (!this.stopped) {
        let reply: NbdReply | undefined;
        try {
          reply = this.next();
        } catch (err) {
          if (!(err instanceof NbdProtocolError)) throw err;
          this.stopped = true;
          this.onError(err.forExport(this.exportName));
          return;
        }
        if (reply === undefined) return;
        this.onReply(reply);
      }
    } finally {
      if (transient) this.queue.retain();
    }
  }

  /**
   * Where the next bytes read from the socket may go directly: the rest of a
   * large payload's own buffer, while nothing else is queued (so the next
   * bytes are that payload's). Undefined otherwise. Bytes read into it are
   * then given to push() as a view of it, and are not copied again.
   */
  readTarget(): Buffer | undefined {
    const pending = this.pending;
    if (this.stopped || pending?.sink === undefined || this.queue.length > 0) return undefined;
    return pending.sink.subarray(pending.filled ?? 0);
  }

  private isReadTarget(bytes: Buffer): boolean {
    const pending = this.pending;
    if (pending?.sink === undefined || this.queue.length > 0 || bytes.buffer !== pending.sink.buffer) return false;
    const filled = pending.filled ?? 0;
    return bytes.byteOffset === pending.sink.byteOffset + filled && bytes.length <= pending.sink.length - filled;
  }

  /** Ignores all further input (the connection is closing). */
  stop(): void {
    this.stopped = true;
  }

  private next(): NbdReply | undefined {
    if (this.pending === undefined) {
      const magic = this.queue.peekUInt32BE();
      if (magic === undefined) return undefined;
      if (magic === NBD_SIMPLE_REPLY_MAGIC) {
        const bytes = this.queue.take(NBD_SIMPLE_REPLY_SIZE);
        if (bytes === undefined) return undefined;
        this.pending = this.checkSimpleHeader(decodeSimpleReplyHeader(bytes));
      } else if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
        if (!this.structuredReplies) {
          throw new NbdProtocolError('unexpected-reply', 'structured reply received, but structured replies were not negotiated');
        }
        const bytes = this.queue.take(NBD_STRUCTURED_REPLY_SIZE);
        if (bytes === undefined) return undefined;
        this.pending = this.checkStructuredHeader(decodeStructuredReplyHeader(bytes));
      } else {
        const hint = magic === NBD_EXTENDED_REPLY_MAGIC ? ' (extended headers were not negotiated)' : '';
        throw new NbdProtocolError('bad-magic', `reply has unknown magic 0x${magic.toString(16).padStart(8, '0')}${hint}`);
      }
    }
    const payload = this.payload(this.pending);
    if (payload === undefined) return undefined;
    const pending = this.pending;
    this.pending = undefined;
    return pending.kind === 'simple' ? this.finishSimple(pending.header, pending.tracked, payload) : this.finishStructured(pending.header, pending.tracked, payload, pending.dataOffset);
  }

  /**
   * The pending reply's whole payload once it has arrived (for data going
   * into the caller's buffer: the data); a large one is gathered into its
   * sink meanwhile.
   */
  private payload(pending: PendingHeader): Buffer | undefined {
    if (pending.sink === undefined) {
      const sink = this.sinkFor(pending);
      if (sink === null) return undefined;
      if (sink === undefined) return this.queue.take(pending.payloadLength);
      pending.sink = sink;
      pending.filled = 0;
    }
    const filled = pending.filled ?? 0;
    pending.filled = filled + this.queue.moveInto(pending.sink, filled, pending.sink.length - filled);
    return pending.filled === pending.sink.length ? pending.sink : undefined;
  }

  /**
   * Where the pending payload is to be gathered: undefined to take it from
   * the queue as it is (it has arrived, or is small), null to wait for an
   * OFFSET_DATA chunk's offset prefix.
   */
  private sinkFor(pending: PendingHeader): Buffer | null | undefined {
    const length = pending.payloadLength;
    const { request } = pending.tracked;
    const into = request.into;
    if (into !== undefined && length > 0) {
      if (pending.kind === 'simple') return into.subarray(0, length);
      if (pending.header.type === NBD_REPLY_TYPE_OFFSET_DATA) {
        const prefix = this.queue.length >= 8 ? this.queue.take(8) : undefined;
        if (prefix === undefined) return null;
        const offset = readU64(prefix, 0, 'data chunk offset');
        // Checked before a byte lands in the caller's buffer (addContent checks overlaps when it is complete).
        if (offset < request.offset || offset + length - 8 > request.offset + request.length) {
          throw new NbdProtocolError('out-of-range', `data chunk [${offset}, ${offset + length - 8}) lies outside the read [${request.offset}, ${request.offset + request.length})`);
        }
        pending.dataOffset = offset;
        return into.subarray(offset - request.offset, offset - request.offset + length - 8);
      }
    }
    if (this.queue.length >= length || length < SINK_MIN_BYTES) return undefined;
    // The header was checked, so length is bounded by the request and maxPayloadBytes.
    return Buffer.allocUnsafe(length);
  }

  private lookup(cookie: bigint, what: string): Tracked {
    const tracked = this.inFlight.get(cookie);
    if (tracked === undefined) {
      throw new NbdProtocolError('unknown-cookie', `${what} for cookie ${cookie}, which is not in flight`, undefined, { cookie: cookie.toString() });
    }
    return tracked;
  }

  private checkSimpleHeader(header: NbdSimpleReplyHeader): PendingHeader {
    const tracked = this.lookup(header.cookie, 'simple reply');
    const { command, length } = tracked.request;
    if (command === NBD_CMD_READ && this.structuredReplies) {
      throw new NbdProtocolError('unexpected-reply', 'simple reply to NBD_CMD_READ although structured replies were negotiated');
    }
    if (command === NBD_CMD_BLOCK_STATUS && header.error === 0) {
      throw new NbdProtocolError('unexpected-reply', 'simple success reply to NBD_CMD_BLOCK_STATUS, which needs a structured reply');
    }
    // Without structured replies a successful read is followed by exactly the requested bytes.
    const payloadLength = command === NBD_CMD_READ && header.error === 0 ? length : 0;
    return { kind: 'simple', header, tracked, payloadLength };
  }

  private finishSimple(header: NbdSimpleReplyHeader, tracked: Tracked, payload: Buffer): NbdReply {
    this.inFlight.delete(header.cookie);
    const { request } = tracked;
    let chunk: NbdReplyChunk;
    if (header.error !== 0) {
      chunk = { type: 'error', replyType: undefined, error: header.error, message: '', offset: undefined };
    } else if (request.command === NBD_CMD_READ && request.length > 0) {
      chunk = { type: 'data', offset: request.offset, data: payload };
    } else {
      chunk = { type: 'none' };
    }
    return { cookie: header.cookie, request, final: true, chunk };
  }

  private checkStructuredHeader(header: NbdStructuredReplyHeader): PendingHeader {
    const tracked = this.lookup(header.cookie, `${nbdReplyTypeName(header.type)} chunk`);
    const { command, flags, length: requestLength } = tracked.request;
    const { type, length } = header;
    const typeName = nbdReplyTypeName(type);
    const cmdName = nbdCommandName(command);
    if (length > this.maxPayloadBytes + CHUNK_OVERHEAD_BYTES) {
      throw new NbdProtocolError('bad-length', `${typeName} chunk has length ${length}, more than ${this.maxPayloadBytes} + ${CHUNK_OVERHEAD_BYTES}`);
    }
    const badLength = (expected: string): NbdProtocolError =>
      new NbdProtocolError('bad-length', `${typeName} chunk for ${cmdName} has length ${length}, ${expected}`);
    const wrongCommand = (): NbdProtocolError => new NbdProtocolError('unexpected-reply', `${typeName} chunk in reply to ${cmdName}`);

    if (isNbdReplyTypeError(type)) {
      const minimum = type === NBD_REPLY_TYPE_ERROR_OFFSET ? 14 : 6;
      if (length < minimum || length > MAX_ERROR_CHUNK_BYTES) throw badLength(`not from ${minimum} to ${MAX_ERROR_CHUNK_BYTES}`);
    } else {
      switch (type) {
        case NBD_REPLY_TYPE_NONE:
          if (length !== 0) throw badLength('expected 0');
          if ((header.flags & NBD_REPLY_FLAG_DONE) === 0) {
            throw new NbdProtocolError('invalid-field', 'NBD_REPLY_TYPE_NONE chunk without NBD_REPLY_FLAG_DONE');
          }
          break;
        case NBD_REPLY_TYPE_OFFSET_DATA:
          if (command !== NBD_CMD_READ) throw wrongCommand();
          if (length < 9) throw badLength('less than 9');
          if (length - 8 > requestLength) {
            throw new NbdProtocolError('out-of-range', `${typeName} chunk carries ${length - 8} bytes for a read of ${requestLength}`);
          }
          break;
        case NBD_REPLY_TYPE_OFFSET_HOLE:
          if (command !== NBD_CMD_READ) throw wrongCommand();
          if (length !== 12) throw badLength('expected 12');
          break;
        case NBD_REPLY_TYPE_BLOCK_STATUS: {
          if (command !== NBD_CMD_BLOCK_STATUS) throw wrongCommand();
          if (length < 12 || (length - 4) % 8 !== 0) throw badLength('not 4 + a positive multiple of 8');
          const count = (length - 4) / 8;
          if (count > this.maxDescriptors) throw badLength(`${count} descriptors, more than ${this.maxDescriptors}`);
          if ((flags & NBD_CMD_FLAG_REQ_ONE) !== 0 && count !== 1) {
            throw new NbdProtocolError('invalid-field', `${count} block status descriptors in reply to a request with NBD_CMD_FLAG_REQ_ONE`);
          }
          break;
        }
        default:
          throw new NbdProtocolError('unexpected-reply', `unknown reply chunk type ${type} in reply to ${cmdName}`);
      }
    }
    return { kind: 'structured', header, tracked, payloadLength: length };
  }

  private finishStructured(header: NbdStructuredReplyHeader, tracked: Tracked, payload: Buffer, dataOffset: number | undefined): NbdReply {
    const { request } = tracked;
    const requestEnd = request.offset + request.length;
    let chunk: NbdReplyChunk;
    if (isNbdReplyTypeError(header.type)) {
      const decoded = decodeErrorChunk(header.type, payload);
      if (decoded.offset !== undefined && request.length > 0 && (decoded.offset < request.offset || decoded.offset >= requestEnd)) {
        throw new NbdProtocolError('out-of-range', `error offset ${decoded.offset} lies outside the request [${request.offset}, ${requestEnd})`);
      }
      tracked.sawError = true;
      chunk = { type: 'error', replyType: header.type, ...decoded };
    } else if (header.type === NBD_REPLY_TYPE_OFFSET_DATA) {
      // Data gathered into the caller's buffer arrives without its offset prefix, already read.
      const { offset, data } = dataOffset !== undefined ? { offset: dataOffset, data: payload } : decodeOffsetData(payload);
      this.addContent(tracked, offset, data.length, 'data');
      chunk = { type: 'data', offset, data };
    } else if (header.type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      const { offset, length } = decodeOffsetHole(payload);
      this.addContent(tracked, offset, length, 'hole');
      chunk = { type: 'hole', offset, length };
    } else if (header.type === NBD_REPLY_TYPE_BLOCK_STATUS) {
      const status = decodeBlockStatus(payload);
      this.checkBlockStatus(tracked, status.contextId, status.descriptors);
      chunk = { type: 'block-status', contextId: status.contextId, descriptors: status.descriptors };
    } else {
      assert(header.type === NBD_REPLY_TYPE_NONE, 'only NBD_REPLY_TYPE_NONE is left after the checks in checkStructuredHeader');
      chunk = { type: 'none' };
    }

    const final = (header.flags & NBD_REPLY_FLAG_DONE) !== 0;
    if (final) {
      if (!tracked.sawError && request.command === NBD_CMD_READ && tracked.content.covered !== request.length) {
        throw new NbdProtocolError(
          'incomplete-reply',
          `read of ${request.length} bytes at offset ${request.offset} completed with only ${tracked.content.covered} bytes described`,
        );
      }
      if (!tracked.sawError && request.command === NBD_CMD_BLOCK_STATUS && tracked.contexts.size !== this.contextIds.size) {
        throw new NbdProtocolError(
          'incomplete-reply',
          `block status completed with ${tracked.contexts.size} of the ${this.contextIds.size} negotiated contexts`,
        );
      }
      this.inFlight.delete(header.cookie);
    }
    return { cookie: header.cookie, request, final, chunk };
  }

  private addContent(tracked: Tracked, offset: number, length: number, what: 'data' | 'hole'): void {
    const { request } = tracked;
    const end = offset + length;
    if (offset < request.offset || end > request.offset + request.length) {
      throw new NbdProtocolError(
        'out-of-range',
        `${what} chunk [${offset}, ${end}) lies outside the read [${request.offset}, ${request.offset + request.length})`,
      );
    }
    if (!tracked.content.add(offset, end)) {
      throw new NbdProtocolError('overlap', `${what} chunk [${offset}, ${end}) overlaps an earlier chunk of the same read`);
    }
  }

  private checkBlockStatus(tracked: Tracked, contextId: number, descriptors: readonly NbdBlockDescriptor[]): void {
    const { request } = tracked;
    if (!this.contextIds.has(contextId)) {
      throw new NbdProtocolError('bad-context', `block status for context id ${contextId}, which was not negotiated`);
    }
    if (tracked.contexts.has(contextId)) {
      throw new NbdProtocolError('bad-context', `second block status chunk for context id ${contextId} in one reply`);
    }
    tracked.contexts.add(contextId);
    const requestEnd = request.offset + request.length;
    let pos = request.offset;
    for (const [index, descriptor] of descriptors.entries()) {
      if (pos >= requestEnd) {
        throw new NbdProtocolError('out-of-range', `block status descriptor ${index} starts at ${pos}, past the request [${request.offset}, ${requestEnd})`);
      }
      pos += descriptor.length;
      if (pos > this.exportSize) {
        throw new NbdProtocolError('out-of-range', `block status descriptor ${index} ends at ${pos}, past the end of the export (${this.exportSize})`);
      }
      if ((request.flags & NBD_CMD_FLAG_REQ_ONE) !== 0 && descriptor.length > request.length) {
        throw new NbdProtocolError('out-of-range', `block status descriptor of ${descriptor.length} bytes exceeds the NBD_CMD_FLAG_REQ_ONE request of ${request.length}`);
      }
    }
  }
}
