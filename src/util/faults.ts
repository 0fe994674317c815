// Test-only fault injection, handed in (the repository's FaultingBackend too):
// multi-step operations call `faults.at(point)` between their steps, and a
// test's Faults may kill the process there to prove the next command finishes
// or rolls back what was begun (or stop it there, see stopAtPoint).
// Production code gets `noFaults`.

import { writeSync } from 'node:fs';

export interface Faults {
  at(point: string): void;
}

export const noFaults: Faults = { at: () => undefined };

/**
 * Kills this process (SIGKILL, nothing cleaned up) when the operation reaches
 * `point`; `point:N` (N a number) kills at its N-th visit, so a test can walk
 * every step of a loop (`repo-write:7`: just before the 7th repository write).
 */
export function crashAtPoint(spec: string): Faults {
  const m = /^(.+):(\d+)$/.exec(spec);
  const point = m?.[1] ?? spec;
  const nth = m?.[2] !== undefined ? Number(m[2]) : 1;
  let seen = 0;
  return {
    at: (p) => {
      if (p === point && ++seen === nth) process.kill(process.pid, 'SIGKILL');
    },
  };
}

/**
 * Stops this process (SIGSTOP) the first time the operation reaches `point`,
 * after writing `qbackup: stopped at POINT` to stderr: a test then knows
 * exactly where the process stands (e.g. mid-copy), and kills it, or changes
 * the world around it and lets it continue (SIGCONT).
 */
export function stopAtPoint(point: string): Faults {
  let stopped = false;
  return {
    at: (p) => {
      if (p !== point || stopped) return;
      stopped = true;
      writeSync(2, `qbackup: stopped at ${point}\n`);
      process.kill(process.pid, 'SIGSTOP');
    },
  };
}

/** Both: each point is handled by whichever of the two names it. */
export function combineFaults(...all: ReadonlyArray<Faults | undefined>): Faults | undefined {
  const some = all.filter((f): f is Faults => f !== undefined);
  if (some.length === 0) return undefined;
  return { at: (p) => some.forEach((f) => f.at(p)) };
}
