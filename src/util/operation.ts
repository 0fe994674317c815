// What every long operation of the library takes through its options: one
// progress shape, one logger and one cancellation signal. Adapters (CLI, HTTP
// daemon) create them; the library never reads globals or the environment to
// decide where progress or log lines go.

import { QbackupError, isQbackupError } from '../errors.js';

/** Where a long operation stands: a phase (e.g. "backup sda", "verify") and bytes done of bytes to do. */
export interface Progress {
  phase: string;
  doneBytes: number;
  totalBytes: number;
}

export type ProgressSink = (p: Progress) => void;

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

/** One structured event: a message and named fields (never secrets). */
export interface LogEvent {
  level: LogLevel;
  msg: string;
  fields?: Record<string, string | number | boolean | null | undefined> | undefined;
}

export interface Logger {
  log(event: LogEvent): void;
}

/** A logger that drops everything: the default when the caller gives none. */
export const silentLogger: Logger = { log: () => undefined };

/** A logger that writes each event as one line through `write` (plain text; JSON when `json`). */
export function lineLogger(write: (line: string) => void, json = false): Logger {
  return {
    log(e) {
      if (json) {
        write(JSON.stringify({ time: new Date().toISOString(), level: e.level, msg: e.msg, ...(e.fields ?? {}) }));
        return;
      }
      const fields = Object.entries(e.fields ?? {})
        .filter(([, v]) => v !== undefined)
        .map(([k, v]) => `${k}=${typeof v === 'string' && /\s/.test(v) ? JSON.stringify(v) : String(v)}`)
        .join(' ');
      write(fields === '' ? e.msg : `${e.msg} ${fields}`);
    },
  };
}

/** The options every long operation accepts. */
export interface OperationOptions {
  onProgress?: ProgressSink | undefined;
  logger?: Logger | undefined;
  signal?: AbortSignal | undefined;
}

/**
 * Throws when the signal has fired; call between steps of a long operation.
 * The signal's reason is thrown as it is when it is one of ours (the daemon
 * aborts with TASK_CANCELLED), else CANCELLED naming the operation.
 */
export function throwIfCancelled(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted !== true) return;
  if (isQbackupError(signal.reason)) throw signal.reason;
  throw new QbackupError('CANCELLED', `${what} was cancelled`, { cause: signal.reason });
}
