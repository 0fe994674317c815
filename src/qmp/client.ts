// A QMP client over a unix socket: one connection to one QEMU monitor, used by
// qbackup to drive block jobs, bitmaps and the VM lifecycle.
//
// Invariants:
// - State only moves forward: connecting → ready → closed. Commands are sent
//   only in `ready`; once closed, nothing is written and nothing is delivered.
// - Every request carries a fresh integer id, and a reply is routed only by id.
//   A reply for an id we never issued is a protocol error that closes the
//   connection; a reply for a call that already timed out is dropped.
// - Every event is numbered (seq 1, 2, …) and kept in a bounded buffer before
//   waiters and listeners see it, so a wait that starts after the event
//   arrived still finds it.
// - Whatever ends the connection, every pending call and waiter is rejected
//   with QMP_DISCONNECTED (cause: the root cause), and `closed` resolves once.
//   The state machine, the pending tables and shutdown are the shared
//   ConnectionLifecycle (src/util/connection.ts), as in the NBD connection.
// - Misuse that the types already rule out (a non-array of actions, a
//   non-string name) is a bug and fails an assertion; bad values a user can
//   pass through (an empty path, a zero timeout) are INVALID_ARGUMENT.

import { AssertionError } from 'node:assert';
import type { Socket } from 'node:net';
import { QbackupError, describeError } from '../errors.js';
import { assert } from '../util/assert.js';
import { ConnectionLifecycle, PendingTable, checkTimeoutMs, openSocket, startTimer } from '../util/connection.js';
import {
  QmpLineParser,
  QmpProtocolError,
  classifyMessage,
  encodeCommand,
  isPlainObject,
  type QmpErrorReply,
  type QmpEvent,
  type QmpEventMessage,
  type QmpGreeting,
  type QmpMessage,
  type QmpReturn,
} from './message.js';

export const QmpClientState = {
  Connecting: 'connecting',
  Ready: 'ready',
  Closed: 'closed',
} as const;
export type QmpClientState = (typeof QmpClientState)[keyof typeof QmpClientState];

export type QmpTraceDirection = 'send' | 'recv';

export interface QmpConnectOptions {
  /** Limit for connecting, reading the greeting and negotiating capabilities. Default 10 s. */
  connectTimeoutMs?: number;
  /** Timeout of execute() and waitForEvent() when the call gives none. Default 30 s. */
  defaultTimeoutMs?: number;
  /** Longest accepted line from QEMU. Default 16 MiB. */
  maxLineBytes?: number;
  /** How many of the most recent events are kept for waitForEvent(). Default 10000. */
  eventBufferSize?: number;
  /** Sees every message sent and every object received (before validation); for debugging. */
  onTrace?: ((direction: QmpTraceDirection, message: object) => void) | undefined;
}

export interface QmpExecuteOptions {
  /** Milliseconds; Infinity for no timeout. Default: the client's defaultTimeoutMs. */
  timeoutMs?: number;
}

export interface QmpTransactionAction {
  type: string;
  data: Record<string, unknown>;
}

export interface QmpTransactionOptions extends QmpExecuteOptions {
  /** QMP `properties.completion-mode`; QEMU's default is 'individual'. */
  completionMode?: 'individual' | 'grouped';
}

export type QmpEventListener = (event: QmpEvent) => void;

export class QmpCommandError extends QbackupError {
  readonly command: string;
  readonly args: Readonly<Record<string, unknown>> | undefined;
  /** QEMU's error class: 'GenericError', 'CommandNotFound', 'DeviceNotFound', … */
  readonly errorClass: string;
  readonly desc: string;

  constructor(command: string, args: Record<string, unknown> | undefined, errorClass: string, desc: string) {
    super('QMP_ERROR', `QMP command "${command}" failed: ${desc}`, { details: { command, errorClass, desc } });
    this.name = 'QmpCommandError';
    this.command = command;
    this.args = args;
    this.errorClass = errorClass;
    this.desc = desc;
  }
}

const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
const DEFAULT_TIMEOUT_MS = 30_000;
const DEFAULT_EVENT_BUFFER_SIZE = 10_000;
const STATES = [QmpClientState.Connecting, QmpClientState.Ready, QmpClientState.Closed] as const;

interface PendingCall {
  command: string;
  args: Record<string, unknown> | undefined;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
}

interface EventWaiter {
  name: string;
  matches: (event: QmpEvent) => boolean;
  resolve: (event: QmpEvent) => void;
  reject: (error: Error) => void;
}

interface ResolvedOptions {
  connectTimeoutMs: number;
  defaultTimeoutMs: number;
  maxLineBytes: number | undefined;
  eventBufferSize: number;
  onTrace: ((direction: QmpTraceDirection, message: object) => void) | undefined;
}

export class QmpClient {
  readonly socketPath: string;
  /** Resolves once, when the connection ends: the root cause, or undefined after close(). Never rejects. */
  readonly closed: Promise<Error | undefined>;

  private readonly lifecycle: ConnectionLifecycle<QmpClientState>;
  private readonly socket: Socket;
  private readonly parser: QmpLineParser;
  private readonly options: ResolvedOptions;
  private nextId = 1;
  private readonly pending: PendingTable<number, PendingCall>;
  private readonly events: QmpEvent[] = [];
  private lastSeq = 0;
  private nextWaiterKey = 1;
  private readonly waiters: PendingTable<number, EventWaiter>;
  private readonly listeners = new Set<QmpEventListener>();
  private greetingValue: QmpGreeting | undefined;
  private readonly greetingReceived: Promise<QmpGreeting>;
  private settleGreeting: { resolve: (greeting: QmpGreeting) => void; reject: (error: Error) => void } | undefined;

  private constructor(socket: Socket, socketPath: string, options: ResolvedOptions) {
    this.socket = socket;
    this.socketPath = socketPath;
    this.options = options;
    this.lifecycle = new ConnectionLifecycle({
      socket,
      states: STATES,
      address: socketPath,
      connectionName: `QMP connection to ${socketPath}`,
      stateCode: 'QMP_STATE',
      disconnectedCode: 'QMP_DISCONNECTED',
      details: { socketPath },
      onShutdown: (reason) => {
        this.settleGreeting?.reject(reason ?? this.lifecycle.disconnectedError('no QMP greeting received'));
        this.settleGreeting = undefined;
      },
    });
    this.closed = this.lifecycle.closed;
    this.pending = this.lifecycle.track(new PendingTable({ describe: (call: PendingCall) => `QMP command "${call.command}" got no reply` }));
    this.waiters = this.lifecycle.track(new PendingTable({ describe: (waiter: EventWaiter) => `stopped waiting for QMP event ${waiter.name}` }));
    this.greetingReceived = new Promise((resolve, reject) => {
      this.settleGreeting = { resolve, reject };
    });
    // Dropping the rejection here is right: connect() awaits this promise at
    // once and sees it; the handler only keeps a failure that lands before
    // that await from counting as unhandled.
    this.greetingReceived.catch(() => undefined);

    const parserOptions = {
      onMessage: (message: Record<string, unknown>) => this.handleObject(message),
      onError: (error: QmpProtocolError) => this.shutdown(error),
    };
    this.parser = new QmpLineParser(
      options.maxLineBytes === undefined ? parserOptions : { ...parserOptions, maxLineBytes: options.maxLineBytes },
    );

    socket.on('data', (chunk: Buffer) => {
      if (!this.lifecycle.isClosed) this.parser.push(chunk);
    });
    socket.on('end', () => {
      const midMessage = this.parser.bufferedBytes > 0 ? ' in the middle of a message' : '';
      this.shutdown(new QbackupError('QMP_DISCONNECTED', `QMP peer at ${socketPath} closed the connection${midMessage}`));
    });
    // Socket errors are handled by the lifecycle, which shuts down with them as the cause.
    socket.on('close', () => {
      this.shutdown(new QbackupError('QMP_DISCONNECTED', `QMP connection to ${socketPath} closed`));
    });
  }

  /** Connects, reads the greeting and leaves capabilities negotiation mode. */
  static async connect(socketPath: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    assert(typeof socketPath === 'string', 'QMP socket path must be a string');
    if (socketPath === '') throw new QbackupError('INVALID_ARGUMENT', 'QMP socket path must be a non-empty string');
    const resolved: ResolvedOptions = {
      connectTimeoutMs: checkTimeoutMs('connectTimeoutMs', options.connectTimeoutMs) ?? DEFAULT_CONNECT_TIMEOUT_MS,
      defaultTimeoutMs: checkTimeoutMs('defaultTimeoutMs', options.defaultTimeoutMs) ?? DEFAULT_TIMEOUT_MS,
      maxLineBytes: options.maxLineBytes,
      eventBufferSize: options.eventBufferSize ?? DEFAULT_EVENT_BUFFER_SIZE,
      onTrace: options.onTrace,
    };
    if (!Number.isSafeInteger(resolved.eventBufferSize) || resolved.eventBufferSize < 1) {
      throw new QbackupError('INVALID_ARGUMENT', `eventBufferSize must be a positive integer, got ${String(options.eventBufferSize)}`);
    }
    const maxLineBytes = resolved.maxLineBytes;
    if (maxLineBytes !== undefined && (!Number.isSafeInteger(maxLineBytes) || maxLineBytes < 1)) {
      throw new QbackupError('INVALID_ARGUMENT', `maxLineBytes must be a positive integer, got ${String(maxLineBytes)}`);
    }

    const client = new QmpClient(openSocket({ path: socketPath }), socketPath, resolved);
    const timer = startTimer(resolved.connectTimeoutMs, () =>
      client.shutdown(
        new QbackupError(
          'QMP_TIMEOUT',
          `QMP handshake with ${socketPath} did not complete within ${resolved.connectTimeoutMs} ms`,
          { details: { socketPath, timeoutMs: resolved.connectTimeoutMs } },
        ),
      ),
    );
    try {
      await client.handshake();
      return client;
    } catch (err) {
      await client.close();
      throw client.connectFailure(err);
    } finally {
      clearTimeout(timer);
    }
  }

  get state(): QmpClientState {
    return this.lifecycle.state;
  }

  /** The greeting QEMU sent on connect, with its version. */
  get greeting(): QmpGreeting {
    if (this.greetingValue === undefined) {
      throw new QbackupError('QMP_STATE', `QMP connection to ${this.socketPath} has no greeting yet`);
    }
    return this.greetingValue;
  }

  /**
   * Runs one command and resolves with its `return` value. T is not checked
   * against what QEMU sends; callers narrow what they rely on.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, options: QmpExecuteOptions = {}): Promise<T> {
    if (this.lifecycle.state !== QmpClientState.Ready) {
      return Promise.reject(this.lifecycle.stateError(`cannot execute QMP command "${String(command)}"`, { command }));
    }
    return this.send(command, args, options.timeoutMs) as Promise<T>;
  }

  /** Runs the actions atomically with QMP `transaction`; all of them take effect or none. */
  async transaction(actions: QmpTransactionAction[], options: QmpTransactionOptions = {}): Promise<void> {
    assert(Array.isArray(actions), 'transaction actions must be an array');
    const wireActions = actions.map((action, index) => {
      assert(
        isPlainObject(action) && typeof action.type === 'string' && isPlainObject(action.data),
        `transaction action ${index} needs a string type and an object data`,
      );
      if (action.type === '') throw new QbackupError('INVALID_ARGUMENT', `transaction action ${index} has an empty type`);
      return { type: action.type, data: action.data };
    });
    const args: Record<string, unknown> = { actions: wireActions };
    if (options.completionMode !== undefined) args['properties'] = { 'completion-mode': options.completionMode };
    await this.execute('transaction', args, options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs });
  }

  /** Runs an HMP command line through `human-monitor-command` and returns its output. */
  async humanMonitorCommand(commandLine: string, options: QmpExecuteOptions = {}): Promise<string> {
    assert(typeof commandLine === 'string', 'HMP command line must be a string');
    if (commandLine.trim() === '') {
      throw new QbackupError('INVALID_ARGUMENT', 'HMP command line must be a non-empty string');
    }
    const output = await this.execute('human-monitor-command', { 'command-line': commandLine }, options);
    if (typeof output !== 'string') {
      throw new QmpProtocolError('invalid-message', `human-monitor-command "${commandLine}" returned a non-string`);
    }
    return output;
  }

  /** Sequence number of the newest event received; 0 before the first. Pass it as `after` to wait for later events only. */
  eventCursor(): number {
    return this.lastSeq;
  }

  /**
   * Resolves with the first buffered or future event named `name` that has
   * seq > after and satisfies the predicate. With the default after = 0 every
   * event still in the buffer counts, including ones that arrived before the
   * call. A buffered match is returned even after the connection closed.
   */
  waitForEvent(
    name: string,
    predicate?: (event: QmpEvent) => boolean,
    timeoutMs?: number,
    after = 0,
  ): Promise<QmpEvent> {
    let timeout: number;
    let buffered: QmpEvent | undefined;
    const matches = (event: QmpEvent): boolean =>
      event.seq > after && event.event === name && (predicate === undefined || predicate(event));
    try {
      assert(typeof name === 'string', 'event name must be a string');
      if (name === '') throw new QbackupError('INVALID_ARGUMENT', 'event name must be a non-empty string');
      if (!Number.isSafeInteger(after) || after < 0) {
        throw new QbackupError('INVALID_ARGUMENT', `event cursor must be a non-negative integer, got ${String(after)}`);
      }
      timeout = checkTimeoutMs('timeoutMs', timeoutMs) ?? this.options.defaultTimeoutMs;
      buffered = this.findBufferedEvent(after, matches);
    } catch (err) {
      return Promise.reject(err);
    }
    if (buffered !== undefined) return Promise.resolve(buffered);
    if (this.lifecycle.isClosed) {
      return Promise.reject(this.lifecycle.disconnectedError(`stopped waiting for QMP event ${name}`));
    }
    return new Promise<QmpEvent>((resolve, reject) => {
      this.waiters.add(
        this.nextWaiterKey++,
        { name, matches, resolve, reject },
        timeout,
        () =>
          new QbackupError('QMP_TIMEOUT', `QMP event ${name} did not arrive within ${timeout} ms`, {
            details: { event: name, timeoutMs: timeout, after },
          }),
      );
    });
  }

  /** Calls listener for every event from now on; returns the unsubscribe function. */
  onEvent(listener: QmpEventListener): () => void {
    this.listeners.add(listener);
    return () => {
      this.listeners.delete(listener);
    };
  }

  /** Closes the connection; pending calls reject with QMP_DISCONNECTED. Safe to call any number of times. */
  close(): Promise<void> {
    this.shutdown(undefined);
    return this.lifecycle.socketClosed;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** The first buffered event after `after` that matches; a throwing predicate throws here. */
  private findBufferedEvent(after: number, matches: (event: QmpEvent) => boolean): QmpEvent | undefined {
    const first = this.events[0];
    // Sequence numbers are contiguous, so the first candidate's index is computed, not searched.
    const start = first === undefined ? 0 : Math.max(0, after + 1 - first.seq);
    for (let i = start; i < this.events.length; i++) {
      const event = this.events[i];
      if (event !== undefined && matches(event)) return event;
    }
    return undefined;
  }

  private async handshake(): Promise<void> {
    await this.greetingReceived;
    // The handshake as a whole is bounded by connectTimeoutMs in connect().
    await this.send('qmp_capabilities', undefined, Infinity);
    if (this.lifecycle.isClosed) throw this.lifecycle.disconnectedError('QMP handshake did not finish');
    this.lifecycle.advance(QmpClientState.Ready);
  }

  private connectFailure(err: unknown): Error {
    if (err instanceof QmpCommandError) return err;
    const reason = this.lifecycle.closeReason;
    if (reason instanceof QbackupError && (reason.code === 'QMP_TIMEOUT' || reason.code === 'QMP_PROTOCOL')) {
      return reason;
    }
    // A bug stays a bug; wrapping it would make it look like a connection problem.
    if (err instanceof AssertionError) return err;
    const cause = reason ?? err;
    return new QbackupError('QMP_DISCONNECTED', `cannot connect to QMP socket ${this.socketPath}: ${describeError(cause)}`, {
      cause,
      details: { socketPath: this.socketPath },
    });
  }

  private send(command: string, args: Record<string, unknown> | undefined, timeoutMs: number | undefined): Promise<unknown> {
    // The handshake sends from `connecting`, after an await during which the peer may already have failed us.
    if (this.lifecycle.isClosed) {
      return Promise.reject(this.lifecycle.disconnectedError(`QMP command "${command}" not sent`));
    }
    let timeout: number;
    let line: string;
    const id = this.nextId++;
    try {
      timeout = checkTimeoutMs('timeoutMs', timeoutMs) ?? this.options.defaultTimeoutMs;
      line = encodeCommand(id, command, args);
    } catch (err) {
      return Promise.reject(err);
    }
    return new Promise<unknown>((resolve, reject) => {
      this.pending.add(
        id,
        { command, args, resolve, reject },
        timeout,
        () =>
          new QbackupError('QMP_TIMEOUT', `QMP command "${command}" got no reply within ${timeout} ms`, {
            details: { command, id, timeoutMs: timeout },
          }),
      );
      if (this.options.onTrace !== undefined) {
        this.trace('send', args === undefined ? { execute: command, id } : { execute: command, arguments: args, id });
      }
      this.socket.write(line);
    });
  }

  private handleObject(raw: Record<string, unknown>): void {
    if (this.lifecycle.isClosed) return;
    this.trace('recv', raw);
    let message: QmpMessage;
    try {
      message = classifyMessage(raw);
    } catch (err) {
      // classifyMessage throws only QmpProtocolError; anything else is a bug and propagates.
      if (!(err instanceof QmpProtocolError)) throw err;
      this.shutdown(err);
      return;
    }
    if (message.kind === 'greeting') {
      if (this.greetingValue !== undefined) {
        this.shutdown(new QmpProtocolError('unexpected-message', 'QMP peer sent a second greeting'));
        return;
      }
      this.greetingValue = message;
      this.settleGreeting?.resolve(message);
      this.settleGreeting = undefined;
      return;
    }
    if (this.greetingValue === undefined && message.kind === 'event') {
      // QEMU can flush an event meant for the previous client of its monitor
      // socket before greeting the next one; it is not ours, so drop it.
      return;
    }
    if (this.greetingValue === undefined) {
      this.shutdown(new QmpProtocolError('unexpected-message', `QMP peer sent ${article(message.kind)} before its greeting`));
      return;
    }
    if (message.kind === 'event') this.deliverEvent(message);
    else this.routeReply(message);
  }

  private routeReply(reply: QmpReturn | QmpErrorReply): void {
    const id = reply.id;
    if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 1 || id >= this.nextId) {
      const shown = id === undefined ? 'no id' : `id ${JSON.stringify(id)?.slice(0, 40) ?? '?'}`;
      this.shutdown(new QmpProtocolError('unexpected-message', `QMP peer sent a reply with ${shown}, which matches no request`));
      return;
    }
    // Ids only grow, so an issued id without a pending call belongs to a call
    // that timed out; dropping its reply needs no record of timed-out ids.
    const call = this.pending.take(id);
    if (call === undefined) return;
    if (reply.kind === 'return') call.resolve(reply.value);
    else call.reject(new QmpCommandError(call.command, call.args, reply.errorClass, reply.desc));
  }

  private deliverEvent(message: QmpEventMessage): void {
    const event: QmpEvent = Object.freeze({
      seq: ++this.lastSeq,
      event: message.event,
      data: message.data,
      timestamp: message.timestamp,
    });
    this.events.push(event);
    if (this.events.length > this.options.eventBufferSize) this.events.shift();

    for (const [key, waiter] of this.waiters.entries()) {
      // A predicate may have closed the client, which already failed the rest.
      if (!this.waiters.has(key)) continue;
      let hit: boolean;
      try {
        hit = waiter.matches(event);
      } catch (err) {
        // The caller's predicate threw: its wait fails with that error; the others go on.
        this.waiters.take(key);
        waiter.reject(err instanceof Error ? err : new Error(String(err)));
        continue;
      }
      if (hit) {
        this.waiters.take(key);
        waiter.resolve(event);
      }
    }
    for (const listener of [...this.listeners]) {
      try {
        listener(event);
      } catch (err) {
        rethrowLater(err);
      }
    }
  }

  /** The one way into `closed`; the first reason wins. undefined means close() was called. */
  private shutdown(reason: Error | undefined): void {
    this.lifecycle.shutdown(reason);
  }

  private trace(direction: QmpTraceDirection, message: object): void {
    const onTrace = this.options.onTrace;
    if (onTrace === undefined) return;
    try {
      onTrace(direction, message);
    } catch (err) {
      rethrowLater(err);
    }
  }
}

/**
 * A throwing listener must not break dispatch to the others or the protocol
 * state, yet must not vanish either: it surfaces as an uncaught exception,
 * as it would from an EventEmitter listener.
 */
function rethrowLater(err: unknown): void {
  queueMicrotask(() => {
    throw err;
  });
}

function article(kind: 'return' | 'error' | 'event'): string {
  return kind === 'event' ? 'an event' : kind === 'error' ? 'an error reply' : 'a reply';
}
