// Runs the correctness oracle from the command line.
//   npm run fuzz -- --seed 7 --steps 40          one scenario (replays a failure)
//   npm run fuzz -- --seeds 200 --steps 40       a soak over seeds 1..200 (or --from N)
// Prints one line per scenario and the totals; exits non-zero on any mismatch,
// with the seed, the failing step and the command that replays it.

import { parseArgs } from 'node:util';
import { runScenario, SLACK_CLUSTERS } from './scenario.js';

const { values } = parseArgs({
  options: {
    seed: { type: 'string' },
    seeds: { type: 'string' },
    from: { type: 'string', default: '1' },
    steps: { type: 'string', default: '40' },
    verbose: { type: 'boolean', default: false },
    keep: { type: 'boolean', default: false },
  },
});
const steps = Number(values.steps);
const seeds =
  values.seed !== undefined
    ? [Number(values.seed)]
    : Array.from({ length: Number(values.seeds ?? '5') }, (_, i) => Number(values.from) + i);

let scenarios = 0;
let stepsRun = 0;
let backups = 0;
let mismatches = 0;
const started = Date.now();
for (const seed of seeds) {
  const r = await runScenario({ seed, steps, keep: values.keep, ...(values.verbose ? { log: (l: string) => console.log(`  ${l}`) } : {}) });
  scenarios++;
  stepsRun += r.stepsRun;
  backups += r.backupsChecked;
  mismatches += r.mismatches;
  if (r.failure !== undefined) {
    console.log(`seed ${seed}: FAILED at step ${r.failure.step} (${r.failure.action}): ${r.failure.message}`);
    console.log(`  shortest failing prefix: ${r.failure.step} steps; replay: npm run fuzz -- --seed ${seed} --steps ${r.failure.step} --verbose`);
  } else {
    console.log(`seed ${seed}: ok (${r.stepsRun} steps, ${r.backupsChecked} disk backups checked)`);
  }
}
console.log(
  `totals: ${scenarios} scenarios, ${stepsRun} steps, ${backups} disk backups checked, ${mismatches} mismatches, slack ${SLACK_CLUSTERS} clusters, ${((Date.now() - started) / 1000).toFixed(0)} s`,
);
process.exitCode = mismatches > 0 ? 1 : 0;
