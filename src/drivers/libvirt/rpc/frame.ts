// The framing of libvirt's RPC (virnetprotocol.x): every message is a 4-byte
// big-endian length that counts itself, a 24-byte header (program, version,
// procedure, type, serial, status) and an XDR body. This module encodes
// messages and parses the daemon's byte stream into them; it owns no socket.
//
// Invariants:
// - A length word below 28 or above VIR_NET_MESSAGE_LEN_MAX +
//   VIR_NET_MESSAGE_MAX (32 MiB) is rejected before its body is buffered.
// - A header with an unknown type or status is rejected; which programs and
//   types are acceptable at a given point is the connection's decision.
// - The first violation is reported once through onError; after it the
//   parser ignores input. push() throws only what a callback throws.

import { QbackupError } from '../../../errors.js';
import * as C from './constants.js';
import { LibvirtProtocolError } from './errors.js';

export interface LibvirtHeader {
  program: number;
  version: number;
  procedure: number;
  /** VIR_NET_CALL, VIR_NET_REPLY, VIR_NET_MESSAGE, … */
  type: number;
  serial: number;
  /** VIR_NET_OK, VIR_NET_ERROR, VIR_NET_CONTINUE */
  status: number;
}

export interface LibvirtFrame {
  header: LibvirtHeader;
  body: Buffer;
}

const PREFIX_BYTES = C.VIR_NET_MESSAGE_LEN_MAX + C.VIR_NET_MESSAGE_HEADER_MAX;

/** One whole message: length word, header, body. */
export function encodeMessage(header: LibvirtHeader, body: Uint8Array): Buffer {
  const total = PREFIX_BYTES + body.length;
  if (total > C.VIR_NET_MESSAGE_LEN_MAX + C.VIR_NET_MESSAGE_MAX) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot send a message of ${total} bytes to libvirt: it accepts at most ${C.VIR_NET_MESSAGE_MAX + C.VIR_NET_MESSAGE_LEN_MAX}`);
  }
  const out = Buffer.alloc(total);
  out.writeUInt32BE(total, 0);
  out.writeUInt32BE(header.program, 4);
  out.writeUInt32BE(header.version, 8);
  out.writeInt32BE(header.procedure, 12);
  out.writeInt32BE(header.type, 16);
  out.writeUInt32BE(header.serial, 20);
  out.writeInt32BE(header.status, 24);
  out.set(body, PREFIX_BYTES);
  return out;
}

/** The header of a message whose length word was already read; `data` starts at the program field. */
export function decodeHeader(data: Buffer): LibvirtHeader {
  if (data.length < C.VIR_NET_MESSAGE_HEADER_MAX) throw new LibvirtProtocolError('bad-length', `a header of ${data.length} bytes is too short`);
  const header: LibvirtHeader = {
    program: data.readUInt32BE(0),
    version: data.readUInt32BE(4),
    procedure: data.readInt32BE(8),
    type: data.readInt32BE(12),
    serial: data.readUInt32BE(16),
    status: data.readInt32BE(20),
  };
  if (header.type < C.VIR_NET_CALL || header.type > C.VIR_NET_STREAM_HOLE) throw new LibvirtProtocolError('bad-header', `unknown message type ${header.type}`);
  if (header.status < C.VIR_NET_OK || header.status > C.VIR_NET_CONTINUE) throw new LibvirtProtocolError('bad-header', `unknown message status ${header.status}`);
  return header;
}

export interface LibvirtFrameParserOptions {
  onFrame: (frame: LibvirtFrame) => void;
  onError: (error: LibvirtProtocolError) => void;
  /** Largest accepted message payload (header + body); default and ceiling VIR_NET_MESSAGE_MAX. */
  maxMessageBytes?: number;
}

/** Push parser: feed it the daemon's bytes in any pieces; it emits whole messages. */
export class LibvirtFrameParser {
  private readonly options: LibvirtFrameParserOptions;
  private readonly maxMessageBytes: number;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private failed = false;

  constructor(options: LibvirtFrameParserOptions) {
    this.options = options;
    this.maxMessageBytes = Math.min(options.maxMessageBytes ?? C.VIR_NET_MESSAGE_MAX, C.VIR_NET_MESSAGE_MAX);
  }

  /** Bytes held that do not yet form a whole message. */
  get bufferedBytes(): number {
    return this.buffered;
  }

  push(chunk: Buffer): void {
    if (this.failed || chunk.length === 0) return;
    this.chunks.push(Buffer.from(chunk));
    this.buffered += chunk.length;
    while (!this.failed && this.buffered >= C.VIR_NET_MESSAGE_LEN_MAX) {
      const head = this.peek(C.VIR_NET_MESSAGE_LEN_MAX);
      const total = head.readUInt32BE(0);
      if (total < PREFIX_BYTES || total - C.VIR_NET_MESSAGE_LEN_MAX > this.maxMessageBytes) {
        this.fail(new LibvirtProtocolError('bad-length', `a message length of ${total} bytes is outside ${PREFIX_BYTES}..${this.maxMessageBytes + C.VIR_NET_MESSAGE_LEN_MAX}`));
        return;
      }
      if (this.buffered < total) return;
      const message = this.consume(total);
      let header: LibvirtHeader;
      try {
        header = decodeHeader(message.subarray(C.VIR_NET_MESSAGE_LEN_MAX));
      } catch (err) {
        if (err instanceof LibvirtProtocolError) return this.fail(err);
        throw err;
      }
      this.options.onFrame({ header, body: message.subarray(PREFIX_BYTES) });
    }
  }

  private fail(error: LibvirtProtocolError): void {
    this.failed = true;
    this.chunks = [];
    this.buffered = 0;
    this.options.onError(error);
  }

  private peek(bytes: number): Buffer {
    const first = this.chunks[0];
    if (first !== undefined && first.length >= bytes) return first.subarray(0, bytes);
    return Buffer.concat(this.chunks).subarray(0, bytes);
  }

  private consume(bytes: number): Buffer {
    const all = this.chunks.length === 1 ? (this.chunks[0] as Buffer) : Buffer.concat(this.chunks);
    const out = all.subarray(0, bytes);
    const rest = all.subarray(bytes);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.buffered = rest.length;
    return out;
  }
}
