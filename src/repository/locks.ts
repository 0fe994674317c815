// Who is using a repository: one small lease object per backup, prune, copy
// or gc in locks/. A lease names its holder (host, boot id, pid and the
// pid's start time), when the lock was first taken (`takenMs`) and until when it holds
// (`leaseMs`). The holder renews it every quarter of the lease by writing a
// new lease object (new id, same `takenMs`, later `leaseMs`) and deleting
// the old one: objects are never rewritten in place, which object storage
// cannot do atomically anyway.
//
// Liveness as others judge it:
// - same host and boot (same /proc/sys/kernel/random/boot_id): the holder
//   runs while its pid runs with the same start time, so the lock of a
//   killed qbackup goes at once;
// - any other host: the lease counts until `leaseMs` plus a margin for clock
//   skew between hosts (CLOCK_SKEW_MS). A host that died stops renewing, so
//   its lease runs out and whoever finds it removes it.
// A holder that cannot renew in time (the store was unreachable, the host was
// suspended) has lost its lock: `assertHeld` says so, and a backup checks it
// before its manifest commits, because a gc elsewhere may have judged it dead.
//
// Rules: at most one backup per domain at a time; at most one gc at a time;
// at most one prune per domain, and never a prune and a gc at once (a prune
// writes folded indexes that gc would take for garbage until their manifest
// lands). Readers conflict with nothing: a `serve` lock (a backup served over
// NBD, serve.ts) and a `copy` lock (a repository read by a copy into another,
// copy.ts). gc never deletes what a running backup or a reader may still
// reference, and repacks nothing while a reader holds a lock (gc.ts). A
// backup or reader that begins while a gc runs waits for it to end.

import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { QbackupError, describeError } from '../errors.js';
import { isProcessAlive, processStartTime } from '../util/proc.js';
import { throwIfCancelled } from '../util/operation.js';
import type { Backend } from './backend/backend.js';

export type LockKind = 'backup' | 'prune' | 'gc' | 'serve' | 'copy';

/** Locks of processes that only read the repository's data. */
export function isReader(kind: LockKind): boolean {
  return kind === 'serve' || kind === 'copy';
}

export interface LockInfo {
  kind: LockKind;
  domain: string | null;
  host: string;
  /** The kernel's boot id: with `host`, tells whether `pid` can be checked here. */
  boot?: string;
  pid: number;
  pidStart: string;
  /** When the lock was taken, ms since the epoch (kept across renewals). */
  takenMs: number;
  /** Until when the holder counts as alive to other hosts, ms since the epoch. */
  leaseMs: number;
}

/** How long a lease lasts; renewed every quarter of it. */
export const LEASE_MS = 2 * 60 * 1000;
/** How far apart the clocks of hosts sharing a repository may be. */
export const CLOCK_SKEW_MS = 60 * 1000;
const LOCK_ID = /^[0-9a-f]{16}$/;

export interface LockOptions {
  /** Lease length (tests shorten it). Default LEASE_MS. */
  leaseMs?: number;
  /** How often a backup or reader looks again while a gc runs. Default 1 s. */
  gcPollMs?: number;
  /** Told once when a backup or reader waits for a running gc. */
  onWait?: (why: string) => void;
  /** Ends a wait for a running gc (with the signal's reason). */
  signal?: AbortSignal | undefined;
}

export interface HeldLock extends AsyncDisposable {
  /** The current lease object's id (changes on renewal). */
  readonly id: string;
  readonly info: LockInfo;
  /** Throws REPO_LOCKED when the lease was lost: not renewed in time, or removed by another process. */
  assertHeld(): Promise<void>;
  release(): Promise<void>;
}

/**
 * A lock object is written in milliseconds: a temporary file of a lock
 * writer older than a lease (plus clock skew) belongs to a writer that is gone.
 */
const STALE_LOCK_TEMPORARY_MS = LEASE_MS + CLOCK_SKEW_MS;

/**
 * Every lock whose holder is alive; dead holders' locks, and temporary files
 * of lock writers that are gone, are removed on the way.
 */
export async function liveLocks(backend: Backend): Promise<Array<{ id: string; info: LockInfo }>> {
  const out: Array<{ id: string; info: LockInfo }> = [];
  await backend.sweepTemporary?.(STALE_LOCK_TEMPORARY_MS, 'locks/');
  for (const { key } of await backend.list('locks/')) {
    const id = key.slice(6);
    if (!LOCK_ID.test(id)) continue;
    const info = await readLock(backend, key);
    if (info !== undefined && isAlive(info)) out.push({ id, info });
    else await backend.delete(key);
  }
  return out;
}

/**
 * Takes a lock of `kind`; refused (REPO_LOCKED) when a conflicting live lock
 * exists: another backup of the same domain, another gc, a prune beside a gc.
 * Serve locks never conflict. The lease is renewed in the background until release.
 */
export async function acquireLock(backend: Backend, kind: LockKind, domain: string | null, options: LockOptions = {}): Promise<HeldLock> {
  const leaseLengthMs = options.leaseMs ?? LEASE_MS;
  const now = Date.now();
  const boot = bootId();
  const info: LockInfo = { kind, domain, host: hostname(), ...(boot !== undefined ? { boot } : {}), pid: process.pid, pidStart: processStartTime(process.pid) ?? '', takenMs: now, leaseMs: now + leaseLengthMs };
  const first = await writeLease(backend, info).catch(async (err: unknown) => {
    // Prune and gc are what frees a full disk: their lock may use the reserve.
    if ((kind !== 'prune' && kind !== 'gc') || !(err instanceof QbackupError && err.code === 'REPO_FULL')) throw err;
    if ((await backend.stat(RESERVE_KEY)) === undefined) throw err;
    await backend.delete(RESERVE_KEY);
    return writeLease(backend, info);
  });
  // Write first, then look: of two racing takers at least one sees the other.
  const others = (await liveLocks(backend)).filter((l) => l.id !== first && !sameHolder(l.info, info));
  const conflict = others.find((l) => conflicts(kind, domain, l.info));
  if (conflict !== undefined) {
    await backend.delete(`locks/${first}`);
    const what = conflict.info.kind === 'gc' ? 'a gc' : `a ${conflict.info.kind} of domain "${conflict.info.domain ?? ''}"`;
    throw new QbackupError('REPO_LOCKED', `Repository "${backend.location}" is in use: ${what} runs (process ${conflict.info.pid} on ${conflict.info.host})`);
  }
  const lease = new Lease(backend, first, info, leaseLengthMs);
  if (kind !== 'gc' && kind !== 'prune') {
    try {
      await waitWhileGcRuns(backend, options);
    } catch (err) {
      await lease.release();
      throw err;
    }
  }
  return lease;
}

/**
 * A gc decides what is garbage from the locks it saw when it began, so a
 * backup or reader that began after it must not look at the repository's
 * packs until it ends: it could deduplicate against (or read) a pack the gc
 * is deleting. Its own lock is written first, so a gc beginning from now on
 * sees it; one already running is waited for (a dead one's lock goes by the
 * usual rules).
 */
async function waitWhileGcRuns(backend: Backend, options: LockOptions): Promise<void> {
  let told = false;
  for (;;) {
    const gc = (await liveLocks(backend)).find((l) => l.info.kind === 'gc');
    if (gc === undefined) return;
    if (!told) options.onWait?.(`waiting for a gc of repository "${backend.location}" to end (process ${gc.info.pid} on ${gc.info.host})`);
    told = true;
    throwIfCancelled(options.signal, `Waiting for a gc of repository "${backend.location}"`);
    await abortableSleep(options.gcPollMs ?? 1000, options.signal);
    throwIfCancelled(options.signal, `Waiting for a gc of repository "${backend.location}"`);
  }
}

function abortableSleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
  });
}

/** A held lock and its renewal timer. */
class Lease implements HeldLock {
  /** Why the last renewal failed, for diagnostics. */
  lastError: string | undefined;
  private lost: string | undefined;
  private released = false;
  private renewing: Promise<void> = Promise.resolve();
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly backend: Backend,
    private current: string,
    private lease: LockInfo,
    private readonly leaseLengthMs: number,
  ) {
    this.timer = setInterval(() => {
      this.renewing = this.renewing.then(() => this.renew());
    }, Math.max(10, Math.floor(leaseLengthMs / 4)));
    this.timer.unref();
  }

  get id(): string {
    return this.current;
  }

  get info(): LockInfo {
    return this.lease;
  }

  async assertHeld(): Promise<void> {
    await this.renewing;
    if (this.lost === undefined && Date.now() >= this.lease.leaseMs) this.lost = 'its lease ran out before it could be renewed';
    if (this.lost === undefined && (await this.backend.stat(`locks/${this.current}`)) === undefined) this.lost = 'another process removed it as expired';
    if (this.lost !== undefined) {
      throw new QbackupError('REPO_LOCKED', `Lost the ${this.lease.kind} lock on repository "${this.backend.location}": ${this.lost}`);
    }
  }

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    clearInterval(this.timer);
    await this.renewing;
    // A lock that cannot be removed now (the store is unreachable) expires on its own.
    await this.backend.delete(`locks/${this.current}`).catch(() => undefined);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.release();
  }

  /** Writes the next lease and drops the old one, unless the lease is already lost. */
  private async renew(): Promise<void> {
    if (this.released || this.lost !== undefined) return;
    const now = Date.now();
    // Too late to renew: other hosts may already count this holder as dead.
    if (now >= this.lease.leaseMs) {
      this.lost = 'its lease ran out before it could be renewed';
      return;
    }
    try {
      if ((await this.backend.stat(`locks/${this.current}`)) === undefined) {
        this.lost = 'another process removed it as expired';
        return;
      }
      const next: LockInfo = { ...this.lease, leaseMs: now + this.leaseLengthMs };
      const id = await writeLease(this.backend, next);
      const old = this.current;
      this.current = id;
      this.lease = next;
      await this.backend.delete(`locks/${old}`);
    } catch (err) {
      // Renewal retries on the next tick; the lease holds until leaseMs.
      this.lastError = describeError(err);
    }
  }
}

/**
 * The space a repository keeps in reserve (docs/design.md, "A full
 * repository"): an object of random bytes (so no filesystem compresses it
 * away), written by init and again by every gc that ends with room for it. A
 * prune or gc whose lock cannot be written for want of space deletes it and
 * writes its lock (and the few small objects a prune needs) in its room.
 */
export const RESERVE_KEY = 'reserve';
export const RESERVE_BYTES = 1024 * 1024;

/** Writes the reserve unless it is there; false when there is no room for it (never an error then). */
export async function ensureReserve(backend: Backend): Promise<boolean> {
  if ((await backend.stat(RESERVE_KEY)) !== undefined) return true;
  try {
    await backend.putIfAbsent(RESERVE_KEY, randomBytes(RESERVE_BYTES));
    return true;
  } catch (err) {
    if (err instanceof QbackupError && err.code === 'REPO_FULL') return false;
    throw err;
  }
}

async function writeLease(backend: Backend, info: LockInfo): Promise<string> {
  for (;;) {
    const id = randomBytes(8).toString('hex');
    if (await backend.putIfAbsent(`locks/${id}`, Buffer.from(JSON.stringify(info)))) return id;
  }
}

/** The same holder's leases (old and new during a renewal) never conflict with each other. */
function sameHolder(a: LockInfo, b: LockInfo): boolean {
  return a.host === b.host && a.boot === b.boot && a.pid === b.pid && a.pidStart === b.pidStart && a.takenMs === b.takenMs && a.kind === b.kind;
}

function conflicts(kind: LockKind, domain: string | null, other: LockInfo): boolean {
  if (isReader(kind) || isReader(other.kind)) return false;
  if (kind === 'gc') return other.kind === 'gc' || other.kind === 'prune';
  if (kind === 'prune' && other.kind === 'gc') return true;
  return other.kind === kind && other.domain === domain;
}

function isAlive(info: LockInfo): boolean {
  const boot = bootId();
  if (info.host === hostname() && (info.boot === undefined || boot === undefined || info.boot === boot)) {
    return isProcessAlive(info.pid, info.pidStart === '' ? undefined : info.pidStart);
  }
  return Date.now() < info.leaseMs + CLOCK_SKEW_MS;
}

let cachedBoot: string | null | undefined;

function bootId(): string | undefined {
  if (cachedBoot === undefined) {
    try {
      cachedBoot = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim() || null;
    } catch {
      cachedBoot = null;
    }
  }
  return cachedBoot ?? undefined;
}

async function readLock(backend: Backend, key: string): Promise<LockInfo | undefined> {
  let text: string;
  try {
    text = (await backend.get(key)).toString('utf8');
  } catch (err) {
    if (err instanceof QbackupError && err.code === 'REPO_OBJECT_NOT_FOUND') return undefined; // released meanwhile
    throw err;
  }
  let v: Partial<LockInfo> | null;
  try {
    v = JSON.parse(text) as Partial<LockInfo> | null;
  } catch {
    return undefined; // a torn lock of a dead writer: treated as dead, and removed
  }
  if (v === null || typeof v !== 'object' || typeof v.pid !== 'number' || typeof v.host !== 'string' || typeof v.takenMs !== 'number' || typeof v.leaseMs !== 'number') return undefined;
  return v as LockInfo;
}
