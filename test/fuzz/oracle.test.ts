// CI budget of the correctness oracle: a few seeded scenarios against real
// QEMU. A failure writes the scenario's actions to a file and prints the
// command that replays (and shrinks) it; shrinking itself is left to
// `npm run fuzz`, outside the CI budget. The long soak is
// `npm run fuzz -- --seeds 200 --steps 40` (see docs/testing.md).

import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { formatScenario } from './actions.js';
import { runScenario } from './scenario.js';

const SEEDS = [101, 202, 303, 404];
const STEPS = 40;

for (const seed of SEEDS) {
  test(`oracle scenario seed ${seed} (${STEPS} steps)`, async () => {
    const r = await runScenario({ seed, steps: STEPS });
    let message = '';
    if (r.failure !== undefined) {
      const dir = join(tmpdir(), 'qbfuzz-failures');
      mkdirSync(dir, { recursive: true });
      const file = join(dir, `seed-${seed}-ci.actions`);
      writeFileSync(file, formatScenario(r.scenario, `failing scenario of seed ${seed}: ${r.failure.message}`));
      message = `seed ${seed} failed at action ${r.failure.index + 1} (${r.failure.action}) [${r.failure.check}]: ${r.failure.message}\nreplay and shrink: npm run fuzz -- --replay ${file}`;
    }
    assert.equal(r.failure, undefined, message);
    assert.ok(r.backupsChecked > 0, 'the scenario checked backups');
  });
}
