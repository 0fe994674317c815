// §2 Incremental backups with 0.1 %, 1 % and 10 % of the clusters dirtied,
// spread (random single clusters) or clustered (one contiguous run), against
// the full backup of §1. Each repetition creates a checkpoint, dirties the
// disk through HMP qemu-io (as a guest would), then takes a push incremental
// (backup-begin --incremental + wait) and a pull incremental (pull job with
// the exported dirty bitmap, our NBD client copying only the dirty extents
// into a qcow2 served by qemu-nbd). Time and bytes are recorded per case.

import { rmSync } from 'node:fs';
import { allocatedDataBytes, createImage } from '../src/image/qemu-img.js';
import { CLUSTER_BYTES, hmpWrite, type BenchEnv } from './env.js';
import { syncAll } from './full.js';
import { pullCopy } from './pull-copy.js';
import { MiB, now, Prng } from './util.js';

export type DirtyPattern = 'spread' | 'clustered';

export interface IncrementalCase {
  fraction: number;
  pattern: DirtyPattern;
  dirtyBytes: number;
  /** begin → wait returned. */
  pushMs: number[];
  /** QEMU's total progress of the job: what it had to copy. */
  pushJobBytes: number[];
  /** Data bytes in the incremental target file. */
  pushFileBytes: number[];
  /** begin + copy + abort (teardown). */
  pullMs: number[];
  /** The copy alone (our NBD client). */
  pullCopyMs: number[];
  pullDataBytes: number[];
}

export interface IncrementalSetup {
  env: BenchEnv;
  domain: string;
  device: string;
  sizeBytes: number;
  reps: number;
  fractions: readonly number[];
  log: (line: string) => void;
}

export async function benchIncremental(s: IncrementalSetup): Promise<IncrementalCase[]> {
  const { env, domain, device, sizeBytes, reps, log } = s;
  const out = env.subdir('incremental');
  const clusters = Math.floor(sizeBytes / CLUSTER_BYTES);
  const prng = new Prng(42);
  const cases: IncrementalCase[] = [];
  let seq = 0;
  for (const pattern of ['spread', 'clustered'] as const) {
    for (const fraction of s.fractions) {
      const count = Math.max(1, Math.round(clusters * fraction));
      const c: IncrementalCase = {
        fraction,
        pattern,
        dirtyBytes: count * CLUSTER_BYTES,
        pushMs: [],
        pushJobBytes: [],
        pushFileBytes: [],
        pullMs: [],
        pullCopyMs: [],
        pullDataBytes: [],
      };
      for (let rep = 0; rep < reps; rep++) {
        const checkpoint = `inc${seq++}`;
        await env.qb.checkpoints.create(domain, { name: checkpoint });
        await dirty(env, domain, device, prng, clusters, count, pattern, 0x10 + (seq % 200));
        await syncAll();

        let t0 = now();
        const started = await env.qb.backups.begin(domain, { mode: 'push', since: checkpoint }, { targetDir: out });
        const job = await env.qb.backups.wait(domain, started.id);
        c.pushMs.push(now() - t0);
        if (job.state !== 'completed') throw new Error(`incremental ${job.id} ended ${job.state}: ${job.error ?? ''}`);
        if (job.disks.some((d) => d.mode !== 'incremental')) throw new Error(`incremental ${job.id} fell back to a full copy`);
        c.pushJobBytes.push(job.bytesTotal);
        const target = job.disks[0]?.targetFile ?? '';
        c.pushFileBytes.push(await allocatedDataBytes(target));
        rmSync(target, { force: true });

        await syncAll();
        const pullTarget = `${out}/pull-inc.qcow2`;
        await createImage(pullTarget, 'qcow2', sizeBytes);
        t0 = now();
        const pj = await env.qb.backups.begin(domain, { mode: 'pull', since: checkpoint });
        try {
          const jd = pj.disks[0];
          if (jd?.tmpBitmap === undefined) throw new Error(`pull job ${pj.id} is not incremental`);
          const t1 = now();
          const res = await pullCopy({ job: pj, exportName: jd.pull?.exportName ?? device, dirtyBitmap: jd.tmpBitmap, targetFile: pullTarget });
          c.pullCopyMs.push(now() - t1);
          c.pullDataBytes.push(res.dataBytes);
        } finally {
          await env.qb.backups.abort(domain);
        }
        c.pullMs.push(now() - t0);
        rmSync(pullTarget, { force: true });
        log(
          `  ${pattern.padEnd(9)} ${(fraction * 100).toString().padStart(4)} %  push ${(c.pushMs.at(-1) ?? 0).toFixed(0)} ms ` +
            `(${((c.pushJobBytes.at(-1) ?? 0) / MiB).toFixed(1)} MiB)  pull ${(c.pullMs.at(-1) ?? 0).toFixed(0)} ms (copy ${(c.pullCopyMs.at(-1) ?? 0).toFixed(0)} ms)`,
        );
      }
      cases.push(c);
    }
  }
  return cases;
}

/** Dirties `count` clusters: random single clusters (spread) or one run at a random place (clustered). */
async function dirty(env: BenchEnv, domain: string, device: string, prng: Prng, clusters: number, count: number, pattern: DirtyPattern, fill: number): Promise<void> {
  await env.withQmp(domain, async (qmp) => {
    if (pattern === 'spread') {
      for (const c of prng.sample(clusters, count)) await hmpWrite(qmp, device, c * CLUSTER_BYTES, CLUSTER_BYTES, fill);
      return;
    }
    const start = prng.int(0, clusters - count);
    const piece = 16 * MiB;
    const end = (start + count) * CLUSTER_BYTES;
    for (let pos = start * CLUSTER_BYTES; pos < end; pos += piece) await hmpWrite(qmp, device, pos, Math.min(piece, end - pos), fill);
  });
}
