// §3 The control plane, in-process through the library (no CLI start-up in
// the numbers): checkpoint create on a short and on a long chain, coverage
// over the whole long chain, delete in the middle of it, checkpoint list, and
// backup begin until the job exists and until its first progress. Then the
// CLI's start-up (`--help`, `list`) against bare `node`. Every library timing
// is also recorded as CPU time of this process, which background load on the
// machine disturbs less than wall time.

import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { isQbackupError } from '../src/errors.js';
import { createImage } from '../src/image/qemu-img.js';
import type { BenchEnv } from './env.js';
import { MiB, now, run, sleep } from './util.js';

export interface Timing {
  wallMs: number[];
  cpuMs: number[];
}

export interface ControlResults {
  chainLength: number;
  buildMs: number;
  createEarly: Timing;
  createLate: Timing;
  /** Coverage from the root: a path through every checkpoint. */
  coverageLong: Timing;
  /** Coverage from the current checkpoint: a path of one. */
  coverageShort: Timing;
  deleteMiddle: Timing;
  list: Timing;
  /** Full push on the big disk: begin() returned (job recorded, running in QEMU). */
  beginJob: Timing;
  /** …and until QEMU reported its first copied bytes. */
  beginFirstByteMs: number[];
  /** Incremental push since the root of the long chain: begin() returned (merges every bitmap). */
  beginIncrementalLong: Timing;
  cliHelpMs: number[];
  cliListMs: number[];
  nodeBareMs: number[];
}

function emptyTiming(): Timing {
  return { wallMs: [], cpuMs: [] };
}

async function measure<T>(into: Timing, fn: () => Promise<T>): Promise<T> {
  const cpu0 = process.cpuUsage();
  const t0 = now();
  const value = await fn();
  into.wallMs.push(now() - t0);
  const cpu = process.cpuUsage(cpu0);
  into.cpuMs.push((cpu.user + cpu.system) / 1000);
  return value;
}

export interface ControlSetup {
  env: BenchEnv;
  chainLength: number;
  /** The domain with the big disk, for backup begin on a real amount of data. */
  bigDomain: string;
  samples: number;
  log: (line: string) => void;
}

export async function benchControl(s: ControlSetup): Promise<ControlResults> {
  const { env, chainLength: n, samples, log } = s;
  const domain = 'ctl';
  const disk = join(env.dir, 'ctl-sda.qcow2');
  await createImage(disk, 'qcow2', 64 * MiB);
  await env.defineAndStart(domain, [{ target: 'sda', file: disk }]);
  const r: ControlResults = {
    chainLength: n,
    buildMs: 0,
    createEarly: emptyTiming(),
    createLate: emptyTiming(),
    coverageLong: emptyTiming(),
    coverageShort: emptyTiming(),
    deleteMiddle: emptyTiming(),
    list: emptyTiming(),
    beginJob: emptyTiming(),
    beginFirstByteMs: [],
    beginIncrementalLong: emptyTiming(),
    cliHelpMs: [],
    cliListMs: [],
    nodeBareMs: [],
  };

  // The chain, on the running domain: the first and the last `samples` creates are the samples.
  const t0 = now();
  for (let i = 0; i < n; i++) {
    const into = i < samples ? r.createEarly : i >= n - samples ? r.createLate : emptyTiming();
    await measure(into, () => env.qb.checkpoints.create(domain, { name: `c${i}` }));
    if ((i + 1) % 100 === 0) log(`  chain ${i + 1}/${n}, last create ${(into.wallMs.at(-1) ?? 0).toFixed(1)} ms`);
  }
  r.buildMs = now() - t0;

  for (let i = 0; i < samples; i++) {
    await measure(r.coverageLong, () => env.qb.checkpoints.coverage(domain, 'c0'));
    await measure(r.coverageShort, () => env.qb.checkpoints.coverage(domain, `c${n - 1}`));
  }
  const deletes = Math.min(samples, Math.max(1, Math.floor(n / 4)));
  for (let i = 0; i < deletes; i++) {
    await measure(r.deleteMiddle, () => env.qb.checkpoints.delete(domain, `c${Math.floor(n / 2) + i}`));
  }
  for (let i = 0; i < Math.min(samples, 5); i++) await measure(r.list, async () => env.qb.checkpoints.list(domain));
  log(`  create ${r.createLate.wallMs.length} at ${n}, coverage, delete, list measured`);

  // Incremental begin over the long chain (one merge of every bitmap), then the job is reaped.
  for (let i = 0; i < Math.min(samples, 5); i++) {
    let started: { id: string } | undefined;
    await measure(r.beginIncrementalLong, async () => {
      started = await env.qb.backups.begin(domain, { mode: 'push', since: 'c0' }, { targetDir: env.subdir('ctl-backups') });
    });
    const job = await env.qb.backups.wait(domain, started?.id ?? '');
    for (const d of job.disks) await run('rm', ['-f', d.targetFile]);
  }

  // Full push on the big disk: until the job exists, and until its first progress; then aborted.
  for (let i = 0; i < Math.min(samples, 5); i++) {
    const start = now();
    await measure(r.beginJob, () => env.qb.backups.begin(s.bigDomain, { mode: 'push' }, { targetDir: env.subdir('begin') }));
    for (;;) {
      const info = await env.qb.backups.info(s.bigDomain);
      if (info === undefined || info.bytesDone > 0) break;
      await sleep(1);
    }
    r.beginFirstByteMs.push(now() - start);
    // A small disk can be done before the abort: then the job completed and its target stays.
    const aborted = await env.qb.backups.abort(s.bigDomain).catch((err: unknown) => {
      if (isQbackupError(err, 'INVALID_ARGUMENT') || isQbackupError(err, 'JOB_NOT_FOUND')) return undefined;
      throw err;
    });
    if (aborted === undefined) {
      const done = await env.qb.backups.lastResult(s.bigDomain);
      for (const d of done?.disks ?? []) await run('rm', ['-f', d.targetFile]);
    }
  }
  log('  backup begin measured');

  // CLI start-up, against node itself.
  // This file runs as dist/bench/control.js.
  const cli = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'bin', 'qbackup');
  for (let i = 0; i < Math.max(samples, 10); i++) {
    r.nodeBareMs.push((await run(process.execPath, ['-e', '0'])).ms);
    r.cliHelpMs.push((await run(process.execPath, [cli, '--help'])).ms);
    r.cliListMs.push((await run(process.execPath, [cli, '--state-dir', env.stateDir, 'list', '--all'])).ms);
  }
  log('  CLI start-up measured');
  return r;
}
