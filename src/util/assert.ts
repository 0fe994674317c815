// Invariant checks: a failed assert is a bug in qbackup or in its caller, never
// a condition a user or peer can cause (those are QbackupErrors).

import { AssertionError } from 'node:assert';

export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new AssertionError({ message });
}
