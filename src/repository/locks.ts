// Who is using a repository: one small object per backup, prune, copy or gc in
// locks/. A lock names its process (host, pid and the pid's start time) and
// when it was taken. Another process on the same host checks whether that
// process still runs; a lock from another host counts until its lease runs
// out (refreshed while it is held). A dead holder's lock is removed by
// whoever finds it, so no lock of a killed qbackup blocks the next command.
//
// Rules: at most one backup per domain at a time; at most one gc at a time;
// gc never deletes what a running backup may still reference (gc.ts). A
// "copy" lock marks a repository being read by a copy into another one
// (copy.ts): it conflicts with nothing, and gc treats it like a running
// backup (garbage is condemned, not deleted) and does not repack under it.

import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { QbackupError } from '../errors.js';
import { isProcessAlive, processStartTime } from '../util/proc.js';
import type { Backend } from './backend/backend.js';

export type LockKind = 'backup' | 'prune' | 'gc' | 'copy';

export interface LockInfo {
  kind: LockKind;
  domain: string | null;
  host: string;
  pid: number;
  pidStart: string;
  /** When the lock was taken, ms since the epoch. */
  takenMs: number;
  /** Until when a holder on another host counts as alive, ms since the epoch. */
  leaseMs: number;
}

const LEASE_MS = 10 * 60 * 1000;
const LOCK_ID = /^[0-9a-f]{16}$/;

export interface HeldLock extends AsyncDisposable {
  readonly id: string;
  readonly info: LockInfo;
  release(): Promise<void>;
}

/** Every lock whose holder is alive; dead holders' locks are removed on the way. */
export async function liveLocks(backend: Backend): Promise<Array<{ id: string; info: LockInfo }>> {
  const out: Array<{ id: string; info: LockInfo }> = [];
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
 * exists: another backup of the same domain, or another gc.
 */
export async function acquireLock(backend: Backend, kind: LockKind, domain: string | null): Promise<HeldLock> {
  const id = randomBytes(8).toString('hex');
  const now = Date.now();
  const info: LockInfo = { kind, domain, host: hostname(), pid: process.pid, pidStart: processStartTime(process.pid) ?? '', takenMs: now, leaseMs: now + LEASE_MS };
  await backend.putIfAbsent(`locks/${id}`, Buffer.from(JSON.stringify(info)));
  // Write first, then look: of two racing takers at least one sees the other.
  const others = (await liveLocks(backend)).filter((l) => l.id !== id);
  const conflict = kind === 'copy' ? undefined : others.find((l) => l.info.kind === kind && (kind === 'gc' || l.info.domain === domain));
  if (conflict !== undefined) {
    await backend.delete(`locks/${id}`);
    const what = kind === 'gc' ? 'a gc' : `a ${kind} of domain "${domain ?? ''}"`;
    throw new QbackupError('REPO_LOCKED', `Repository "${backend.location}" is in use: ${what} runs (process ${conflict.info.pid} on ${conflict.info.host})`);
  }
  let released = false;
  const release = async (): Promise<void> => {
    if (released) return;
    released = true;
    await backend.delete(`locks/${id}`);
  };
  return { id, info, release, [Symbol.asyncDispose]: release };
}

function isAlive(info: LockInfo): boolean {
  if (info.host === hostname()) return isProcessAlive(info.pid, info.pidStart === '' ? undefined : info.pidStart);
  return Date.now() < info.leaseMs;
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
  if (v === null || typeof v !== 'object' || typeof v.pid !== 'number' || typeof v.host !== 'string' || typeof v.takenMs !== 'number') return undefined;
  return v as LockInfo;
}
