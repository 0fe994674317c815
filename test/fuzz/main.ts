// Runs the correctness oracle from the command line.
//   npm run fuzz -- --seed 7 --steps 40          one generated scenario
//   npm run fuzz -- --seeds 200 --steps 40       a soak over seeds 1..200 (or --from N)
//   npm run fuzz -- --replay FILE                the actions of a file (as printed on failure)
//   --libvirt: against a domain of the libvirt daemon (qemu:///system, started
//     when none runs), through qbackup's libvirt driver, with libvirt's actions:
//   npm run fuzz -- --libvirt --seeds 20 --steps 30
//   --verbose: every action and its outcome; --keep: keep the scenario's directory;
//   --no-shrink; --shrink-attempts N (default 150); --shrink-minutes M (default 15).
// Prints one line per scenario and the totals. On a failure it writes the
// scenario's actions to a file, shrinks them (removing actions while the same
// check still fails), prints the minimal list and the command that replays it,
// and exits non-zero.

import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { formatScenario, parseScenario, type Scenario } from './actions.js';
import { runActions, runScenario, SLACK_CLUSTERS, type RunResult } from './scenario.js';
import { shrink } from './shrink.js';
import { startLibvirt } from '../helpers/libvirt.js';

const { values } = parseArgs({
  options: {
    seed: { type: 'string' },
    seeds: { type: 'string' },
    from: { type: 'string', default: '1' },
    steps: { type: 'string', default: '40' },
    replay: { type: 'string' },
    verbose: { type: 'boolean', default: false },
    keep: { type: 'boolean', default: false },
    libvirt: { type: 'boolean', default: false },
    'no-shrink': { type: 'boolean', default: false },
    'shrink-attempts': { type: 'string', default: '150' },
    'shrink-minutes': { type: 'string', default: '15' },
  },
});
const steps = Number(values.steps);
const log = values.verbose ? (l: string): void => console.log(`  ${l}`) : undefined;
const daemon = values.libvirt ? await startLibvirt() : undefined;
const runOptions = { keep: values.keep, libvirtUri: daemon?.uri, ...(log !== undefined ? { log } : {}) };
const failuresDir = join(tmpdir(), 'qbfuzz-failures');

/** Writes the failing list, shrinks it, prints the minimal list and its replay command. */
async function report(label: string, r: RunResult): Promise<void> {
  const f = r.failure;
  if (f === undefined) return;
  console.log(`${label}: FAILED at action ${f.index + 1} (${f.action}) [${f.check}]: ${f.message}`);
  mkdirSync(failuresDir, { recursive: true });
  const full = join(failuresDir, `seed-${r.scenario.seed}-${Date.now()}.actions`);
  writeFileSync(full, formatScenario(r.scenario, `failing scenario of seed ${r.scenario.seed}: ${f.check}: ${f.message}`));
  console.log(`  actions: ${full}`);
  if (values['no-shrink'] || f.index < 0) return;
  const s = await shrink(r.scenario, f, (c) => runActions(c, { libvirtUri: runOptions.libvirtUri }), {
    maxAttempts: Number(values['shrink-attempts']),
    deadlineMs: Number(values['shrink-minutes']) * 60_000,
    log: (l) => log?.(l),
  });
  const min = full.replace(/\.actions$/, '.min.actions');
  writeFileSync(min, formatScenario(s.scenario, `shrunk from ${r.scenario.actions.length} to ${s.scenario.actions.length} actions in ${s.attempts} runs: ${s.failure.check}: ${s.failure.message}`));
  console.log(`  shrunk to ${s.scenario.actions.length} actions in ${s.attempts} runs [${s.failure.check}]: ${s.failure.message}`);
  console.log(formatScenario(s.scenario, 'minimal failing scenario').replace(/^/gm, '    ').trimEnd());
  console.log(`  replay: npm run fuzz -- ${values.libvirt ? '--libvirt ' : ''}--replay ${min} --verbose`);
}

const jobs: Array<{ label: string; run: () => Promise<RunResult> }> =
  values.replay !== undefined
    ? [{ label: `replay ${values.replay}`, run: (): Promise<RunResult> => runActions(readScenario(values.replay ?? ''), runOptions) }]
    : seedList().map((seed) => ({ label: `seed ${seed}`, run: (): Promise<RunResult> => runScenario({ seed, steps, ...runOptions }) }));

function readScenario(file: string): Scenario {
  return parseScenario(readFileSync(file, 'utf8'));
}

function seedList(): number[] {
  if (values.seed !== undefined) return [Number(values.seed)];
  return Array.from({ length: Number(values.seeds ?? '5') }, (_, i) => Number(values.from) + i);
}

let scenarios = 0;
let stepsRun = 0;
let skipped = 0;
let backups = 0;
let mismatches = 0;
const started = Date.now();
for (const job of jobs) {
  const r = await job.run();
  scenarios++;
  stepsRun += r.stepsRun;
  skipped += r.skipped;
  backups += r.backupsChecked;
  if (r.failure !== undefined) {
    mismatches++;
    await report(job.label, r);
  } else {
    console.log(`${job.label}: ok (${r.stepsRun} actions, ${r.skipped} skipped, ${r.backupsChecked} disk backups checked)`);
  }
}
console.log(
  `totals: ${scenarios} scenarios, ${stepsRun} actions (${skipped} skipped), ${backups} disk backups checked, ${mismatches} mismatches, slack ${SLACK_CLUSTERS} clusters, ${((Date.now() - started) / 1000).toFixed(0)} s`,
);
await daemon?.stop();
process.exitCode = mismatches > 0 ? 1 : 0;
