// Disjoint half-open ranges: which parts of a read request a server's
// replies have covered (the reply parser refuses overlaps).

/** Disjoint half-open ranges, merged when adjacent; reports overlaps. */
export class RangeSet {
  private readonly starts: number[] = [];
  private readonly ends: number[] = [];
  covered = 0;

  /** Adds [start, end); false (and no change) if it overlaps a range already present. */
  add(start: number, end: number): boolean {
    let lo = 0;
    let hi = this.starts.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((this.starts[mid] ?? 0) < start) lo = mid + 1;
      else hi = mid;
    }
    const prev = lo - 1;
    const next = lo;
    const prevEnd = prev >= 0 ? this.ends[prev] : undefined;
    const nextStart = this.starts[next];
    if (prevEnd !== undefined && prevEnd > start) return false;
    if (nextStart !== undefined && nextStart < end) return false;
    this.covered += end - start;
    const joinsPrev = prevEnd === start;
    const joinsNext = nextStart === end;
    if (joinsPrev && joinsNext) {
      this.ends[prev] = this.ends[next] ?? end;
      this.starts.splice(next, 1);
      this.ends.splice(next, 1);
    } else if (joinsPrev) {
      this.ends[prev] = end;
    } else if (joinsNext) {
      this.starts[next] = start;
    } else {
      this.starts.splice(next, 0, start);
      this.ends.splice(next, 0, end);
    }
    return true;
  }
}
