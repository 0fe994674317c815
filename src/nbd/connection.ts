// One NBD connection to one export: owns the socket (unix path or TCP),
// performs the fixed-newstyle handshake, then sends requests and routes the
// parser's replies back to them by cookie.
//
// Invariants:
// - State only moves forward: connecting → negotiating → ready → closing →
//   closed. Requests are sent only in `ready`; anything else is a typed
//   NBD_STATE error (or NBD_DISCONNECTED with the cause once the connection
//   failed).
// - Every request gets a fresh 64-bit cookie that is registered with the
//   parser before its bytes are written, so a reply can only ever match a
//   request in flight.
// - Whatever ends the connection (server hang-up, socket error, protocol
//   violation, timeout, close()), every pending request is rejected once,
//   with NBD_DISCONNECTED carrying the root cause, and `closed` resolves
//   once with that cause. shutdown() is the only way into `closed`, and it
//   is idempotent.
// - close() is the soft disconnect: it waits for requests in flight, sends
//   NBD_CMD_DISC and lets the server hang up. During the handshake a refusal
//   is answered with NBD_OPT_ABORT; only protocol violations cut the socket.

import { strict as assert } from 'node:assert';
import { createConnection, type Socket } from 'node:net';
import { QbackupError, describeError } from '../errors.js';
import {
  NBD_CMD_DISC,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_DEFAULT_MAX_PAYLOAD,
  NBD_ESHUTDOWN,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAX_STRING,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPTION_REPLY_HEADER_SIZE,
  NBD_REP_ACK,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  isNbdReplyError,
  nbdCommandName,
  nbdOptionName,
  nbdReplyName,
} from './constants.js';
import {
  decodeExportNameReply,
  decodeInfoReply,
  decodeMetaContextReply,
  decodeOptionErrorMessage,
  decodeOptionReplyHeader,
  decodeServerHello,
  encodeAbortOption,
  encodeClientFlags,
  encodeExportNameOption,
  encodeGoOption,
  encodeMetaContextOption,
  encodeNbdString,
  encodeRequest,
  encodeStructuredReplyOption,
  type NbdBlockSizes,
} from './codec.js';
import { NbdCommandError, NbdProtocolError } from './errors.js';
import { ByteQueue, NbdReplyParser, type NbdReply, type NbdReplyChunk } from './parser.js';

export const NbdConnectionState = {
  Connecting: 'connecting',
  Negotiating: 'negotiating',
  Ready: 'ready',
  Closing: 'closing',
  Closed: 'closed',
} as const;
export type NbdConnectionState = (typeof NbdConnectionState)[keyof typeof NbdConnectionState];

export type NbdAddress = { socket: string } | { host: string; port: number };

export interface NbdConnectionOptions {
  exportName: string;
  /** Metadata contexts to select, e.g. "base:allocation", "qemu:dirty-bitmap:NAME". */
  metaContexts?: readonly string[];
  /**
   * Bounds connecting plus the handshake (default 30 s), and each request
   * (default: none). A request that times out fails the whole connection,
   * because its reply could otherwise still arrive.
   */
  timeoutMs?: number;
  /** Largest reply payload accepted; see parser.ts. */
  maxPayloadBytes?: number;
}

/** What the handshake settled. */
export interface NbdNegotiated {
  exportName: string;
  size: number;
  /** NBD_FLAG_* transmission flags. */
  transmissionFlags: number;
  blockSizes: NbdBlockSizes;
  /** False when the server sent no NBD_INFO_BLOCK_SIZE and the spec's defaults apply. */
  blockSizesAdvertised: boolean;
  structuredReplies: boolean;
  /** Contexts the server selected: name → context id. */
  contexts: ReadonlyMap<string, number>;
  /** NBD_INFO_NAME, when the server sent one. */
  canonicalName: string | undefined;
  /** NBD_INFO_DESCRIPTION, when the server sent one. */
  description: string | undefined;
}

export interface NbdRequestOptions {
  /** NBD_CMD_*; NBD_CMD_DISC is sent by close() only. */
  command: number;
  /** NBD_CMD_FLAG_* */
  flags?: number;
  offset?: number;
  /** Ignored for NBD_CMD_WRITE, whose length is data.length. */
  length?: number;
  /** Payload of NBD_CMD_WRITE. */
  data?: Uint8Array;
  /** Sees every non-error chunk of the reply as it arrives (read data, holes, block status). */
  onChunk?: (chunk: NbdReplyChunk) => void;
}

const DEFAULT_HANDSHAKE_TIMEOUT_MS = 30_000;
/** How long to wait for the server to hang up after NBD_CMD_DISC or NBD_OPT_ABORT. */
const DISCONNECT_GRACE_MS = 5_000;
/** setTimeout fires at once for larger delays, so anything beyond is treated as "no timeout". */
const MAX_TIMER_MS = 2_147_483_647;
/** Option replies carry at most a string of NBD_MAX_STRING bytes plus fixed fields. */
const MAX_OPTION_REPLY_BYTES = NBD_MAX_STRING + 16;

interface PendingRequest {
  readonly command: number;
  readonly offset: number;
  readonly length: number;
  readonly onChunk: ((chunk: NbdReplyChunk) => void) | undefined;
  readonly resolve: () => void;
  readonly reject: (error: Error) => void;
  timer: NodeJS.Timeout | undefined;
  firstError: Error | undefined;
}

interface OptionReply {
  reply: number;
  payload: Buffer;
}

export function formatNbdAddress(address: NbdAddress): string {
  if ('socket' in address) return `unix:${address.socket}`;
  return address.host.includes(':') ? `[${address.host}]:${address.port}` : `${address.host}:${address.port}`;
}

export class NbdConnection {
  readonly exportName: string;
  /** "unix:/path" or "host:port", for messages. */
  readonly address: string;
  /** Resolves once, when the connection ends: the root cause, or undefined after close(). Never rejects. */
  readonly closed: Promise<Error | undefined>;

  private stateValue: NbdConnectionState = NbdConnectionState.Connecting;
  private readonly socket: Socket;
  private readonly requestTimeoutMs: number | undefined;
  private readonly maxPayloadBytes: number | undefined;
  private readonly handshakeBytes = new ByteQueue();
  private readWaiter: { n: number; resolve: (bytes: Buffer) => void; reject: (error: Error) => void } | undefined;
  private parser: NbdReplyParser | undefined;
  private negotiatedValue: NbdNegotiated | undefined;
  private readonly pending = new Map<bigint, PendingRequest>();
  private nextCookie = 1n;
  private closeReason: Error | undefined;
  private resolveClosed: (reason: Error | undefined) => void = () => undefined;
  private readonly socketClosed: Promise<void>;
  private closing: Promise<void> | undefined;
  private disconnectSent = false;
  /** Set once our client flags are sent: from then on a refusal is answered with NBD_OPT_ABORT. */
  private optionHaggling = false;
  private readonly idleWaiters: Array<() => void> = [];

  private constructor(socket: Socket, address: string, exportName: string, options: NbdConnectionOptions) {
    this.socket = socket;
    this.address = address;
    this.exportName = exportName;
    this.requestTimeoutMs = options.timeoutMs;
    this.maxPayloadBytes = options.maxPayloadBytes;
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    this.socketClosed = new Promise((resolve) => socket.once('close', () => resolve()));

    socket.on('connect', () => {
      if (this.stateValue === NbdConnectionState.Connecting) this.stateValue = NbdConnectionState.Negotiating;
    });
    socket.on('data', (chunk: Buffer) => this.handleData(chunk));
    socket.on('end', () => this.handleHangUp());
    socket.on('close', () => this.handleHangUp());
    // Always listened to: an unhandled 'error' on a socket would crash the process.
    socket.on('error', (err: Error) => this.shutdown(err));
  }

  /** Connects and negotiates; resolves in state `ready`. */
  static async connect(address: NbdAddress, options: NbdConnectionOptions): Promise<NbdConnection> {
    const description = checkAddress(address);
    if (options === null || typeof options !== 'object') throw new QbackupError('INVALID_ARGUMENT', 'NBD connect options must be an object');
    encodeNbdString(options.exportName, 'export name');
    const metaContexts = checkMetaContexts(options.metaContexts);
    const handshakeTimeoutMs = checkTimeout(options.timeoutMs) ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
    if (options.maxPayloadBytes !== undefined && (!Number.isSafeInteger(options.maxPayloadBytes) || options.maxPayloadBytes < 1)) {
      throw new QbackupError('INVALID_ARGUMENT', `maxPayloadBytes must be a positive integer, got ${String(options.maxPayloadBytes)}`);
    }

    const socket = 'socket' in address ? createConnection({ path: address.socket }) : createConnection({ host: address.host, port: address.port });
    if (!('socket' in address)) socket.setNoDelay(true);
    const connection = new NbdConnection(socket, description, options.exportName, options);
    const timer = timerFor(handshakeTimeoutMs, () =>
      connection.shutdown(
        new QbackupError(
          'NBD_TIMEOUT',
          `NBD handshake for export "${options.exportName}" with ${description} did not complete within ${handshakeTimeoutMs} ms`,
          { details: { exportName: options.exportName, address: description, timeoutMs: handshakeTimeoutMs } },
        ),
      ),
    );
    try {
      await connection.handshake(metaContexts);
      return connection;
    } catch (err) {
      const failure = connection.connectFailure(err);
      await connection.abortNegotiation(failure);
      throw failure;
    } finally {
      clearTimeout(timer);
    }
  }

  get state(): NbdConnectionState {
    return this.stateValue;
  }

  get negotiated(): NbdNegotiated {
    assert(this.negotiatedValue !== undefined, 'NBD connection has not negotiated yet');
    return this.negotiatedValue;
  }

  /** Requests whose final reply has not arrived. */
  get inFlight(): number {
    return this.pending.size;
  }

  /**
   * Sends one request; resolves when its final reply arrives without error,
   * rejects with NbdCommandError when the server reports one. Any number may
   * be in flight at once.
   */
  request(options: NbdRequestOptions): Promise<void> {
    if (this.stateValue !== NbdConnectionState.Ready) {
      const what = `${nbdCommandName(options.command)} on export "${this.exportName}" not sent`;
      if (this.stateValue === NbdConnectionState.Closed && this.closeReason !== undefined) return Promise.reject(this.disconnectedError(what));
      return Promise.reject(
        new QbackupError('NBD_STATE', `${what}: the connection to ${this.address} is ${this.stateValue}`, {
          details: { exportName: this.exportName, state: this.stateValue },
        }),
      );
    }
    const parser = this.parser;
    assert(parser !== undefined);
    const command = options.command;
    const flags = options.flags ?? 0;
    const offset = options.offset ?? 0;
    const data = options.data;
    const length = command === NBD_CMD_WRITE ? (data?.length ?? 0) : (options.length ?? 0);
    if (command === NBD_CMD_DISC) return Promise.reject(new QbackupError('INVALID_ARGUMENT', 'NBD_CMD_DISC is sent by close()'));
    if ((command === NBD_CMD_WRITE) !== (data !== undefined)) {
      return Promise.reject(new QbackupError('INVALID_ARGUMENT', 'NBD_CMD_WRITE, and only it, carries data'));
    }
    if (command === NBD_CMD_READ && length > parser.maxPayloadBytes) {
      return Promise.reject(new QbackupError('INVALID_ARGUMENT', `read of ${length} bytes exceeds the accepted payload of ${parser.maxPayloadBytes}`));
    }
    const cookie = this.nextCookie++;
    let header: Buffer;
    try {
      header = encodeRequest({ flags, type: command, cookie, offset, length });
    } catch (err) {
      return Promise.reject(err);
    }
    return new Promise<void>((resolve, reject) => {
      const request: PendingRequest = { command, offset, length, onChunk: options.onChunk, resolve, reject, timer: undefined, firstError: undefined };
      this.pending.set(cookie, request);
      parser.expect(cookie, { command, flags, offset, length });
      if (this.requestTimeoutMs !== undefined) {
        const timeoutMs = this.requestTimeoutMs;
        request.timer = timerFor(timeoutMs, () => {
          const error = new QbackupError('NBD_TIMEOUT', `${this.describe(request)} got no reply within ${timeoutMs} ms`, {
            details: { exportName: this.exportName, address: this.address, timeoutMs },
          });
          this.pending.delete(cookie);
          reject(error);
          this.shutdown(error);
        });
      }
      this.socket.cork();
      this.socket.write(header);
      if (data !== undefined && data.length > 0) this.socket.write(data);
      this.socket.uncork();
    });
  }

  /** Soft disconnect: waits for requests in flight, sends NBD_CMD_DISC, waits for the hang-up. Idempotent. */
  close(): Promise<void> {
    this.closing ??= this.closeGracefully();
    return this.closing;
  }

  /** Hard disconnect: cuts the socket; pending requests fail with `reason` as their cause. Idempotent. */
  destroy(reason?: Error): Promise<void> {
    this.shutdown(reason);
    return this.socketClosed;
  }

  // ---- Handshake -------------------------------------------------------------

  private async handshake(metaContexts: readonly string[]): Promise<void> {
    const hello = decodeServerHello(await this.read(16));
    if (hello === 'oldstyle') {
      throw new QbackupError(
        'NBD_HANDSHAKE',
        `NBD server at ${this.address} uses the oldstyle handshake, which cannot select export "${this.exportName}"; a newstyle server is required`,
        { details: { exportName: this.exportName, address: this.address } },
      );
    }
    const handshakeFlags = (await this.read(2)).readUInt16BE(0);
    if ((handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE) === 0) {
      throw new QbackupError(
        'NBD_HANDSHAKE',
        `NBD server at ${this.address} does not support fixed newstyle negotiation, which export "${this.exportName}" needs`,
        { details: { exportName: this.exportName, address: this.address, handshakeFlags } },
      );
    }
    const noZeroes = (handshakeFlags & NBD_FLAG_NO_ZEROES) !== 0;
    this.socket.write(encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0)));
    this.optionHaggling = true;

    const structuredReplies = await this.negotiateStructuredReplies();
    const contexts = structuredReplies && metaContexts.length > 0 ? await this.negotiateMetaContexts(metaContexts) : new Map<string, number>();
    const go = await this.negotiateGo(noZeroes);

    const negotiated: NbdNegotiated = { ...go, exportName: this.exportName, structuredReplies, contexts };
    // The parser is created before the state change, so no reply byte can arrive without it.
    this.parser = new NbdReplyParser({
      exportName: this.exportName,
      exportSize: negotiated.size,
      structuredReplies,
      contextIds: contexts.values(),
      ...(this.maxPayloadBytes === undefined ? {} : { maxPayloadBytes: this.maxPayloadBytes }),
      onReply: (reply) => this.handleReply(reply),
      onError: (error) => this.shutdown(error),
    });
    this.negotiatedValue = negotiated;
    if (this.stateValue !== NbdConnectionState.Negotiating) throw this.disconnectedError('NBD handshake did not finish');
    this.stateValue = NbdConnectionState.Ready;
    // A server must not speak before we send a request; the parser reports such bytes as unknown cookies.
    const early = this.handshakeBytes.takeAll();
    if (early.length > 0) this.parser.push(early);
  }

  private async negotiateStructuredReplies(): Promise<boolean> {
    this.socket.write(encodeStructuredReplyOption());
    const { reply, payload } = await this.readOptionReply(NBD_OPT_STRUCTURED_REPLY);
    if (reply === NBD_REP_ACK) {
      if (payload.length !== 0) throw new NbdProtocolError('bad-length', `NBD_REP_ACK to NBD_OPT_STRUCTURED_REPLY carries ${payload.length} bytes`);
      return true;
    }
    if (isNbdReplyError(reply)) {
      this.throwIfFatalOptionError(NBD_OPT_STRUCTURED_REPLY, reply, payload);
      return false;
    }
    throw unexpectedOptionReply(NBD_OPT_STRUCTURED_REPLY, reply);
  }

  private async negotiateMetaContexts(queries: readonly string[]): Promise<Map<string, number>> {
    this.socket.write(encodeMetaContextOption(this.exportName, queries, NBD_OPT_SET_META_CONTEXT));
    const contexts = new Map<string, number>();
    const ids = new Set<number>();
    for (;;) {
      const { reply, payload } = await this.readOptionReply(NBD_OPT_SET_META_CONTEXT);
      if (reply === NBD_REP_META_CONTEXT) {
        const { contextId, name } = decodeMetaContextReply(payload);
        if (!queries.includes(name)) {
          throw new NbdProtocolError('bad-context', `server selected metadata context "${name}", which was not requested`);
        }
        if (contexts.has(name) || ids.has(contextId)) {
          throw new NbdProtocolError('bad-context', `server selected metadata context "${name}" (id ${contextId}) twice or reused its id`);
        }
        contexts.set(name, contextId);
        ids.add(contextId);
      } else if (reply === NBD_REP_ACK) {
        if (payload.length !== 0) throw new NbdProtocolError('bad-length', `NBD_REP_ACK to NBD_OPT_SET_META_CONTEXT carries ${payload.length} bytes`);
        return contexts;
      } else if (isNbdReplyError(reply)) {
        // A refused selection selects nothing; callers see it in `contexts`.
        this.throwIfFatalOptionError(NBD_OPT_SET_META_CONTEXT, reply, payload);
        return new Map();
      } else {
        throw unexpectedOptionReply(NBD_OPT_SET_META_CONTEXT, reply);
      }
    }
  }

  private async negotiateGo(noZeroes: boolean): Promise<Omit<NbdNegotiated, 'exportName' | 'structuredReplies' | 'contexts'>> {
    this.socket.write(encodeGoOption(this.exportName, [NBD_INFO_BLOCK_SIZE], NBD_OPT_GO));
    let exportInfo: { size: number; transmissionFlags: number } | undefined;
    let blockSizes: NbdBlockSizes | undefined;
    let canonicalName: string | undefined;
    let description: string | undefined;
    for (;;) {
      const { reply, payload } = await this.readOptionReply(NBD_OPT_GO);
      if (reply === NBD_REP_INFO) {
        const info = decodeInfoReply(payload);
        if (info.info === NBD_INFO_EXPORT) exportInfo = { size: info.size, transmissionFlags: info.transmissionFlags };
        else if (info.info === NBD_INFO_BLOCK_SIZE) blockSizes = { minimum: info.minimum, preferred: info.preferred, maximum: info.maximum };
        else if (info.info === NBD_INFO_NAME) canonicalName = info.name;
        else if (info.info === NBD_INFO_DESCRIPTION) description = info.description;
        // Unknown info types are ignored, as the spec demands.
      } else if (reply === NBD_REP_ACK) {
        if (payload.length !== 0) throw new NbdProtocolError('bad-length', `NBD_REP_ACK to NBD_OPT_GO carries ${payload.length} bytes`);
        if (exportInfo === undefined) throw new NbdProtocolError('incomplete-reply', 'NBD_OPT_GO succeeded without NBD_INFO_EXPORT');
        return {
          ...exportInfo,
          blockSizes: blockSizes ?? defaultBlockSizes(),
          blockSizesAdvertised: blockSizes !== undefined,
          canonicalName,
          description,
        };
      } else if (reply === NBD_REP_ERR_UNSUP) {
        // Servers without NBD_OPT_GO: the spec asks clients to fall back to NBD_OPT_EXPORT_NAME.
        return { ...(await this.exportNameFallback(noZeroes)), blockSizes: defaultBlockSizes(), blockSizesAdvertised: false, canonicalName, description };
      } else if (isNbdReplyError(reply)) {
        this.throwIfFatalOptionError(NBD_OPT_GO, reply, payload);
        throw this.optionRefused(NBD_OPT_GO, reply, payload);
      } else {
        throw unexpectedOptionReply(NBD_OPT_GO, reply);
      }
    }
  }

  private async exportNameFallback(noZeroes: boolean): Promise<{ size: number; transmissionFlags: number }> {
    this.socket.write(encodeExportNameOption(this.exportName));
    const reply = decodeExportNameReply(await this.read(10));
    if (!noZeroes) await this.read(124);
    return reply;
  }

  /** Errors after which negotiation cannot go on, whatever the option. */
  private throwIfFatalOptionError(option: number, reply: number, payload: Buffer): void {
    if (reply === NBD_REP_ERR_SHUTDOWN || reply === NBD_REP_ERR_TLS_REQD) throw this.optionRefused(option, reply, payload);
  }

  private optionRefused(option: number, reply: number, payload: Buffer): QbackupError {
    const serverMessage = decodeOptionErrorMessage(payload);
    const suffix = serverMessage === '' ? '' : `: ${serverMessage}`;
    const details = { exportName: this.exportName, address: this.address, option: nbdOptionName(option), reply: nbdReplyName(reply), serverMessage };
    if (reply === NBD_REP_ERR_UNKNOWN) {
      return new QbackupError('NBD_EXPORT_NOT_FOUND', `NBD export "${this.exportName}" not found on ${this.address}${suffix}`, { details });
    }
    const why =
      reply === NBD_REP_ERR_TLS_REQD
        ? 'the server requires TLS, which qbackup does not use'
        : reply === NBD_REP_ERR_SHUTDOWN
          ? 'the server is shutting down'
          : reply === NBD_REP_ERR_POLICY
            ? 'the server refused it by policy'
            : `the server replied ${nbdReplyName(reply)}`;
    return new QbackupError('NBD_HANDSHAKE', `Cannot open NBD export "${this.exportName}" on ${this.address}: ${why}${suffix}`, { details });
  }

  private async readOptionReply(option: number): Promise<OptionReply> {
    const header = decodeOptionReplyHeader(await this.read(NBD_OPTION_REPLY_HEADER_SIZE));
    if (header.option !== option) {
      throw new NbdProtocolError('unexpected-reply', `option reply is for ${nbdOptionName(header.option)}, but ${nbdOptionName(option)} was sent`);
    }
    if (header.length > MAX_OPTION_REPLY_BYTES) {
      throw new NbdProtocolError('bad-length', `${nbdReplyName(header.reply)} to ${nbdOptionName(option)} has length ${header.length}, more than ${MAX_OPTION_REPLY_BYTES}`);
    }
    return { reply: header.reply, payload: await this.read(header.length) };
  }

  /** Exactly n bytes of the handshake. */
  private read(n: number): Promise<Buffer> {
    assert(this.readWaiter === undefined, 'one handshake read at a time');
    if (this.stateValue === NbdConnectionState.Closed) return Promise.reject(this.closeReason ?? this.disconnectedError('NBD handshake'));
    const ready = this.handshakeBytes.take(n);
    if (ready !== undefined) return Promise.resolve(ready);
    return new Promise((resolve, reject) => {
      this.readWaiter = { n, resolve, reject };
    });
  }

  private connectFailure(err: unknown): QbackupError {
    const reason = this.closeReason ?? err;
    if (reason instanceof NbdProtocolError) return reason.forExport(this.exportName);
    if (reason instanceof QbackupError && reason.code === 'NBD_TIMEOUT') return reason;
    if (err instanceof NbdProtocolError) return err.forExport(this.exportName);
    if (err instanceof QbackupError && err.code !== 'NBD_DISCONNECTED' && err.code !== 'NBD_STATE') return err;
    const cause = reason instanceof QbackupError && reason.cause !== undefined ? reason.cause : reason;
    return new QbackupError('NBD_DISCONNECTED', `Cannot connect to NBD export "${this.exportName}" at ${this.address}: ${describeError(cause)}`, {
      cause,
      details: { exportName: this.exportName, address: this.address },
    });
  }

  /** After a refusal the spec wants a soft disconnect (NBD_OPT_ABORT); after a violation we just hang up. */
  private async abortNegotiation(failure: QbackupError): Promise<void> {
    const soft =
      (failure.code === 'NBD_EXPORT_NOT_FOUND' || failure.code === 'NBD_HANDSHAKE') &&
      this.optionHaggling &&
      this.stateValue === NbdConnectionState.Negotiating;
    if (soft) {
      this.stateValue = NbdConnectionState.Closing;
      this.disconnectSent = true;
      this.socket.end(encodeAbortOption());
      const timer = setTimeout(() => this.socket.destroy(), DISCONNECT_GRACE_MS);
      await this.socketClosed;
      clearTimeout(timer);
    }
    this.shutdown(soft ? undefined : failure);
    await this.socketClosed;
  }

  // ---- Transmission ------------------------------------------------------------

  private handleData(chunk: Buffer): void {
    switch (this.stateValue) {
      case NbdConnectionState.Connecting:
      case NbdConnectionState.Negotiating: {
        this.handshakeBytes.push(chunk);
        const waiter = this.readWaiter;
        if (waiter !== undefined) {
          const bytes = this.handshakeBytes.take(waiter.n);
          if (bytes !== undefined) {
            this.readWaiter = undefined;
            waiter.resolve(bytes);
          }
        }
        return;
      }
      case NbdConnectionState.Ready:
      case NbdConnectionState.Closing:
        this.parser?.push(chunk);
        return;
      case NbdConnectionState.Closed:
        return;
    }
  }

  private handleReply(reply: NbdReply): void {
    const request = this.pending.get(reply.cookie);
    // The parser accepts only cookies in flight, and both tables drop a cookie together.
    assert(request !== undefined, `NBD reply for cookie ${reply.cookie} has no pending request`);
    const { chunk } = reply;
    if (chunk.type === 'error') {
      request.firstError ??= new NbdCommandError({
        exportName: this.exportName,
        command: request.command,
        offset: request.offset,
        length: request.length,
        error: chunk.error,
        serverMessage: chunk.message,
        ...(chunk.offset === undefined ? {} : { errorOffset: chunk.offset }),
      });
    } else if (request.onChunk !== undefined && request.firstError === undefined) {
      try {
        request.onChunk(chunk);
      } catch (err) {
        request.firstError = err instanceof Error ? err : new Error(String(err));
      }
    }
    if (!reply.final) return;
    this.pending.delete(reply.cookie);
    clearTimeout(request.timer);
    if (request.firstError === undefined) request.resolve();
    else request.reject(request.firstError);
    if (request.firstError instanceof NbdCommandError && request.firstError.error === NBD_ESHUTDOWN) {
      // The spec: a client that sees NBD_ESHUTDOWN must initiate a soft disconnect.
      void this.close();
    }
    if (this.pending.size === 0) this.wakeIdleWaiters();
  }

  private async closeGracefully(): Promise<void> {
    if (this.stateValue === NbdConnectionState.Ready) {
      this.stateValue = NbdConnectionState.Closing;
      if (this.pending.size > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
      if (this.stateValue === NbdConnectionState.Closing) {
        this.disconnectSent = true;
        this.parser?.stop();
        this.socket.end(encodeRequest({ flags: 0, type: NBD_CMD_DISC, cookie: this.nextCookie++, offset: 0, length: 0 }));
        const timer = setTimeout(() => this.socket.destroy(), DISCONNECT_GRACE_MS);
        await this.socketClosed;
        clearTimeout(timer);
      }
    }
    this.shutdown(undefined);
    await this.socketClosed;
  }

  private handleHangUp(): void {
    if (this.stateValue === NbdConnectionState.Closed) return;
    if (this.disconnectSent) {
      this.shutdown(undefined);
      return;
    }
    const midMessage = (this.parser?.bufferedBytes ?? this.handshakeBytes.length) > 0 ? ' in the middle of a message' : '';
    const phase = this.stateValue === NbdConnectionState.Ready || this.stateValue === NbdConnectionState.Closing ? '' : ' during the handshake';
    this.shutdown(
      new QbackupError('NBD_DISCONNECTED', `NBD server at ${this.address} closed the connection to export "${this.exportName}"${phase}${midMessage}`, {
        details: { exportName: this.exportName, address: this.address },
      }),
    );
  }

  /** The one way into `closed`; the first reason wins. undefined means a clean close. */
  private shutdown(reason: Error | undefined): void {
    if (this.stateValue === NbdConnectionState.Closed) return;
    this.stateValue = NbdConnectionState.Closed;
    this.closeReason = reason;
    this.socket.destroy();
    this.parser?.stop();

    const waiter = this.readWaiter;
    this.readWaiter = undefined;
    waiter?.reject(reason ?? this.disconnectedError('NBD handshake'));

    const requests = [...this.pending.values()];
    this.pending.clear();
    for (const request of requests) {
      clearTimeout(request.timer);
      request.reject(this.disconnectedError(`${this.describe(request)} got no reply`));
    }
    this.wakeIdleWaiters();
    this.resolveClosed(reason);
  }

  private wakeIdleWaiters(): void {
    const waiters = this.idleWaiters.splice(0);
    for (const wake of waiters) wake();
  }

  private disconnectedError(what: string): QbackupError {
    const reason = this.closeReason;
    const message =
      reason === undefined
        ? `${what}: the connection to ${this.address} was closed`
        : `${what}: connection to ${this.address} lost: ${describeError(reason)}`;
    return new QbackupError('NBD_DISCONNECTED', message, { cause: reason, details: { exportName: this.exportName, address: this.address } });
  }

  private describe(request: { command: number; offset: number; length: number }): string {
    return `${nbdCommandName(request.command)} of ${request.length} bytes at offset ${request.offset} on export "${this.exportName}"`;
  }
}

function defaultBlockSizes(): NbdBlockSizes {
  return { minimum: 1, preferred: 4096, maximum: NBD_DEFAULT_MAX_PAYLOAD };
}

function unexpectedOptionReply(option: number, reply: number): NbdProtocolError {
  return new NbdProtocolError('unexpected-reply', `unexpected ${nbdReplyName(reply)} in reply to ${nbdOptionName(option)}`);
}

function checkAddress(address: NbdAddress): string {
  if (address !== null && typeof address === 'object' && 'socket' in address) {
    if (typeof address.socket !== 'string' || address.socket === '') {
      throw new QbackupError('INVALID_ARGUMENT', 'NBD socket path must be a non-empty string');
    }
    return formatNbdAddress(address);
  }
  if (address !== null && typeof address === 'object' && 'host' in address) {
    if (typeof address.host !== 'string' || address.host === '') throw new QbackupError('INVALID_ARGUMENT', 'NBD host must be a non-empty string');
    if (!Number.isInteger(address.port) || address.port < 1 || address.port > 65535) {
      throw new QbackupError('INVALID_ARGUMENT', `NBD port must be an integer from 1 to 65535, got ${String(address.port)}`);
    }
    return formatNbdAddress(address);
  }
  throw new QbackupError('INVALID_ARGUMENT', 'NBD address must be { socket } or { host, port }');
}

function checkMetaContexts(contexts: readonly string[] | undefined): string[] {
  if (contexts === undefined) return [];
  if (!Array.isArray(contexts)) throw new QbackupError('INVALID_ARGUMENT', 'metaContexts must be an array of strings');
  const unique = [...new Set(contexts)];
  for (const c of unique) encodeNbdString(c, 'metadata context');
  return unique;
}

function checkTimeout(value: number | undefined): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'number' || Number.isNaN(value) || value <= 0) {
    throw new QbackupError('INVALID_ARGUMENT', `timeoutMs must be a positive number of milliseconds, got ${String(value)}`);
  }
  return value;
}

function timerFor(timeoutMs: number, onTimeout: () => void): NodeJS.Timeout | undefined {
  return timeoutMs > MAX_TIMER_MS ? undefined : setTimeout(onTimeout, timeoutMs);
}
