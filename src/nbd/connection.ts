// One NBD connection to one export: owns the socket (unix path or TCP),
// pumps the server's bytes through the handshake state machine
// (handshake.ts), then sends requests and routes the parser's replies back
// to them by cookie.
//
// Invariants:
// - State only moves forward: connecting → negotiating → ready → closing →
//   closed. Requests are sent only in `ready`; anything else is a typed
//   NBD_STATE error (or NBD_DISCONNECTED with the cause once the connection
//   failed). The state machine, the pending table and shutdown are the
//   shared ConnectionLifecycle (src/util/connection.ts), as in QmpClient.
// - Every request gets a fresh 64-bit cookie that is registered with the
//   parser before its bytes are written, so a reply can only ever match a
//   request in flight.
// - Every request has a timeout (requestTimeoutMs, default 60 s; 0 = none).
//   A request that times out fails with NBD_TIMEOUT and fails the whole
//   connection, because its reply could otherwise still arrive and be taken
//   for another's.
// - Whatever ends the connection (server hang-up, socket error, protocol
//   violation, timeout, close()), every pending request is rejected once,
//   with NBD_DISCONNECTED carrying the root cause, and `closed` resolves
//   once with that cause.
// - With `tls`, the handshake's NBD_OPT_STARTTLS is accepted before anything
//   else is said, the socket is upgraded in place (node:tls over the same
//   socket, the server's certificate checked against the given CA and the
//   host name or address), and every later byte goes over TLS. A refusal, an
//   untrusted certificate or a failed TLS handshake ends the connection with
//   NBD_TLS; nothing is ever sent in the clear instead.
// - close() is the soft disconnect: it waits for requests in flight, sends
//   NBD_CMD_DISC and lets the server hang up. During the handshake a refusal
//   is answered with NBD_OPT_ABORT; only protocol violations cut the socket.
// - The socket reads into one reused buffer, or straight into the buffer a
//   large payload is being gathered in (parser.readTarget()); bytes of the
//   reused buffer are pushed as transient, so nothing keeps a view of them.
// - Misuse the types rule out or that only a caller bug produces (sending
//   NBD_CMD_DISC, data on a non-write) fails an assertion.

import { AssertionError } from 'node:assert';
import { isIP, type Socket } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { QbackupError, describeError } from '../errors.js';
import { assert } from '../util/assert.js';
import type { TlsClientCredentials } from '../util/pki.js';
import { ConnectionLifecycle, PendingTable, checkTimeoutMs, openSocket, startTimer } from '../util/connection.js';
import { NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE, NBD_ESHUTDOWN, nbdCommandName } from './constants.js';
import { encodeAbortOption, encodeMetaContextOption, encodeNbdString, encodeRequest } from './codec.js';
import { NbdCommandError, NbdProtocolError } from './errors.js';
import { NbdHandshake, type NbdNegotiated } from './handshake.js';
import { NbdReplyParser, type NbdReply, type NbdReplyChunk } from './parser.js';

export type { NbdNegotiated } from './handshake.js';

export const NbdConnectionState = {
  Connecting: 'connecting',
  Negotiating: 'negotiating',
  Ready: 'ready',
  Closing: 'closing',
  Closed: 'closed',
} as const;
export type NbdConnectionState = (typeof NbdConnectionState)[keyof typeof NbdConnectionState];

export type NbdAddress = { socket: string } | { host: string; port: number };

/** TLS for one connection: the CA that signed the server's certificate, and the client's own certificate and key when the server verifies clients. */
export interface NbdTlsOptions extends TlsClientCredentials {
  /**
   * The name the server's certificate must carry. Default: the TCP host (a
   * name or an address), or "localhost" over a unix socket.
   */
  servername?: string;
}

export interface NbdConnectionOptions {
  exportName: string;
  /** Metadata contexts to select, e.g. "base:allocation", "qemu:dirty-bitmap:NAME". */
  metaContexts?: readonly string[];
  /**
   * Bounds connecting plus the handshake (default 30 s), and each request
   * unless requestTimeoutMs is given.
   */
  timeoutMs?: number;
  /**
   * Longest wait for the reply to one request; default timeoutMs when given,
   * else 60 s; 0 means no limit. A request that times out fails with
   * NBD_TIMEOUT and fails the connection.
   */
  requestTimeoutMs?: number;
  /** Largest reply payload accepted; see parser.ts. */
  maxPayloadBytes?: number;
  /** Negotiate TLS (NBD_OPT_STARTTLS) before anything else; never falls back to plain. */
  tls?: NbdTlsOptions;
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
  /** NBD_CMD_READ only: a buffer of `length` bytes the data is read straight into (holes are not written; see parser.ts). */
  into?: Buffer;
}

const DEFAULT_HANDSHAKE_TIMEOUT_MS = 30_000;
/** The socket's reused read buffer: one read takes at most this much of what the kernel holds. */
const READ_BUFFER_BYTES = 256 * 1024;
export const DEFAULT_NBD_REQUEST_TIMEOUT_MS = 60_000;
/** How long to wait for the server to hang up after NBD_CMD_DISC or NBD_OPT_ABORT. */
const DISCONNECT_GRACE_MS = 5_000;
const STATES = [
  NbdConnectionState.Connecting,
  NbdConnectionState.Negotiating,
  NbdConnectionState.Ready,
  NbdConnectionState.Closing,
  NbdConnectionState.Closed,
] as const;

interface PendingRequest {
  readonly command: number;
  readonly offset: number;
  readonly length: number;
  readonly onChunk: ((chunk: NbdReplyChunk) => void) | undefined;
  readonly resolve: () => void;
  readonly reject: (error: Error) => void;
  firstError: Error | undefined;
}

interface Settle {
  resolve: () => void;
  reject: (error: Error) => void;
}

interface ResolvedOptions {
  address: string;
  exportName: string;
  metaContexts: readonly string[];
  handshakeTimeoutMs: number;
  requestTimeoutMs: number;
  maxPayloadBytes: number | undefined;
  tls: NbdTlsOptions | undefined;
  /** The name the server's certificate is checked against (TLS only). */
  tlsHost: string;
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
  /** Longest wait for one reply in milliseconds; 0 means none. */
  readonly requestTimeoutMs: number;

  private readonly lifecycle: ConnectionLifecycle<NbdConnectionState>;
  /** The TCP or unix socket; after STARTTLS, the TLS socket over it. */
  private socket: Socket;
  private readonly tls: NbdTlsOptions | undefined;
  private readonly tlsHost: string;
  private readonly maxPayloadBytes: number | undefined;
  private readonly handshake: NbdHandshake;
  private readonly handshakeDone: Promise<void>;
  private settleHandshake: Settle | undefined;
  private parser: NbdReplyParser | undefined;
  private negotiatedValue: NbdNegotiated | undefined;
  private readonly pending: PendingTable<bigint, PendingRequest>;
  private nextCookie = 1n;
  private disconnectSent = false;
  private readonly idleWaiters: Array<() => void> = [];

  private constructor(socket: Socket, options: ResolvedOptions) {
    this.socket = socket;
    this.address = options.address;
    this.exportName = options.exportName;
    this.requestTimeoutMs = options.requestTimeoutMs;
    this.maxPayloadBytes = options.maxPayloadBytes;
    this.tls = options.tls;
    this.tlsHost = options.tlsHost;
    this.handshake = new NbdHandshake({ exportName: options.exportName, metaContexts: options.metaContexts, address: options.address, tls: options.tls !== undefined });
    this.handshakeDone = new Promise((resolve, reject) => {
      this.settleHandshake = { resolve, reject };
    });
    this.lifecycle = new ConnectionLifecycle({
      socket,
      states: STATES,
      address: options.address,
      connectionName: `connection to ${options.address}`,
      stateCode: 'NBD_STATE',
      disconnectedCode: 'NBD_DISCONNECTED',
      details: { exportName: options.exportName, address: options.address },
      onShutdown: (reason) => {
        this.parser?.stop();
        this.settleHandshake?.reject(reason ?? this.lifecycle.disconnectedError('NBD handshake'));
        this.settleHandshake = undefined;
        this.wakeIdleWaiters();
      },
    });
    this.closed = this.lifecycle.closed;
    this.pending = this.lifecycle.track(
      new PendingTable({
        describe: (request: PendingRequest) => `${this.describe(request)} got no reply`,
        afterTimeout: (error) => this.shutdown(error),
      }),
    );

    socket.on('connect', () => {
      if (this.lifecycle.state === NbdConnectionState.Connecting) this.lifecycle.advance(NbdConnectionState.Negotiating);
    });
    // Bytes arrive through the socket's read callback (connect()), or as 'data' events on a socket opened without one
    // (and on the TLS socket after STARTTLS).
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', () => this.handleHangUp());
    // Socket errors are handled by the lifecycle, which shuts down with them as the cause.
  }

  private readonly onData = (chunk: Buffer): void => this.handleData(chunk, false);
  private readonly onEnd = (): void => this.handleHangUp();

  /** Connects and negotiates; resolves in state `ready`. */
  static async connect(address: NbdAddress, options: NbdConnectionOptions): Promise<NbdConnection> {
    const resolved = resolveOptions(address, options);
    // Replies are read into one reused buffer (no allocation per socket
    // read; the parser copies what it keeps), or straight into the buffer of
    // a large payload that is arriving (no copy at all).
    let connection: NbdConnection | undefined;
    const shared = Buffer.allocUnsafe(READ_BUFFER_BYTES);
    const readInto = {
      buffer: (): Buffer => connection?.parser?.readTarget() ?? shared,
      callback: (n: number, buf: Buffer): boolean => {
        connection?.handleData(buf.subarray(0, n), buf.buffer === shared.buffer);
        return true;
      },
    };
    const socket = openSocket('socket' in address ? { path: address.socket } : { host: address.host, port: address.port }, readInto);
    connection = new NbdConnection(socket, resolved);
    const { exportName, handshakeTimeoutMs } = resolved;
    const timer = startTimer(handshakeTimeoutMs, () =>
      connection.shutdown(
        new QbackupError(
          'NBD_TIMEOUT',
          `NBD handshake for export "${exportName}" with ${resolved.address} did not complete within ${handshakeTimeoutMs} ms`,
          { details: { exportName, address: resolved.address, timeoutMs: handshakeTimeoutMs } },
        ),
      ),
    );
    try {
      await connection.handshakeDone;
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
    return this.lifecycle.state;
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
   * rejects with NbdCommandError when the server reports one, and with
   * NBD_TIMEOUT when no final reply came within requestTimeoutMs. Any
   * number may be in flight at once.
   */
  request(options: NbdRequestOptions): Promise<void> {
    if (this.lifecycle.state !== NbdConnectionState.Ready) {
      const what = `${nbdCommandName(options.command)} on export "${this.exportName}" not sent`;
      if (this.lifecycle.isClosed && this.lifecycle.closeReason !== undefined) return Promise.reject(this.lifecycle.disconnectedError(what));
      return Promise.reject(this.lifecycle.stateError(what));
    }
    const parser = this.parser;
    const { command, data } = options;
    const flags = options.flags ?? 0;
    const offset = options.offset ?? 0;
    const length = command === NBD_CMD_WRITE ? (data?.length ?? 0) : (options.length ?? 0);
    const cookie = this.nextCookie++;
    let header: Buffer;
    try {
      assert(parser !== undefined, 'a ready NBD connection has a reply parser');
      assert(command !== NBD_CMD_DISC, 'NBD_CMD_DISC is sent by close()');
      assert((command === NBD_CMD_WRITE) === (data !== undefined), 'NBD_CMD_WRITE, and only it, carries data');
      assert(command !== NBD_CMD_READ || length <= parser.maxPayloadBytes, `read of ${length} bytes exceeds the accepted payload of ${parser.maxPayloadBytes}`);
      assert(options.into === undefined || (command === NBD_CMD_READ && options.into.length === length), 'a read target is for NBD_CMD_READ and has its length');
      header = encodeRequest({ flags, type: command, cookie, offset, length });
    } catch (err) {
      return Promise.reject(err);
    }
    return new Promise<void>((resolve, reject) => {
      const request: PendingRequest = { command, offset, length, onChunk: options.onChunk, resolve, reject, firstError: undefined };
      this.pending.add(cookie, request, this.requestTimeoutMs, () => this.timeoutError(request));
      parser.expect(cookie, options.into === undefined ? { command, flags, offset, length } : { command, flags, offset, length, into: options.into });
      this.socket.cork();
      this.socket.write(header);
      if (data !== undefined && data.length > 0) this.socket.write(data);
      this.socket.uncork();
    });
  }

  /** Soft disconnect: waits for requests in flight, sends NBD_CMD_DISC, waits for the hang-up. Idempotent. */
  close(): Promise<void> {
    return this.lifecycle.closeOnce(() => this.closeGracefully());
  }

  /** Hard disconnect: cuts the socket; pending requests fail with `reason` as their cause. Idempotent. */
  destroy(reason?: Error): Promise<void> {
    this.shutdown(reason);
    return this.lifecycle.socketClosed;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  // ---- Handshake -------------------------------------------------------------

  /** Runs the handshake on the bytes received; writes what it says to send. */
  private pumpHandshake(chunk: Buffer): void {
    const handshake = this.handshake;
    handshake.push(chunk);
    const out = handshake.takeOutput();
    if (out.length > 0) this.socket.write(out);
    if (handshake.step.name === 'tls-upgrade') {
      this.upgradeToTls();
    } else if (handshake.status === 'failed') {
      assert(handshake.error !== undefined, 'a failed handshake has an error');
      this.settleHandshake?.reject(handshake.error);
      this.settleHandshake = undefined;
    } else if (handshake.status === 'done') {
      this.finishHandshake();
    }
  }

  /**
   * The server accepted NBD_OPT_STARTTLS: TLS over the same socket. The plain
   * socket's data now feeds the TLS layer only; its 'close' still ends the
   * connection. Once the TLS handshake is done the NBD handshake goes on.
   */
  private upgradeToTls(): void {
    const tls = this.tls;
    assert(tls !== undefined, 'STARTTLS is only sent with TLS options');
    const plain = this.socket;
    plain.off('data', this.onData);
    plain.off('end', this.onEnd);
    const secure: TLSSocket = tlsConnect({
      socket: plain,
      ca: tls.ca,
      ...(tls.cert !== undefined ? { cert: tls.cert } : {}),
      ...(tls.key !== undefined ? { key: tls.key } : {}),
      host: this.tlsHost,
      // SNI carries names only (RFC 6066); an address is still checked against the certificate's IP entries.
      ...(isIP(this.tlsHost) === 0 ? { servername: this.tlsHost } : {}),
      minVersion: 'TLSv1.2',
    });
    this.socket = secure;
    secure.on('error', (err: Error) => this.shutdown(this.tlsFailure(err)));
    secure.on('data', this.onData);
    secure.on('end', this.onEnd);
    secure.on('secureConnect', () => {
      if (this.lifecycle.state !== NbdConnectionState.Negotiating) return;
      this.handshake.tlsEstablished();
      const out = this.handshake.takeOutput();
      if (out.length > 0) secure.write(out);
    });
  }

  /** A TLS error while negotiating is NBD_TLS, naming the export and what failed; later ones are socket errors like any other. */
  private tlsFailure(err: Error): Error {
    if (this.lifecycle.state !== NbdConnectionState.Negotiating && this.lifecycle.state !== NbdConnectionState.Connecting) return err;
    const code = (err as { code?: unknown }).code;
    const name = typeof code === 'string' ? code : '';
    const ca = this.tls?.dir !== undefined ? ` by the CA in "${this.tls.dir}"` : ' by the given CA';
    const noClientCert = this.tls?.cert === undefined ? '; it may require a client certificate (client-cert.pem and client-key.pem), and none was given' : '';
    // OpenSSL's messages run over lines with source locations; its `reason` is the part for people.
    const reason = (err as { reason?: unknown }).reason;
    const detail = (typeof reason === 'string' && reason !== '' ? reason : err.message).replace(/\s+/g, ' ').trim();
    let why = `the TLS handshake failed (${detail})`;
    // The server's alerts (e.g. "certificate required") are about us; the other certificate errors are about its certificate.
    if (name.includes('ALERT')) why = `the server refused the TLS handshake (${detail})${noClientCert}`;
    else if (name.includes('ALTNAME')) why = `the server's certificate is not for "${this.tlsHost}" (${detail})`;
    else if (/CERT|SIGNATURE|ISSUER|SELF_SIGNED|VERIFY/.test(name)) why = `the server's certificate is not trusted${ca} (${detail})`;
    return new QbackupError('NBD_TLS', `Cannot open NBD export "${this.exportName}" on ${this.address} with TLS: ${why}`, {
      cause: err,
      details: { exportName: this.exportName, address: this.address, ...(typeof code === 'string' ? { tlsError: code } : {}) },
    });
  }

  private finishHandshake(): void {
    const negotiated = this.handshake.result;
    // The parser is created before the state change, so no reply byte can arrive without it.
    this.parser = new NbdReplyParser({
      exportName: this.exportName,
      exportSize: negotiated.size,
      structuredReplies: negotiated.structuredReplies,
      contextIds: negotiated.contexts.values(),
      ...(this.maxPayloadBytes === undefined ? {} : { maxPayloadBytes: this.maxPayloadBytes }),
      onReply: (reply) => this.handleReply(reply),
      onError: (error) => this.shutdown(error),
    });
    this.negotiatedValue = negotiated;
    this.lifecycle.advance(NbdConnectionState.Ready);
    this.settleHandshake?.resolve();
    this.settleHandshake = undefined;
    // A server must not speak before we send a request; the parser reports such bytes as unknown cookies.
    const early = this.handshake.takeLeftover();
    if (early.length > 0) this.parser.push(early);
  }

  private connectFailure(err: unknown): Error {
    // A bug stays a bug; wrapping it would make it look like a connection problem.
    if (err instanceof AssertionError) return err;
    const reason = this.lifecycle.closeReason ?? err;
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
  private async abortNegotiation(failure: Error): Promise<void> {
    const soft =
      failure instanceof QbackupError &&
      (failure.code === 'NBD_EXPORT_NOT_FOUND' || failure.code === 'NBD_HANDSHAKE' || failure.code === 'NBD_TLS') &&
      this.handshake.optionsStarted &&
      this.lifecycle.state === NbdConnectionState.Negotiating;
    if (soft) {
      this.lifecycle.advance(NbdConnectionState.Closing);
      this.disconnectSent = true;
      this.socket.end(encodeAbortOption());
      await this.socketClosedWithin(DISCONNECT_GRACE_MS);
    }
    this.shutdown(soft ? undefined : failure);
    await this.lifecycle.socketClosed;
  }

  // ---- Transmission ------------------------------------------------------------

  /** Bytes from the server; `transient` ones are a view of the reused read buffer, valid only during this call. */
  private handleData(chunk: Buffer, transient: boolean): void {
    switch (this.lifecycle.state) {
      case NbdConnectionState.Connecting:
      case NbdConnectionState.Negotiating:
        // The handshake keeps what it is given; its messages are small.
        this.pumpHandshake(transient ? Buffer.from(chunk) : chunk);
        return;
      case NbdConnectionState.Ready:
      case NbdConnectionState.Closing:
        // Closing after a refused handshake has no parser: the server's last words are dropped.
        this.parser?.push(chunk, transient);
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
        // The caller's callback failed: its request fails with that error; the connection goes on.
        request.firstError = err instanceof Error ? err : new Error(String(err));
      }
    }
    if (!reply.final) return;
    this.pending.take(reply.cookie);
    if (request.firstError === undefined) request.resolve();
    else request.reject(request.firstError);
    if (request.firstError instanceof NbdCommandError && request.firstError.error === NBD_ESHUTDOWN) {
      // The spec: a client that sees NBD_ESHUTDOWN must initiate a soft disconnect.
      void this.close();
    }
    if (this.pending.size === 0) this.wakeIdleWaiters();
  }

  private async closeGracefully(): Promise<void> {
    if (this.lifecycle.state === NbdConnectionState.Ready) {
      this.lifecycle.advance(NbdConnectionState.Closing);
      if (this.pending.size > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
      // The server may have failed the connection while requests drained.
      if (this.lifecycle.is(NbdConnectionState.Closing)) {
        this.disconnectSent = true;
        this.parser?.stop();
        this.socket.end(encodeRequest({ flags: 0, type: NBD_CMD_DISC, cookie: this.nextCookie++, offset: 0, length: 0 }));
        await this.socketClosedWithin(DISCONNECT_GRACE_MS);
      }
    }
    this.shutdown(undefined);
    await this.lifecycle.socketClosed;
  }

  /** Waits for the server to hang up after our goodbye; cuts the socket if it takes longer than graceMs. */
  private async socketClosedWithin(graceMs: number): Promise<void> {
    const timer = setTimeout(() => this.socket.destroy(), graceMs);
    await this.lifecycle.socketClosed;
    clearTimeout(timer);
  }

  private handleHangUp(): void {
    if (this.lifecycle.isClosed) return;
    if (this.disconnectSent) {
      this.shutdown(undefined);
      return;
    }
    const state = this.lifecycle.state;
    const midMessage = (this.parser?.bufferedBytes ?? this.handshake.bufferedBytes) > 0 ? ' in the middle of a message' : '';
    const phase = state === NbdConnectionState.Ready || state === NbdConnectionState.Closing ? '' : ' during the handshake';
    if (phase !== '' && this.tls !== undefined && this.handshake.step.name !== 'greeting') {
      // QEMU checks the client's certificate (and its tls-authz) and, when it refuses, just hangs up.
      const why =
        this.tls.cert === undefined
          ? 'likely because it requires a client certificate (client-cert.pem and client-key.pem) and none was given'
          : 'likely because it does not accept this client certificate (another CA, or not the identity its authorization allows)';
      this.shutdown(
        new QbackupError('NBD_TLS', `Cannot open NBD export "${this.exportName}" on ${this.address} with TLS: the server closed the connection, ${why}`, {
          details: { exportName: this.exportName, address: this.address },
        }),
      );
      return;
    }
    this.shutdown(
      new QbackupError('NBD_DISCONNECTED', `NBD server at ${this.address} closed the connection to export "${this.exportName}"${phase}${midMessage}`, {
        details: { exportName: this.exportName, address: this.address },
      }),
    );
  }

  /** The one way into `closed`; the first reason wins. undefined means a clean close. */
  private shutdown(reason: Error | undefined): void {
    this.lifecycle.shutdown(reason);
  }

  private wakeIdleWaiters(): void {
    const waiters = this.idleWaiters.splice(0);
    for (const wake of waiters) wake();
  }

  private timeoutError(request: PendingRequest): QbackupError {
    const timeoutMs = this.requestTimeoutMs;
    return new QbackupError('NBD_TIMEOUT', `${this.describe(request)} got no reply within ${timeoutMs} ms`, {
      details: { exportName: this.exportName, address: this.address, command: nbdCommandName(request.command), timeoutMs },
    });
  }

  private describe(request: { command: number; offset: number; length: number }): string {
    return `${nbdCommandName(request.command)} of ${request.length} bytes at offset ${request.offset} on export "${this.exportName}"`;
  }
}

/** Checks what a caller passed to connect(); user-reachable mistakes are INVALID_ARGUMENT. */
function resolveOptions(address: NbdAddress, options: NbdConnectionOptions): ResolvedOptions {
  const description = checkAddress(address);
  assert(options !== null && typeof options === 'object', 'NBD connect options must be an object');
  encodeNbdString(options.exportName, 'export name');
  const timeoutMs = checkTimeoutMs('timeoutMs', options.timeoutMs);
  const requestTimeoutMs = checkTimeoutMs('requestTimeoutMs', options.requestTimeoutMs, { allowZero: true });
  if (options.maxPayloadBytes !== undefined && (!Number.isSafeInteger(options.maxPayloadBytes) || options.maxPayloadBytes < 1)) {
    throw new QbackupError('INVALID_ARGUMENT', `maxPayloadBytes must be a positive integer, got ${String(options.maxPayloadBytes)}`);
  }
  return {
    address: description,
    exportName: options.exportName,
    metaContexts: checkMetaContexts(options.exportName, options.metaContexts),
    handshakeTimeoutMs: timeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS,
    requestTimeoutMs: requestTimeoutMs ?? timeoutMs ?? DEFAULT_NBD_REQUEST_TIMEOUT_MS,
    maxPayloadBytes: options.maxPayloadBytes,
    tls: checkTls(options.tls),
    tlsHost: options.tls?.servername ?? ('socket' in address ? 'localhost' : address.host),
  };
}

function checkTls(tls: NbdTlsOptions | undefined): NbdTlsOptions | undefined {
  if (tls === undefined) return undefined;
  assert(tls !== null && typeof tls === 'object', 'NBD tls options must be an object');
  if (tls.ca === undefined || tls.ca.length === 0) throw new QbackupError('INVALID_ARGUMENT', 'NBD TLS needs a CA certificate to check the server against');
  if ((tls.cert === undefined) !== (tls.key === undefined)) throw new QbackupError('INVALID_ARGUMENT', 'NBD TLS needs both a client certificate and its key, or neither');
  if (tls.servername === '') throw new QbackupError('INVALID_ARGUMENT', 'NBD TLS server name must be non-empty');
  return tls;
}

function checkAddress(address: NbdAddress): string {
  assert(address !== null && typeof address === 'object' && ('socket' in address || 'host' in address), 'NBD address must be { socket } or { host, port }');
  if ('socket' in address) {
    assert(typeof address.socket === 'string', 'NBD socket path must be a string');
    if (address.socket === '') throw new QbackupError('INVALID_ARGUMENT', 'NBD socket path must be a non-empty string');
    return formatNbdAddress(address);
  }
  assert(typeof address.host === 'string', 'NBD host must be a string');
  if (address.host === '') throw new QbackupError('INVALID_ARGUMENT', 'NBD host must be a non-empty string');
  if (!Number.isInteger(address.port) || address.port < 1 || address.port > 65535) {
    throw new QbackupError('INVALID_ARGUMENT', `NBD port must be an integer from 1 to 65535, got ${String(address.port)}`);
  }
  return formatNbdAddress(address);
}

/** The contexts without duplicates; each must be a valid query ("namespace:…"), checked before connecting. */
function checkMetaContexts(exportName: string, contexts: readonly string[] | undefined): string[] {
  if (contexts === undefined) return [];
  assert(Array.isArray(contexts), 'metaContexts must be an array of strings');
  const unique = [...new Set(contexts)];
  if (unique.length > 0) encodeMetaContextOption(exportName, unique);
  return unique;
}
