// Test-only fault injection for repositories (src/util/faults.ts): a backend
// that visits the fault point "repo-write" before every write or delete it
// passes on, so a test can kill a command just before any one of its
// repository writes (QBACKUP_CRASH_AT=repo-write:N in the CLI), or a unit
// test fail every write after the N-th with a Faults that throws. Production
// code never wraps a backend in it.

import type { Faults } from '../../util/faults.js';
import type { Backend, ByteRange, ObjectInfo } from './backend.js';

export class FaultingBackend implements Backend {
  constructor(
    private readonly inner: Backend,
    private readonly faults: Faults,
  ) {}

  get location(): string {
    return this.inner.location;
  }
  // async: a fault that throws (a test's) fails the returned promise, as a failed write would.
  async putIfAbsent(key: string, data: Buffer): Promise<boolean> {
    this.faults.at('repo-write');
    return this.inner.putIfAbsent(key, data);
  }
  get(key: string, range?: ByteRange): Promise<Buffer> {
    return this.inner.get(key, range);
  }
  stat(key: string): Promise<ObjectInfo | undefined> {
    return this.inner.stat(key);
  }
  list(prefix: string): Promise<ObjectInfo[]> {
    return this.inner.list(prefix);
  }
  async delete(key: string): Promise<void> {
    this.faults.at('repo-write');
    return this.inner.delete(key);
  }
  async createContainer(): Promise<void> {
    await this.inner.createContainer?.();
  }
  close(): void {
    this.inner.close?.();
  }
  async sweepTemporary(ageMs: number, prefix?: string): Promise<number> {
    this.faults.at('repo-write');
    return (await this.inner.sweepTemporary?.(ageMs, prefix)) ?? 0;
  }
}
