// The checkpoint tree (each checkpoint names its parent) as pure functions over
// rows read once: children, descendants, ancestry and a topological order.
//
// Invariants:
// - Iterative everywhere: a chain can be thousands of checkpoints long, as deep
//   as no recursion should go.
// - Every walk terminates on bad metadata too (a parent cycle, a parent that
//   does not exist): a node is visited at most once.
// - Orders are stable: children come in the order of the rows given (creation
//   order, as the store returns them).

/** What the tree needs of a checkpoint; CheckpointLink and CheckpointRow have it. */
export interface TreeNode {
  name: string;
  parent: string | null;
}

/** Children of each checkpoint, in the order of `rows`. */
export function childrenIndex<T extends TreeNode>(rows: readonly T[]): Map<string, T[]> {
  const out = new Map<string, T[]>();
  for (const r of rows) {
    if (r.parent === null) continue;
    const list = out.get(r.parent);
    if (list === undefined) out.set(r.parent, [r]);
    else list.push(r);
  }
  return out;
}

/** Names below `name`, parents before children, siblings in row order. */
export function preOrder(children: ReadonlyMap<string, readonly TreeNode[]>, name: string): string[] {
  const out: string[] = [];
  const seen = new Set<string>([name]);
  const stack = [...(children.get(name) ?? [])].reverse();
  for (let c = stack.pop(); c !== undefined; c = stack.pop()) {
    if (seen.has(c.name)) continue;
    seen.add(c.name);
    out.push(c.name);
    stack.push(...[...(children.get(c.name) ?? [])].reverse());
  }
  return out;
}

/**
 * Names below `name`, each after all of its own descendants (leaves first): the
 * order to delete a subtree in.
 */
export function postOrder(children: ReadonlyMap<string, readonly TreeNode[]>, name: string): string[] {
  // The reverse of a pre-order where children are visited last-first is a valid post-order.
  const out: string[] = [];
  const seen = new Set<string>([name]);
  const stack = [...(children.get(name) ?? [])];
  for (let c = stack.pop(); c !== undefined; c = stack.pop()) {
    if (seen.has(c.name)) continue;
    seen.add(c.name);
    out.push(c.name);
    stack.push(...(children.get(c.name) ?? []));
  }
  return out.reverse();
}

/** Number of checkpoints below `name`. */
export function countDescendants(children: ReadonlyMap<string, readonly TreeNode[]>, name: string): number {
  let count = 0;
  const seen = new Set<string>([name]);
  const stack = [name];
  for (let n = stack.pop(); n !== undefined; n = stack.pop()) {
    for (const c of children.get(n) ?? []) {
      if (seen.has(c.name)) continue;
      seen.add(c.name);
      count++;
      stack.push(c.name);
    }
  }
  return count;
}

/**
 * The number of checkpoints below each of `rows`, in one walk of the tree
 * (countDescendants for every row would be quadratic on a long chain). A
 * checkpoint on a parent cycle, or below one, has no root above it; its count
 * is countDescendants'.
 */
export function descendantCounts(rows: readonly TreeNode[], children: ReadonlyMap<string, readonly TreeNode[]>): Map<string, number> {
  const names = new Set(rows.map((r) => r.name));
  const counts = new Map<string, number>();
  // Post-order from the roots: a node's count is taken once all its children's are known.
  const stack: Array<{ name: string; expanded: boolean }> = [];
  for (const r of rows) if (r.parent === null || !names.has(r.parent)) stack.push({ name: r.name, expanded: false });
  for (let top = stack.pop(); top !== undefined; top = stack.pop()) {
    const kids = children.get(top.name) ?? [];
    if (!top.expanded) {
      if (counts.has(top.name)) continue;
      stack.push({ name: top.name, expanded: true });
      for (const c of kids) if (!counts.has(c.name)) stack.push({ name: c.name, expanded: false });
      continue;
    }
    let n = 0;
    for (const c of kids) n += 1 + (counts.get(c.name) ?? 0);
    counts.set(top.name, n);
  }
  for (const r of rows) if (!counts.has(r.name)) counts.set(r.name, countDescendants(children, r.name));
  return counts;
}

/**
 * `from` and its ancestors, nearest first, following parent links until a
 * root, a parent that does not exist, or a checkpoint already visited.
 */
export function ancestry<T extends TreeNode>(byName: ReadonlyMap<string, T>, from: T): T[] {
  const out: T[] = [];
  const seen = new Set<string>();
  for (let at: T | undefined = from; at !== undefined && !seen.has(at.name); at = at.parent === null ? undefined : byName.get(at.parent)) {
    seen.add(at.name);
    out.push(at);
  }
  return out;
}

/**
 * Every checkpoint after its parent: a depth-first walk from the roots
 * (checkpoints whose parent is null or not among `rows`), siblings in row
 * order. Checkpoints on a parent cycle with no way in from a root are left out.
 */
export function topologicalOrder<T extends TreeNode>(rows: readonly T[]): T[] {
  const names = new Set(rows.map((r) => r.name));
  const byParent = new Map<string | null, T[]>();
  for (const r of rows) {
    const key = r.parent !== null && names.has(r.parent) ? r.parent : null;
    const list = byParent.get(key);
    if (list === undefined) byParent.set(key, [r]);
    else list.push(r);
  }
  const out: T[] = [];
  const placed = new Set<string>();
  const stack = [...(byParent.get(null) ?? [])].reverse();
  for (let r = stack.pop(); r !== undefined; r = stack.pop()) {
    if (placed.has(r.name)) continue;
    placed.add(r.name);
    out.push(r);
    stack.push(...[...(byParent.get(r.name) ?? [])].reverse());
  }
  return out;
}
