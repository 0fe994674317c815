// One connection to a libvirt daemon over its unix socket: owns the socket,
// frames calls (procedures.ts) with fresh serials, routes replies back by
// serial, answers keepalive pings, and buffers the domain events the daemon
// sends so a wait that starts after an event arrived still finds it.
//
// Invariants:
// - State only moves forward: connecting → ready → closed (the
//   shared ConnectionLifecycle of src/util/connection.ts, as QMP and NBD).
// - A call's serial is registered before its bytes are written; a reply
//   must name the program, version and procedure of the call it answers,
//   else the daemon broke the protocol and the connection ends.
// - Every reply body is decoded in full: bytes left over are a protocol error.
// - A call that times out fails with LIBVIRT_TIMEOUT and ends the connection
//   (its late reply could otherwise be taken for another's).
// - Whatever ends the connection, every pending call and event waiter fails
//   once with LIBVIRT_DISCONNECTED carrying the root cause, and `closed`
//   resolves once.
// - Connecting fails with one sentence: no socket (LIBVIRT_UNAVAILABLE),
//   nothing listening (LIBVIRT_UNAVAILABLE), or permission denied
//   (LIBVIRT_ACCESS_DENIED).

import type { Socket } from 'node:net';
import { QbackupError, describeError } from '../../../errors.js';
import { assert } from '../../../util/assert.js';
import { ConnectionLifecycle, PendingTable, checkTimeoutMs, openSocket, startTimer } from '../../../util/connection.js';
import * as C from './constants.js';
import { LibvirtCallError, LibvirtProtocolError } from './errors.js';
import { LibvirtFrameParser, encodeMessage, type LibvirtFrame } from './frame.js';
import { EVENTS, type LibvirtDomainEvent, type LibvirtProcedure } from './procedures.js';
import { remoteError } from './structs.js';
import { XdrReader, encodeXdr } from './xdr.js';

export const LibvirtConnectionState = {
  Connecting: 'connecting',
  Ready: 'ready',
  Closed: 'closed',
} as const;
export type LibvirtConnectionState = (typeof LibvirtConnectionState)[keyof typeof LibvirtConnectionState];

export interface LibvirtConnectionOptions {
  /** How the daemon is named in messages (the connection URI); default the socket path. */
  label?: string;
  /** Limit for the socket to connect. Default 10 s. */
  connectTimeoutMs?: number;
  /** Timeout of a call that gives none. Default 60 s; Infinity for none. */
  defaultTimeoutMs?: number;
  /** Largest accepted message; default and ceiling 32 MiB (VIR_NET_MESSAGE_MAX). */
  maxMessageBytes?: number;
  /** How many recent events are kept for waitForEvent(). Default 1000. */
  eventBufferSize?: number;
}

export interface LibvirtCallOptions {
  /** Milliseconds; Infinity for none. Default: the connection's defaultTimeoutMs. */
  timeoutMs?: number | undefined;
}

/** A received event with its sequence number on this connection (1, 2, …). */
export type LibvirtEvent = LibvirtDomainEvent & { seq: number };
export type LibvirtEventListener = (event: LibvirtEvent) => void;

interface PendingCall {
  procedure: LibvirtProcedure<unknown, unknown>;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
}

interface EventWaiter {
  matches: (event: LibvirtEvent) => boolean;
  resolve: (event: LibvirtEvent) => void;
  reject: (error: Error) => void;
}

const STATES = [LibvirtConnectionState.Connecting, LibvirtConnectionState.Ready, LibvirtConnectionState.Closed] as const;
const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
const DEFAULT_TIMEOUT_MS = 60_000;
const DEFAULT_EVENT_BUFFER_SIZE = 1000;

export class LibvirtConnection {
  readonly socketPath: string;
  readonly label: string;
  /** Resolves once, when the connection ends: the root cause, or undefined after close(). Never rejects. */
  readonly closed: Promise<Error | undefined>;

  private readonly lifecycle: ConnectionLifecycle<LibvirtConnectionState>;
  private readonly socket: Socket;
  private readonly parser: LibvirtFrameParser;
  private readonly defaultTimeoutMs: number;
  private readonly eventBufferSize: number;
  private readonly pending: PendingTable<number, PendingCall>;
  private readonly waiters: PendingTable<number, EventWaiter>;
  private readonly listeners = new Set<LibvirtEventListener>();
  private readonly events: LibvirtEvent[] = [];
  private nextSerial = 1;
  private nextWaiterKey = 1;
  private lastSeq = 0;

  private constructor(socket: Socket, socketPath: string, options: LibvirtConnectionOptions) {
    this.socket = socket;
    this.socketPath = socketPath;
    this.label = options.label ?? socketPath;
    this.defaultTimeoutMs = checkTimeoutMs('defaultTimeoutMs', options.defaultTimeoutMs) ?? DEFAULT_TIMEOUT_MS;
    this.eventBufferSize = options.eventBufferSize ?? DEFAULT_EVENT_BUFFER_SIZE;
    this.lifecycle = new ConnectionLifecycle({
      socket,
      states: STATES,
      address: socketPath,
      connectionName: `connection to libvirt at ${this.label}`,
      stateCode: 'LIBVIRT_STATE',
      disconnectedCode: 'LIBVIRT_DISCONNECTED',
      details: { socketPath, uri: this.label },
    });
    this.closed = this.lifecycle.closed;
    this.pending = this.lifecycle.track(
      new PendingTable({
        describe: (call: PendingCall) => `libvirt call ${call.procedure.name} got no reply`,
        afterTimeout: (error) => this.lifecycle.shutdown(error),
      }),
    );
    this.waiters = this.lifecycle.track(new PendingTable({ describe: () => 'stopped waiting for a libvirt event' }));
    this.parser = new LibvirtFrameParser({
      onFrame: (frame) => this.handleFrame(frame),
      onError: (error) => this.lifecycle.shutdown(error),
      ...(options.maxMessageBytes === undefined ? {} : { maxMessageBytes: options.maxMessageBytes }),
    });
    socket.on('data', (chunk: Buffer) => {
      if (!this.lifecycle.isClosed) this.parser.push(chunk);
    });
    socket.on('end', () => {
      const mid = this.parser.bufferedBytes > 0 ? ' in the middle of a message' : '';
      this.lifecycle.shutdown(new QbackupError('LIBVIRT_DISCONNECTED', `libvirt at ${this.label} closed the connection${mid}`));
    });
    socket.on('close', () => this.lifecycle.shutdown(new QbackupError('LIBVIRT_DISCONNECTED', `connection to libvirt at ${this.label} closed`)));
  }

  /** Connects the socket; no call is made (the client opens the libvirt connection). */
  static async connect(socketPath: string, options: LibvirtConnectionOptions = {}): Promise<LibvirtConnection> {
    if (typeof socketPath !== 'string' || socketPath === '') throw new QbackupError('INVALID_ARGUMENT', 'libvirt socket path must be a non-empty string');
    const connectTimeoutMs = checkTimeoutMs('connectTimeoutMs', options.connectTimeoutMs) ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const socket = openSocket({ path: socketPath });
    const label = options.label ?? socketPath;
    await new Promise<void>((resolve, reject) => {
      const timer = startTimer(connectTimeoutMs, () => {
        socket.destroy();
        reject(new QbackupError('LIBVIRT_TIMEOUT', `libvirt at ${label} did not accept a connection on ${socketPath} within ${connectTimeoutMs} ms`));
      });
      socket.once('connect', () => {
        clearTimeout(timer);
        resolve();
      });
      socket.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        socket.destroy();
        reject(connectError(err, label, socketPath));
      });
    });
    const connection = new LibvirtConnection(socket, socketPath, options);
    connection.lifecycle.advance(LibvirtConnectionState.Ready);
    return connection;
  }

  get state(): LibvirtConnectionState {
    return this.lifecycle.state;
  }

  /** Calls one procedure and resolves with its decoded reply; libvirt's errors reject with LibvirtCallError. */
  call<A, R>(procedure: LibvirtProcedure<A, R>, args: A, options: LibvirtCallOptions = {}): Promise<R> {
    if (!this.lifecycle.is(LibvirtConnectionState.Ready)) {
      return Promise.reject(this.lifecycle.closeReason !== undefined ? this.lifecycle.disconnectedError(`cannot call ${procedure.name}`) : this.lifecycle.stateError(`cannot call ${procedure.name}`));
    }
    const serial = this.nextSerial;
    let message: Buffer;
    let timeoutMs: number;
    try {
      timeoutMs = checkTimeoutMs('timeoutMs', options.timeoutMs) ?? this.defaultTimeoutMs;
      message = encodeMessage({ program: procedure.program, version: procedure.version, procedure: procedure.procedure, type: C.VIR_NET_CALL, serial, status: C.VIR_NET_OK }, encodeXdr(procedure.args, args));
    } catch (err) {
      return Promise.reject(err);
    }
    this.nextSerial = this.nextSerial >= 0xffff_ffff ? 1 : this.nextSerial + 1;
    return new Promise<R>((resolve, reject) => {
      this.pending.add(
        serial,
        { procedure: procedure as LibvirtProcedure<unknown, unknown>, resolve: resolve as (value: unknown) => void, reject },
        timeoutMs,
        () => new QbackupError('LIBVIRT_TIMEOUT', `libvirt at ${this.label} did not answer ${procedure.name} within ${timeoutMs} ms`, { details: { procedure: procedure.name, timeoutMs } }),
      );
      this.socket.write(message);
    });
  }

  /** Sees every event after it is buffered; returns a function that removes the listener. */
  onEvent(listener: LibvirtEventListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Sequence number of the newest event received (0 before any); pass as `after` to wait only for later ones. */
  eventCursor(): number {
    return this.lastSeq;
  }

  /** The first buffered or future event with seq > after that matches. */
  waitForEvent(matches: (event: LibvirtEvent) => boolean, timeoutMs?: number, after = 0): Promise<LibvirtEvent> {
    const buffered = this.events.find((e) => e.seq > after && matches(e));
    if (buffered !== undefined) return Promise.resolve(buffered);
    if (this.lifecycle.isClosed) return Promise.reject(this.lifecycle.disconnectedError('stopped waiting for a libvirt event'));
    let timeout: number;
    try {
      timeout = checkTimeoutMs('timeoutMs', timeoutMs) ?? this.defaultTimeoutMs;
    } catch (err) {
      return Promise.reject(err);
    }
    return new Promise((resolve, reject) => {
      this.waiters.add(this.nextWaiterKey++, { matches: (e) => e.seq > after && matches(e), resolve, reject }, timeout, () => new QbackupError('LIBVIRT_TIMEOUT', `the awaited libvirt event did not arrive within ${timeout} ms`));
    });
  }

  /** Closes the socket; pending calls fail with LIBVIRT_DISCONNECTED. Idempotent. */
  close(): Promise<void> {
    return this.lifecycle.closeOnce(async () => {
      if (!this.lifecycle.isClosed) this.lifecycle.shutdown(undefined);
      await this.lifecycle.socketClosed;
    });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  private write(header: Parameters<typeof encodeMessage>[0], body: Buffer): void {
    this.socket.write(encodeMessage(header, body));
  }

  private handleFrame(frame: LibvirtFrame): void {
    try {
      const { header } = frame;
      if (header.type === C.VIR_NET_REPLY) this.handleReply(frame);
      else if (header.type === C.VIR_NET_MESSAGE && header.program === C.KEEPALIVE_PROGRAM) this.handleKeepalive(frame);
      else if (header.type === C.VIR_NET_MESSAGE && header.program === C.REMOTE_PROGRAM) this.handleEvent(frame);
      else if (header.type === C.VIR_NET_MESSAGE && header.program === C.QEMU_PROGRAM) return; // monitor events: never registered
      else throw new LibvirtProtocolError('bad-header', `unexpected ${C.messageTypeName(header.type)} message for program 0x${header.program.toString(16)} procedure ${header.procedure}`);
    } catch (err) {
      if (err instanceof LibvirtProtocolError) this.lifecycle.shutdown(err);
      else throw err;
    }
  }

  private handleReply(frame: LibvirtFrame): void {
    const { header } = frame;
    const call = this.pending.get(header.serial);
    if (call === undefined) throw new LibvirtProtocolError('unknown-serial', `a reply for serial ${header.serial}, which is not in flight`);
    const p = call.procedure;
    if (header.program !== p.program || header.version !== p.version || header.procedure !== p.procedure) {
      throw new LibvirtProtocolError('bad-header', `the reply for serial ${header.serial} names procedure ${header.procedure} of program 0x${header.program.toString(16)}, not ${p.name}`);
    }
    if (header.status === C.VIR_NET_CONTINUE) throw new LibvirtProtocolError('bad-header', `${p.name} was answered with a stream continuation`);
    const reader = new XdrReader(frame.body);
    if (header.status === C.VIR_NET_ERROR) {
      const error = remoteError.decode(reader);
      reader.end(`the error of ${p.name}`);
      this.pending.take(header.serial);
      call.reject(new LibvirtCallError(p.name, error));
      return;
    }
    const value = p.ret.decode(reader);
    reader.end(`the reply of ${p.name}`);
    this.pending.take(header.serial);
    call.resolve(value);
  }

  private handleKeepalive(frame: LibvirtFrame): void {
    if (frame.header.procedure !== C.KEEPALIVE_PROC_PING) return;
    this.write({ program: C.KEEPALIVE_PROGRAM, version: C.KEEPALIVE_PROTOCOL_VERSION, procedure: C.KEEPALIVE_PROC_PONG, type: C.VIR_NET_MESSAGE, serial: 0, status: C.VIR_NET_OK }, Buffer.alloc(0));
  }

  private handleEvent(frame: LibvirtFrame): void {
    const codec = EVENTS.get(frame.header.procedure);
    if (codec === undefined) return;
    const reader = new XdrReader(frame.body);
    const decoded = codec.decode(reader);
    reader.end(`event ${frame.header.procedure}`);
    const event: LibvirtEvent = { ...decoded, seq: ++this.lastSeq };
    this.events.push(event);
    if (this.events.length > this.eventBufferSize) this.events.shift();
    for (const [key, waiter] of this.waiters.entries()) {
      if (waiter.matches(event)) {
        this.waiters.take(key);
        waiter.resolve(event);
      }
    }
    for (const listener of this.listeners) {
      try {
        listener(event);
      } catch (err) {
        assert(false, `a libvirt event listener threw: ${describeError(err)}`);
      }
    }
  }
}

function connectError(err: NodeJS.ErrnoException, label: string, socketPath: string): QbackupError {
  const details = { socketPath, uri: label, errno: err.code };
  switch (err.code) {
    case 'ENOENT':
      return new QbackupError('LIBVIRT_UNAVAILABLE', `No libvirt daemon at ${label}: the socket ${socketPath} does not exist (is libvirtd running?)`, { cause: err, details });
    case 'ECONNREFUSED':
      return new QbackupError('LIBVIRT_UNAVAILABLE', `No libvirt daemon at ${label}: nothing listens on ${socketPath} (is libvirtd running?)`, { cause: err, details });
    case 'EACCES':
    case 'EPERM':
      return new QbackupError('LIBVIRT_ACCESS_DENIED', `Permission denied on libvirt's socket ${socketPath} for ${label}: run as root or as a member of the group that owns it`, { cause: err, details });
    default:
      return new QbackupError('LIBVIRT_UNAVAILABLE', `Cannot connect to libvirt at ${label} on ${socketPath}: ${describeError(err)}`, { cause: err, details });
  }
}
