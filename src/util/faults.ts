// Test-only fault injection, handed in like the repository's CrashingBackend:
// multi-step operations call `faults.at(point)` between their steps, and a
// test's Faults may kill the process there to prove the next command finishes
// or rolls back what was begun. Production code gets `noFaults`.

export interface Faults {
  at(point: string): void;
}

export const noFaults: Faults = { at: () => undefined };

/** Kills this process (SIGKILL, nothing cleaned up) when the operation reaches `point`. */
export function crashAtPoint(point: string): Faults {
  return {
    at: (p) => {
      if (p === point) process.kill(process.pid, 'SIGKILL');
    },
  };
}
