// Tasks: long operations (repository backups, restores, verify, gc, …) run in
// the background of a long-lived process (the daemon), each with a state,
// progress, a rate, log lines and its result or error. The task manager
// queues them under a small global concurrency limit and runs at most one
// task per domain at a time (a domain is a name on a hypervisor connection:
// two domains of one name on different connections are two domains); it keeps every task in SQLite (written when it
// is queued, starts and ends), so finished tasks survive a restart and a
// task that was queued or running when the process died is marked failed,
// with the reason, when the next manager opens the store.
//
// Invariants:
// - A task's state only moves forward: queued → running → succeeded | failed
//   | cancelled, or queued → cancelled.
// - Cancellation is honest: a queued task is cancelled at once; a running
//   task is only asked to stop when its operation can stop mid-way
//   (`cancellable`), otherwise cancel throws TASK_NOT_CANCELLABLE.

import { randomBytes } from 'node:crypto';
import { QbackupError, describeError, isQbackupError } from '../errors.js';
import type { TaskRow, TaskStore } from '../store/tasks.js';

export type TaskState = TaskRow['state'];

export interface TaskProgress {
  phase: string;
  doneBytes: number;
  totalBytes: number;
  /** Bytes per second since the phase began. */
  rateBytesPerSec: number;
}

export interface TaskLogLine {
  timeMs: number;
  message: string;
}

export interface TaskInfo {
  id: string;
  kind: string;
  domain: string | null;
  /** The hypervisor connection (URI) the task's domain lives on; null for a task of no domain (and tasks recorded before connections were). */
  connection: string | null;
  state: TaskState;
  /** Can it stop mid-way once running? (Queued tasks can always be cancelled.) */
  cancellable: boolean;
  requestedBy: string | null;
  createdMs: number;
  startedMs: number | null;
  endedMs: number | null;
  progress: TaskProgress | null;
  log: TaskLogLine[];
  result?: unknown;
  error?: { code: string; message: string };
}

/** What a running task's operation sees. */
export interface TaskContext {
  readonly id: string;
  /** Aborted when a cancellable task is cancelled. */
  readonly signal: AbortSignal;
  progress(p: { phase: string; doneBytes: number; totalBytes: number }): void;
  log(message: string): void;
}

export interface TaskRequest {
  kind: string;
  /** The domain the task works on: tasks of one domain run one at a time. */
  domain?: string | undefined;
  /** The connection (URI) of `domain`: tasks of one domain of one connection run one at a time. */
  connection?: string | undefined;
  cancellable?: boolean;
  requestedBy?: string;
  run(ctx: TaskContext): Promise<unknown>;
}

export type TaskEvent = { type: 'progress' | 'log' | 'state'; task: TaskInfo };

export interface TaskManagerOptions {
  /** Tasks running at once (default 2). */
  maxConcurrent?: number;
  /** Finished tasks kept (default 500). */
  keepFinished?: number;
  /** How often progress events are sent at most (default 250 ms). */
  progressIntervalMs?: number;
}

const MAX_LOG_LINES = 200;

interface Live {
  info: TaskInfo;
  request: TaskRequest;
  abort: AbortController;
  phaseStartMs: number;
  lastEventMs: number;
  done: Promise<TaskInfo>;
  settle: (info: TaskInfo) => void;
  /** Aborted because the daemon is stopping: the task ends failed (TASK_INTERRUPTED), not cancelled. */
  interrupted?: { code: string; message: string };
}

export class TaskManager {
  private readonly live = new Map<string, Live>();
  private readonly queue: Live[] = [];
  private readonly listeners = new Set<(e: TaskEvent) => void>();
  private readonly maxConcurrent: number;
  private readonly keepFinished: number;
  private readonly progressIntervalMs: number;
  private running = 0;
  private closed = false;

  constructor(
    private readonly store: TaskStore,
    options: TaskManagerOptions = {},
  ) {
    this.maxConcurrent = options.maxConcurrent ?? 2;
    this.keepFinished = options.keepFinished ?? 500;
    this.progressIntervalMs = options.progressIntervalMs ?? 250;
  }

  /**
   * Marks the tasks a previous process left queued or running as failed,
   * and returns them (so the caller can let the library clean up their domains).
   */
  recoverInterrupted(nowMs = Date.now()): TaskInfo[] {
    return this.store.unfinished().map((row) => {
      const info = parseTask(row);
      const was = info.state;
      info.state = 'failed';
      info.endedMs = nowMs;
      info.error = { code: 'TASK_INTERRUPTED', message: `Task "${info.id}" (${taskWhat(info)}) did not finish: the daemon stopped while it was ${was}` };
      info.log.push({ timeMs: nowMs, message: info.error.message });
      this.store.save(toRow(info));
      return info;
    });
  }

  /** Queues a task and returns its id at once. */
  submit(request: TaskRequest): TaskInfo {
    if (this.closed) throw new QbackupError('INVALID_ARGUMENT', `Cannot start a ${request.kind} task: the daemon is stopping`);
    const info: TaskInfo = {
      id: newTaskId(),
      kind: request.kind,
      domain: request.domain ?? null,
      connection: request.connection ?? null,
      state: 'queued',
      cancellable: request.cancellable ?? false,
      requestedBy: request.requestedBy ?? null,
      createdMs: Date.now(),
      startedMs: null,
      endedMs: null,
      progress: null,
      log: [],
    };
    let settle: (i: TaskInfo) => void = () => undefined;
    const done = new Promise<TaskInfo>((resolve) => (settle = resolve));
    const entry: Live = { info, request, abort: new AbortController(), phaseStartMs: 0, lastEventMs: 0, done, settle };
    this.live.set(info.id, entry);
    this.queue.push(entry);
    this.store.save(toRow(info));
    this.emit('state', entry);
    this.pump();
    return snapshot(info);
  }

  /** Queued or running tasks of `kind` on `domain` (of `connection`: a task that recorded none matches any). */
  active(filter: { kind?: string | undefined; domain?: string | undefined; connection?: string | undefined } = {}): TaskInfo[] {
    return [...this.live.values()]
      .map((l) => l.info)
      .filter((i) => (filter.kind === undefined || i.kind === filter.kind) && (filter.domain === undefined || i.domain === filter.domain))
      .filter((i) => filter.connection === undefined || (i.connection ?? filter.connection) === filter.connection)
      .map(snapshot);
  }

  get(id: string): TaskInfo {
    const live = this.live.get(id);
    if (live !== undefined) return snapshot(live.info);
    const row = this.store.get(id);
    if (row === undefined) throw new QbackupError('TASK_NOT_FOUND', `Task "${id}" does not exist`);
    return parseTask(row);
  }

  /** The newest tasks first: live ones as they are now, the rest as stored. */
  list(limit = 100): TaskInfo[] {
    return this.store.recent(limit).map((row) => {
      const live = this.live.get(row.id);
      return live !== undefined ? snapshot(live.info) : parseTask(row);
    });
  }

  /** Resolves when the task has ended (at once for a finished one). */
  async wait(id: string): Promise<TaskInfo> {
    const live = this.live.get(id);
    if (live !== undefined) return live.done;
    return this.get(id);
  }

  cancel(id: string): TaskInfo {
    const live = this.live.get(id);
    if (live === undefined) {
      const info = this.get(id);
      throw new QbackupError('TASK_NOT_CANCELLABLE', `Cannot cancel task "${id}": it has already ${info.state === 'cancelled' ? 'been cancelled' : info.state}`);
    }
    if (live.info.state === 'queued') {
      this.queue.splice(this.queue.indexOf(live), 1);
      this.appendLog(live, 'cancelled before it started');
      this.finish(live, 'cancelled', {});
      return snapshot(live.info);
    }
    if (!live.info.cancellable) {
      throw new QbackupError('TASK_NOT_CANCELLABLE', `Cannot cancel task "${id}": a running ${live.info.kind} cannot stop mid-way; it ends on its own`);
    }
    live.abort.abort(new QbackupError('TASK_CANCELLED', `Task "${id}" was cancelled`));
    this.appendLog(live, 'cancel requested');
    return snapshot(live.info);
  }

  subscribe(listener: (e: TaskEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /**
   * Stops taking tasks; resolves when the running ones have ended (queued
   * ones are cancelled). With `interrupt` (SIGTERM), running tasks that can
   * stop mid-way are stopped and end failed with TASK_INTERRUPTED; the others
   * finish.
   */
  async close(options: { interrupt?: boolean | undefined } = {}): Promise<void> {
    this.closed = true;
    for (const q of this.queue.splice(0)) this.finish(q, 'cancelled', { error: { code: 'TASK_INTERRUPTED', message: `Task "${q.info.id}" was cancelled: the daemon is stopping` } });
    if (options.interrupt === true) {
      for (const l of this.live.values()) {
        if (l.info.state !== 'running' || !l.info.cancellable || l.abort.signal.aborted) continue;
        l.interrupted = { code: 'TASK_INTERRUPTED', message: `Task "${l.info.id}" (${taskWhat(l.info)}) did not finish: the daemon was stopped while it was running` };
        this.appendLog(l, 'the daemon is stopping: interrupted');
        l.abort.abort(new QbackupError('TASK_INTERRUPTED', l.interrupted.message));
      }
    }
    await Promise.all([...this.live.values()].map((l) => l.done));
  }

  private pump(): void {
    while (this.running < this.maxConcurrent) {
      const running = [...this.live.values()].filter((l) => l.info.state === 'running' && l.info.domain !== null).map((l) => l.info);
      const index = this.queue.findIndex((q) => q.info.domain === null || !running.some((r) => sameDomain(r, q.info)));
      if (index < 0) return;
      const [next] = this.queue.splice(index, 1);
      if (next === undefined) return;
      void this.start(next);
    }
  }

  private async start(entry: Live): Promise<void> {
    this.running++;
    entry.info.state = 'running';
    entry.info.startedMs = Date.now();
    this.store.save(toRow(entry.info));
    this.emit('state', entry);
    const ctx: TaskContext = {
      id: entry.info.id,
      signal: entry.abort.signal,
      progress: (p) => this.setProgress(entry, p),
      log: (message) => this.appendLog(entry, message),
    };
    try {
      const result = await entry.request.run(ctx);
      this.finish(entry, 'succeeded', { result });
    } catch (err) {
      const cancelled = entry.abort.signal.aborted;
      if (entry.interrupted !== undefined) this.finish(entry, 'failed', { error: entry.interrupted });
      else this.finish(entry, cancelled ? 'cancelled' : 'failed', { error: errorOf(err) });
    } finally {
      this.running--;
      this.pump();
    }
  }

  private setProgress(entry: Live, p: { phase: string; doneBytes: number; totalBytes: number }): void {
    const now = Date.now();
    if (entry.info.progress?.phase !== p.phase) entry.phaseStartMs = now;
    const seconds = Math.max(0.001, (now - entry.phaseStartMs) / 1000);
    entry.info.progress = { phase: p.phase, doneBytes: p.doneBytes, totalBytes: p.totalBytes, rateBytesPerSec: Math.round(p.doneBytes / seconds) };
    if (now - entry.lastEventMs >= this.progressIntervalMs || p.doneBytes >= p.totalBytes) {
      entry.lastEventMs = now;
      this.emit('progress', entry);
    }
  }

  private appendLog(entry: Live, message: string): void {
    entry.info.log.push({ timeMs: Date.now(), message });
    if (entry.info.log.length > MAX_LOG_LINES) entry.info.log.splice(0, entry.info.log.length - MAX_LOG_LINES);
    this.emit('log', entry);
  }

  private finish(entry: Live, state: 'succeeded' | 'failed' | 'cancelled', outcome: { result?: unknown; error?: { code: string; message: string } }): void {
    entry.info.state = state;
    entry.info.endedMs = Date.now();
    if (outcome.result !== undefined) entry.info.result = outcome.result;
    if (outcome.error !== undefined) {
      entry.info.error = outcome.error;
      entry.info.log.push({ timeMs: entry.info.endedMs, message: `${state}: ${outcome.error.message}` });
    } else {
      entry.info.log.push({ timeMs: entry.info.endedMs, message: state });
    }
    this.live.delete(entry.info.id);
    this.store.save(toRow(entry.info));
    this.store.trim(this.keepFinished);
    this.emit('state', entry);
    entry.settle(snapshot(entry.info));
  }

  private emit(type: TaskEvent['type'], entry: Live): void {
    const event: TaskEvent = { type, task: snapshot(entry.info) };
    for (const l of this.listeners) l(event);
  }
}

/** "KIND of domain "NAME" (URI)", as messages name a task's work. */
export function taskWhat(info: TaskInfo): string {
  return `${info.kind}${info.domain !== null ? ` of domain "${info.domain}"${info.connection !== null ? ` (${info.connection})` : ''}` : ''}`;
}

/** One domain: the same name on the same connection (a task that recorded no connection may be on any). */
function sameDomain(a: TaskInfo, b: TaskInfo): boolean {
  return a.domain === b.domain && (a.connection === null || b.connection === null || a.connection === b.connection);
}

function errorOf(err: unknown): { code: string; message: string } {
  if (isQbackupError(err)) return { code: err.code, message: err.message };
  return { code: 'INTERNAL', message: `Internal error (a bug in qbackup): ${describeError(err)}` };
}

function newTaskId(): string {
  return `t${Date.now().toString(36)}-${randomBytes(4).toString('hex')}`;
}

function snapshot(info: TaskInfo): TaskInfo {
  return { ...info, progress: info.progress === null ? null : { ...info.progress }, log: [...info.log] };
}

function toRow(info: TaskInfo): TaskRow {
  return { id: info.id, kind: info.kind, domain: info.domain, state: info.state, payload: JSON.stringify(info), created_ms: info.createdMs, ended_ms: info.endedMs };
}

function parseTask(row: TaskRow): TaskInfo {
  try {
    const info = JSON.parse(row.payload) as TaskInfo;
    return { ...info, connection: info.connection ?? null, state: row.state };
  } catch (err) {
    throw new QbackupError('METADATA_INCONSISTENT', `Task "${row.id}" has a damaged record: ${describeError(err)}`, { cause: err });
  }
}
