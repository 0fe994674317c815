// A bounded pool of async work: used wherever reads or writes go out several
// at a time (the NBD copier, the repository's pack and manifest loads,
// restores and serving).

/**
 * Runs `fn` on every item of `work` with at most `maxInFlight` running at
 * once. The first failure stops new work; it is thrown once the running items
 * have settled.
 */
export async function runPool<T>(work: Iterator<T> | AsyncIterator<T>, maxInFlight: number, fn: (item: T) => Promise<void>): Promise<void> {
  const failures: unknown[] = [];
  const worker = async (): Promise<void> => {
    while (failures.length === 0) {
      let next: IteratorResult<T>;
      try {
        next = await work.next();
      } catch (err) {
        failures.push(err);
        return;
      }
      if (next.done === true || failures.length > 0) return;
      try {
        await fn(next.value);
      } catch (err) {
        failures.push(err);
      }
    }
  };
  await Promise.all(Array.from({ length: maxInFlight }, () => worker()));
  if (failures.length > 0) {
    await work.return?.(undefined);
    throw failures[0];
  }
}
