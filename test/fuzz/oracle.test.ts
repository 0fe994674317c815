// CI budget of the correctness oracle: a few seeded scenarios against real
// QEMU. A failure prints the seed, the step and the replay command.
// The long soak is `npm run fuzz -- --seeds 200 --steps 40` (see docs/testing.md).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { runScenario } from './scenario.js';

const SEEDS = [101, 202, 303, 404];
const STEPS = 40;

for (const seed of SEEDS) {
  test(`oracle scenario seed ${seed} (${STEPS} steps)`, async () => {
    const r = await runScenario({ seed, steps: STEPS });
    assert.equal(
      r.failure,
      undefined,
      r.failure === undefined
        ? ''
        : `seed ${seed} failed at step ${r.failure.step} (${r.failure.action}): ${r.failure.message}\nreplay: npm run fuzz -- --seed ${seed} --steps ${r.failure.step} --verbose`,
    );
    assert.ok(r.backupsChecked > 0, 'the scenario checked backups');
  });
}
