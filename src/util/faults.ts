// Test-only fault injection, handed in like the repository's CrashingBackend:
// multi-step operations call `faults.at(point)` between their steps, and a
// test's Faults may kill the process there to prove the next command finishes
// or rolls back what was begun. Production code gets `noFaults`.

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
