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

import { createConnection, type Socket } from 'node:net';
import { QbackupError, describeError } from '../errors.js';
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
  onTrace?: (direction: QmpTraceDirection, message: object) => void;
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
/** setTimeout fires at once for larger delays, so anything beyond is treated as "no timeout". */
const MAX_TIMER_MS = 2_147_483_647;

interface PendingCall {
  command: string;
  args: Record<string, unknown> | undefined;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout | undefined;
}

interface EventWaiter {
  name: string;
  matches: (event: QmpEvent) => boolean;
  resolve: (event: QmpEvent) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout | undefined;
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

  private stateValue: QmpClientState = QmpClientState.Connecting;
  private readonly socket: Socket;
  private readonly parser: QmpLineParser;
  private readonly options: ResolvedOptions;
  private nextId = 1;
  private readonly pending = new Map<number, PendingCall>();
  private readonly events: QmpEvent[] = [];
  private lastSeq = 0;
  private readonly waiters = new Set<EventWaiter>();
  private readonly listeners = new Set<QmpEventListener>();
  private greetingValue: QmpGreeting | undefined;
  private readonly greetingReceived: Promise<QmpGreeting>;
  private settleGreeting: { resolve: (greeting: QmpGreeting) => void; reject: (error: Error) => void } | undefined;
  private closeReason: Error | undefined;
  private resolveClosed: (reason: Error | undefined) => void = () => undefined;
  private readonly socketClosed: Promise<void>;

  private constructor(socket: Socket, socketPath: string, options: ResolvedOptions) {
    this.socket = socket;
    this.socketPath = socketPath;
    this.options = options;
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    this.greetingReceived = new Promise((resolve, reject) => {
      this.settleGreeting = { resolve, reject };
    });
    // connect() awaits this at once; the handler only keeps a failure before that from counting as unhandled.
    this.greetingReceived.catch(() => undefined);
    this.socketClosed = new Promise((resolve) => socket.once('close', () => resolve()));

    const parserOptions = {
      onMessage: (message: Record<string, unknown>) => this.handleObject(message),
      onError: (error: QmpProtocolError) => this.shutdown(error),
    };
    this.parser = new QmpLineParser(
      options.maxLineBytes === undefined ? parserOptions : { ...parserOptions, maxLineBytes: options.maxLineBytes },
    );

    socket.on('data', (chunk: Buffer) => {
      if (this.stateValue !== QmpClientState.Closed) this.parser.push(chunk);
    });
    socket.on('end', () => {
      const midMessage = this.parser.bufferedBytes > 0 ? ' in the middle of a message' : '';
      this.shutdown(new QbackupError('QMP_DISCONNECTED', `QMP peer at ${socketPath} closed the connection${midMessage}`));
    });
    // Always listened to: an unhandled 'error' on a socket would crash the process.
    socket.on('error', (err: Error) => this.shutdown(err));
    socket.on('close', () => {
      this.shutdown(new QbackupError('QMP_DISCONNECTED', `QMP connection to ${socketPath} closed`));
    });
  }

  /** Connects, reads the greeting and leaves capabilities negotiation mode. */
  static async connect(socketPath: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    if (typeof socketPath !== 'string' || socketPath === '') {
      throw new QbackupError('INVALID_ARGUMENT', 'QMP socket path must be a non-empty string');
    }
    const resolved: ResolvedOptions = {
      connectTimeoutMs: checkTimeout('connectTimeoutMs', options.connectTimeoutMs, DEFAULT_CONNECT_TIMEOUT_MS),
      defaultTimeoutMs: checkTimeout('defaultTimeoutMs', options.defaultTimeoutMs, DEFAULT_TIMEOUT_MS),
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

    const client = new QmpClient(createConnection({ path: socketPath }), socketPath, resolved);
    const timer = timerFor(resolved.connectTimeoutMs, () =>
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
    return this.stateValue;
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
    if (this.stateValue !== QmpClientState.Ready) {
      return Promise.reject(
        new QbackupError(
          'QMP_STATE',
          `cannot execute QMP command "${String(command)}": the connection to ${this.socketPath} is ${this.stateValue}`,
          { details: { command, state: this.stateValue } },
        ),
      );
    }
    return this.send(command, args, options.timeoutMs) as Promise<T>;
  }

  /** Runs the actions atomically with QMP `transaction`; all of them take effect or none. */
  async transaction(actions: QmpTransactionAction[], options: QmpTransactionOptions = {}): Promise<void> {
    if (!Array.isArray(actions)) throw new QbackupError('INVALID_ARGUMENT', 'transaction actions must be an array');
    const wireActions = actions.map((action, index) => {
      if (!isPlainObject(action) || typeof action.type !== 'string' || action.type === '' || !isPlainObject(action.data)) {
        throw new QbackupError('INVALID_ARGUMENT', `transaction action ${index} needs a string type and an object data`);
      }
      return { type: action.type, data: action.data };
    });
    const args: Record<string, unknown> = { actions: wireActions };
    if (options.completionMode !== undefined) args['properties'] = { 'completion-mode': options.completionMode };
    await this.execute('transaction', args, options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs });
  }

  /** Runs an HMP command line through `human-monitor-command` and returns its output. */
  async humanMonitorCommand(commandLine: string, options: QmpExecuteOptions = {}): Promise<string> {
    if (typeof commandLine !== 'string' || commandLine.trim() === '') {
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
    if (typeof name !== 'string' || name === '') {
      return Promise.reject(new QbackupError('INVALID_ARGUMENT', 'event name must be a non-empty string'));
    }
    if (!Number.isSafeInteger(after) || after < 0) {
      return Promise.reject(new QbackupError('INVALID_ARGUMENT', `event cursor must be a non-negative integer, got ${String(after)}`));
    }
    let timeout: number;
    try {
      timeout = checkTimeout('timeoutMs', timeoutMs, this.options.defaultTimeoutMs);
    } catch (err) {
      return Promise.reject(err);
    }
    const matches = (event: QmpEvent): boolean =>
      event.seq > after && event.event === name && (predicate === undefined || predicate(event));

    try {
      const first = this.events[0];
      // Sequence numbers are contiguous, so the first candidate's index is computed, not searched.
      const start = first === undefined ? 0 : Math.max(0, after + 1 - first.seq);
      for (let i = start; i < this.events.length; i++) {
        const event = this.events[i];
        if (event !== undefined && matches(event)) return Promise.resolve(event);
      }
    } catch (err) {
      return Promise.reject(err);
    }
    if (this.stateValue === QmpClientState.Closed) {
      return Promise.reject(this.disconnectedError(`stopped waiting for QMP event ${name}`));
    }

    return new Promise<QmpEvent>((resolve, reject) => {
      const waiter: EventWaiter = { name, matches, resolve, reject, timer: undefined };
      waiter.timer = timerFor(timeout, () => {
        this.waiters.delete(waiter);
        reject(
          new QbackupError('QMP_TIMEOUT', `QMP event ${name} did not arrive within ${timeout} ms`, {
            details: { event: name, timeoutMs: timeout, after },
          }),
        );
      });
      this.waiters.add(waiter);
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
    return this.socketClosed;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  private async handshake(): Promise<void> {
    await this.greetingReceived;
    // The handshake as a whole is bounded by connectTimeoutMs in connect().
    await this.send('qmp_capabilities', undefined, Infinity);
    if (this.stateValue === QmpClientState.Closed) throw this.disconnectedError('QMP handshake did not finish');
    this.stateValue = QmpClientState.Ready;
  }

  private connectFailure(err: unknown): Error {
    if (err instanceof QmpCommandError) return err;
    const reason = this.closeReason;
    if (reason instanceof QbackupError && (reason.code === 'QMP_TIMEOUT' || reason.code === 'QMP_PROTOCOL')) {
      return reason;
    }
    const cause = reason ?? err;
    return new QbackupError('QMP_DISCONNECTED', `cannot connect to QMP socket ${this.socketPath}: ${describeError(cause)}`, {
      cause,
      details: { socketPath: this.socketPath },
    });
  }

  private send(command: string, args: Record<string, unknown> | undefined, timeoutMs: number | undefined): Promise<unknown> {
    // The handshake sends from `connecting`, after an await during which the peer may already have failed us.
    if (this.stateValue === QmpClientState.Closed) {
      return Promise.reject(this.disconnectedError(`QMP command "${command}" not sent`));
    }
    let timeout: number;
    let line: string;
    const id = this.nextId++;
    try {
      timeout = checkTimeout('timeoutMs', timeoutMs, this.options.defaultTimeoutMs);
      line = encodeCommand(id, command, args);
    } catch (err) {
      return Promise.reject(err);
    }
    return new Promise<unknown>((resolve, reject) => {
      const call: PendingCall = { command, args, resolve, reject, timer: undefined };
      call.timer = timerFor(timeout, () => {
        this.pending.delete(id);
        reject(
          new QbackupError('QMP_TIMEOUT', `QMP command "${command}" got no reply within ${timeout} ms`, {
            details: { command, id, timeoutMs: timeout },
          }),
        );
      });
      this.pending.set(id, call);
      if (this.options.onTrace !== undefined) {
        this.trace('send', args === undefined ? { execute: command, id } : { execute: command, arguments: args, id });
      }
      this.socket.write(line);
    });
  }

  private handleObject(raw: Record<string, unknown>): void {
    if (this.stateValue === QmpClientState.Closed) return;
    this.trace('recv', raw);
    let message: QmpMessage;
    try {
      message = classifyMessage(raw);
    } catch (err) {
      this.shutdown(err instanceof Error ? err : new Error(String(err)));
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
    const call = this.pending.get(id);
    // Ids only grow, so an issued id without a pending call belongs to a call
    // that timed out; dropping its reply needs no record of timed-out ids.
    if (call === undefined) return;
    this.pending.delete(id);
    clearTimeout(call.timer);
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

    for (const waiter of [...this.waiters]) {
      let hit: boolean;
      try {
        hit = waiter.matches(event);
      } catch (err) {
        this.settleWaiter(waiter);
        waiter.reject(err instanceof Error ? err : new Error(String(err)));
        continue;
      }
      if (hit) {
        this.settleWaiter(waiter);
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

  private settleWaiter(waiter: EventWaiter): void {
    this.waiters.delete(waiter);
    clearTimeout(waiter.timer);
  }

  /** The one way into `closed`; the first reason wins. undefined means close() was called. */
  private shutdown(reason: Error | undefined): void {
    if (this.stateValue === QmpClientState.Closed) return;
    this.stateValue = QmpClientState.Closed;
    this.closeReason = reason;
    this.socket.destroy();

    const calls = [...this.pending.values()];
    this.pending.clear();
    for (const call of calls) {
      clearTimeout(call.timer);
      call.reject(this.disconnectedError(`QMP command "${call.command}" got no reply`));
    }
    const waiters = [...this.waiters];
    this.waiters.clear();
    for (const waiter of waiters) {
      clearTimeout(waiter.timer);
      waiter.reject(this.disconnectedError(`stopped waiting for QMP event ${waiter.name}`));
    }
    this.settleGreeting?.reject(reason ?? this.disconnectedError('no QMP greeting received'));
    this.settleGreeting = undefined;
    this.resolveClosed(reason);
  }

  private disconnectedError(what: string): QbackupError {
    const reason = this.closeReason;
    const message =
      reason === undefined
        ? `${what}: the QMP connection to ${this.socketPath} was closed`
        : `${what}: QMP connection to ${this.socketPath} lost: ${describeError(reason)}`;
    return new QbackupError('QMP_DISCONNECTED', message, { cause: reason, details: { socketPath: this.socketPath } });
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

function checkTimeout(name: string, value: number | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || Number.isNaN(value) || value <= 0) {
    throw new QbackupError('INVALID_ARGUMENT', `${name} must be a positive number of milliseconds, got ${String(value)}`);
  }
  return value;
}

function timerFor(timeoutMs: number, onTimeout: () => void): NodeJS.Timeout | undefined {
  return timeoutMs > MAX_TIMER_MS ? undefined : setTimeout(onTimeout, timeoutMs);
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
