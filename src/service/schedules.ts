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
  /** Cron pattern (5 fields, local time) or "daily HH:MM", "weekly DAY HH:MM", "hourly :MM". */
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
}

export interface ScheduleInfo extends ScheduleSpec {
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
  if (!/^[0-9*,/\-a-z ]+$/.test(text) || text.split(/\s+/).length !== 5) throw invalidWhen(when);
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

  markRun(id: string, atMs: number): void {
    this.store.setLastRun(id, atMs);
  }
}

function toInfo(row: ScheduleRow): ScheduleInfo {
  let spec: ScheduleSpec & { cron: string };
  try {
    spec = JSON.parse(row.payload) as ScheduleSpec & { cron: string };
  } catch (err) {
    throw new QbackupError('METADATA_INCONSISTENT', `Schedule "${row.id}" has a damaged record: ${describeError(err)}`, { cause: err });
  }
  return { ...spec, id: row.id, createdMs: row.created_ms, lastRunMs: row.last_run_ms, nextRunMs: nextRun(spec.cron, row.last_run_ms ?? row.created_ms) };
}

/** Finds due schedules on each tick and hands them to `run`; `busy` says whether a schedule's work is already under way. */
export class Scheduler {
  private timer: NodeJS.Timeout | undefined;

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

  /** Ticks now (missed runs run once) and then every `intervalMs` of real time. */
  start(intervalMs = 30_000): void {
    this.tick();
    this.timer = setInterval(() => this.tick(), intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer !== undefined) clearInterval(this.timer);
    this.timer = undefined;
  }
}
