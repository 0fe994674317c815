// Per-domain mutual exclusion across processes. Commands that read or change a
// domain hold its lock for their whole run, so two qbackup processes never
// interleave QMP commands or metadata changes on one domain. The lock is a row
// in the metadata database owned by (pid, token); a row whose owner process is
// gone is stale and taken over, so a killed qbackup never blocks the next one.

import { randomBytes } from 'node:crypto';
import { QbackupError } from '../errors.js';
import { isProcessAlive, processStartTime, sleep } from '../util/proc.js';
import type { Db } from './db.js';

export interface DomainLock extends Disposable {
  readonly domain: string;
  release(): void;
}

interface LockRow {
  owner_pid: number;
  owner_token: string;
  command: string;
  acquired_ms: number;
}

export interface LockOptions {
  /** How long to wait for another command to finish before failing. */
  timeoutMs: number;
  pollMs?: number;
}

export async function acquireDomainLock(db: Db, domain: string, command: string, options: LockOptions): Promise<DomainLock> {
  // The token embeds our start time so that a row left by an earlier process
  // that had our pid is recognisably someone else's.
  const token = `${processStartTime(process.pid) ?? '0'}:${randomBytes(8).toString('hex')}`;
  const deadline = Date.now() + options.timeoutMs;
  const tryAcquire = db.transaction((): LockRow | undefined => {
    const row = db.prepare('SELECT owner_pid, owner_token, command, acquired_ms FROM locks WHERE domain = ?').get(domain) as LockRow | undefined;
    if (row !== undefined && ownerAlive(row)) return row;
    db.prepare('INSERT OR REPLACE INTO locks (domain, owner_pid, owner_token, command, acquired_ms) VALUES (?, ?, ?, ?, ?)').run(
      domain,
      process.pid,
      token,
      command,
      Date.now(),
    );
    return undefined;
  });
  for (;;) {
    const holder = withoutFsync(db, () => tryAcquire.immediate());
    if (holder === undefined) break;
    if (Date.now() >= deadline) {
      throw new QbackupError(
        'DOMAIN_LOCKED',
        `Domain "${domain}" is busy: command "${holder.command}" (pid ${holder.owner_pid}) has held it for ${Math.round((Date.now() - holder.acquired_ms) / 1000)} s`,
        { details: { domain, holderPid: holder.owner_pid, holderCommand: holder.command } },
      );
    }
    await sleep(options.pollMs ?? 50);
  }
  let released = false;
  const release = (): void => {
    if (released) return;
    released = true;
    withoutFsync(db, () => db.prepare('DELETE FROM locks WHERE domain = ? AND owner_token = ?').run(domain, token));
  };
  return { domain, release, [Symbol.dispose]: release };
}

/**
 * A lock row only means something while its owner process lives, so it needs
 * atomicity, not durability: its commits skip the fsync (WAL with
 * synchronous=NORMAL; the next durable commit syncs them along). Two fsyncs
 * per command were a large part of a checkpoint create's time.
 */
function withoutFsync<T>(db: Db, fn: () => T): T {
  const previous = db.pragma('synchronous', { simple: true }) as number;
  if (previous < 2) return fn();
  db.pragma('synchronous = NORMAL');
  try {
    return fn();
  } finally {
    db.pragma(`synchronous = ${previous}`);
  }
}

function ownerAlive(row: LockRow): boolean {
  const startTime = row.owner_token.split(':')[0];
  return isProcessAlive(row.owner_pid, startTime === '0' ? undefined : startTime);
}
