// §1 Full backup of a disk with half of its clusters random data:
// qbackup push (backup-begin full + wait) against `qemu-img convert -O qcow2`
// of the same image, and qbackup pull (our NBD client, through the bench's
// copier in pull-copy.ts, reading the pull job's export into a qcow2 served
// by qemu-nbd) against nbdcopy reading the same export into the same kind of target.
// Every method runs once untimed first (QEMU's I/O thread pool, fresh page
// cache memory), then each repetition runs every method in turn, so that
// background load hits them alike. Before each timed run written data is
// synced and the source is read once (untimed): the machine drops page cache
// that has been idle for a few seconds, and every method should find the
// source in memory alike. Besides wall time, the CPU time of the process doing the
// copy is recorded (QEMU for push, qemu-img, our process for pull, nbdcopy).

import { rmSync } from 'node:fs';
import { exportUri, type JobInfo } from '../src/backup/job.js';
import { createImage } from '../src/image/qemu-img.js';
import { startQemuNbd } from '../src/image/qemu-nbd.js';
import { processCpuMs, warmFile, type BenchEnv } from './env.js';
import { pullCopy } from './pull-copy.js';
import { now, run, runWithCpu, withOwnCpu } from './util.js';

export interface Measured {
  ms: number[];
  /** CPU time of the process that copies: QEMU (push), the tool, or this process (our pull). */
  cpuMs: number[];
}

export interface FullResults {
  push: Measured;
  /** QEMU job time as qbackup recorded it (startedMs → endedMs). */
  pushJobMs: number[];
  convert: Measured;
  convertWriteback: Measured;
  pull: Measured;
  nbdcopy: Measured;
  nbdcopyRaw: Measured;
  /** Bytes the push job reported copying (QEMU's total progress). */
  pushBytes: number;
  pullDataBytes: number;
}

export interface FullSetup {
  env: BenchEnv;
  domain: string;
  source: string;
  sizeBytes: number;
  reps: number;
  log: (line: string) => void;
}

export async function syncAll(): Promise<void> {
  await run('sync', []);
}

const measured = (): Measured => ({ ms: [], cpuMs: [] });

export async function benchFull(s: FullSetup): Promise<FullResults> {
  const { env, domain, source, sizeBytes, reps, log } = s;
  const out = env.subdir('full');
  const r: FullResults = {
    push: measured(),
    pushJobMs: [],
    convert: measured(),
    convertWriteback: measured(),
    pull: measured(),
    nbdcopy: measured(),
    nbdcopyRaw: measured(),
    pushBytes: 0,
    pullDataBytes: 0,
  };
  warmFile(source);
  const qemuPid = env.qb.domains.info(domain).pid ?? 0;
  const conv = `${out}/convert.qcow2`;

  const push = async (into: Measured | undefined): Promise<void> => {
    await syncAll();
    warmFile(source);
    const cpu0 = processCpuMs(qemuPid);
    const t0 = now();
    const started = await env.qb.backups.begin(domain, { mode: 'push' }, { targetDir: out });
    const job = await env.qb.backups.wait(domain, started.id);
    const ms = now() - t0;
    if (job.state !== 'completed') throw new Error(`push backup ${job.id} ended ${job.state}: ${job.error ?? ''}`);
    for (const d of job.disks) rmSync(d.targetFile, { force: true });
    if (into === undefined) return;
    into.ms.push(ms);
    into.cpuMs.push(processCpuMs(qemuPid) - cpu0);
    r.pushJobMs.push((job.endedMs ?? job.startedMs) - job.startedMs);
    r.pushBytes = job.bytesTotal;
  };
  const convert = async (into: Measured | undefined, extra: readonly string[]): Promise<void> => {
    await syncAll();
    warmFile(source);
    const res = await runWithCpu('qemu-img', ['convert', '-U', ...extra, '-O', 'qcow2', source, conv]);
    rmSync(conv, { force: true });
    into?.ms.push(res.ms);
    into?.cpuMs.push(res.cpuMs);
  };

  const rounds: Array<Measured | undefined> = [undefined, ...Array.from({ length: reps }, () => undefined)];
  for (const [i] of rounds.entries()) {
    const timed = i > 0;
    await push(timed ? r.push : undefined);
    await convert(timed ? r.convert : undefined, []);
    // -t writeback: flushes the target at the end, as QEMU does when qbackup removes a backup target.
    await convert(timed ? r.convertWriteback : undefined, ['-t', 'writeback']);
    if (timed) log(`  push ${fmt(r.push)}  qemu-img convert ${fmt(r.convert)}  convert -t writeback ${fmt(r.convertWriteback)}`);
  }

  // Pull: one pull job for all runs (no guest writes, so the frozen view is the disk).
  const job = await env.qb.backups.begin(domain, { mode: 'pull' });
  try {
    const exportName = job.disks[0]?.pull?.exportName ?? 'sda';
    if (job.server === undefined) throw new Error(`pull job ${job.id} has no server`);
    const uri = exportUri(job.server, exportName);
    const target = `${out}/pull.qcow2`;
    const raw = `${out}/pull.raw`;
    for (const [i] of rounds.entries()) {
      const timed = i > 0;
      await syncAll();
      await createImage(target, 'qcow2', sizeBytes);
      warmFile(source);
      let t0 = now();
      const ours = await withOwnCpu(() => pullCopy({ job, exportName, dirtyBitmap: undefined, targetFile: target }));
      if (timed) {
        r.pull.ms.push(now() - t0);
        r.pull.cpuMs.push(ours.cpuMs);
        r.pullDataBytes = ours.value.dataBytes;
      }
      rmSync(target, { force: true });

      await syncAll();
      await createImage(target, 'qcow2', sizeBytes);
      warmFile(source);
      t0 = now();
      const cpuMs = await nbdcopyIntoQcow2(uri, target);
      if (timed) {
        r.nbdcopy.ms.push(now() - t0);
        r.nbdcopy.cpuMs.push(cpuMs);
      }
      rmSync(target, { force: true });

      await syncAll();
      warmFile(source);
      const res = await runWithCpu('nbdcopy', ['--flush', uri, raw]);
      rmSync(raw, { force: true });
      if (timed) {
        r.nbdcopyRaw.ms.push(res.ms);
        r.nbdcopyRaw.cpuMs.push(res.cpuMs);
        log(`  pull (our client) ${fmt(r.pull)}  nbdcopy → qemu-nbd ${fmt(r.nbdcopy)}  nbdcopy → raw ${fmt(r.nbdcopyRaw)}`);
      }
    }
  } finally {
    await env.qb.backups.abort(domain);
  }
  return r;
}

function fmt(m: Measured): string {
  return `${(m.ms.at(-1) ?? 0).toFixed(0)} ms (cpu ${(m.cpuMs.at(-1) ?? 0).toFixed(0)})`;
}

/** nbdcopy into a qcow2 served by qemu-nbd exactly as qbackup's pull copier serves its target; returns nbdcopy's CPU ms. */
export async function nbdcopyIntoQcow2(sourceUri: string, target: string): Promise<number> {
  const writer = await startQemuNbd(target, { format: 'qcow2' });
  try {
    return (await runWithCpu('nbdcopy', ['--flush', sourceUri, `nbd+unix:///${writer.exportName}?socket=${writer.socket}`])).cpuMs;
  } finally {
    await writer.stop();
  }
}

export type { JobInfo };
