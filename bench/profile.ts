// CPU profiles in benchmarks: the top self-time functions of a V8 profile,
// whether sampled through the inspector (bench/chunks.ts) or written per
// thread by `node --cpu-prof` (bench/verify.ts).

import { readdirSync, readFileSync } from 'node:fs';
import type { Profiler } from 'node:inspector';
import { join } from 'node:path';

export interface HotFunction {
  name: string;
  where: string;
  selfMs: number;
  pct: number;
}

/** Self time per function (summed over its nodes), the top `count`. */
export function hotFunctions(p: Profiler.Profile, count = 8): HotFunction[] {
  const dt = new Map<number, number>();
  const deltas = p.timeDeltas ?? [];
  (p.samples ?? []).forEach((id, i) => dt.set(id, (dt.get(id) ?? 0) + (deltas[i] ?? 0) / 1000));
  const byName = new Map<string, HotFunction>();
  let total = 0;
  for (const n of p.nodes) {
    const self = dt.get(n.id) ?? 0;
    total += self;
    const f = n.callFrame;
    const name = f.functionName === '' ? '(anonymous)' : f.functionName;
    const where = f.url === '' ? '' : `${f.url.replace(/^.*\/(dist|node_modules)\//, '').replace(/^node:/, 'node:')}:${f.lineNumber + 1}`;
    const key = `${name} ${where}`;
    const h = byName.get(key) ?? { name, where, selfMs: 0, pct: 0 };
    h.selfMs += self;
    byName.set(key, h);
  }
  const top = [...byName.values()].sort((a, b) => b.selfMs - a.selfMs).slice(0, count);
  for (const h of top) h.pct = total > 0 ? (100 * h.selfMs) / total : 0;
  return top;
}

/** One thread's profile from a `--cpu-prof-dir`: its busy time (samples not idle) and top functions. */
export interface ThreadProfile {
  file: string;
  busyMs: number;
  hot: HotFunction[];
}

/** Every `.cpuprofile` in `dir` (one per thread), the busiest thread first. */
export function readProfileDir(dir: string, count = 8): ThreadProfile[] {
  const out: ThreadProfile[] = [];
  for (const file of readdirSync(dir).filter((f) => f.endsWith('.cpuprofile'))) {
    const p = JSON.parse(readFileSync(join(dir, file), 'utf8')) as Profiler.Profile;
    const all = hotFunctions(p, Number.MAX_SAFE_INTEGER);
    const busyMs = all.filter((h) => h.name !== '(idle)').reduce((n, h) => n + h.selfMs, 0);
    out.push({ file, busyMs, hot: all.slice(0, count) });
  }
  return out.sort((a, b) => b.busyMs - a.busyMs);
}
