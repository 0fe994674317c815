// Shrinks a failing scenario by removing actions, delta-debugging style: cut
// the list after the failing action, then try removing chunks (halves,
// quarters, … single actions) while the same check still fails, keeping every
// removal that does. Each attempt is a full run against QEMU, so attempts and
// time are bounded; the result is the smallest list found so far.
//
// "The same failure" = the same check code (content, mode, dirty-map, …), so
// a shrink does not wander off to a different bug. The failing action is never
// removed: without it the run cannot fail there.

import type { Action, Scenario } from './actions.js';
import type { Failure, RunResult } from './scenario.js';

export interface ShrinkOptions {
  maxAttempts: number;
  deadlineMs: number;
  log: (line: string) => void;
}

export interface ShrinkResult {
  scenario: Scenario;
  failure: Failure;
  attempts: number;
}

function cut(s: Scenario, actions: Action[], f: Failure): Scenario {
  return { ...s, actions: actions.slice(0, f.index + 1) };
}

export async function shrink(original: Scenario, failure: Failure, run: (s: Scenario) => Promise<RunResult>, options: ShrinkOptions): Promise<ShrinkResult> {
  const deadline = Date.now() + options.deadlineMs;
  let best = cut(original, original.actions, failure);
  let bestFailure = failure;
  let attempts = 0;
  const budgetLeft = (): boolean => attempts < options.maxAttempts && Date.now() < deadline;
  let chunk = Math.max(1, Math.ceil((best.actions.length - 1) / 2));
  while (chunk >= 1 && budgetLeft()) {
    let removedAny = false;
    // Removable actions are all but the last (the failing one).
    for (let start = 0; start < best.actions.length - 1 && budgetLeft(); ) {
      const end = Math.min(start + chunk, best.actions.length - 1);
      const candidate = { ...best, actions: [...best.actions.slice(0, start), ...best.actions.slice(end)] };
      attempts++;
      const r = await run(candidate);
      const same = r.failure !== undefined && r.failure.check === bestFailure.check;
      options.log(`shrink attempt ${attempts}: without actions ${start + 1}..${end} of ${best.actions.length}: ${same ? 'still fails' : 'passes or fails otherwise'}`);
      if (same && r.failure !== undefined) {
        best = cut(candidate, candidate.actions, r.failure);
        bestFailure = r.failure;
        removedAny = true;
      } else {
        start = end;
      }
    }
    if (!removedAny) chunk = chunk === 1 ? 0 : Math.ceil(chunk / 2);
    else chunk = Math.min(chunk, Math.max(1, best.actions.length - 1));
  }
  return { scenario: best, failure: bestFailure, attempts };
}
