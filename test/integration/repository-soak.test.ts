// The CI-sized repository soak (test/soak/soak.ts; the full one is
// `npm run soak`, figures in docs/testing.md): backup, prune, gc and copy each
// killed before their first repository write, instant restore killed at
// every step of its begin, in a plain and an encrypted repository, then every
// object kind flipped, truncated and deleted in copies of each. Every
// invariant the soak checks must hold: no failure at all.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { formatFigures, runSoak } from '../soak/soak.js';

describe('repository soak, CI size (real QEMU, CLI in subprocesses)', () => {
  test('kills at counted points and every kind of damage: listed backups restore exactly, damage is named, nothing left running or locked', async () => {
    const figures = await runSoak({ seed: 7, rounds: 1, maxKillsPerOp: 1 });
    const summary = formatFigures(figures);
    assert.deepEqual(figures.failures, [], summary);
    assert.ok(figures.totalKills >= 20, summary);
    assert.ok(figures.damages >= 39, summary);
    assert.equal(figures.damagesNamed, figures.damages, summary);
  });
});
