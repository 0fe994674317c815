// qbackup's metadata store: one SQLite database per state directory, opened by
// every process that works on it (WAL, busy timeout), with a versioned schema.
// Migrations run in order inside one transaction each; a database written by a
// newer qbackup (higher user_version than we know) is refused rather than
// guessed at. The database and its -wal/-shm files are owner-only (0600)
// whatever the directory's mode or the umask: they are created so before
// SQLite opens them (SQLite gives its -wal/-shm the database file's mode), and
// older ones readable by others are narrowed on open.

import { chmodSync, closeSync, constants, lstatSync, openSync } from 'node:fs';
import Database from 'better-sqlite3';
import { QbackupError, describeError } from '../errors.js';

export type Db = Database.Database;

/** Each entry moves the schema from version i to i+1. Never edit a shipped entry: append. */
const MIGRATIONS: readonly string[] = [
  // 1: domains, their disks with stable ids, the attach/detach journal, runtime state, locks.
  `
  CREATE TABLE domains (
    name        TEXT PRIMARY KEY,
    uuid        TEXT NOT NULL UNIQUE,
    xml         TEXT NOT NULL,
    created_ms  INTEGER NOT NULL
  );
  CREATE TABLE disks (
    id          TEXT PRIMARY KEY,
    domain      TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    source      TEXT NOT NULL,
    format      TEXT NOT NULL,
    target      TEXT NOT NULL,
    attached    INTEGER NOT NULL,
    UNIQUE (domain, source)
  );
  CREATE TABLE disk_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    disk_id     TEXT NOT NULL REFERENCES disks(id) ON DELETE CASCADE,
    event       TEXT NOT NULL CHECK (event IN ('attach', 'detach')),
    target      TEXT NOT NULL,
    live        INTEGER NOT NULL,
    at_ms       INTEGER NOT NULL
  );
  CREATE INDEX disk_events_by_disk ON disk_events (disk_id, seq);
  CREATE TABLE runtime (
    domain      TEXT PRIMARY KEY REFERENCES domains(name) ON DELETE CASCADE,
    state       TEXT NOT NULL CHECK (state IN ('running', 'stopping', 'shutoff', 'crashed')),
    reason      TEXT NOT NULL,
    pid         INTEGER,
    pid_start   TEXT,
    qmp_socket  TEXT,
    changed_ms  INTEGER NOT NULL
  );
  CREATE TABLE locks (
    domain      TEXT PRIMARY KEY,
    owner_pid   INTEGER NOT NULL,
    owner_token TEXT NOT NULL,
    command     TEXT NOT NULL,
    acquired_ms INTEGER NOT NULL
  );
  `,
  // 2: checkpoints (one row per checkpoint, one per disk in it), coverage losses
  // found by reconciling metadata with the images, and the intent journal of
  // multi-step operations (at most one per domain, finished by the next command).
  `
  CREATE TABLE checkpoints (
    domain        TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    parent        TEXT,
    description   TEXT,
    creation_time INTEGER NOT NULL,
    domain_xml    TEXT NOT NULL,
    journal_seq   INTEGER NOT NULL,
    is_current    INTEGER NOT NULL DEFAULT 0,
    created_seq   INTEGER NOT NULL,
    PRIMARY KEY (domain, name)
  );
  CREATE TABLE checkpoint_disks (
    domain      TEXT NOT NULL,
    checkpoint  TEXT NOT NULL,
    target      TEXT NOT NULL,
    disk_id     TEXT,
    mode        TEXT NOT NULL CHECK (mode IN ('bitmap', 'no')),
    bitmap      TEXT,
    PRIMARY KEY (domain, checkpoint, target),
    FOREIGN KEY (domain, checkpoint) REFERENCES checkpoints(domain, name) ON DELETE CASCADE ON UPDATE CASCADE
  );
  CREATE TABLE coverage_losses (
    domain      TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    disk_id     TEXT NOT NULL,
    checkpoint  TEXT NOT NULL,
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    at_ms       INTEGER NOT NULL,
    PRIMARY KEY (domain, disk_id, checkpoint)
  );
  CREATE TABLE operations (
    domain      TEXT PRIMARY KEY REFERENCES domains(name) ON DELETE CASCADE,
    kind        TEXT NOT NULL,
    payload     TEXT NOT NULL,
    started_ms  INTEGER NOT NULL
  );
  `,
  // 3: backup jobs (at most one running per domain, plus the last finished
  // result) and the push targets each checkpoint was created with, so that the
  // next incremental can use them as its backing file.
  `
  CREATE TABLE jobs (
    domain      TEXT PRIMARY KEY REFERENCES domains(name) ON DELETE CASCADE,
    id          TEXT NOT NULL,
    state       TEXT NOT NULL,
    payload     TEXT NOT NULL,
    started_ms  INTEGER NOT NULL,
    ended_ms    INTEGER,
    error       TEXT
  );
  CREATE TABLE job_results (
    domain      TEXT PRIMARY KEY REFERENCES domains(name) ON DELETE CASCADE,
    id          TEXT NOT NULL,
    payload     TEXT NOT NULL
  );
  CREATE TABLE backup_targets (
    domain      TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    checkpoint  TEXT NOT NULL,
    disk_id     TEXT NOT NULL,
    file        TEXT NOT NULL,
    PRIMARY KEY (domain, checkpoint, disk_id)
  );
  `,
  // 4: results of finished jobs by id, so a waiter gets its own job's outcome.
  `
  CREATE TABLE job_history (
    id          TEXT PRIMARY KEY,
    domain      TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    payload     TEXT NOT NULL,
    ended_ms    INTEGER NOT NULL
  );
  `,
  // 5: the virtual size each disk was last seen with, so a resize between two
  // looks is noticed (a resize loses coverage: QEMU does not mark grown areas).
  `
  CREATE TABLE disk_sizes (
    disk_id     TEXT PRIMARY KEY REFERENCES disks(id) ON DELETE CASCADE,
    size        INTEGER NOT NULL,
    seen_ms     INTEGER NOT NULL
  );
  `,
  // 6: runtime state 'starting': QEMU spawned (pid recorded) but not yet known
  // to answer QMP, so that a start killed half-way leaves a QEMU the next
  // command finds. SQLite cannot change a CHECK, so the table is rebuilt.
  `
  CREATE TABLE runtime_new (
    domain      TEXT PRIMARY KEY REFERENCES domains(name) ON DELETE CASCADE,
    state       TEXT NOT NULL CHECK (state IN ('starting', 'running', 'stopping', 'shutoff', 'crashed')),
    reason      TEXT NOT NULL,
    pid         INTEGER,
    pid_start   TEXT,
    qmp_socket  TEXT,
    changed_ms  INTEGER NOT NULL
  );
  INSERT INTO runtime_new SELECT domain, state, reason, pid, pid_start, qmp_socket, changed_ms FROM runtime;
  DROP TABLE runtime;
  ALTER TABLE runtime_new RENAME TO runtime;
  `,
  // 7: the daemon (qbackup serve): its tasks (long operations, kept after they
  // end, bounded), API tokens (only their SHA-256 is stored) and schedules
  // (backups with their retention policies, verify, gc).
  `
  CREATE TABLE tasks (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    domain      TEXT,
    state       TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    payload     TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    ended_ms    INTEGER
  );
  CREATE INDEX tasks_by_created ON tasks (created_ms);
  CREATE TABLE api_tokens (
    name        TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    read_only   INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL,
    last_used_ms INTEGER
  );
  CREATE TABLE schedules (
    id          TEXT PRIMARY KEY,
    domain      TEXT,
    payload     TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    last_run_ms INTEGER
  );
  `,
  // 8: instant restores (src/instant/): the running one of each domain (written
  // before the domain exists, so no reference to domains) and the last result.
  `
  CREATE TABLE instant_restores (
    domain      TEXT PRIMARY KEY,
    record      TEXT NOT NULL,
    changed_ms  INTEGER NOT NULL
  );
  CREATE TABLE instant_results (
    domain      TEXT PRIMARY KEY,
    result      TEXT NOT NULL,
    ended_ms    INTEGER NOT NULL
  );
  `,
];

export const SCHEMA_VERSION = MIGRATIONS.length;

/** Creates `file` 0600 if missing (never through a symlink) and narrows it and its -wal/-shm to 0600. */
function makePrivateFiles(file: string): void {
  try {
    closeSync(openSync(file, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  }
  for (const f of [file, `${file}-wal`, `${file}-shm`]) {
    const st = lstatSync(f, { throwIfNoEntry: false });
    if (st !== undefined && st.isFile() && (st.mode & 0o077) !== 0) chmodSync(f, st.mode & 0o700);
  }
}

/**
 * A value that differs from every earlier one whenever the database may have
 * changed since: a commit by another connection (any process) moves SQLite's
 * `data_version`, a change through this one moves its `total_changes()`.
 * Both only grow, so a value never comes back; a rolled-back change moves it
 * too (a reader recomputes for nothing, never serves stale data). Read it
 * before the data it stands for, so a commit landing between the two makes
 * the next value differ.
 */
export function changeStamp(db: Db): string {
  const row = db.prepare('SELECT total_changes() AS local').get() as { local: number };
  const other = db.pragma('data_version', { simple: true }) as number;
  return `${String(other)}.${String(row.local)}`;
}

export function openDatabase(file: string): Db {
  let db: Db;
  try {
    makePrivateFiles(file);
    db = new Database(file);
  } catch (err) {
    throw new QbackupError('STATE_DIR', `Cannot open the metadata database "${file}": ${describeError(err)}`, { cause: err });
  }
  try {
    db.pragma('journal_mode = WAL');
    db.pragma('busy_timeout = 10000');
    db.pragma('foreign_keys = ON');
    db.pragma('synchronous = FULL');
    migrate(db, file);
  } catch (err) {
    db.close();
    if (err instanceof QbackupError) throw err;
    throw new QbackupError('STATE_DIR', `Cannot use the metadata database "${file}": ${describeError(err)}`, { cause: err });
  }
  return db;
}

function migrate(db: Db, file: string): void {
  // Each step re-reads the version inside an IMMEDIATE transaction, so two
  // processes opening a fresh database never both apply the same migration.
  const step = db.transaction((): boolean => {
    const current = db.pragma('user_version', { simple: true }) as number;
    if (current > SCHEMA_VERSION) {
      throw new QbackupError(
        'STATE_DIR',
        `Cannot use the metadata database "${file}": it has schema version ${current}, written by a newer qbackup (this one knows up to ${SCHEMA_VERSION})`,
      );
    }
    if (current === SCHEMA_VERSION) return false;
    db.exec(MIGRATIONS[current] ?? '');
    db.pragma(`user_version = ${current + 1}`);
    return true;
  });
  while (step.immediate()) {
    // keep applying until the schema is current
  }
}
