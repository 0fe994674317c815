// SQL access to the daemon's tasks. A task's row is written when it is
// created and again when it ends, so a task that was queued or running when
// the daemon died is still there on the next start (and is then marked
// failed). Finished tasks are kept up to a bound, newest first.

import type { Db } from './db.js';

export interface TaskRow {
  id: string;
  kind: string;
  domain: string | null;
  state: 'queued' | 'running' | 'succeeded' | 'failed' | 'cancelled';
  payload: string;
  created_ms: number;
  ended_ms: number | null;
}

export class TaskStore {
  constructor(readonly db: Db) {}

  save(row: TaskRow): void {
    this.db
      .prepare('INSERT OR REPLACE INTO tasks (id, kind, domain, state, payload, created_ms, ended_ms) VALUES (@id, @kind, @domain, @state, @payload, @created_ms, @ended_ms)')
      .run(row);
  }

  get(id: string): TaskRow | undefined {
    return this.db.prepare('SELECT * FROM tasks WHERE id = ?').get(id) as TaskRow | undefined;
  }

  /** The newest tasks first. */
  recent(limit: number): TaskRow[] {
    return this.db.prepare('SELECT * FROM tasks ORDER BY created_ms DESC, id DESC LIMIT ?').all(limit) as TaskRow[];
  }

  /** Tasks that had not ended when their daemon stopped. */
  unfinished(): TaskRow[] {
    return this.db.prepare("SELECT * FROM tasks WHERE state IN ('queued', 'running') ORDER BY created_ms").all() as TaskRow[];
  }

  /** Keeps the newest `keep` finished tasks and deletes the rest. */
  trim(keep: number): void {
    this.db
      .prepare(
        `DELETE FROM tasks WHERE ended_ms IS NOT NULL AND id NOT IN (
           SELECT id FROM tasks WHERE ended_ms IS NOT NULL ORDER BY created_ms DESC, id DESC LIMIT ?)`,
      )
      .run(keep);
  }
}
