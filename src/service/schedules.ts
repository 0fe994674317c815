// Schedules: per domain, when to back up (a cron pattern, or "daily
// 02:00", "weekly sun 03:00", "hourly :15"), into which repository, and
// which backups to keep afterwards (retention); and per repository, when to
// verify it, collect its garbage or copy its backups into another
// repository. The Scheduler decides
// which schedules are due; it takes its clock as a parameter (tests move
// time for the scheduler only) and hands due runs to a callback (the
// daemon turns them into tasks).
//
// Invariants:
// - A run missed while the daemon was down runs once at the next tick, not
//   once per missed slot: after a run the schedule's last run is "now".
// - A due schedule whose work is already under way (a backup of the same
//   domain, a verify or gc) is skipped and counted as run, so one domain
//   never gets two backups at once.
// - A paused schedule is never due; resumed, it runs at its next slot after
//   the resume (the slots missed while paused are not made up).
// - A schedule imported from the configuration file keeps its paused state
//   when the file is read again; its other settings change only in the file.

import { randomBytes } from 'node:crypto';
import { Cron } from 'croner';
import { assertDomainName } from '../domain/names.js';
import { QbackupError, describeError } from '../errors.js';
import type { RetentionPolicy } from '../repository/repository.js';
import type { ScheduleRow, ScheduleStore } from '../store/schedules.js';

export type ScheduleAction = 'backup' | 'verify' | 'gc' | 'copy';

export interface ScheduleSpec {
  /** What runs (default backup). */
  action?: ScheduleAction;
  /** The domain to back up (backup: required; verify, copy: only its backups; gc: none). */
  domain?: string;
  /** Cron pattern (5 fields, or 6 with seconds first; local time) or "daily HH:MM", "weekly DAY HH:MM", "hourly :MM". */
  when: string;
  /** The repository (copy: the source). */
  repo: string;
  /** A file holding the passphrase of an encrypted repository (read at each run). */
  passwordFile?: string;
  /** Copy: the target repository (an unencrypted one is created on first use). */
  to?: string;
  /** Copy: a file holding the target's passphrase. */
  toPasswordFile?: string;
  /** Applied after each successful backup; empty: keep everything. */
  retention?: RetentionPolicy;
  /** Every run a full backup. */
  full?: boolean;
  /** Verify: also read back this percentage of the chunks. */
  readDataPercent?: number;
  /** The configured schedule's name, for schedules imported from the configuration file. */
  name?: string;
  /** Dead man's switch URL fetched after each run (with /fail after a failure). */
  pingUrl?: string;
  /** Notification targets of this schedule's outcomes (default: every target). */
  notify?: string[];
  /** Backup: the hypervisor connection URI (src/drivers/open.ts); default: the daemon's own. */
  connection?: string;
}

/** What pausing adds to a stored schedule. */
interface PauseState {
  paused?: boolean;
  /** When it was last resumed: its next run is the first slot after this. */
  resumedMs?: number;
}

/** Ids of schedules imported from the configuration file: this prefix and the schedule's name. */
export const CONFIG_SCHEDULE_PREFIX = 'config-';

export interface ScheduleInfo extends ScheduleSpec, PauseState {
  id: string;
  /** The cron pattern `when` stands for. */
  cron: string;
  createdMs: number;
  lastRunMs: number | null;
  nextRunMs: number | null;
}

export interface Clock {
  now(): number;
}

export const systemClock: Clock = { now: () => Date.now() };

const DAYS = ['sun', 'mon', 'tue', 'wed', 'thu', 'fri', 'sat'];

/** The cron pattern for `when`, or INVALID_ARGUMENT. */
export function cronFor(when: string): string {
  const text = when.trim().toLowerCase();
  const hhmm = (h: string, m: string): string => {
    const hour = Number(h);
    const minute = Number(m);
    if (hour > 23 || minute > 59) throw invalidWhen(when);
    return `${minute} ${hour}`;
  };
  let m = /^daily\s+(\d{1,2}):(\d{2})$/.exec(text);
  if (m !== null) return `${hhmm(m[1] ?? '', m[2] ?? '')} * * *`;
  m = /^weekly\s+([a-z]{3})\s+(\d{1,2}):(\d{2})$/.exec(text);
  if (m !== null) {
    const day = DAYS.indexOf(m[1] ?? '');
    if (day < 0) throw invalidWhen(when);
    return `${hhmm(m[2] ?? '', m[3] ?? '')} * * ${day}`;
  }
  m = /^hourly(?:\s+:(\d{2}))?$/.exec(text);
  if (m !== null) {
    const minute = Number(m[1] ?? '0');
    if (minute > 59) throw invalidWhen(when);
    return `${minute} * * * *`;
  }
  // Five fields, or six with seconds first (croner's extension: "*/10 * * * * *").
  const fields = text.split(/\s+/).length;
  if (!/^[0-9*,/\-a-z ]+$/.test(text) || (fields !== 5 && fields !== 6)) throw invalidWhen(when);
  try {
    new Cron(text, { paused: true }).stop();
  } catch (err) {
    throw new QbackupError('INVALID_ARGUMENT', `Invalid schedule "${when}": ${describeError(err)}`);
  }
  return text;
}

function invalidWhen(when: string): QbackupError {
  return new QbackupError('INVALID_ARGUMENT', `Invalid schedule "${when}": use a cron pattern such as "0 2 * * *", or "daily 02:00", "weekly sun 03:00", "hourly :15"`);
}

/** The first run of `cron` strictly after `afterMs`. */
export function nextRun(cron: string, afterMs: number): number | null {
  const job = new Cron(cron, { paused: true });
  try {
    return job.nextRun(new Date(afterMs))?.getTime() ?? null;
  } finally {
    job.stop();
  }
}

const RETENTION_KEYS = ['keepLast', 'keepHourly', 'keepDaily', 'keepWeekly', 'keepMonthly', 'keepYearly'] as const;

function checkSpec(spec: ScheduleSpec): void {
  const action = spec.action ?? 'backup';
  if (!['backup', 'verify', 'gc', 'copy'].includes(action)) throw new QbackupError('INVALID_ARGUMENT', `Invalid schedule action "${action}": expected backup, verify, gc or copy`);
  if (action === 'copy' && spec.to === undefined) throw new QbackupError('INVALID_ARGUMENT', 'A copy schedule needs a target repository (to)');
  if (action !== 'copy' && (spec.to !== undefined || spec.toPasswordFile !== undefined)) throw new QbackupError('INVALID_ARGUMENT', `A target repository belongs to copy schedules, not to a ${action} schedule`);
  if (spec.to !== undefined && !isRepoLocation(spec.to)) throw new QbackupError('INVALID_ARGUMENT', `Invalid schedule target repository "${spec.to}": give an absolute path or an s3:// URL`);
  if (spec.toPasswordFile !== undefined && !spec.toPasswordFile.startsWith('/')) {
    throw new QbackupError('INVALID_ARGUMENT', `Invalid schedule target passphrase file "${spec.toPasswordFile}": give an absolute path`);
  }
  if (spec.to !== undefined && spec.to === spec.repo) throw new QbackupError('INVALID_ARGUMENT', `A copy schedule cannot copy repository "${spec.repo}" into itself`);
  if (spec.domain !== undefined) assertDomainName(spec.domain);
  if (action === 'backup' && spec.domain === undefined) throw new QbackupError('INVALID_ARGUMENT', 'A backup schedule needs a domain');
  if (action === 'gc' && spec.domain !== undefined) throw new QbackupError('INVALID_ARGUMENT', `A gc schedule works on the whole repository, not on domain "${spec.domain}"`);
  if (action !== 'backup' && (spec.retention !== undefined || spec.full !== undefined)) throw new QbackupError('INVALID_ARGUMENT', `Retention and full belong to backup schedules, not to a ${action} schedule`);
  if (action !== 'backup' && spec.connection !== undefined) throw new QbackupError('INVALID_ARGUMENT', `A connection belongs to backup schedules, not to a ${action} schedule`);
  if (action !== 'verify' && spec.readDataPercent !== undefined) throw new QbackupError('INVALID_ARGUMENT', 'readDataPercent belongs to verify schedules');
  if (spec.readDataPercent !== undefined && !(spec.readDataPercent > 0 && spec.readDataPercent <= 100)) {
    throw new QbackupError('INVALID_ARGUMENT', `Invalid readDataPercent ${spec.readDataPercent}: expected more than 0 and at most 100`);
  }
  if (!isRepoLocation(spec.repo)) throw new QbackupError('INVALID_ARGUMENT', `Invalid schedule repository "${spec.repo}": give an absolute path or an s3:// URL`);
  if (spec.passwordFile !== undefined && !spec.passwordFile.startsWith('/')) {
    throw new QbackupError('INVALID_ARGUMENT', `Invalid schedule passphrase file "${spec.passwordFile}": give an absolute path`);
  }
  for (const key of RETENTION_KEYS) {
    const v = spec.retention?.[key];
    if (v !== undefined && (!Number.isInteger(v) || v < 1)) throw new QbackupError('INVALID_ARGUMENT', `Invalid retention ${key} ${v}: expected a whole number above zero`);
  }
}

/** A schedule names a repository that means the same whatever the daemon's working directory. */
function isRepoLocation(repo: string): boolean {
  return repo.startsWith('/') || /^s3:\/\/[^/]/.test(repo);
}

export class Schedules {
  constructor(private readonly store: ScheduleStore) {}

  add(spec: ScheduleSpec, nowMs = Date.now()): ScheduleInfo {
    checkSpec(spec);
    const cron = cronFor(spec.when);
    const id = `s${randomBytes(4).toString('hex')}`;
    this.store.insert({ id, domain: spec.domain ?? null, payload: JSON.stringify({ action: 'backup', ...spec, cron }), created_ms: nowMs, last_run_ms: null });
    return this.get(id);
  }

  list(): ScheduleInfo[] {
    return this.store.all().map(toInfo);
  }

  get(id: string): ScheduleInfo {
    const row = this.store.get(id);
    if (row === undefined) throw new QbackupError('SCHEDULE_NOT_FOUND', `Schedule "${id}" does not exist`);
    return toInfo(row);
  }

  remove(id: string): void {
    if (!this.store.remove(id)) throw new QbackupError('SCHEDULE_NOT_FOUND', `Schedule "${id}" does not exist`);
  }

  /** Replaces a schedule's settings (keeping its id, last run and paused state); one from the configuration file is changed there. */
  update(id: string, spec: ScheduleSpec): ScheduleInfo {
    const current = this.get(id);
    if (id.startsWith(CONFIG_SCHEDULE_PREFIX)) {
      throw new QbackupError('SCHEDULE_FROM_CONFIG', `Cannot change schedule "${id}": it comes from the configuration file; change it there (pausing it is allowed)`);
    }
    checkSpec(spec);
    const cron = cronFor(spec.when);
    this.store.update(id, spec.domain ?? null, payloadOf(spec, cron, current));
    return this.get(id);
  }

  /** Pauses or resumes a schedule (idempotent). */
  setPaused(id: string, paused: boolean, nowMs = Date.now()): ScheduleInfo {
    const current = this.get(id);
    if ((current.paused === true) === paused) return current;
    const row = this.store.get(id);
    if (row === undefined) throw new QbackupError('SCHEDULE_NOT_FOUND', `Schedule "${id}" does not exist`);
    const stored = JSON.parse(row.payload) as ScheduleSpec & PauseState & { cron: string };
    delete stored.paused;
    if (paused) stored.paused = true;
    else stored.resumedMs = nowMs;
    this.store.update(id, row.domain, JSON.stringify(stored));
    return this.get(id);
  }

  /**
   * Makes the schedules imported from the configuration file what `specs`
   * says (keyed by name): new ones are added, changed ones updated (keeping
   * their last run, so a re-read does not make them due), and those no longer
   * in the file removed. Schedules added by `schedule add` or the API stay.
   * Checks every spec before changing anything.
   */
  sync(specs: readonly (ScheduleSpec & { name: string })[], nowMs = Date.now()): { added: string[]; updated: string[]; removed: string[] } {
    const prepared = specs.map((spec) => {
      checkSpec(spec);
      return { id: `${CONFIG_SCHEDULE_PREFIX}${spec.name}`, spec, cron: cronFor(spec.when) };
    });
    const result = { added: [] as string[], updated: [] as string[], removed: [] as string[] };
    this.store.db.transaction(() => {
      const wanted = new Set(prepared.map((p) => p.id));
      for (const row of this.store.all()) {
        if (row.id.startsWith(CONFIG_SCHEDULE_PREFIX) && !wanted.has(row.id)) {
          this.store.remove(row.id);
          result.removed.push(row.id);
        }
      }
      for (const { id, spec, cron } of prepared) {
        const row = this.store.get(id);
        const payload = payloadOf(spec, cron, row !== undefined ? toInfo(row) : undefined);
        if (row === undefined) {
          this.store.insert({ id, domain: spec.domain ?? null, payload, created_ms: nowMs, last_run_ms: null });
          result.added.push(id);
        } else if (row.payload !== payload) {
          this.store.update(id, spec.domain ?? null, payload);
          result.updated.push(id);
        }
      }
    })();
    return result;
  }

  markRun(id: string, atMs: number): void {
    this.store.setLastRun(id, atMs);
  }
}

/** The stored record of a schedule: its settings, its cron pattern, and the paused state it keeps across changes. */
function payloadOf(spec: ScheduleSpec, cron: string, keep: PauseState | undefined): string {
  const state: PauseState = {};
  if (keep?.paused === true) state.paused = true;
  if (keep?.resumedMs !== undefined) state.resumedMs = keep.resumedMs;
  return JSON.stringify({ action: 'backup', ...spec, cron, ...state });
}

function toInfo(row: ScheduleRow): ScheduleInfo {
  let spec: ScheduleSpec & PauseState & { cron: string };
  try {
    spec = JSON.parse(row.payload) as ScheduleSpec & PauseState & { cron: string };
  } catch (err) {
    throw new QbackupError('METADATA_INCONSISTENT', `Schedule "${row.id}" has a damaged record: ${describeError(err)}`, { cause: err });
  }
  const since = Math.max(row.last_run_ms ?? row.created_ms, spec.resumedMs ?? 0);
  return { ...spec, id: row.id, createdMs: row.created_ms, lastRunMs: row.last_run_ms, nextRunMs: spec.paused === true ? null : nextRun(spec.cron, since) };
}

/** Finds due schedules on each tick and hands them to `run`; `busy` says whether a schedule's work is already under way. */
export class Scheduler {
  private timer: NodeJS.Timeout | undefined;
  private running = false;

  constructor(
    private readonly schedules: Schedules,
    private readonly clock: Clock,
    private readonly run: (s: ScheduleInfo) => void,
    private readonly busy: (s: ScheduleInfo) => boolean,
    private readonly log: (message: string) => void = () => undefined,
  ) {}

  /** Runs every due schedule once; returns the ids started. */
  tick(): string[] {
    const now = this.clock.now();
    const started: string[] = [];
    for (const s of this.schedules.list()) {
      if (s.nextRunMs === null || s.nextRunMs > now) continue;
      this.schedules.markRun(s.id, now);
      if (this.busy(s)) {
        this.log(`schedule ${s.id}: skipped the run due at ${new Date(s.nextRunMs).toISOString()}: ${s.action === 'backup' ? `a backup of domain "${s.domain ?? ''}"` : `a ${s.action ?? 'backup'}`} is under way`);
        continue;
      }
      try {
        this.run(s);
        started.push(s.id);
      } catch (err) {
        this.log(`schedule ${s.id}: could not start: ${describeError(err)}`);
      }
    }
    return started;
  }

  /**
   * Ticks now (missed runs run once), then again when the next schedule falls
   * due, and at least every `intervalMs` (schedules added through the API or
   * a reload are seen by then).
   */
  start(intervalMs = 30_000): void {
    this.stop();
    this.running = true;
    const loop = (): void => {
      if (!this.running) return;
      this.tick();
      const now = this.clock.now();
      const due = Math.min(...this.schedules.list().map((s) => s.nextRunMs ?? Infinity));
      this.timer = setTimeout(loop, Math.max(20, Math.min(intervalMs, due - now)));
      this.timer.unref();
    };
    loop();
  }

  stop(): void {
    this.running = false;
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
  }
}
