// SQL access to backup jobs, their last results, and the push targets recorded
// per checkpoint. Rules live in src/backup.

import type { Db } from './db.js';

export interface JobRow {
  domain: string;
  id: string;
  /** starting: intent written, QEMU not yet told; running: QEMU jobs exist. */
  /** finishing: the outcome is decided and stored in the payload; teardown may be under way. */
  state: 'starting' | 'running' | 'finishing';
  payload: string;
  started_ms: number;
  ended_ms: number | null;
  error: string | null;
}

export class JobStore {
  constructor(readonly db: Db) {}

  transaction<T>(fn: () => T): T {
    return this.db.transaction(fn).immediate();
  }

  active(domain: string): JobRow | undefined {
    return this.db.prepare('SELECT * FROM jobs WHERE domain = ?').get(domain) as JobRow | undefined;
  }

  insert(row: Omit<JobRow, 'ended_ms' | 'error'>): void {
    this.db.prepare('INSERT INTO jobs (domain, id, state, payload, started_ms) VALUES (@domain, @id, @state, @payload, @started_ms)').run(row);
  }

  update(domain: string, state: JobRow['state'], payload: string): void {
    this.db.prepare('UPDATE jobs SET state = ?, payload = ? WHERE domain = ?').run(state, payload, domain);
  }

  remove(domain: string): void {
    this.db.prepare('DELETE FROM jobs WHERE domain = ?').run(domain);
  }

  saveResult(domain: string, id: string, payload: string): void {
    this.db.prepare('INSERT OR REPLACE INTO job_results (domain, id, payload) VALUES (?, ?, ?)').run(domain, id, payload);
    this.db.prepare('INSERT OR REPLACE INTO job_history (id, domain, payload, ended_ms) VALUES (?, ?, ?, ?)').run(id, domain, payload, Date.now());
  }

  /** The result of a finished job, by id. */
  result(id: string): string | undefined {
    return (this.db.prepare('SELECT payload FROM job_history WHERE id = ?').get(id) as { payload: string } | undefined)?.payload;
  }

  lastResult(domain: string): { id: string; payload: string } | undefined {
    return this.db.prepare('SELECT id, payload FROM job_results WHERE domain = ?').get(domain) as { id: string; payload: string } | undefined;
  }

  recordTarget(domain: string, checkpoint: string, diskId: string, file: string): void {
    this.db.prepare('INSERT OR REPLACE INTO backup_targets (domain, checkpoint, disk_id, file) VALUES (?, ?, ?, ?)').run(domain, checkpoint, diskId, file);
  }

  targetFor(domain: string, checkpoint: string, diskId: string): string | undefined {
    const row = this.db.prepare('SELECT file FROM backup_targets WHERE domain = ? AND checkpoint = ? AND disk_id = ?').get(domain, checkpoint, diskId) as
      | { file: string }
      | undefined;
    return row?.file;
  }
}
