// Invariant checks: a failure is a bug in qbackup or its caller, never something a user or peer caused.
import { AssertionError } from 'node:assert';
export function assert(condition: unknown, message: string): asserts condition { if (!condition) throw new AssertionError({ message }); }
