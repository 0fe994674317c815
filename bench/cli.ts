// The qbackup command line as a user types it, for the benches that measure
// it (§5 with --method cli, §12, §16): `node bin/qbackup ARGS`, one process
// per command, timed from spawn to exit, its CPU (all its threads) from
// /usr/bin/time. The passphrase of an encrypted repository goes in through
// $QBACKUP_PASSWORD, as a user's script would pass it; without one the
// variable is removed, so a value in the bench's own environment cannot leak in.

import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runWithCpu, type RunResult } from './util.js';

const here = dirname(fileURLToPath(import.meta.url));

/** bin/qbackup of this checkout (the bench runs from dist/bench). */
export const QBACKUP_BIN = resolve(here, '..', '..', 'bin', 'qbackup');

export interface CliOptions {
  /** Another build's bin/qbackup (default: this checkout's). */
  bin?: string | undefined;
  /** $QBACKUP_STATE_DIR of the command (default: the bench's environment). */
  stateDir?: string | undefined;
  /** $QBACKUP_PASSWORD (the repository's passphrase); undefined removes it. */
  password?: string | undefined;
}

/** The environment a qbackup command runs with. */
export function cliEnv(o: CliOptions): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  if (o.stateDir !== undefined) env['QBACKUP_STATE_DIR'] = o.stateDir;
  if (o.password !== undefined) env['QBACKUP_PASSWORD'] = o.password;
  else delete env['QBACKUP_PASSWORD'];
  return env;
}

/** Runs `qbackup ARGS` to completion (rejects on a non-zero exit); ms from spawn to exit, cpuMs of the process (NaN without /usr/bin/time). */
export function qbackupCli(args: readonly string[], o: CliOptions = {}): Promise<RunResult & { cpuMs: number }> {
  return runWithCpu(process.execPath, [o.bin ?? QBACKUP_BIN, ...args], { env: cliEnv(o) });
}
