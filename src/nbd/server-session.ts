// One client of the NBD server, as a state machine over bytes: it takes the
// client's bytes in any pieces (push), and writes replies through the
// transport the server gives it. It owns no socket, so unit tests drive it
// with bytes, and TLS is the transport's business (the session only says
// when to start it).
//
//   client-flags ─► options ─┬─► (STARTTLS acked) tls ─► options
//                            └─► (GO / EXPORT_NAME) transmission ─► draining (DISC) ─► closed
//
// Invariants:
// - Every field is hostile: option lengths are capped before any data is
//   buffered, inner lengths are checked against the option's data, request
//   offsets and lengths against the export, flags against what each command
//   allows. A malformed option gets an NBD_REP_ERR_* and the session goes on;
//   only a broken frame (bad magic, an option too long to skip, bytes sent
//   before a TLS handshake, a write payload above the limit) closes it.
// - With TLS required, nothing but NBD_OPT_STARTTLS and NBD_OPT_ABORT is
//   answered before TLS is up (NBD_REP_ERR_TLS_REQD); the session never
//   reveals an export name, size or list in clear text.
// - Replies go out whole: the chunks of one reply are written in one go, so
//   replies of pipelined requests never interleave, and they may come out of
//   order (each carries its cookie). At most MAX_IN_FLIGHT requests run at
//   once; past that the session stops reading until one finishes. Reads
//   also wait for room in the server's shared ByteBudget.
//   A read's data is let go (NbdServerExport.readDone) only once the
//   transport has written or dropped its reply.
// - After close() nothing more is written; late results are dropped.

import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_CONTEXT_BASE_ALLOCATION,
  NBD_DEFAULT_MAX_PAYLOAD,
  NBD_EINVAL,
  NBD_EIO,
  NBD_EPERM,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_DF,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_NEW_VERSION,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPTION_HEADER_SIZE,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  NBD_REQUEST_SIZE,
  nbdCommandName,
  nbdOptionName,
} from './constants.js';
import type { NbdBlockDescriptor, NbdBlockSizes } from './codec.js';
import { ByteQueue } from './byte-queue.js';
import {
  NbdOptionError,
  decodeClientString,
  decodeGoOption,
  decodeMetaContextOption,
  decodeRequestHeader,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContextEntry,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHole,
  encodeOptionError,
  encodeOptionReply,
  encodeServerEntry,
  encodeSimpleReply,
  type ReceivedRequest,
} from './server-codec.js';

/** Longest option data accepted (a GO with a 4096-byte name, or a few meta context queries, fits easily). */
export const MAX_OPTION_BYTES = 64 * 1024;
/** Options one connection may send before transmission; a client haggling longer is dropped. */
export const MAX_OPTIONS = 256;
/** Requests of one connection served at once. */
export const MAX_IN_FLIGHT = 16;
/** Largest read (and write payload skipped) in one request: the spec's default 32 MiB. */
export const MAX_REQUEST_BYTES = NBD_DEFAULT_MAX_PAYLOAD;
/** Most descriptors in one block status reply. */
export const MAX_DESCRIPTORS = 64 * 1024;
/** The context id of base:allocation (the only context served). */
export const BASE_ALLOCATION_ID = 1;

const CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

/** A piece of an export read: data, or zeroes when `data` is undefined. Pieces cover the read in order. */
export interface NbdExportSegment {
  offset: number;
  length: number;
  data: Buffer | undefined;
}

/** What the server serves: a read-only byte range with an allocation map. */
export interface NbdServerExport {
  readonly name: string;
  readonly size: number;
  readonly description?: string;
  /** Preferred I/O size (a power of two, at least 512). */
  readonly preferredBlockBytes: number;
  /** Reads [offset, offset+length) inside the export; throws NbdExportError (or anything: EIO) on failure. */
  read(offset: number, length: number): Promise<NbdExportSegment[]>;
  /**
   * Called once per successful read() when the server no longer refers to
   * its segments' data (the reply was written, or dropped): an export that
   * reuses read memory may take it back then, and not before.
   */
  readDone?(segments: readonly NbdExportSegment[]): void;
  /** False: base:allocation is not offered for this export, so a client takes every byte as data and never asks. Default true. */
  readonly reportsAllocation?: boolean | undefined;
  /** base:allocation extents from `offset`, covering at most `length` bytes (NBD_STATE_* flags). */
  blockStatus(offset: number, length: number, maxDescriptors: number): Promise<NbdBlockDescriptor[]>;
}

/** A failed read with the errno to send; its message goes to the client in an error chunk. */
export class NbdExportError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
    this.name = 'NbdExportError';
  }
}

export interface NbdSessionTransport {
  /**
   * Writes bytes; false when the transport's buffer is full (call `drained`
   * later). `done`, when given, is called once the transport no longer
   * refers to any of `bytes` (written, or dropped with the connection).
   */
  write(bytes: readonly Buffer[], done?: (() => void) | undefined): boolean;
  /** Stop (false) or resume (true) delivering client bytes. */
  flow(on: boolean): void;
  /** STARTTLS was acknowledged: start a TLS server handshake, then call `tlsReady`. */
  startTls(): void;
  /** The session is over; close the connection. */
  close(): void;
  /** One line for the server's log. */
  log(line: string): void;
}

/**
 * Bytes of reads being served at once, shared by every session of a server,
 * so many clients with many large reads cannot make the server hold more
 * than `capacity` bytes of replies. Waiters are served in order.
 */
export class ByteBudget {
  private used = 0;
  private readonly waiters: Array<{ bytes: number; resolve: () => void }> = [];

  constructor(readonly capacity: number) {}

  async acquire(bytes: number): Promise<number> {
    const n = Math.min(bytes, this.capacity);
    if (this.waiters.length === 0 && this.used + n <= this.capacity) {
      this.used += n;
      return n;
    }
    await new Promise<void>((resolve) => this.waiters.push({ bytes: n, resolve }));
    return n;
  }

  /** Gives back what acquire returned. */
  release(granted: number): void {
    this.used -= granted;
    for (let w = this.waiters[0]; w !== undefined && this.used + w.bytes <= this.capacity; w = this.waiters[0]) {
      this.waiters.shift();
      this.used += w.bytes;
      w.resolve();
    }
  }
}

export interface NbdSessionOptions {
  exports: ReadonlyMap<string, NbdServerExport>;
  /** Shared bound on bytes of reads in flight (default: none). */
  budget?: ByteBudget;
  /** TLS is offered, and required before anything else. */
  tls: boolean;
  transport: NbdSessionTransport;
  /** Names the client in log lines. */
  peer: string;
}

export type NbdSessionState = 'client-flags' | 'options' | 'tls' | 'transmission' | 'draining' | 'closed';

interface OptionHeader {
  option: number;
  length: number;
}

export class NbdServerSession {
  private readonly queue = new ByteQueue();
  private stateValue: NbdSessionState = 'client-flags';
  private noZeroes = false;
  private structured = false;
  private tlsUp = false;
  private optionCount = 0;
  private pendingOption: OptionHeader | undefined;
  /** base:allocation selected by SET_META_CONTEXT, for this export name. */
  private contextFor: string | undefined;
  private export: NbdServerExport | undefined;
  private baseAllocation = false;
  private inFlight = 0;
  /** Bytes of a write payload still to drop. */
  private skipBytes = 0;
  private writeBlocked = false;
  private reading = true;

  constructor(private readonly options: NbdSessionOptions) {}

  get state(): NbdSessionState {
    return this.stateValue;
  }

  get exportName(): string | undefined {
    return this.export?.name;
  }

  /** Bytes from the client. */
  push(bytes: Buffer): void {
    if (this.stateValue === 'closed') return;
    this.queue.push(bytes);
    this.pump();
  }

  /** The transport can take bytes again. */
  drained(): void {
    this.writeBlocked = false;
    this.pump();
  }

  /** The TLS handshake after STARTTLS succeeded; option haggling resumes encrypted. */
  tlsReady(): void {
    if (this.stateValue !== 'tls') return;
    this.tlsUp = true;
    this.stateValue = 'options';
    this.pump();
  }

  /** Ends the session (the client went away, or the server is closing). Idempotent. */
  close(): void {
    if (this.stateValue === 'closed') return;
    this.stateValue = 'closed';
    this.options.transport.close();
  }

  private send(bytes: readonly Buffer[], done?: () => void): void {
    if (this.stateValue === 'closed') {
      done?.();
      return;
    }
    if (!this.options.transport.write(bytes, done)) this.writeBlocked = true;
  }

  private drop(why: string): void {
    this.options.transport.log(`NBD client ${this.options.peer} dropped: ${why}`);
    this.close();
  }

  private setReading(on: boolean): void {
    if (this.reading === on) return;
    this.reading = on;
    this.options.transport.flow(on);
  }

  private pump(): void {
    for (;;) {
      const state: NbdSessionState = this.stateValue;
      let progressed = false;
      if (state === 'client-flags') progressed = this.stepClientFlags();
      else if (state === 'options') progressed = this.stepOption();
      else if (state === 'transmission') progressed = this.stepRequest();
      else if (state === 'tls' && this.queue.length > 0) this.drop('it sent bytes after NBD_OPT_STARTTLS before the TLS handshake');
      if (!progressed) break;
    }
    const busy = this.stateValue === 'transmission' && (this.inFlight >= MAX_IN_FLIGHT || this.writeBlocked);
    this.setReading(!busy);
  }

  // ---- handshake ---------------------------------------------------------------

  private stepClientFlags(): boolean {
    const bytes = this.queue.take(4);
    if (bytes === undefined) return false;
    const flags = bytes.readUInt32BE(0);
    if ((flags & NBD_FLAG_C_FIXED_NEWSTYLE) === 0) {
      this.drop('it does not speak fixed newstyle');
      return false;
    }
    if ((flags & ~CLIENT_FLAGS) !== 0) {
      this.drop(`it sent unknown client flags 0x${flags.toString(16)}`);
      return false;
    }
    this.noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
    this.stateValue = 'options';
    return true;
  }

  private stepOption(): boolean {
    if (this.pendingOption === undefined) {
      const head = this.queue.take(NBD_OPTION_HEADER_SIZE);
      if (head === undefined) return false;
      if (head.readBigUInt64BE(0) !== NBD_NEW_VERSION) {
        this.drop('an option does not start with IHAVEOPT');
        return false;
      }
      const option = head.readUInt32BE(8);
      const length = head.readUInt32BE(12);
      if (++this.optionCount > MAX_OPTIONS) {
        this.drop(`it sent more than ${MAX_OPTIONS} options`);
        return false;
      }
      if (length > MAX_OPTION_BYTES) {
        // Skipping gigabytes a client announces is not worth it: refuse and hang up.
        this.send([encodeOptionError(option, NBD_REP_ERR_TOO_BIG, `option data of ${length} bytes is more than ${MAX_OPTION_BYTES}`)]);
        this.drop(`${nbdOptionName(option)} with ${length} bytes of data`);
        return false;
      }
      this.pendingOption = { option, length };
    }
    const { option, length } = this.pendingOption;
    const data = this.queue.take(length);
    if (data === undefined) return false;
    this.pendingOption = undefined;
    this.handleOption(option, data);
    return this.stateValue === 'options' || this.stateValue === 'transmission';
  }

  private handleOption(option: number, data: Buffer): void {
    if (option === NBD_OPT_ABORT) {
      this.send([encodeOptionReply(option, NBD_REP_ACK)]);
      this.close();
      return;
    }
    if (option === NBD_OPT_EXPORT_NAME) {
      this.optExportName(data);
      return;
    }
    if (this.options.tls && !this.tlsUp && option !== NBD_OPT_STARTTLS) {
      this.send([encodeOptionError(option, NBD_REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first')]);
      return;
    }
    try {
      this.dispatchOption(option, data);
    } catch (err) {
      if (!(err instanceof NbdOptionError)) throw err;
      this.send([encodeOptionError(option, err.reply, err.message)]);
    }
  }

  private dispatchOption(option: number, data: Buffer): void {
    switch (option) {
      case NBD_OPT_STARTTLS:
        return this.optStartTls(data);
      case NBD_OPT_LIST:
        return this.optList(data);
      case NBD_OPT_STRUCTURED_REPLY:
        return this.optStructuredReply(data);
      case NBD_OPT_INFO:
      case NBD_OPT_GO:
        return this.optInfoOrGo(option, data);
      case NBD_OPT_LIST_META_CONTEXT:
      case NBD_OPT_SET_META_CONTEXT:
        return this.optMetaContext(option, data);
      default:
        throw new NbdOptionError(NBD_REP_ERR_UNSUP, `${nbdOptionName(option)} is not supported`);
    }
  }

  private expectEmpty(option: number, data: Buffer): void {
    if (data.length !== 0) throw new NbdOptionError(NBD_REP_ERR_INVALID, `${nbdOptionName(option)} carries ${data.length} bytes of data; it takes none`);
  }

  private optStartTls(data: Buffer): void {
    this.expectEmpty(NBD_OPT_STARTTLS, data);
    if (!this.options.tls) throw new NbdOptionError(NBD_REP_ERR_POLICY, 'this server does not offer TLS');
    if (this.tlsUp) throw new NbdOptionError(NBD_REP_ERR_INVALID, 'TLS is already in use');
    this.send([encodeOptionReply(NBD_OPT_STARTTLS, NBD_REP_ACK)]);
    this.stateValue = 'tls';
    if (this.queue.length > 0) {
      this.drop('it sent bytes after NBD_OPT_STARTTLS before the TLS handshake');
      return;
    }
    this.options.transport.startTls();
  }

  private optList(data: Buffer): void {
    this.expectEmpty(NBD_OPT_LIST, data);
    const replies = [...this.options.exports.values()].map((e) => encodeOptionReply(NBD_OPT_LIST, NBD_REP_SERVER, encodeServerEntry(e.name, e.description ?? '')));
    this.send([...replies, encodeOptionReply(NBD_OPT_LIST, NBD_REP_ACK)]);
  }

  private optStructuredReply(data: Buffer): void {
    this.expectEmpty(NBD_OPT_STRUCTURED_REPLY, data);
    if (this.structured) throw new NbdOptionError(NBD_REP_ERR_INVALID, 'structured replies are already negotiated');
    this.structured = true;
    this.send([encodeOptionReply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK)]);
  }

  /** The export a client names; "" is the only export when there is exactly one. */
  private lookup(name: string): NbdServerExport | undefined {
    const found = this.options.exports.get(name);
    if (found !== undefined || name !== '' || this.options.exports.size !== 1) return found;
    return [...this.options.exports.values()][0];
  }

  private unknownExport(name: string): NbdOptionError {
    return new NbdOptionError(NBD_REP_ERR_UNKNOWN, `export "${name}" does not exist (exports: ${[...this.options.exports.keys()].join(', ')})`);
  }

  private transmissionFlags(): number {
    return NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_CAN_MULTI_CONN | (this.structured ? NBD_FLAG_SEND_DF : 0);
  }

  private blockSizes(exp: NbdServerExport): NbdBlockSizes {
    return { minimum: 1, preferred: exp.preferredBlockBytes, maximum: MAX_REQUEST_BYTES };
  }

  private optInfoOrGo(option: number, data: Buffer): void {
    const { exportName, infoRequests } = decodeGoOption(data, nbdOptionName(option));
    const exp = this.lookup(exportName);
    if (exp === undefined) throw this.unknownExport(exportName);
    const replies = [encodeInfoExport(exp.size, this.transmissionFlags()), encodeInfoBlockSize(this.blockSizes(exp))];
    if (infoRequests.includes(NBD_INFO_NAME)) replies.push(encodeInfoString(NBD_INFO_NAME, exp.name));
    if (infoRequests.includes(NBD_INFO_DESCRIPTION) && exp.description !== undefined) replies.push(encodeInfoString(NBD_INFO_DESCRIPTION, exp.description));
    this.send([...replies.map((r) => encodeOptionReply(option, NBD_REP_INFO, r)), encodeOptionReply(option, NBD_REP_ACK)]);
    if (option === NBD_OPT_GO) this.enterTransmission(exp, exportName);
  }

  private optMetaContext(option: number, data: Buffer): void {
    const { exportName, queries } = decodeMetaContextOption(data, nbdOptionName(option));
    const set = option === NBD_OPT_SET_META_CONTEXT;
    if (set && !this.structured) throw new NbdOptionError(NBD_REP_ERR_INVALID, 'NBD_OPT_SET_META_CONTEXT needs structured replies first');
    const exp = this.lookup(exportName);
    if (exp === undefined) throw this.unknownExport(exportName);
    // A query is a context name or, when listing, a namespace ("base:") or nothing (every context).
    const wanted = exp.reportsAllocation !== false && (queries.some((q) => q === NBD_CONTEXT_BASE_ALLOCATION || (!set && q === 'base:')) || (!set && queries.length === 0));
    if (set) {
      this.contextFor = wanted ? exportName : undefined;
    }
    const replies = wanted ? [encodeOptionReply(option, NBD_REP_META_CONTEXT, encodeMetaContextEntry(set ? BASE_ALLOCATION_ID : 0, NBD_CONTEXT_BASE_ALLOCATION))] : [];
    this.send([...replies, encodeOptionReply(option, NBD_REP_ACK)]);
  }

  private optExportName(data: Buffer): void {
    if (this.options.tls && !this.tlsUp) {
      this.drop('NBD_OPT_EXPORT_NAME before TLS');
      return;
    }
    let name: string;
    try {
      name = decodeClientString(data, 'export name');
    } catch (err) {
      if (!(err instanceof NbdOptionError)) throw err;
      this.drop(err.message);
      return;
    }
    const exp = this.lookup(name);
    if (exp === undefined) {
      // NBD_OPT_EXPORT_NAME has no error reply: the only answer is to hang up.
      this.drop(`it asked for export "${name}", which does not exist`);
      return;
    }
    this.send([encodeExportNameReply(exp.size, this.transmissionFlags(), this.noZeroes)]);
    this.enterTransmission(exp, name);
  }

  private enterTransmission(exp: NbdServerExport, askedName: string): void {
    this.export = exp;
    // Contexts chosen for another export do not carry over (as in QEMU's server).
    this.baseAllocation = this.structured && this.contextFor === askedName;
    this.stateValue = 'transmission';
  }

  // ---- transmission --------------------------------------------------------------

  private stepRequest(): boolean {
    if (this.skipBytes > 0) {
      const n = Math.min(this.skipBytes, this.queue.length);
      if (n === 0) return false;
      this.queue.take(n);
      this.skipBytes -= n;
      return true;
    }
    if (this.inFlight >= MAX_IN_FLIGHT || this.writeBlocked) return false;
    const head = this.queue.take(NBD_REQUEST_SIZE);
    if (head === undefined) return false;
    const req = decodeRequestHeader(head);
    if (req === undefined) {
      this.drop('a request does not start with the request magic');
      return false;
    }
    if (req.type === NBD_CMD_WRITE) {
      if (req.length > MAX_REQUEST_BYTES) {
        this.drop(`NBD_CMD_WRITE with a ${req.length}-byte payload`);
        return false;
      }
      this.skipBytes = req.length;
    }
    if (req.type === NBD_CMD_DISC) {
      this.stateValue = 'draining';
      if (this.inFlight === 0) this.close();
      return false;
    }
    this.inFlight++;
    void this.serve(req).finally(() => {
      this.inFlight--;
      if (this.stateValue === 'draining' && this.inFlight === 0) this.close();
      else this.pump();
    });
    return true;
  }

  /** Why a request cannot be served (an errno and a message), or undefined. */
  private check(req: ReceivedRequest, exp: NbdServerExport): [number, string] | undefined {
    const name = nbdCommandName(req.type);
    if (req.type === NBD_CMD_WRITE || req.type === NBD_CMD_TRIM || req.type === NBD_CMD_WRITE_ZEROES) return [NBD_EPERM, `export "${exp.name}" is read-only`];
    if (req.type !== NBD_CMD_READ && req.type !== NBD_CMD_BLOCK_STATUS) return [NBD_EINVAL, `${name} is not supported by this server`];
    const allowed = req.type === NBD_CMD_READ ? (this.structured ? NBD_CMD_FLAG_DF : 0) : NBD_CMD_FLAG_REQ_ONE;
    if ((req.flags & ~allowed) !== 0) return [NBD_EINVAL, `${name} with flags 0x${req.flags.toString(16)}, of which this server allows 0x${allowed.toString(16)}`];
    if (req.type === NBD_CMD_BLOCK_STATUS && !this.baseAllocation) return [NBD_EINVAL, 'NBD_CMD_BLOCK_STATUS without a negotiated metadata context'];
    if (req.offset + BigInt(req.length) > BigInt(exp.size)) return [NBD_EINVAL, `${name} of ${req.length} bytes at offset ${req.offset} ends past the end of the export (${exp.size} bytes)`];
    if (req.type === NBD_CMD_READ && req.length > MAX_REQUEST_BYTES) return [NBD_EINVAL, `${name} of ${req.length} bytes is larger than ${MAX_REQUEST_BYTES}`];
    if (req.type === NBD_CMD_BLOCK_STATUS && req.length === 0) return [NBD_EINVAL, 'NBD_CMD_BLOCK_STATUS of length 0'];
    return undefined;
  }

  private async serve(req: ReceivedRequest): Promise<void> {
    const exp = this.export;
    if (exp === undefined) return;
    const refused = this.check(req, exp);
    if (refused !== undefined) {
      this.sendError(req.cookie, refused[0], refused[1]);
      return;
    }
    const offset = Number(req.offset);
    const budget = req.type === NBD_CMD_READ ? this.options.budget : undefined;
    const granted = (await budget?.acquire(req.length)) ?? 0;
    try {
      if (this.stateValue === 'closed') return;
      if (req.type === NBD_CMD_READ) {
        const segments = await exp.read(offset, req.length);
        this.sendRead(req, segments, () => exp.readDone?.(segments));
      }
      else this.sendBlockStatus(req, await exp.blockStatus(offset, req.length, (req.flags & NBD_CMD_FLAG_REQ_ONE) !== 0 ? 1 : MAX_DESCRIPTORS));
    } catch (err) {
      const errno = err instanceof NbdExportError ? err.errno : NBD_EIO;
      const message = err instanceof Error ? err.message : String(err);
      this.options.transport.log(`${nbdCommandName(req.type)} of ${req.length} bytes at offset ${offset} on export "${exp.name}" failed: ${message}`);
      this.sendError(req.cookie, errno, message);
    } finally {
      budget?.release(granted);
    }
  }

  private sendError(cookie: bigint, errno: number, message: string): void {
    this.send([this.structured ? encodeErrorChunk(cookie, errno, message) : encodeSimpleReply(cookie, errno)]);
  }

  /** Sends a read's reply; `done` once the segments' data is no longer referred to (see NbdServerExport.readDone). */
  private sendRead(req: ReceivedRequest, segments: readonly NbdExportSegment[], done: () => void): void {
    const offset = Number(req.offset);
    if (!this.structured || (req.flags & NBD_CMD_FLAG_DF) !== 0 || req.length === 0) {
      const data = Buffer.alloc(req.length);
      for (const s of segments) s.data?.copy(data, s.offset - offset, 0, s.length);
      done();
      if (!this.structured) this.send([encodeSimpleReply(req.cookie, 0), data]);
      else if (req.length === 0) this.send([encodeNoneChunk(req.cookie)]);
      else this.send([encodeOffsetDataHeader(req.cookie, offset, data.length, true), data]);
      return;
    }
    // One data chunk per run of back-to-back data segments (its payload goes
    // out as the segments' own buffers, uncopied): a client reads one header
    // per run instead of one per segment.
    const out: Buffer[] = [];
    for (let i = 0; i < segments.length; ) {
      const s = segments[i];
      if (s === undefined) break;
      if (s.data === undefined) {
        out.push(encodeOffsetHole(req.cookie, s.offset, s.length, ++i === segments.length));
        continue;
      }
      const payload: Buffer[] = [];
      let end = s.offset;
      for (let d = segments[i]; d?.data !== undefined && d.offset === end; d = segments[++i]) {
        payload.push(d.data.subarray(0, d.length));
        end += d.length;
      }
      out.push(encodeOffsetDataHeader(req.cookie, s.offset, end - s.offset, i === segments.length), ...payload);
    }
    this.send(out, done);
  }

  private sendBlockStatus(req: ReceivedRequest, descriptors: readonly NbdBlockDescriptor[]): void {
    this.send([encodeBlockStatusChunk(req.cookie, BASE_ALLOCATION_ID, descriptors, true)]);
  }
}
