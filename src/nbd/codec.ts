// Pure encoding and decoding of NBD messages: options and requests we send,
// option replies, reply headers and chunk payloads the server sends. No I/O
// and no state, so every byte layout can be tested in isolation.
//
// Invariants:
// - Encoders validate their arguments and never emit a field that
//   overflows. A value a user can get wrong (a name, an offset) is
//   INVALID_ARGUMENT (as are the field limits this layer's tests pin down);
//   a string argument of the wrong type is a bug and fails an assertion.
// - Decoders take exactly the bytes of one message part (the caller framed
//   it) and check every length, reserved value and string against the spec;
//   any violation is an NbdProtocolError. Offsets from the peer are returned
//   as numbers only when they are exact (at most 2^53 - 1).

import { QbackupError } from '../errors.js';
import { assert } from '../util/assert.js';
import {
  NBD_CMD_DISC,
  NBD_FLAG_HAS_FLAGS,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAGIC,
  NBD_MAX_PAYLOAD_UNLIMITED,
  NBD_MAX_STRING,
  NBD_NEW_VERSION,
  NBD_OLD_VERSION,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPTION_HEADER_SIZE,
  NBD_OPTION_REPLY_HEADER_SIZE,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REP_MAGIC,
  NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_SIMPLE_REPLY_SIZE,
  NBD_STRUCTURED_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_SIZE,
} from './constants.js';
import { NbdProtocolError } from './errors.js';

const U32_MAX = 0xffffffff;
const U16_MAX = 0xffff;
const U64_MAX = (1n << 64n) - 1n;
const strictUtf8 = new TextDecoder('utf-8', { fatal: true });
const lenientUtf8 = new TextDecoder('utf-8', { fatal: false });

// ---------------------------------------------------------------------------
// Types

export type NbdServerHello = 'newstyle' | 'oldstyle';

export interface NbdOptionReplyHeader {
  option: number;
  /** NBD_REP_* */
  reply: number;
  length: number;
}

export interface NbdBlockSizes {
  /** Smallest addressable unit; offsets and lengths are multiples of it. */
  minimum: number;
  /** Size at which requests avoid read-modify-write. */
  preferred: number;
  /** Largest payload the server accepts in one request; 0xffffffff means no fixed limit. */
  maximum: number;
}

export type NbdInfo =
  | { info: typeof NBD_INFO_EXPORT; size: number; transmissionFlags: number }
  | { info: typeof NBD_INFO_NAME; name: string }
  | { info: typeof NBD_INFO_DESCRIPTION; description: string }
  | ({ info: typeof NBD_INFO_BLOCK_SIZE } & NbdBlockSizes)
  | { info: 'unknown'; type: number };

export interface NbdMetaContextReply {
  contextId: number;
  name: string;
}

export interface NbdExportNameReply {
  size: number;
  transmissionFlags: number;
}

export interface NbdRequestHeader {
  /** NBD_CMD_FLAG_* */
  flags: number;
  /** NBD_CMD_* */
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
}

export interface NbdSimpleReplyHeader {
  error: number;
  cookie: bigint;
}

export interface NbdStructuredReplyHeader {
  /** NBD_REPLY_FLAG_* */
  flags: number;
  /** NBD_REPLY_TYPE_* */
  type: number;
  cookie: bigint;
  length: number;
}

export interface NbdBlockDescriptor {
  length: number;
  flags: number;
}

export interface NbdBlockStatusPayload {
  contextId: number;
  descriptors: NbdBlockDescriptor[];
}

export interface NbdErrorPayload {
  error: number;
  message: string;
  /** Present for NBD_REPLY_TYPE_ERROR_OFFSET. */
  offset: number | undefined;
}

// ---------------------------------------------------------------------------
// Encoding

/** UTF-8 bytes of a protocol string, checked against the spec's limits. */
export function encodeNbdString(value: string, what: string): Buffer {
  assert(typeof value === 'string', `${what} must be a string`);
  if (value.includes('\0')) throw new QbackupError('INVALID_ARGUMENT', `${what} "${value}" must not contain NUL characters`);
  const bytes = Buffer.from(value, 'utf8');
  // Lone surrogates would silently turn into U+FFFD on the wire.
  if (bytes.toString('utf8') !== value) throw new QbackupError('INVALID_ARGUMENT', `${what} must be well-formed Unicode`);
  if (bytes.length > NBD_MAX_STRING) {
    throw new QbackupError('INVALID_ARGUMENT', `${what} is ${bytes.length} bytes long; NBD allows at most ${NBD_MAX_STRING}`);
  }
  return bytes;
}

export function encodeClientFlags(flags: number): Buffer {
  checkUint(flags, U32_MAX, 'client flags');
  const out = Buffer.alloc(4);
  out.writeUInt32BE(flags, 0);
  return out;
}

/** One option: IHAVEOPT, option number, data length, data. */
export function encodeOption(option: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  checkUint(option, U32_MAX, 'option');
  checkUint(data.length, U32_MAX, 'option data length');
  const out = Buffer.alloc(NBD_OPTION_HEADER_SIZE + data.length);
  out.writeBigUInt64BE(NBD_NEW_VERSION, 0);
  out.writeUInt32BE(option, 8);
  out.writeUInt32BE(data.length, 12);
  out.set(data, NBD_OPTION_HEADER_SIZE);
  return out;
}

export function encodeStructuredReplyOption(): Buffer {
  return encodeOption(NBD_OPT_STRUCTURED_REPLY);
}

export function encodeAbortOption(): Buffer {
  return encodeOption(NBD_OPT_ABORT);
}

/** NBD_OPT_EXPORT_NAME (the fallback for servers without NBD_OPT_GO). */
export function encodeExportNameOption(exportName: string): Buffer {
  return encodeOption(NBD_OPT_EXPORT_NAME, encodeNbdString(exportName, 'export name'));
}

/** NBD_OPT_GO or NBD_OPT_INFO: name length, name, number of info requests, the requests. */
export function encodeGoOption(exportName: string, infoRequests: readonly number[], option: typeof NBD_OPT_GO | typeof NBD_OPT_INFO = NBD_OPT_GO): Buffer {
  const name = encodeNbdString(exportName, 'export name');
  if (new Set(infoRequests).size !== infoRequests.length) {
    throw new QbackupError('INVALID_ARGUMENT', 'NBD info requests must not repeat');
  }
  checkUint(infoRequests.length, U16_MAX, 'number of info requests');
  const data = Buffer.alloc(4 + name.length + 2 + 2 * infoRequests.length);
  data.writeUInt32BE(name.length, 0);
  name.copy(data, 4);
  let pos = 4 + name.length;
  data.writeUInt16BE(infoRequests.length, pos);
  pos += 2;
  for (const info of infoRequests) {
    checkUint(info, U16_MAX, 'info request');
    data.writeUInt16BE(info, pos);
    pos += 2;
  }
  return encodeOption(option, data);
}

/** NBD_OPT_SET_META_CONTEXT or NBD_OPT_LIST_META_CONTEXT with exact queries. */
export function encodeMetaContextOption(
  exportName: string,
  queries: readonly string[],
  option: typeof NBD_OPT_SET_META_CONTEXT | typeof NBD_OPT_LIST_META_CONTEXT = NBD_OPT_SET_META_CONTEXT,
): Buffer {
  const name = encodeNbdString(exportName, 'export name');
  const encoded = queries.map((q) => {
    const bytes = encodeNbdString(q, 'metadata context');
    if (!/^[^:\s]+:/u.test(q)) {
      throw new QbackupError('INVALID_ARGUMENT', `metadata context "${q}" must start with a namespace and a colon`);
    }
    return bytes;
  });
  const data = Buffer.alloc(4 + name.length + 4 + encoded.reduce((n, q) => n + 4 + q.length, 0));
  data.writeUInt32BE(name.length, 0);
  name.copy(data, 4);
  let pos = 4 + name.length;
  data.writeUInt32BE(encoded.length, pos);
  pos += 4;
  for (const q of encoded) {
    data.writeUInt32BE(q.length, pos);
    q.copy(data, pos + 4);
    pos += 4 + q.length;
  }
  return encodeOption(option, data);
}

/** A request header; an NBD_CMD_WRITE is followed on the wire by its `length` data bytes. */
export function encodeRequest(request: NbdRequestHeader): Buffer {
  checkUint(request.flags, U16_MAX, 'command flags');
  checkUint(request.type, U16_MAX, 'command type');
  checkUint(request.offset, Number.MAX_SAFE_INTEGER, 'request offset');
  checkUint(request.length, U32_MAX, 'request length');
  if (typeof request.cookie !== 'bigint' || request.cookie < 0n || request.cookie > U64_MAX) {
    throw new QbackupError('INVALID_ARGUMENT', `request cookie must be an unsigned 64-bit bigint, got ${String(request.cookie)}`);
  }
  if (request.type === NBD_CMD_DISC && (request.offset !== 0 || request.length !== 0)) {
    throw new QbackupError('INVALID_ARGUMENT', 'NBD_CMD_DISC must have offset and length 0');
  }
  const out = Buffer.alloc(NBD_REQUEST_SIZE);
  out.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  out.writeUInt16BE(request.flags, 4);
  out.writeUInt16BE(request.type, 6);
  out.writeBigUInt64BE(request.cookie, 8);
  out.writeBigUInt64BE(BigInt(request.offset), 16);
  out.writeUInt32BE(request.length, 24);
  return out;
}

// ---------------------------------------------------------------------------
// Decoding: handshake

/** The first 16 bytes from the server: NBDMAGIC, then IHAVEOPT (newstyle) or cliserv_magic (oldstyle). */
export function decodeServerHello(bytes: Buffer): NbdServerHello {
  expectLength(bytes, 16, 'server greeting');
  const magic = bytes.readBigUInt64BE(0);
  if (magic !== NBD_MAGIC) {
    throw new NbdProtocolError('bad-magic', `server greeting starts with 0x${magic.toString(16)}, not NBDMAGIC; this is not an NBD server`);
  }
  const version = bytes.readBigUInt64BE(8);
  if (version === NBD_NEW_VERSION) return 'newstyle';
  if (version === NBD_OLD_VERSION) return 'oldstyle';
  throw new NbdProtocolError('bad-magic', `server greeting has unknown second magic 0x${version.toString(16)}`);
}

export function decodeOptionReplyHeader(bytes: Buffer): NbdOptionReplyHeader {
  expectLength(bytes, NBD_OPTION_REPLY_HEADER_SIZE, 'option reply header');
  const magic = bytes.readBigUInt64BE(0);
  if (magic !== NBD_REP_MAGIC) {
    throw new NbdProtocolError('bad-magic', `option reply has magic 0x${magic.toString(16)}, expected 0x${NBD_REP_MAGIC.toString(16)}`);
  }
  return { option: bytes.readUInt32BE(8), reply: bytes.readUInt32BE(12), length: bytes.readUInt32BE(16) };
}

/** Payload of NBD_REP_INFO. Unknown info types are returned, not rejected (the client must ignore them). */
export function decodeInfoReply(payload: Buffer): NbdInfo {
  if (payload.length < 2) throw new NbdProtocolError('bad-length', `NBD_REP_INFO has ${payload.length} bytes, less than its 2-byte type`);
  const type = payload.readUInt16BE(0);
  switch (type) {
    case NBD_INFO_EXPORT: {
      expectLength(payload, 12, 'NBD_INFO_EXPORT');
      const size = readU64(payload, 2, 'export size');
      const transmissionFlags = payload.readUInt16BE(10);
      if ((transmissionFlags & NBD_FLAG_HAS_FLAGS) === 0) {
        throw new NbdProtocolError('invalid-field', `transmission flags 0x${transmissionFlags.toString(16)} lack NBD_FLAG_HAS_FLAGS`);
      }
      return { info: NBD_INFO_EXPORT, size, transmissionFlags };
    }
    case NBD_INFO_NAME:
      return { info: NBD_INFO_NAME, name: decodeStrictString(payload.subarray(2), 'NBD_INFO_NAME') };
    case NBD_INFO_DESCRIPTION:
      return { info: NBD_INFO_DESCRIPTION, description: decodeStrictString(payload.subarray(2), 'NBD_INFO_DESCRIPTION') };
    case NBD_INFO_BLOCK_SIZE: {
      expectLength(payload, 14, 'NBD_INFO_BLOCK_SIZE');
      const sizes: NbdBlockSizes = {
        minimum: payload.readUInt32BE(2),
        preferred: payload.readUInt32BE(6),
        maximum: payload.readUInt32BE(10),
      };
      checkBlockSizes(sizes);
      return { info: NBD_INFO_BLOCK_SIZE, ...sizes };
    }
    default:
      return { info: 'unknown', type };
  }
}

/** The spec's constraints on advertised block sizes ("Size constraints"). */
export function checkBlockSizes(sizes: NbdBlockSizes): void {
  const { minimum, preferred, maximum } = sizes;
  if (!isPowerOfTwo(minimum) || minimum > 65536) {
    throw new NbdProtocolError('invalid-field', `minimum block size ${minimum} is not a power of 2 up to 65536`);
  }
  if (!isPowerOfTwo(preferred) || preferred < Math.max(minimum, 512)) {
    throw new NbdProtocolError('invalid-field', `preferred block size ${preferred} is not a power of 2 of at least max(minimum ${minimum}, 512)`);
  }
  if (maximum < preferred) {
    throw new NbdProtocolError('invalid-field', `maximum payload size ${maximum} is smaller than the preferred block size ${preferred}`);
  }
  if (maximum !== NBD_MAX_PAYLOAD_UNLIMITED && maximum % minimum !== 0) {
    throw new NbdProtocolError('invalid-field', `maximum payload size ${maximum} is not a multiple of the minimum block size ${minimum}`);
  }
}

export function decodeMetaContextReply(payload: Buffer): NbdMetaContextReply {
  if (payload.length < 5) {
    throw new NbdProtocolError('bad-length', `NBD_REP_META_CONTEXT has ${payload.length} bytes; it needs a context id and a name`);
  }
  return { contextId: payload.readUInt32BE(0), name: decodeStrictString(payload.subarray(4), 'metadata context name') };
}

/** Reply to NBD_OPT_EXPORT_NAME: size and transmission flags (any 124 zero bytes are framed by the caller). */
export function decodeExportNameReply(bytes: Buffer): NbdExportNameReply {
  expectLength(bytes, 10, 'NBD_OPT_EXPORT_NAME reply');
  const size = readU64(bytes, 0, 'export size');
  const transmissionFlags = bytes.readUInt16BE(8);
  if ((transmissionFlags & NBD_FLAG_HAS_FLAGS) === 0) {
    throw new NbdProtocolError('invalid-field', `transmission flags 0x${transmissionFlags.toString(16)} lack NBD_FLAG_HAS_FLAGS`);
  }
  return { size, transmissionFlags };
}

/** The optional message of an option error reply; invalid UTF-8 is shown with replacement characters. */
export function decodeOptionErrorMessage(payload: Buffer): string {
  return printable(lenientUtf8.decode(payload));
}

// ---------------------------------------------------------------------------
// Decoding: transmission

/** The first 4 bytes of every reply. */
export function readReplyMagic(bytes: Buffer): number {
  if (bytes.length < 4) throw new NbdProtocolError('bad-length', 'reply is shorter than its magic');
  return bytes.readUInt32BE(0);
}

export function decodeSimpleReplyHeader(bytes: Buffer): NbdSimpleReplyHeader {
  expectLength(bytes, NBD_SIMPLE_REPLY_SIZE, 'simple reply header');
  const magic = bytes.readUInt32BE(0);
  if (magic !== NBD_SIMPLE_REPLY_MAGIC) throw new NbdProtocolError('bad-magic', `simple reply has magic 0x${magic.toString(16)}`);
  return { error: bytes.readUInt32BE(4), cookie: bytes.readBigUInt64BE(8) };
}

export function decodeStructuredReplyHeader(bytes: Buffer): NbdStructuredReplyHeader {
  expectLength(bytes, NBD_STRUCTURED_REPLY_SIZE, 'structured reply header');
  const magic = bytes.readUInt32BE(0);
  if (magic !== NBD_STRUCTURED_REPLY_MAGIC) throw new NbdProtocolError('bad-magic', `structured reply has magic 0x${magic.toString(16)}`);
  return {
    flags: bytes.readUInt16BE(4),
    type: bytes.readUInt16BE(6),
    cookie: bytes.readBigUInt64BE(8),
    length: bytes.readUInt32BE(16),
  };
}

/** NBD_REPLY_TYPE_OFFSET_DATA: the data is a view into `payload`, not a copy. */
export function decodeOffsetData(payload: Buffer): { offset: number; data: Buffer } {
  if (payload.length < 9) throw new NbdProtocolError('bad-length', `NBD_REPLY_TYPE_OFFSET_DATA has length ${payload.length}, less than 9`);
  return { offset: readU64(payload, 0, 'data chunk offset'), data: payload.subarray(8) };
}

export function decodeOffsetHole(payload: Buffer): { offset: number; length: number } {
  expectLength(payload, 12, 'NBD_REPLY_TYPE_OFFSET_HOLE');
  const length = payload.readUInt32BE(8);
  if (length === 0) throw new NbdProtocolError('invalid-field', 'NBD_REPLY_TYPE_OFFSET_HOLE has hole size 0');
  return { offset: readU64(payload, 0, 'hole chunk offset'), length };
}

export function decodeBlockStatus(payload: Buffer): NbdBlockStatusPayload {
  if (payload.length < 12 || (payload.length - 4) % 8 !== 0) {
    throw new NbdProtocolError('bad-length', `NBD_REPLY_TYPE_BLOCK_STATUS has length ${payload.length}, not 4 + a positive multiple of 8`);
  }
  const contextId = payload.readUInt32BE(0);
  const descriptors: NbdBlockDescriptor[] = [];
  for (let pos = 4; pos < payload.length; pos += 8) {
    const length = payload.readUInt32BE(pos);
    if (length === 0) {
      throw new NbdProtocolError('invalid-field', `block status descriptor ${descriptors.length} has length 0`);
    }
    descriptors.push({ length, flags: payload.readUInt32BE(pos + 4) });
  }
  return { contextId, descriptors };
}

/**
 * Any error chunk (bit 15 of the type set): error, message length, message,
 * then for NBD_REPLY_TYPE_ERROR_OFFSET a 64-bit offset. Unknown error types
 * share the first three fields; what follows is not interpreted.
 */
export function decodeErrorChunk(type: number, payload: Buffer): NbdErrorPayload {
  const fixed = type === NBD_REPLY_TYPE_ERROR_OFFSET ? 14 : 6;
  if (payload.length < fixed) {
    throw new NbdProtocolError('bad-length', `error chunk of type 0x${type.toString(16)} has length ${payload.length}, less than ${fixed}`);
  }
  const error = payload.readUInt32BE(0);
  if (error === 0) throw new NbdProtocolError('invalid-field', 'error chunk carries error value 0');
  const messageLength = payload.readUInt16BE(4);
  if (messageLength > payload.length - fixed) {
    throw new NbdProtocolError(
      'bad-length',
      `error chunk message length ${messageLength} exceeds the ${payload.length - fixed} bytes its chunk leaves for it`,
    );
  }
  if (messageLength > NBD_MAX_STRING) {
    throw new NbdProtocolError('bad-length', `error chunk message length ${messageLength} exceeds ${NBD_MAX_STRING}`);
  }
  const message = printable(lenientUtf8.decode(payload.subarray(6, 6 + messageLength)));
  if (type !== NBD_REPLY_TYPE_ERROR_OFFSET) return { error, message, offset: undefined };
  if (payload.length !== fixed + messageLength) {
    throw new NbdProtocolError('bad-length', `NBD_REPLY_TYPE_ERROR_OFFSET has length ${payload.length}, expected ${fixed + messageLength}`);
  }
  return { error, message, offset: readU64(payload, 6 + messageLength, 'error offset') };
}

// ---------------------------------------------------------------------------
// Helpers

/** A 64-bit field that must be exact as a JavaScript number. */
export function readU64(bytes: Buffer, pos: number, what: string): number {
  const value = bytes.readBigUInt64BE(pos);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new NbdProtocolError('out-of-range', `${what} ${value} exceeds 2^53 - 1`);
  }
  return Number(value);
}

function decodeStrictString(bytes: Buffer, what: string): string {
  if (bytes.length > NBD_MAX_STRING) throw new NbdProtocolError('bad-length', `${what} is ${bytes.length} bytes, more than ${NBD_MAX_STRING}`);
  let text: string;
  try {
    text = strictUtf8.decode(bytes);
  } catch {
    throw new NbdProtocolError('invalid-field', `${what} is not valid UTF-8`);
  }
  if (text.includes('\0')) throw new NbdProtocolError('invalid-field', `${what} contains a NUL character`);
  return text;
}

/** Server text goes into our messages; control characters would let a peer forge lines in logs. */
function printable(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f]/gu, ' ').trim();
}

function expectLength(bytes: Buffer, expected: number, what: string): void {
  if (bytes.length !== expected) throw new NbdProtocolError('bad-length', `${what} has ${bytes.length} bytes, expected ${expected}`);
}

function checkUint(value: number, max: number, what: string): void {
  if (!Number.isSafeInteger(value) || value < 0 || value > max) {
    throw new QbackupError('INVALID_ARGUMENT', `${what} must be an integer from 0 to ${max}, got ${String(value)}`);
  }
}

export function isPowerOfTwo(value: number): boolean {
  return Number.isSafeInteger(value) && value > 0 && (value & (value - 1)) === 0 && value <= 2 ** 30;
}
