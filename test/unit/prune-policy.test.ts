// Retention as a pure function: the policy may come inside a wider options
// object (the repository, passphrase, dryRun), as the library's prune and the
// CLI pass it; only the keep-* rules count.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { planPrune } from '../../src/repository/prune.js';

const manifests = ['01', '02', '03', '04'].map((mm) => ({ id: `2026${mm}01T000000.000Z-0000`, time: `2026-${mm}-01T00:00:00.000Z` }));

test('keep-last inside a wider options object keeps the newest', () => {
  const options = { repo: '/srv/repo', password: 'x', dryRun: false, keepLast: 2 };
  const plan = planPrune(manifests, options);
  assert.deepEqual(plan.keep.map((k) => k.id), [manifests[3]?.id, manifests[2]?.id]);
  assert.deepEqual(plan.remove.map((k) => k.id), [manifests[1]?.id, manifests[0]?.id]);
});

test('a policy without rules, or with a bad one, is refused', () => {
  assert.throws(() => planPrune(manifests, { repo: '/srv/repo' } as object), /Give a retention policy/);
  assert.throws(() => planPrune(manifests, { keepLast: 1.5 }), /Invalid keepLast/);
  assert.throws(() => planPrune(manifests, { keepLast: 0 }), /keeps nothing/);
});
