// The lifecycle shared by qbackup's protocol connections (QMP, NBD): one
// socket, an explicit forward-only state, tables of requests waiting for the
// peer, and exactly one way to end it all. The protocols on top decide what
// to send and how to read replies; this module decides how a connection dies.
//
// Invariants:
// - State only moves forward through the order given at construction. The
//   last state is the closed state, and only shutdown() enters it.
// - shutdown() is idempotent and the first reason wins: it destroys the
//   socket, runs the owner's hook, rejects every entry of every tracked
//   PendingTable once with a disconnected error whose cause is that reason,
//   then resolves `closed`. A socket 'error' always leads to shutdown, so it
//   can never crash the process as an unhandled event.
// - A PendingTable entry is settled exactly once: by its reply (take()), by
//   its timer, or by failAll(); its timer is cleared in every case.

import { createConnection, type Socket } from 'node:net';
import { QbackupError, describeError, type ErrorCode } from '../errors.js';
import { assert } from './assert.js';

/** setTimeout fires at once for larger delays, so anything beyond is treated as "no timeout". */
export const MAX_TIMER_MS = 2_147_483_647;

export type SocketAddress = { path: string } | { host: string; port: number };

/**
 * Reads into caller-owned memory instead of a new buffer per read: `buffer`
 * is one buffer the socket reuses, or a function called before each read for
 * the buffer to read into. `callback` sees the bytes read (the buffer and
 * how many bytes of it), valid only until it returns unless the caller owns
 * that memory; returning false pauses the socket.
 */
export interface SocketReadInto {
  buffer: Buffer | (() => Buffer);
  callback: (bytesRead: number, buffer: Buffer) => boolean;
}

/**
 * Starts connecting; the socket's 'connect' or 'error' event tells how it
 * went. TCP gets TCP_NODELAY. With `readInto`, received bytes go to its
 * callback instead of 'data' events.
 */
export function openSocket(address: SocketAddress, readInto?: SocketReadInto): Socket {
  const onread = readInto !== undefined ? { onread: readInto } : {};
  if ('path' in address) return createConnection({ path: address.path, ...onread });
  const socket = createConnection({ host: address.host, port: address.port, ...onread });
  socket.setNoDelay(true);
  return socket;
}

/** A timer, or undefined for "no timeout" (undefined, 0, Infinity, or beyond what setTimeout can wait). */
export function startTimer(timeoutMs: number | undefined, onTimeout: () => void): NodeJS.Timeout | undefined {
  if (timeoutMs === undefined || timeoutMs === 0 || timeoutMs > MAX_TIMER_MS) return undefined;
  return setTimeout(onTimeout, timeoutMs);
}

/**
 * A caller-supplied timeout, checked: a positive number of milliseconds
 * (Infinity for none), or with allowZero also 0 for none. undefined passes
 * through so the caller can apply its default.
 */
export function checkTimeoutMs(name: string, value: number | undefined, options: { allowZero?: boolean } = {}): number | undefined {
  if (value === undefined) return undefined;
  const lowest = options.allowZero === true ? 0 : Number.MIN_VALUE;
  if (typeof value !== 'number' || Number.isNaN(value) || value < lowest) {
    const what = options.allowZero === true ? 'a non-negative number of milliseconds (0 for none)' : 'a positive number of milliseconds';
    throw new QbackupError('INVALID_ARGUMENT', `${name} must be ${what}, got ${String(value)}`);
  }
  return value;
}

/** What a pending entry must offer: a way to fail it. */
export interface PendingEntry {
  reject(error: Error): void;
}

interface Slot<T> {
  readonly entry: T;
  timer: NodeJS.Timeout | undefined;
}

export interface PendingTableOptions<T> {
  /** Names an entry in a disconnected error: `QMP command "x" got no reply`. */
  describe: (entry: T) => string;
  /** Runs after a timed-out entry was removed and rejected (NBD closes the connection there). */
  afterTimeout?: (error: Error) => void;
}

/** Requests (or waiters) in flight, by key, each with an optional timer. */
export class PendingTable<K, T extends PendingEntry> {
  readonly describe: (entry: T) => string;
  private readonly afterTimeout: ((error: Error) => void) | undefined;
  private readonly slots = new Map<K, Slot<T>>();

  constructor(options: PendingTableOptions<T>) {
    this.describe = options.describe;
    this.afterTimeout = options.afterTimeout;
  }

  get size(): number {
    return this.slots.size;
  }

  has(key: K): boolean {
    return this.slots.has(key);
  }

  /** The entry without removing it (a reply in several parts). */
  get(key: K): T | undefined {
    return this.slots.get(key)?.entry;
  }

  /** A snapshot, so settling entries while iterating is safe. */
  entries(): Array<[K, T]> {
    return [...this.slots].map(([key, slot]) => [key, slot.entry]);
  }

  /**
   * Adds an entry. When timeoutMs elapses first (undefined, 0 and Infinity
   * mean never), the entry is removed and rejected with timeoutError(entry).
   */
  add(key: K, entry: T, timeoutMs: number | undefined, timeoutError: (entry: T) => Error): void {
    assert(!this.slots.has(key), `pending key ${String(key)} is already in use`);
    const slot: Slot<T> = { entry, timer: undefined };
    slot.timer = startTimer(timeoutMs, () => {
      if (this.slots.get(key) !== slot) return;
      this.slots.delete(key);
      const error = timeoutError(entry);
      entry.reject(error);
      this.afterTimeout?.(error);
    });
    this.slots.set(key, slot);
  }

  /** Removes the entry and stops its timer; the caller settles it. undefined if it is not (or no longer) pending. */
  take(key: K): T | undefined {
    const slot = this.slots.get(key);
    if (slot === undefined) return undefined;
    this.slots.delete(key);
    clearTimeout(slot.timer);
    return slot.entry;
  }

  /** Rejects every entry with errorFor(entry) and empties the table. */
  failAll(errorFor: (entry: T) => Error): void {
    const slots = [...this.slots.values()];
    this.slots.clear();
    for (const slot of slots) {
      clearTimeout(slot.timer);
      slot.entry.reject(errorFor(slot.entry));
    }
  }
}

export interface ConnectionLifecycleOptions<S extends string> {
  socket: Socket;
  /** Every state in the only order they may be entered; the first is the initial state, the last the closed state. */
  states: readonly S[];
  /** The peer as shown in messages: a socket path, "unix:/path" or "host:port". */
  address: string;
  /** How the connection is named when lost: "QMP connection to /run/qmp.sock". */
  connectionName: string;
  /** Code of the error for a call made in the wrong state. */
  stateCode: ErrorCode;
  /** Code of the error that fails what was pending when the connection ended. */
  disconnectedCode: ErrorCode;
  /** Structured fields added to every error this lifecycle makes. */
  details: Record<string, unknown>;
  /** Runs once inside shutdown, after the socket is destroyed and before the pending tables fail. */
  onShutdown?: (reason: Error | undefined) => void;
}

/** The state machine and the death of one connection; owned by a protocol client. */
export class ConnectionLifecycle<S extends string> {
  /** Resolves once, when the connection ends: the root cause, or undefined for a clean close. Never rejects. */
  readonly closed: Promise<Error | undefined>;
  /** Resolves when the socket has closed (after shutdown, or after a graceful end). */
  readonly socketClosed: Promise<void>;
  readonly address: string;

  private readonly socket: Socket;
  private readonly states: readonly S[];
  private readonly options: ConnectionLifecycleOptions<S>;
  /** One per tracked table: fails all its entries. */
  private readonly failAlls: Array<() => void> = [];
  private index = 0;
  private reason: Error | undefined;
  private resolveClosed: (reason: Error | undefined) => void = () => undefined;
  private closing: Promise<void> | undefined;

  constructor(options: ConnectionLifecycleOptions<S>) {
    assert(options.states.length >= 2 && new Set(options.states).size === options.states.length, 'connection states must be distinct, at least two');
    this.options = options;
    this.socket = options.socket;
    this.states = options.states;
    this.address = options.address;
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    this.socketClosed = new Promise((resolve) => this.socket.once('close', () => resolve()));
    this.socket.on('error', (err: Error) => this.shutdown(err));
  }

  get state(): S {
    const state = this.states[this.index];
    assert(state !== undefined, 'connection state index out of range');
    return state;
  }

  /** Whether the connection is in `state` now (a call, so TypeScript does not carry narrowing across awaits). */
  is(state: S): boolean {
    return this.state === state;
  }

  get isClosed(): boolean {
    return this.index === this.states.length - 1;
  }

  /** Why the connection ended; undefined while open and after a clean close. */
  get closeReason(): Error | undefined {
    return this.reason;
  }

  /** Moves forward to `to`; moving back, staying, or entering the closed state here is a bug. */
  advance(to: S): void {
    const target = this.states.indexOf(to);
    assert(target > this.index && target < this.states.length - 1, `connection cannot move from ${this.state} to ${to}`);
    this.index = target;
  }

  /** Fails every entry of `table` when the connection ends. */
  track<K, T extends PendingEntry>(table: PendingTable<K, T>): PendingTable<K, T> {
    this.failAlls.push(() => table.failAll((entry) => this.disconnectedError(table.describe(entry))));
    return table;
  }

  /** The typed error for a call made in the wrong state: `${what}: the connection to X is closing`. */
  stateError(what: string, details: Record<string, unknown> = {}): QbackupError {
    return new QbackupError(this.options.stateCode, `${what}: the connection to ${this.address} is ${this.state}`, {
      details: { ...this.options.details, ...details, state: this.state },
    });
  }

  /** The error that fails `what` because the connection ended; its cause is the root cause. */
  disconnectedError(what: string): QbackupError {
    const reason = this.reason;
    const name = this.options.connectionName;
    const message = reason === undefined ? `${what}: the ${name} was closed` : `${what}: ${name} lost: ${describeError(reason)}`;
    return new QbackupError(this.options.disconnectedCode, message, { cause: reason, details: { ...this.options.details } });
  }

  /** Runs `gracefully` once; every later call returns the same promise. For idempotent close(). */
  closeOnce(gracefully: () => Promise<void>): Promise<void> {
    this.closing ??= gracefully();
    return this.closing;
  }

  /** The one way into the closed state; the first reason wins. undefined means a clean close. False if already closed. */
  shutdown(reason: Error | undefined): boolean {
    if (this.isClosed) return false;
    this.index = this.states.length - 1;
    this.reason = reason;
    this.socket.destroy();
    this.options.onShutdown?.(reason);
    for (const failAll of this.failAlls) failAll();
    this.resolveClosed(reason);
    return true;
  }
}
