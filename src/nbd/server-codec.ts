// Pure encoding and decoding for the server side of NBD: the greeting, option
// data the client sends (NBD_OPT_GO/INFO, the meta context options), option
// replies, request headers, and simple and structured replies. No I/O and no
// state; the session (server-session.ts) frames the bytes.
//
// Invariants:
// - Decoders take exactly one option's data (already capped in length by the
//   session) and check every inner length against what is left, so a
//   hostile length never makes us read past the data or allocate for it.
//   A violation is an NbdOptionError carrying the NBD_REP_ERR_* to answer.
// - Encoders build replies from values the server chose; a value out of
//   range is a bug (assert).

import { assert } from '../util/assert.js';
import {
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAGIC,
  NBD_MAX_STRING,
  NBD_NEW_VERSION,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_MAGIC,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
} from './constants.js';
import type { NbdBlockDescriptor, NbdBlockSizes } from './codec.js';

const strictUtf8 = new TextDecoder('utf-8', { fatal: true });

/** Most metadata context queries accepted in one option. */
export const MAX_META_QUERIES = 128;
/** Most info requests accepted in one NBD_OPT_GO/INFO. */
export const MAX_INFO_REQUESTS = 64;

/** An option the client got wrong: the session answers it with `reply` and goes on. */
export class NbdOptionError extends Error {
  constructor(
    readonly reply: number,
    message: string,
  ) {
    super(message);
    this.name = 'NbdOptionError';
  }
}

export interface GoOptionData {
  exportName: string;
  infoRequests: number[];
}

export interface MetaContextOptionData {
  exportName: string;
  queries: string[];
}

/** A request header as received; the offset stays a bigint until checked against the export. */
export interface ReceivedRequest {
  flags: number;
  type: number;
  cookie: bigint;
  offset: bigint;
  length: number;
}

// ---------------------------------------------------------------------------
// Handshake

/** NBDMAGIC, IHAVEOPT, and the handshake flags (fixed newstyle, no zeroes). */
export function encodeServerGreeting(): Buffer {
  const out = Buffer.alloc(18);
  out.writeBigUInt64BE(NBD_MAGIC, 0);
  out.writeBigUInt64BE(NBD_NEW_VERSION, 8);
  out.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
  return out;
}

/** One option reply: magic, the option it answers, reply type, payload. */
export function encodeOptionReply(option: number, reply: number, payload: Uint8Array = Buffer.alloc(0)): Buffer {
  const out = Buffer.alloc(20 + payload.length);
  out.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  out.writeUInt32BE(option >>> 0, 8);
  out.writeUInt32BE(reply >>> 0, 12);
  out.writeUInt32BE(payload.length, 16);
  out.set(payload, 20);
  return out;
}

/** An error reply with a human-readable message (capped, as the spec asks). */
export function encodeOptionError(option: number, reply: number, message: string): Buffer {
  return encodeOptionReply(option, reply, Buffer.from(message, 'utf8').subarray(0, NBD_MAX_STRING));
}

/** NBD_REP_SERVER payload: name length, name, then the description. */
export function encodeServerEntry(name: string, description: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8').subarray(0, NBD_MAX_STRING);
  const out = Buffer.alloc(4 + n.length + d.length);
  out.writeUInt32BE(n.length, 0);
  n.copy(out, 4);
  d.copy(out, 4 + n.length);
  return out;
}

export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const out = Buffer.alloc(12);
  out.writeUInt16BE(NBD_INFO_EXPORT, 0);
  out.writeBigUInt64BE(BigInt(size), 2);
  out.writeUInt16BE(transmissionFlags, 10);
  return out;
}

export function encodeInfoString(type: typeof NBD_INFO_NAME | typeof NBD_INFO_DESCRIPTION, text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8').subarray(0, NBD_MAX_STRING);
  const out = Buffer.alloc(2 + bytes.length);
  out.writeUInt16BE(type, 0);
  bytes.copy(out, 2);
  return out;
}

export function encodeInfoBlockSize(sizes: NbdBlockSizes): Buffer {
  const out = Buffer.alloc(14);
  out.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  out.writeUInt32BE(sizes.minimum, 2);
  out.writeUInt32BE(sizes.preferred, 6);
  out.writeUInt32BE(sizes.maximum, 10);
  return out;
}

export function encodeMetaContextEntry(contextId: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const out = Buffer.alloc(4 + n.length);
  out.writeUInt32BE(contextId, 0);
  n.copy(out, 4);
  return out;
}

/** Reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zero bytes unless NO_ZEROES was agreed. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const out = Buffer.alloc(noZeroes ? 10 : 134);
  out.writeBigUInt64BE(BigInt(size), 0);
  out.writeUInt16BE(transmissionFlags, 8);
  return out;
}

/** A protocol string from the client: at most 4096 bytes of valid UTF-8 without NUL. */
export function decodeClientString(bytes: Buffer, what: string): string {
  if (bytes.length > NBD_MAX_STRING) throw new NbdOptionError(NBD_REP_ERR_TOO_BIG, `${what} is ${bytes.length} bytes long, more than ${NBD_MAX_STRING}`);
  let text: string;
  try {
    text = strictUtf8.decode(bytes);
  } catch {
    throw new NbdOptionError(NBD_REP_ERR_INVALID, `${what} is not valid UTF-8`);
  }
  if (text.includes('\0')) throw new NbdOptionError(NBD_REP_ERR_INVALID, `${what} contains a NUL character`);
  return text;
}

/** A cursor over one option's data that refuses to read past it. */
class OptionReader {
  private pos = 0;
  constructor(
    private readonly data: Buffer,
    private readonly what: string,
  ) {}

  private need(n: number, field: string): void {
    if (this.data.length - this.pos < n) {
      throw new NbdOptionError(NBD_REP_ERR_INVALID, `${this.what} is too short for its ${field} (${this.data.length} bytes)`);
    }
  }

  u16(field: string): number {
    this.need(2, field);
    const v = this.data.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }

  u32(field: string): number {
    this.need(4, field);
    const v = this.data.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }

  /** A u32 length, then that many bytes as a string. */
  string(field: string): string {
    const length = this.u32(`${field} length`);
    if (length > NBD_MAX_STRING) throw new NbdOptionError(NBD_REP_ERR_TOO_BIG, `${this.what} has a ${field} of ${length} bytes, more than ${NBD_MAX_STRING}`);
    this.need(length, field);
    const text = decodeClientString(this.data.subarray(this.pos, this.pos + length), `${this.what} ${field}`);
    this.pos += length;
    return text;
  }

  end(): void {
    if (this.pos !== this.data.length) {
      throw new NbdOptionError(NBD_REP_ERR_INVALID, `${this.what} has ${this.data.length - this.pos} bytes after its last field`);
    }
  }
}

/** Data of NBD_OPT_GO or NBD_OPT_INFO. */
export function decodeGoOption(data: Buffer, what: string): GoOptionData {
  const r = new OptionReader(data, what);
  const exportName = r.string('export name');
  const count = r.u16('number of info requests');
  if (count > MAX_INFO_REQUESTS) throw new NbdOptionError(NBD_REP_ERR_TOO_BIG, `${what} asks for ${count} infos, more than ${MAX_INFO_REQUESTS}`);
  const infoRequests: number[] = [];
  for (let i = 0; i < count; i++) infoRequests.push(r.u16('info request'));
  r.end();
  return { exportName, infoRequests };
}

/** Data of NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT. */
export function decodeMetaContextOption(data: Buffer, what: string): MetaContextOptionData {
  const r = new OptionReader(data, what);
  const exportName = r.string('export name');
  const count = r.u32('number of queries');
  if (count > MAX_META_QUERIES) throw new NbdOptionError(NBD_REP_ERR_TOO_BIG, `${what} has ${count} queries, more than ${MAX_META_QUERIES}`);
  const queries: string[] = [];
  for (let i = 0; i < count; i++) queries.push(r.string('query'));
  r.end();
  return { exportName, queries };
}

// ---------------------------------------------------------------------------
// Transmission

/** A request header; undefined when the magic is wrong (the stream cannot be trusted after that). */
export function decodeRequestHeader(bytes: Buffer): ReceivedRequest | undefined {
  assert(bytes.length === NBD_REQUEST_SIZE, 'a request header is 28 bytes');
  if (bytes.readUInt32BE(0) !== NBD_REQUEST_MAGIC) return undefined;
  return {
    flags: bytes.readUInt16BE(4),
    type: bytes.readUInt16BE(6),
    cookie: bytes.readBigUInt64BE(8),
    offset: bytes.readBigUInt64BE(16),
    length: bytes.readUInt32BE(24),
  };
}

export function encodeSimpleReply(cookie: bigint, error: number): Buffer {
  const out = Buffer.alloc(16);
  out.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  out.writeUInt32BE(error, 4);
  out.writeBigUInt64BE(cookie, 8);
  return out;
}

function chunkHeader(cookie: bigint, flags: number, type: number, length: number): Buffer {
  const out = Buffer.alloc(20);
  out.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  out.writeUInt16BE(flags, 4);
  out.writeUInt16BE(type, 6);
  out.writeBigUInt64BE(cookie, 8);
  out.writeUInt32BE(length, 16);
  return out;
}

/** NBD_REPLY_TYPE_OFFSET_DATA: header and offset; the data follows as its own buffer (no copy). */
export function encodeOffsetDataHeader(cookie: bigint, offset: number, dataLength: number, done: boolean): Buffer {
  const head = chunkHeader(cookie, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_DATA, 8 + dataLength);
  const off = Buffer.alloc(8);
  off.writeBigUInt64BE(BigInt(offset), 0);
  return Buffer.concat([head, off]);
}

export function encodeOffsetHole(cookie: bigint, offset: number, length: number, done: boolean): Buffer {
  const out = Buffer.concat([chunkHeader(cookie, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_HOLE, 12), Buffer.alloc(12)]);
  out.writeBigUInt64BE(BigInt(offset), 20);
  out.writeUInt32BE(length, 28);
  return out;
}

export function encodeBlockStatusChunk(cookie: bigint, contextId: number, descriptors: readonly NbdBlockDescriptor[], done: boolean): Buffer {
  const length = 4 + 8 * descriptors.length;
  const out = Buffer.concat([chunkHeader(cookie, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_BLOCK_STATUS, length), Buffer.alloc(length)]);
  out.writeUInt32BE(contextId, 20);
  let pos = 24;
  for (const d of descriptors) {
    out.writeUInt32BE(d.length, pos);
    out.writeUInt32BE(d.flags, pos + 4);
    pos += 8;
  }
  return out;
}

/** The final NBD_REPLY_TYPE_NONE chunk of a reply whose content went in earlier chunks. */
export function encodeNoneChunk(cookie: bigint): Buffer {
  return chunkHeader(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
}

/** NBD_REPLY_TYPE_ERROR with a message, ending the reply. */
export function encodeErrorChunk(cookie: bigint, error: number, message: string): Buffer {
  const text = Buffer.from(message, 'utf8').subarray(0, NBD_MAX_STRING);
  const out = Buffer.concat([chunkHeader(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6 + text.length), Buffer.alloc(6), text]);
  out.writeUInt32BE(error, 20);
  out.writeUInt16BE(text.length, 24);
  return out;
}
