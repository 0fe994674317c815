// Warm file-browsing sessions for a long-running process (the daemon): one
// session per (repository, domain, backup, disks, filesystem), kept open for
// `idleMs` after its last use, so the appliance boots once and the next
// listing costs milliseconds. Concurrent first requests share one opening.
//
// Invariants:
// - A session in use is never closed under its user: `use` counts users and
//   the idle timer starts when the last one is done.
// - A session whose appliance failed is dropped (the next request opens a
//   new one); a failed opening is not cached.
// - close() ends every session; after it, `use` refuses.

import { createHash } from 'node:crypto';
import { QbackupError } from '../errors.js';
import type { RepositoryService } from '../repository/repository.js';
import { FileSession, type FileSessionOptions } from './session.js';

interface Slot {
  session: Promise<FileSession>;
  users: number;
  timer: NodeJS.Timeout | undefined;
}

export class WarmSessions {
  private readonly slots = new Map<string, Slot>();
  private closed = false;

  constructor(
    private readonly repository: RepositoryService,
    private readonly defaults: Pick<FileSessionOptions, 'runDir' | 'appliance' | 'limits'>,
    private readonly idleMs = 5 * 60_000,
  ) {}

  /** Runs `fn` with the warm session of that backup (opened on first use). */
  async use<T>(options: Omit<FileSessionOptions, 'runDir' | 'appliance' | 'limits'> & { backup: string }, fn: (s: FileSession) => Promise<T>): Promise<T> {
    if (this.closed) throw new QbackupError('APPLIANCE_FAILED', 'File browsing is shutting down');
    // The passphrase is part of the key (hashed): a wrong one must not reuse a session opened with the right one.
    const key = JSON.stringify([options.repo, options.domain, options.backup, [...(options.disks ?? [])].sort(), options.fs ?? '', createHash('sha256').update(options.password ?? '').digest('hex')]);
    let slot = this.slots.get(key);
    if (slot === undefined) {
      const opening = FileSession.open(this.repository, { ...this.defaults, ...options });
      slot = { session: opening, users: 0, timer: undefined };
      const mine = slot;
      this.slots.set(key, slot);
      opening.catch(() => {
        if (this.slots.get(key) === mine) this.slots.delete(key);
      });
    }
    if (slot.timer !== undefined) clearTimeout(slot.timer);
    slot.timer = undefined;
    slot.users++;
    try {
      const session = await slot.session;
      return await fn(session);
    } catch (err) {
      if (err instanceof QbackupError && (err.code === 'APPLIANCE_FAILED' || err.code === 'APPLIANCE_TIMEOUT')) this.drop(key, slot);
      throw err;
    } finally {
      slot.users--;
      if (slot.users === 0 && this.slots.get(key) === slot) {
        const s = slot;
        s.timer = setTimeout(() => this.drop(key, s), this.idleMs);
        s.timer.unref();
      }
    }
  }

  /** Sessions open now. */
  get size(): number {
    return this.slots.size;
  }

  private drop(key: string, slot: Slot): void {
    if (this.slots.get(key) !== slot) return;
    this.slots.delete(key);
    if (slot.timer !== undefined) clearTimeout(slot.timer);
    void slot.session.then((s) => s.close(), () => undefined);
  }

  async close(): Promise<void> {
    this.closed = true;
    const all = [...this.slots.values()];
    this.slots.clear();
    for (const s of all) if (s.timer !== undefined) clearTimeout(s.timer);
    await Promise.all(all.map((s) => s.session.then((x) => x.close(), () => undefined)));
  }
}
