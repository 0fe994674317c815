// GET /metrics in Prometheus' text format (prom-client), for Prometheus and
// the alerting built on it. Every figure is read from the service when the
// page is scraped (no counter is kept beside the task table):
// - per domain, its last repository backup: end time, duration, bytes read
//   and stored, and whether it succeeded (from the task history);
// - per repository, its size, dedup ratio and last verify (from
//   QbackupService.repositoryFacts, refreshed after each task on it);
// - tasks by kind and state (the kept history plus the live ones);
// - per schedule, its next and last run and how late its due run is.
// Labels carry names and locations, never a secret: a repository is labelled
// by its configured name, else its location (which holds no credentials;
// s3:// URLs with user info are refused by the backend).
//
// Access: like the API (Authorization: Bearer TOKEN, any token) unless the
// configuration says `metrics: public`.

import type { FastifyInstance } from 'fastify';
import { Gauge, Registry } from 'prom-client';
import { QbackupError } from '../errors.js';
import type { Manifest } from '../repository/repository.js';
import { BACKUP_TASK, type QbackupService } from '../service/daemon-service.js';
import type { TaskInfo } from '../service/tasks.js';

const HISTORY = 500;

export function metricsRoute(app: FastifyInstance, service: QbackupService): void {
  const registry = buildRegistry(service);
  app.get('/metrics', { schema: { hide: true } }, async (request, reply) => {
    if (service.config.metrics !== 'public') {
      const m = /^Bearer\s+(\S+)\s*$/i.exec(request.headers.authorization ?? '');
      const info = m?.[1] !== undefined ? service.tokens.authenticate(m[1]) : undefined;
      if (info === undefined) throw new QbackupError('AUTH_REQUIRED', 'The metrics need an API token: send "Authorization: Bearer TOKEN", or set "metrics: public" in the configuration');
    }
    const text = await registry.metrics();
    return reply.type(registry.contentType).send(text);
  });
}

function lastBackups(tasks: readonly TaskInfo[]): Map<string, TaskInfo> {
  const last = new Map<string, TaskInfo>();
  for (const t of tasks) {
    if (t.kind !== BACKUP_TASK || t.domain === null || t.endedMs === null || t.state === 'cancelled') continue;
    const seen = last.get(t.domain);
    if (seen === undefined || (seen.endedMs ?? 0) < t.endedMs) last.set(t.domain, t);
  }
  return last;
}

function manifestOf(task: TaskInfo): Manifest | undefined {
  const r = task.result as { manifest?: Manifest } | undefined;
  return r?.manifest;
}

// Long: one declaration per metric, each with the few lines that fill it.
function buildRegistry(service: QbackupService): Registry {
  const registry = new Registry();
  const domain = ['domain'];
  let snapshot: { tasks: TaskInfo[]; last: Map<string, TaskInfo> } | undefined;
  // One read of the task history per scrape, shared by the metrics below (prom-client collects them in order).
  const tasks = (): { tasks: TaskInfo[]; last: Map<string, TaskInfo> } => {
    if (snapshot === undefined) {
      const list = service.tasks.list(HISTORY);
      snapshot = { tasks: list, last: lastBackups(list) };
      setImmediate(() => (snapshot = undefined));
    }
    return snapshot;
  };
  const perLastBackup = (g: Gauge, value: (t: TaskInfo, m: Manifest | undefined) => number | undefined): void => {
    g.reset();
    for (const [d, t] of tasks().last) {
      const v = value(t, manifestOf(t));
      if (v !== undefined) g.set({ domain: d }, v);
    }
  };
  new Gauge({ name: 'qbackup_backup_last_end_timestamp_seconds', help: 'When the last repository backup of the domain ended (success or failure)', labelNames: domain, registers: [registry], collect() { perLastBackup(this, (t) => (t.endedMs ?? 0) / 1000); } });
  new Gauge({ name: 'qbackup_backup_last_success', help: '1 when the last repository backup of the domain succeeded, 0 when it failed', labelNames: domain, registers: [registry], collect() { perLastBackup(this, (t) => (t.state === 'succeeded' ? 1 : 0)); } });
  new Gauge({ name: 'qbackup_backup_last_duration_seconds', help: 'How long the last repository backup of the domain ran', labelNames: domain, registers: [registry], collect() { perLastBackup(this, (t) => ((t.endedMs ?? 0) - (t.startedMs ?? t.endedMs ?? 0)) / 1000); } });
  new Gauge({ name: 'qbackup_backup_last_bytes_read', help: 'Bytes the last successful repository backup of the domain read from its disks', labelNames: domain, registers: [registry], collect() { perLastBackup(this, (_t, m) => m?.disks.reduce((a, d) => a + d.bytesRead, 0)); } });
  new Gauge({ name: 'qbackup_backup_last_bytes_stored', help: 'Bytes the last successful repository backup of the domain added to the repository', labelNames: domain, registers: [registry], collect() { perLastBackup(this, (_t, m) => m?.disks.reduce((a, d) => a + d.bytesStored, 0)); } });
  new Gauge({ name: 'qbackup_backup_last_success_timestamp_seconds', help: 'When the newest successful repository backup of the domain ended', labelNames: domain, registers: [registry], collect() {
    this.reset();
    const newest = new Map<string, number>();
    for (const t of tasks().tasks) {
      if (t.kind === BACKUP_TASK && t.domain !== null && t.state === 'succeeded' && t.endedMs !== null) newest.set(t.domain, Math.max(t.endedMs, newest.get(t.domain) ?? 0));
    }
    for (const [d, ms] of newest) this.set({ domain: d }, ms / 1000);
  } });

  const repo = ['repository'];
  const perRepository = (g: Gauge, value: (f: NonNullable<ReturnType<QbackupService['repositoryFacts']['get']>>) => number | undefined): void => {
    g.reset();
    for (const f of service.repositoryFacts.values()) {
      const v = value(f);
      if (v !== undefined) g.set({ repository: f.label }, v);
    }
  };
  new Gauge({ name: 'qbackup_repository_size_bytes', help: 'Bytes of every pack and index of the repository', labelNames: repo, registers: [registry], collect() { perRepository(this, (f) => f.stats?.repositoryBytes); } });
  new Gauge({ name: 'qbackup_repository_stored_bytes', help: 'Bytes of the chunks the backups reference, as stored', labelNames: repo, registers: [registry], collect() { perRepository(this, (f) => f.stats?.storedChunkBytes); } });
  new Gauge({ name: 'qbackup_repository_backups', help: 'Backups in the repository', labelNames: repo, registers: [registry], collect() { perRepository(this, (f) => f.stats?.backups); } });
  new Gauge({ name: 'qbackup_repository_dedup_ratio', help: 'Referenced bytes over unique bytes', labelNames: repo, registers: [registry], collect() { perRepository(this, (f) => f.stats?.dedupRatio); } });
  new Gauge({ name: 'qbackup_repository_compression_ratio', help: 'Unique bytes over stored bytes', labelNames: repo, registers: [registry], collect() { perRepository(this, (f) => f.stats?.compressionRatio); } });
  new Gauge({ name: 'qbackup_repository_last_verify_success', help: '1 when the last verify of the repository found no damage, 0 when it found some', labelNames: repo, registers: [registry], collect() { perRepository(this, (f) => (f.lastVerify === undefined ? undefined : f.lastVerify.ok ? 1 : 0)); } });
  new Gauge({ name: 'qbackup_repository_last_verify_timestamp_seconds', help: 'When the last verify of the repository ended', labelNames: repo, registers: [registry], collect() { perRepository(this, (f) => (f.lastVerify === undefined ? undefined : f.lastVerify.timeMs / 1000)); } });

  new Gauge({ name: 'qbackup_tasks', help: 'Tasks by kind and state (the kept history and the live ones)', labelNames: ['kind', 'state'], registers: [registry], collect() {
    this.reset();
    const counts = new Map<string, { kind: string; state: string; n: number }>();
    for (const t of tasks().tasks) {
      const key = `${t.kind}\u0000${t.state}`;
      const c = counts.get(key) ?? { kind: t.kind, state: t.state, n: 0 };
      c.n++;
      counts.set(key, c);
    }
    for (const c of counts.values()) this.set({ kind: c.kind, state: c.state }, c.n);
  } });

  const sched = ['schedule', 'action', 'domain'];
  const perSchedule = (g: Gauge, value: (s: ReturnType<QbackupService['schedules']['list']>[number], now: number) => number | undefined): void => {
    g.reset();
    const now = Date.now();
    for (const s of service.schedules.list()) {
      const v = value(s, now);
      if (v !== undefined) g.set({ schedule: s.name ?? s.id, action: s.action ?? 'backup', domain: s.domain ?? '' }, v);
    }
  };
  new Gauge({ name: 'qbackup_schedule_lag_seconds', help: 'How long ago a schedule\'s run fell due without running yet (0 when none is due)', labelNames: sched, registers: [registry], collect() { perSchedule(this, (s, now) => (s.nextRunMs === null ? 0 : Math.max(0, (now - s.nextRunMs) / 1000))); } });
  new Gauge({ name: 'qbackup_schedule_paused', help: '1 while a schedule is paused (it has no next run and no lag then), else 0', labelNames: sched, registers: [registry], collect() { perSchedule(this, (s) => (s.paused === true ? 1 : 0)); } });
  new Gauge({ name: 'qbackup_schedule_next_run_timestamp_seconds', help: 'When the schedule runs next', labelNames: sched, registers: [registry], collect() { perSchedule(this, (s) => (s.nextRunMs === null ? undefined : s.nextRunMs / 1000)); } });
  new Gauge({ name: 'qbackup_schedule_last_run_timestamp_seconds', help: 'When the schedule last started a run', labelNames: sched, registers: [registry], collect() { perSchedule(this, (s) => (s.lastRunMs === null ? undefined : s.lastRunMs / 1000)); } });
  return registry;
}
