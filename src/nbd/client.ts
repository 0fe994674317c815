// The NBD client qbackup uses to read disks, write backups and query
// allocation and dirty bitmaps: byte-range operations on one export over one
// connection, with any number of requests in flight.
//
// Invariants:
// - Every request respects what the server advertised: offsets and lengths
//   are multiples of the minimum block size (or end at the export's end),
//   reads and writes never exceed min(maximum payload, 32 MiB), and commands
//   the export did not offer (write on a read-only export, write zeroes,
//   flush, block status for a context not negotiated) fail with
//   NOT_SUPPORTED before anything is sent. Ranges a user can get wrong are
//   INVALID_ARGUMENT; arguments of the wrong type are bugs (assertions).
// - read() returns exactly the requested bytes: structured chunks are placed
//   by offset, whatever their order, and holes read as zeroes.
// - blockStatus() and extents() return consecutive extents clipped to the
//   asked range, so callers never see bytes outside it.
// - close() is idempotent; `await using` works through Symbol.asyncDispose.

import { constants as bufferConstants } from 'node:buffer';
import { QbackupError } from '../errors.js';
import { assert } from '../util/assert.js';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_DEFAULT_MAX_PAYLOAD,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_MAX_PAYLOAD_UNLIMITED,
} from './constants.js';
import type { NbdBlockSizes } from './codec.js';
import { readClientCredentials } from '../util/pki.js';
import { parseNbdUri } from './uri.js';
import { NbdConnection, type NbdAddress, type NbdConnectionState, type NbdNegotiated, type NbdTlsOptions } from './connection.js';
import type { NbdReplyChunk } from './parser.js';

/** Largest effect length of one write-zeroes or block-status request: below 2^32, a multiple of 64 KiB. */
const MAX_EFFECT_BYTES = 0xffff0000;
/** Largest payload of one read or write we send, whatever the server allows (the spec's portable limit). */
const MAX_TRANSFER_BYTES = NBD_DEFAULT_MAX_PAYLOAD;

export interface NbdClientOptions {
  exportName: string;
  /** Metadata contexts to select, e.g. "base:allocation", "qemu:dirty-bitmap:NAME". */
  metaContexts?: string[];
  /** Bounds the handshake (default 30 s) and, unless requestTimeoutMs is given, each request; a timeout fails the connection. */
  timeoutMs?: number;
  /** Longest wait for one request's reply: default timeoutMs when given, else 60 s; 0 = no limit. Fails with NBD_TIMEOUT. */
  requestTimeoutMs?: number;
  /** Talk TLS (NBD_OPT_STARTTLS first, never plain instead); see readClientCredentials for a certificate directory. */
  tls?: NbdTlsOptions;
}

export interface NbdExtent {
  offset: number;
  length: number;
  /** Context-defined status bits, e.g. NBD_STATE_HOLE | NBD_STATE_ZERO, or bit 0 = dirty. */
  flags: number;
}

export interface NbdWriteZeroesOptions {
  /** NBD_CMD_FLAG_NO_HOLE: allocate instead of punching a hole (qcow2: no zero clusters). */
  noHole?: boolean;
}

export class NbdClient {
  readonly exportName: string;
  /** Export size in bytes. */
  readonly size: number;
  readonly readOnly: boolean;
  readonly canWriteZeroes: boolean;
  readonly canFlush: boolean;
  readonly blockSizes: Readonly<NbdBlockSizes>;
  /** Metadata contexts the server accepted: name → context id. */
  readonly contexts: ReadonlyMap<string, number>;
  /** Largest read or write payload sent in one request. */
  readonly maxTransferBytes: number;
  /** Everything the handshake settled. */
  readonly negotiated: Readonly<NbdNegotiated>;
  /** Resolves when the connection ends: the root cause, or undefined after close(). Never rejects. */
  readonly closed: Promise<Error | undefined>;

  private readonly connection: NbdConnection;

  private constructor(connection: NbdConnection) {
    const negotiated = connection.negotiated;
    this.connection = connection;
    this.negotiated = negotiated;
    this.exportName = negotiated.exportName;
    this.size = negotiated.size;
    this.readOnly = (negotiated.transmissionFlags & NBD_FLAG_READ_ONLY) !== 0;
    this.canWriteZeroes = !this.readOnly && (negotiated.transmissionFlags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0;
    this.canFlush = (negotiated.transmissionFlags & NBD_FLAG_SEND_FLUSH) !== 0;
    this.blockSizes = Object.freeze({ ...negotiated.blockSizes });
    this.contexts = new Map(negotiated.contexts);
    this.closed = connection.closed;
    const { minimum, maximum } = negotiated.blockSizes;
    const limit = maximum === NBD_MAX_PAYLOAD_UNLIMITED ? MAX_TRANSFER_BYTES : Math.min(maximum, MAX_TRANSFER_BYTES);
    this.maxTransferBytes = Math.max(minimum, limit - (limit % minimum));
  }

  static async connect(address: NbdAddress, options: NbdClientOptions): Promise<NbdClient> {
    const connection = await NbdConnection.connect(address, {
      exportName: options.exportName,
      ...(options.metaContexts === undefined ? {} : { metaContexts: options.metaContexts }),
      ...(options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs }),
      ...(options.requestTimeoutMs === undefined ? {} : { requestTimeoutMs: options.requestTimeoutMs }),
      ...(options.tls === undefined ? {} : { tls: options.tls }),
    });
    return new NbdClient(connection);
  }

  /**
   * Connects to the export an NBD URI names (nbd://, nbds://, nbd+unix://,
   * nbds+unix://). A TLS URI takes its credentials from options.tls or from
   * tls-certificates=DIR; with neither it is refused, never opened in the clear.
   */
  static async connectUri(uri: string, options: Omit<NbdClientOptions, 'exportName'> = {}): Promise<NbdClient> {
    const u = parseNbdUri(uri);
    let tls = options.tls;
    if (u.tls && tls === undefined) {
      if (u.tlsCertificates === undefined) {
        throw new QbackupError('TLS_CREDENTIALS', `Cannot open NBD URI "${uri}" with TLS: give tls-certificates=DIR (a directory with ca-cert.pem, client-cert.pem and client-key.pem)`);
      }
      tls = readClientCredentials(u.tlsCertificates, `Cannot open NBD URI "${uri}" with TLS`);
    }
    if (u.tls && tls !== undefined && u.tlsHostname !== undefined) tls = { ...tls, servername: u.tlsHostname };
    const { tls: _ignored, ...rest } = options;
    return NbdClient.connect(u.address, { ...rest, exportName: u.exportName, ...(u.tls && tls !== undefined ? { tls } : {}) });
  }

  get state(): NbdConnectionState {
    return this.connection.state;
  }

  /** Reads [offset, offset + length) into a new buffer; large reads go out as several requests at once. */
  async read(offset: number, length: number): Promise<Buffer> {
    this.checkRange('read', offset, length);
    if (length > bufferConstants.MAX_LENGTH) throw new QbackupError('INVALID_ARGUMENT', `read of ${length} bytes is larger than one buffer can hold`);
    const out = Buffer.allocUnsafe(length);
    await this.readInto(offset, out);
    return out;
  }

  /**
   * Reads [offset, offset + target.length) straight into `target` (the
   * server's data is gathered there as it arrives, holes are zeroed), so a
   * caller that reuses its buffers allocates nothing per read. On failure
   * the content of `target` is undefined.
   */
  async readInto(offset: number, target: Buffer): Promise<void> {
    assert(Buffer.isBuffer(target), 'read target must be a Buffer');
    this.checkRange('read', offset, target.length);
    const pieces = this.split(offset, target.length, this.maxTransferBytes);
    const requests: Array<Promise<void>> = [];
    for (const piece of pieces) {
      const into = target.subarray(piece.offset - offset, piece.offset - offset + piece.length);
      requests.push(this.connection.request({ command: NBD_CMD_READ, offset: piece.offset, length: piece.length, into, onChunk: (chunk) => placeChunk(chunk, into, piece.offset) }));
    }
    await Promise.all(requests);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    assert(data instanceof Uint8Array, 'write data must be a Buffer or Uint8Array');
    this.checkWritable('write');
    this.checkRange('write', offset, data.length);
    await Promise.all(
      this.split(offset, data.length, this.maxTransferBytes).map((piece) =>
        this.connection.request({ command: NBD_CMD_WRITE, offset: piece.offset, data: data.subarray(piece.offset - offset, piece.offset - offset + piece.length) }),
      ),
    );
  }

  /**
   * Makes [offset, offset + length) read as zeroes without sending them.
   * Without noHole the server may deallocate; on qcow2 that makes zero
   * clusters, which also hide the data of a backing file.
   */
  async writeZeroes(offset: number, length: number, options: NbdWriteZeroesOptions = {}): Promise<void> {
    this.checkWritable('write zeroes');
    if (!this.canWriteZeroes) {
      throw new QbackupError('NOT_SUPPORTED', `NBD export "${this.exportName}" does not support NBD_CMD_WRITE_ZEROES`, {
        details: { exportName: this.exportName },
      });
    }
    this.checkRange('write zeroes', offset, length);
    const flags = options.noHole === true ? NBD_CMD_FLAG_NO_HOLE : 0;
    await Promise.all(
      this.split(offset, length, MAX_EFFECT_BYTES).map((piece) =>
        this.connection.request({ command: NBD_CMD_WRITE_ZEROES, flags, offset: piece.offset, length: piece.length }),
      ),
    );
  }

  /** Makes every write the server has acknowledged durable. */
  async flush(): Promise<void> {
    if (!this.canFlush) {
      throw new QbackupError('NOT_SUPPORTED', `NBD export "${this.exportName}" does not support NBD_CMD_FLUSH`, { details: { exportName: this.exportName } });
    }
    await this.connection.request({ command: NBD_CMD_FLUSH });
  }

  /**
   * One NBD_CMD_BLOCK_STATUS request: consecutive extents of `context`
   * starting at `offset`. They may cover less than asked (never more: the
   * last extent is clipped), but always at least one byte.
   */
  async blockStatus(context: string, offset: number, length: number): Promise<NbdExtent[]> {
    const contextId = this.contexts.get(context);
    if (contextId === undefined) {
      const offered = this.contexts.size === 0 ? 'none' : [...this.contexts.keys()].map((c) => `"${c}"`).join(', ');
      throw new QbackupError(
        'NOT_SUPPORTED',
        `Metadata context "${context}" was not negotiated with NBD export "${this.exportName}" (negotiated: ${offered})`,
        { details: { exportName: this.exportName, context } },
      );
    }
    this.checkRange('block status', offset, length);
    if (length === 0) throw new QbackupError('INVALID_ARGUMENT', 'block status needs a length of at least one byte');
    const requestLength = Math.min(length, MAX_EFFECT_BYTES);
    const end = offset + length;
    const extents: NbdExtent[] = [];
    await this.connection.request({
      command: NBD_CMD_BLOCK_STATUS,
      offset,
      length: requestLength,
      onChunk: (chunk) => {
        if (chunk.type !== 'block-status' || chunk.contextId !== contextId) return;
        let pos = offset;
        for (const d of chunk.descriptors) {
          if (pos >= end) break;
          const extentEnd = Math.min(pos + d.length, end);
          extents.push({ offset: pos, length: extentEnd - pos, flags: d.flags });
          pos = extentEnd;
        }
      },
    });
    return extents;
  }

  /**
   * All extents of `context` over [offset, offset + length), repeating block
   * status until the range is covered; adjacent extents with equal flags are
   * merged.
   */
  async extents(context: string, offset = 0, length = this.size - offset): Promise<NbdExtent[]> {
    this.checkRange('extents', offset, length);
    const end = offset + length;
    const out: NbdExtent[] = [];
    let pos = offset;
    while (pos < end) {
      const batch = await this.blockStatus(context, pos, end - pos);
      for (const extent of batch) {
        const last = out.at(-1);
        if (last !== undefined && last.flags === extent.flags && last.offset + last.length === extent.offset) last.length += extent.length;
        else out.push({ ...extent });
        pos = extent.offset + extent.length;
      }
    }
    return out;
  }

  /** Soft disconnect (NBD_CMD_DISC after requests in flight finish). Idempotent. */
  close(): Promise<void> {
    return this.connection.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  private checkWritable(what: string): void {
    if (this.readOnly) {
      throw new QbackupError('NOT_SUPPORTED', `Cannot ${what} NBD export "${this.exportName}": it is read-only`, { details: { exportName: this.exportName } });
    }
  }

  private checkRange(what: string, offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new QbackupError('INVALID_ARGUMENT', `${what} needs a non-negative integer offset and length, got ${String(offset)} and ${String(length)}`);
    }
    if (offset + length > this.size) {
      throw new QbackupError(
        'INVALID_ARGUMENT',
        `${what} of ${length} bytes at offset ${offset} lies beyond the end of NBD export "${this.exportName}" (${this.size} bytes)`,
        { details: { exportName: this.exportName, offset, length, size: this.size } },
      );
    }
    const { minimum } = this.blockSizes;
    if (minimum > 1 && (offset % minimum !== 0 || (length % minimum !== 0 && offset + length !== this.size))) {
      throw new QbackupError(
        'INVALID_ARGUMENT',
        `${what} of ${length} bytes at offset ${offset} is not aligned to the minimum block size ${minimum} of NBD export "${this.exportName}"`,
        { details: { exportName: this.exportName, offset, length, minimum } },
      );
    }
  }

  /** Consecutive pieces of at most `max` bytes; `max` is a multiple of the minimum block size, so pieces stay aligned. */
  private split(offset: number, length: number, max: number): Array<{ offset: number; length: number }> {
    const pieces: Array<{ offset: number; length: number }> = [];
    for (let pos = offset; pos < offset + length; pos += max) pieces.push({ offset: pos, length: Math.min(max, offset + length - pos) });
    return pieces;
  }
}

/** A read reply's chunk in the read's buffer: a hole is zeroed; data normally arrived in place already. */
function placeChunk(chunk: NbdReplyChunk, into: Buffer, intoOffset: number): void {
  if (chunk.type === 'hole') into.fill(0, chunk.offset - intoOffset, chunk.offset - intoOffset + chunk.length);
  else if (chunk.type === 'data' && (chunk.data.buffer !== into.buffer || chunk.data.byteOffset !== into.byteOffset + chunk.offset - intoOffset)) {
    chunk.data.copy(into, chunk.offset - intoOffset);
  }
}
