// Runs an oracle scenario: a list of actions against a fresh domain in a
// temporary directory, through the driver, stopping at the first failed check
// or unexpected error. `runScenario` generates the list from a seed first.
// A result names the failing action by its index, so the shrinker can cut the
// list there and the printout can show it.

import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { formatAction, generateScenario, type Scenario } from './actions.js';
import { OracleFailure, type CheckCode } from './checks.js';
import { canMountTmpfs, Driver } from './driver.js';
import { LibvirtOracleDriver } from './libvirt-driver.js';

export { SLACK_CLUSTERS } from './checks.js';

export interface RunOptions {
  log?: (line: string) => void;
  /** Keep the scenario's directory (disks, backups, state) for inspection. */
  keep?: boolean;
  /** Run against a domain of the libvirt daemon at this URI, through qbackup's libvirt driver (libvirt-driver.ts). */
  libvirtUri?: string | undefined;
}

export interface Failure {
  /** Index of the failing action; -1 for the set-up. */
  index: number;
  action: string;
  check: CheckCode;
  message: string;
}

export interface RunResult {
  scenario: Scenario;
  stepsRun: number;
  skipped: number;
  backupsChecked: number;
  failure?: Failure;
}

let tmpfsProbe: Promise<boolean> | undefined;

/** Whether repo-full can be staged here (the repository on a tmpfs); probed once per process. */
export function repoFullPossible(): Promise<boolean> {
  tmpfsProbe ??= canMountTmpfs();
  return tmpfsProbe;
}

export async function runActions(scenario: Scenario, options: RunOptions = {}): Promise<RunResult> {
  const log = options.log ?? ((): void => undefined);
  const dir = mkdtempSync(join(tmpdir(), `qbfuzz-${scenario.seed}-`));
  const driver = options.libvirtUri !== undefined ? new LibvirtOracleDriver(dir, log, options.libvirtUri) : new Driver(dir, log);
  const result: RunResult = { scenario, stepsRun: 0, skipped: 0, backupsChecked: 0 };
  let index = -1;
  try {
    await driver.setup(scenario.setup, options.libvirtUri === undefined && (await repoFullPossible()));
    for (index = 0; index < scenario.actions.length; index++) {
      const a = scenario.actions[index];
      if (a === undefined) break;
      log(`step ${index + 1}: ${formatAction(a)}`);
      const outcome = await driver.execute(a);
      if (outcome === 'skipped') {
        result.skipped++;
        log('    skipped: its disk or checkpoint does not exist here');
      }
      result.stepsRun = index + 1;
    }
  } catch (err) {
    const a = scenario.actions[index];
    result.failure = {
      index,
      action: a === undefined ? 'setup' : formatAction(a),
      check: err instanceof OracleFailure ? err.check : 'error',
      message: err instanceof Error ? err.message : String(err),
    };
  } finally {
    result.backupsChecked = driver.backupsChecked;
    await driver.close(options.keep ?? false);
  }
  return result;
}

/** Generates the scenario of `seed` (with repo-full only where it can be staged; libvirt's actions under libvirt) and runs it. */
export async function runScenario(options: RunOptions & { seed: number; steps: number }): Promise<RunResult> {
  const libvirt = options.libvirtUri !== undefined;
  const scenario = generateScenario(options.seed, options.steps, libvirt ? { libvirt } : { repoFull: await repoFullPossible() });
  return runActions(scenario, options);
}
