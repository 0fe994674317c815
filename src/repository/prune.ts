// Retention: which backups of a domain a policy keeps, and why (restic's and
// Proxmox Backup's rules), as a pure function; then deleting the others'
// manifests and folding the kept backups' index chains (fold.ts), so the
// chunks and indexes only removed backups used become garbage for gc.
//
// Order of pruneStore: replaced manifest generations left by an interrupted
// prune go first; then the removed backups' manifests (no space needed: a
// full repository can always be pruned, and gc, which marks whole chains,
// keeps every link a kept backup still runs through); then the folds, each
// new index and manifest generation stored before the old generation goes.
// Prune and gc exclude each other (locks.ts), so gc never sees a folded index
// before the manifest that names it.
//
// Rules, newest backup first: keep-last N keeps the N newest; keep-hourly,
// -daily, -weekly, -monthly, -yearly N keep the newest backup of each of the
// N most recent hours, days, ISO weeks, months, years that have a backup.
// Periods are in UTC. A backup kept by several rules lists every reason.

import { QbackupError } from '../errors.js';
import { executeFold, planFold, readParents, type FoldStep } from './fold.js';
import { acquireLock } from './locks.js';
import type { Manifest } from './manifest.js';
import type { Store } from './store.js';
import { throwIfCancelled, type OperationOptions } from '../util/operation.js';

export interface RetentionPolicy {
  keepLast?: number;
  keepHourly?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
  keepYearly?: number;
}

export interface PrunePlan {
  keep: Array<{ id: string; time: string; reasons: string[] }>;
  remove: Array<{ id: string; time: string }>;
  /** The kept disks whose index chains are folded (they ran through removed backups or unowned links). */
  folds: FoldStep[];
}

const PERIODS: Array<{ rule: keyof RetentionPolicy; name: string; bucket: (d: Date) => string }> = [
  { rule: 'keepHourly', name: 'hourly', bucket: (d) => d.toISOString().slice(0, 13) },
  { rule: 'keepDaily', name: 'daily', bucket: (d) => d.toISOString().slice(0, 10) },
  { rule: 'keepWeekly', name: 'weekly', bucket: isoWeek },
  { rule: 'keepMonthly', name: 'monthly', bucket: (d) => d.toISOString().slice(0, 7) },
  { rule: 'keepYearly', name: 'yearly', bucket: (d) => d.toISOString().slice(0, 4) },
];

/** The policy's rules that are set. Only the rule fields count: callers pass wider objects (the repository, the passphrase, dryRun). */
function setRules(policy: RetentionPolicy): Array<[keyof RetentionPolicy, number | undefined]> {
  const names: Array<keyof RetentionPolicy> = ['keepLast', ...PERIODS.map((p) => p.rule)];
  return names.map((rule): [keyof RetentionPolicy, number | undefined] => [rule, policy[rule]]).filter(([, v]) => v !== undefined);
}

export function validatePolicy(policy: RetentionPolicy): void {
  const rules = setRules(policy);
  if (rules.length === 0) throw new QbackupError('INVALID_ARGUMENT', 'Give a retention policy (--keep-last, --keep-daily, …): without one every backup would go');
  for (const [rule, v] of rules) {
    if (!Number.isSafeInteger(v) || (v as number) < 0) throw new QbackupError('INVALID_ARGUMENT', `Invalid ${rule} ${String(v)}: use a whole number of backups`);
  }
  if (rules.every(([, v]) => v === 0)) throw new QbackupError('INVALID_ARGUMENT', 'A retention policy that keeps nothing would remove every backup; keep at least 1');
}

export function planPrune(manifests: readonly Pick<Manifest, 'id' | 'time'>[], policy: RetentionPolicy): PrunePlan {
  validatePolicy(policy);
  const newestFirst = [...manifests].sort((a, b) => b.time.localeCompare(a.time) || b.id.localeCompare(a.id));
  const reasons = new Map<string, string[]>(newestFirst.map((m) => [m.id, []]));
  newestFirst.slice(0, policy.keepLast ?? 0).forEach((m, i) => reasons.get(m.id)?.push(`last ${i + 1}`));
  for (const { rule, name, bucket } of PERIODS) {
    const limit = policy[rule] ?? 0;
    const seen = new Set<string>();
    for (const m of newestFirst) {
      if (seen.size >= limit) break;
      const b = bucket(new Date(m.time));
      if (seen.has(b)) continue;
      seen.add(b);
      reasons.get(m.id)?.push(`${name} ${b}`);
    }
  }
  const plan: PrunePlan = { keep: [], remove: [], folds: [] };
  for (const m of newestFirst) {
    const why = reasons.get(m.id) ?? [];
    if (why.length > 0) plan.keep.push({ id: m.id, time: m.time, reasons: why });
    else plan.remove.push({ id: m.id, time: m.time });
  }
  return plan;
}

/**
 * Applies `policy` to the backups of `domain` in `store`: removes the
 * manifests of those it does not keep and folds the kept ones' index chains.
 * With `dryRun`, only plans. Returns the plan carried out and the removed
 * backups' manifests (their checkpoints are the caller's to merge away).
 */
export interface PruneOptions extends OperationOptions {
  dryRun?: boolean | undefined;
}

export async function pruneStore(store: Store, domain: string, policy: RetentionPolicy, options: PruneOptions = {}): Promise<{ plan: PrunePlan; removed: Manifest[] }> {
  validatePolicy(policy);
  await using _lock = options.dryRun === true ? undefined : await acquireLock(store.backend, 'prune', domain);
  if (options.dryRun !== true) await store.dropSupersededManifests(domain);
  const manifests = await store.manifests(domain);
  const plan = planPrune(manifests, policy);
  const keepIds = new Set(plan.keep.map((k) => k.id));
  const kept = manifests.filter((m) => keepIds.has(m.id));
  const removed = manifests.filter((m) => !keepIds.has(m.id));
  plan.folds = planFold({ kept, parents: await readParents(store, kept) });
  if (options.dryRun === true) return { plan, removed };
  // Cancellation is checked between backups: each manifest goes whole, and
  // each fold writes its indexes before the manifest generation that names them.
  const what = `Prune of domain "${domain}"`;
  let done = 0;
  const progress = (): void => options.onProgress?.({ phase: 'prune', doneBytes: done, totalBytes: removed.length + plan.folds.length });
  for (const m of removed) {
    throwIfCancelled(options.signal, what);
    await store.deleteManifest(domain, m.id);
    options.logger?.log({ level: 'info', msg: 'backup removed', fields: { domain, backup: m.id } });
    done++;
    progress();
  }
  await executeFold(store, kept, plan.folds, { signal: options.signal, what, onStep: () => (done++, progress()) });
  return { plan, removed };
}

/** ISO 8601 week, e.g. "2026-W48". */
function isoWeek(d: Date): string {
  const t = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate()));
  const day = t.getUTCDay() || 7;
  t.setUTCDate(t.getUTCDate() + 4 - day);
  const yearStart = Date.UTC(t.getUTCFullYear(), 0, 1);
  const week = Math.ceil(((t.getTime() - yearStart) / 86_400_000 + 1) / 7);
  return `${t.getUTCFullYear()}-W${String(week).padStart(2, '0')}`;
}
