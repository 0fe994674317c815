// XDR (RFC 4506) as libvirt's RPC uses it: a writer and a reader of the
// primitive types, and small composable codecs (struct, array, optional,
// union) from which every structure of remote_protocol.x used by qbackup is
// declared once (structs.ts) and both encoded and decoded.
//
// Invariants:
// - Bytes from the peer are hostile: every read checks that the bytes are
//   there, every variable length is checked against its declared maximum
//   before anything is allocated, padding must be zero, booleans are 0 or 1.
//   A violation throws LibvirtProtocolError('bad-xdr').
// - Values we encode are checked too (range of integers, string and array
//   limits), so a bad argument fails before anything is sent: an
//   INVALID_ARGUMENT for values a caller can get wrong.
// - 64-bit integers are bigint on both sides, so no value is rounded.

import { QbackupError } from '../../../errors.js';
import { LibvirtProtocolError } from './errors.js';

const UINT32_MAX = 0xffff_ffff;
const INT64_MIN = -(1n << 63n);
const INT64_MAX = (1n << 63n) - 1n;
const UINT64_MAX = (1n << 64n) - 1n;

function pad(length: number): number {
  return (4 - (length % 4)) % 4;
}

function badValue(what: string, value: unknown): QbackupError {
  return new QbackupError('INVALID_ARGUMENT', `Cannot encode ${what} for libvirt: ${String(value)} is out of range`);
}

/** Appends XDR items to a growing buffer. */
export class XdrWriter {
  private buffer = Buffer.alloc(256);
  private length = 0;

  private reserve(bytes: number): void {
    if (this.length + bytes <= this.buffer.length) return;
    const next = Buffer.alloc(Math.max(this.buffer.length * 2, this.length + bytes));
    this.buffer.copy(next, 0, 0, this.length);
    this.buffer = next;
  }

  int(value: number): this {
    if (!Number.isInteger(value) || value < -0x8000_0000 || value > 0x7fff_ffff) throw badValue('an int', value);
    this.reserve(4);
    this.buffer.writeInt32BE(value, this.length);
    this.length += 4;
    return this;
  }

  uint(value: number): this {
    if (!Number.isInteger(value) || value < 0 || value > UINT32_MAX) throw badValue('an unsigned int', value);
    this.reserve(4);
    this.buffer.writeUInt32BE(value, this.length);
    this.length += 4;
    return this;
  }

  hyper(value: bigint): this {
    if (typeof value !== 'bigint' || value < INT64_MIN || value > INT64_MAX) throw badValue('a hyper', value);
    this.reserve(8);
    this.buffer.writeBigInt64BE(value, this.length);
    this.length += 8;
    return this;
  }

  uhyper(value: bigint): this {
    if (typeof value !== 'bigint' || value < 0n || value > UINT64_MAX) throw badValue('an unsigned hyper', value);
    this.reserve(8);
    this.buffer.writeBigUInt64BE(value, this.length);
    this.length += 8;
    return this;
  }

  double(value: number): this {
    this.reserve(8);
    this.buffer.writeDoubleBE(value, this.length);
    this.length += 8;
    return this;
  }

  bool(value: boolean): this {
    return this.uint(value ? 1 : 0);
  }

  /** Exactly `length` bytes, padded to a multiple of 4. */
  fixedOpaque(data: Uint8Array, length: number): this {
    if (data.length !== length) throw new QbackupError('INVALID_ARGUMENT', `Cannot encode fixed opaque data for libvirt: ${data.length} bytes where ${length} are required`);
    this.reserve(length + pad(length));
    this.buffer.set(data, this.length);
    this.length += length;
    this.buffer.fill(0, this.length, this.length + pad(length));
    this.length += pad(length);
    return this;
  }

  opaque(data: Uint8Array, max: number): this {
    if (data.length > max) throw new QbackupError('INVALID_ARGUMENT', `Cannot encode ${data.length} bytes for libvirt: the limit is ${max}`);
    this.uint(data.length);
    return this.fixedOpaque(data, data.length);
  }

  string(value: string, max: number): this {
    const bytes = Buffer.from(value, 'utf8');
    if (bytes.length > max) throw new QbackupError('INVALID_ARGUMENT', `Cannot send a string of ${bytes.length} bytes to libvirt: the limit is ${max}`);
    return this.opaque(bytes, max);
  }

  /** The bytes written so far (a copy-free view; do not write afterwards). */
  finish(): Buffer {
    return this.buffer.subarray(0, this.length);
  }
}

/** Reads XDR items from one message body; every read is bounds-checked. */
export class XdrReader {
  private offset = 0;

  constructor(private readonly data: Buffer) {}

  get remaining(): number {
    return this.data.length - this.offset;
  }

  private take(bytes: number, what: string): number {
    if (bytes > this.remaining) throw new LibvirtProtocolError('bad-xdr', `${what} runs past the end of the message (${bytes} bytes needed, ${this.remaining} left)`);
    const at = this.offset;
    this.offset += bytes;
    return at;
  }

  int(): number {
    return this.data.readInt32BE(this.take(4, 'an int'));
  }

  uint(): number {
    return this.data.readUInt32BE(this.take(4, 'an unsigned int'));
  }

  hyper(): bigint {
    return this.data.readBigInt64BE(this.take(8, 'a hyper'));
  }

  uhyper(): bigint {
    return this.data.readBigUInt64BE(this.take(8, 'an unsigned hyper'));
  }

  double(): number {
    return this.data.readDoubleBE(this.take(8, 'a double'));
  }

  bool(): boolean {
    const value = this.uint();
    if (value > 1) throw new LibvirtProtocolError('bad-xdr', `a boolean is ${value}, not 0 or 1`);
    return value === 1;
  }

  fixedOpaque(length: number): Buffer {
    const at = this.take(length + pad(length), `${length} bytes of opaque data`);
    for (let i = at + length; i < at + length + pad(length); i++) {
      if (this.data[i] !== 0) throw new LibvirtProtocolError('bad-xdr', 'padding bytes are not zero');
    }
    return Buffer.from(this.data.subarray(at, at + length));
  }

  opaque(max: number): Buffer {
    const length = this.uint();
    if (length > max) throw new LibvirtProtocolError('bad-xdr', `variable-length data of ${length} bytes exceeds its limit of ${max}`);
    return this.fixedOpaque(length);
  }

  string(max: number): string {
    return this.opaque(max).toString('utf8');
  }

  /** A declared element count, checked against max and against the bytes left (each element takes at least 4). */
  count(max: number, what: string): number {
    const n = this.uint();
    if (n > max) throw new LibvirtProtocolError('bad-xdr', `${what} has ${n} elements, more than its limit of ${max}`);
    if (n * 4 > this.remaining) throw new LibvirtProtocolError('bad-xdr', `${what} declares ${n} elements but only ${this.remaining} bytes follow`);
    return n;
  }

  /** Fails unless every byte was read: trailing bytes mean the structure was not what we expected. */
  end(what: string): void {
    if (this.remaining !== 0) throw new LibvirtProtocolError('bad-xdr', `${this.remaining} unexpected bytes after ${what}`);
  }
}

/** A codec of one XDR type. Methods (not arrow properties) so codecs of any T compose. */
export interface XdrType<T> {
  encode(writer: XdrWriter, value: T): void;
  decode(reader: XdrReader): T;
}

/** The XDR bytes of one value (a call's arguments, a reply, an event body). */
export function encodeXdr<T>(codec: XdrType<T>, value: T): Buffer {
  const writer = new XdrWriter();
  codec.encode(writer, value);
  return writer.finish();
}

/** The TypeScript type a codec stands for. */
export type XdrValue<C> = C extends XdrType<infer T> ? T : never;

export const xdrInt: XdrType<number> = { encode: (w, v) => void w.int(v), decode: (r) => r.int() };
export const xdrUint: XdrType<number> = { encode: (w, v) => void w.uint(v), decode: (r) => r.uint() };
export const xdrHyper: XdrType<bigint> = { encode: (w, v) => void w.hyper(v), decode: (r) => r.hyper() };
export const xdrUhyper: XdrType<bigint> = { encode: (w, v) => void w.uhyper(v), decode: (r) => r.uhyper() };
export const xdrDouble: XdrType<number> = { encode: (w, v) => void w.double(v), decode: (r) => r.double() };
export const xdrBool: XdrType<boolean> = { encode: (w, v) => void w.bool(v), decode: (r) => r.bool() };
/** The empty structure of procedures without arguments or reply. */
export const xdrVoid: XdrType<undefined> = { encode: () => undefined, decode: () => undefined };

export function xdrString(max: number): XdrType<string> {
  return { encode: (w, v) => void w.string(v, max), decode: (r) => r.string(max) };
}

export function xdrOpaque(max: number): XdrType<Buffer> {
  return { encode: (w, v) => void w.opaque(v, max), decode: (r) => r.opaque(max) };
}

export function xdrFixedOpaque(length: number): XdrType<Buffer> {
  return { encode: (w, v) => void w.fixedOpaque(v, length), decode: (r) => r.fixedOpaque(length) };
}

/** `T name<max>`: a counted array. */
export function xdrArray<T>(element: XdrType<T>, max: number, what = 'an array'): XdrType<T[]> {
  return {
    encode(w, values) {
      if (values.length > max) throw new QbackupError('INVALID_ARGUMENT', `Cannot send ${values.length} items to libvirt in ${what}: the limit is ${max}`);
      w.uint(values.length);
      for (const v of values) element.encode(w, v);
    },
    decode(r) {
      const n = r.count(max, what);
      const out: T[] = [];
      for (let i = 0; i < n; i++) out.push(element.decode(r));
      return out;
    },
  };
}

/** `T *name`: present or not (undefined). */
export function xdrOptional<T>(element: XdrType<T>): XdrType<T | undefined> {
  return {
    encode(w, value) {
      w.bool(value !== undefined);
      if (value !== undefined) element.encode(w, value);
    },
    decode(r) {
      return r.bool() ? element.decode(r) : undefined;
    },
  };
}

/** A struct: the fields in declaration order (object key order). */
export function xdrStruct<F extends Record<string, XdrType<unknown>>>(fields: F): XdrType<{ [K in keyof F]: XdrValue<F[K]> }> {
  const entries = Object.entries(fields);
  return {
    encode(w, value) {
      for (const [name, codec] of entries) codec.encode(w, (value as Record<string, unknown>)[name]);
    },
    decode(r) {
      const out: Record<string, unknown> = {};
      for (const [name, codec] of entries) out[name] = codec.decode(r);
      return out as { [K in keyof F]: XdrValue<F[K]> };
    },
  };
}
