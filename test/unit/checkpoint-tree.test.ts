// The checkpoint tree walks (src/checkpoint/tree.ts): orders, counts, and
// termination on bad metadata (cycles, dangling parents) and on long chains.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ancestry, childrenIndex, countDescendants, descendantCounts, postOrder, preOrder, topologicalOrder, type TreeNode } from '../../src/checkpoint/tree.js';

const n = (name: string, parent: string | null): TreeNode => ({ name, parent });

//      a
//     / \
//    b   e
//   / \
//  c   d        f (its parent "zz" does not exist)
const rows = [n('a', null), n('b', 'a'), n('c', 'b'), n('e', 'a'), n('d', 'b'), n('f', 'zz')];
const children = childrenIndex(rows);

describe('checkpoint tree', () => {
  test('childrenIndex keeps the row order of siblings and skips roots', () => {
    assert.deepEqual(children.get('a')?.map((r) => r.name), ['b', 'e']);
    assert.deepEqual(children.get('b')?.map((r) => r.name), ['c', 'd']);
    assert.deepEqual(children.get('zz')?.map((r) => r.name), ['f']);
    assert.equal(children.has('c'), false);
  });

  test('preOrder: parents before children, siblings in row order, the start left out', () => {
    assert.deepEqual(preOrder(children, 'a'), ['b', 'c', 'd', 'e']);
    assert.deepEqual(preOrder(children, 'b'), ['c', 'd']);
    assert.deepEqual(preOrder(children, 'c'), []);
    assert.deepEqual(preOrder(children, 'nope'), []);
  });

  test('postOrder: every checkpoint after its own descendants (a safe deletion order)', () => {
    const order = postOrder(children, 'a');
    assert.deepEqual([...order].sort(), ['b', 'c', 'd', 'e']);
    for (const r of rows) {
      if (r.parent !== null && order.includes(r.parent) && order.includes(r.name)) {
        assert.ok(order.indexOf(r.name) < order.indexOf(r.parent), `${r.name} before its parent ${r.parent}`);
      }
    }
    assert.deepEqual(order, ['c', 'd', 'b', 'e']);
    assert.deepEqual(postOrder(children, 'e'), []);
  });

  test('countDescendants counts the whole subtree', () => {
    assert.equal(countDescendants(children, 'a'), 4);
    assert.equal(countDescendants(children, 'b'), 2);
    assert.equal(countDescendants(children, 'd'), 0);
  });

  test('descendantCounts gives every row what countDescendants gives it, in one walk', () => {
    const counts = descendantCounts(rows, children);
    for (const r of rows) assert.equal(counts.get(r.name), countDescendants(children, r.name), r.name);
    const cyclic = [n('x', 'y'), n('y', 'x'), n('z', 'x'), n('r', null), n('s', 'r')];
    const ch = childrenIndex(cyclic);
    const cc = descendantCounts(cyclic, ch);
    for (const r of cyclic) assert.equal(cc.get(r.name), countDescendants(ch, r.name), `${r.name} (on or below a cycle)`);
  });

  test('topologicalOrder: every checkpoint after its parent; a dangling parent makes a root', () => {
    assert.deepEqual(topologicalOrder(rows).map((r) => r.name), ['a', 'b', 'c', 'd', 'e', 'f']);
    const shuffled = [n('c', 'b'), n('b', 'a'), n('a', null)];
    assert.deepEqual(topologicalOrder(shuffled).map((r) => r.name), ['a', 'b', 'c']);
  });

  test('ancestry walks up to the root, nearest first, and stops at a missing parent', () => {
    const byName = new Map(rows.map((r) => [r.name, r]));
    assert.deepEqual(ancestry(byName, n('d', 'b')).map((r) => r.name), ['d', 'b', 'a']);
    assert.deepEqual(ancestry(byName, n('f', 'zz')).map((r) => r.name), ['f']);
  });

  test('every walk terminates on a parent cycle', () => {
    const cyclic = [n('x', 'y'), n('y', 'x'), n('r', null), n('s', 'r')];
    const ch = childrenIndex(cyclic);
    assert.deepEqual(preOrder(ch, 'x'), ['y']);
    assert.deepEqual(postOrder(ch, 'x'), ['y']);
    assert.equal(countDescendants(ch, 'x'), 1);
    assert.deepEqual(ancestry(new Map(cyclic.map((r) => [r.name, r])), n('x', 'y')).map((r) => r.name), ['x', 'y']);
    // A cycle with no way in from a root is not placed.
    assert.deepEqual(topologicalOrder(cyclic).map((r) => r.name), ['r', 's']);
  });

  test('a chain of 20000 walks without deep recursion', () => {
    const chain = Array.from({ length: 20000 }, (_, i) => n(`c${i}`, i === 0 ? null : `c${i - 1}`));
    const ch = childrenIndex(chain);
    assert.equal(preOrder(ch, 'c0').length, 19999);
    assert.equal(postOrder(ch, 'c0')[0], 'c19999');
    assert.equal(countDescendants(ch, 'c0'), 19999);
    const counts = descendantCounts(chain, ch);
    assert.equal(counts.get('c0'), 19999);
    assert.equal(counts.get('c19999'), 0);
    assert.equal(topologicalOrder(chain).length, 20000);
    const last = chain[chain.length - 1];
    assert.ok(last !== undefined);
    assert.equal(ancestry(new Map(chain.map((r) => [r.name, r])), last).length, 20000);
  });
});
