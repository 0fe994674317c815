// SQL access to the daemon's backup schedules. The rules (what a schedule
// may say, when it runs) live in src/service/schedules.ts.

import type { Db } from './db.js';

export interface ScheduleRow {
  id: string;
  domain: string | null;
  payload: string;
  created_ms: number;
  last_run_ms: number | null;
}

export class ScheduleStore {
  constructor(readonly db: Db) {}

  insert(row: ScheduleRow): void {
    this.db.prepare('INSERT INTO schedules (id, domain, payload, created_ms, last_run_ms) VALUES (@id, @domain, @payload, @created_ms, @last_run_ms)').run(row);
  }

  all(): ScheduleRow[] {
    return this.db.prepare('SELECT * FROM schedules ORDER BY domain, created_ms').all() as ScheduleRow[];
  }

  get(id: string): ScheduleRow | undefined {
    return this.db.prepare('SELECT * FROM schedules WHERE id = ?').get(id) as ScheduleRow | undefined;
  }

  remove(id: string): boolean {
    return this.db.prepare('DELETE FROM schedules WHERE id = ?').run(id).changes > 0;
  }

  /** Replaces what a schedule says, keeping when it was created and last ran. */
  update(id: string, domain: string | null, payload: string): void {
    this.db.prepare('UPDATE schedules SET domain = ?, payload = ? WHERE id = ?').run(domain, payload, id);
  }

  setLastRun(id: string, ms: number): void {
    this.db.prepare('UPDATE schedules SET last_run_ms = ? WHERE id = ?').run(ms, id);
  }
}
