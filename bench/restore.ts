// §5 Repository: a chain of three push backups (full, then two incrementals
// of 1 % spread writes each) of the big disk, end to end through the
// repository (job, manifest, content digest). Then restore of the newest
// backup against `qemu-img convert -O qcow2` of the same chain, and verify of
// the newest backup (and of the whole repository) against `qemu-img compare`
// of the same chain with the restored image.

import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { imageDigest } from '../src/repository/digest.js';
import { CLUSTER_BYTES, hmpWrite, warmFile, type BenchEnv } from './env.js';
import { syncAll } from './full.js';
import { now, Prng, run } from './util.js';

export interface RepoResults {
  virtualBytes: number;
  /** End-to-end repository backups: full, then incrementals (1 % spread each). */
  backupFullMs: number;
  backupIncrementalMs: number[];
  incrementalDirtyBytes: number;
  restoreMs: number[];
  convertMs: number[];
  /** The content digest alone of the restored image: the part of restore that convert does not do. */
  digestMs: number[];
  verifyLatestMs: number[];
  verifyAllMs: number[];
  compareMs: number[];
  chainFiles: number;
  /** Data in the full backup's file: by now the disk also holds §2's writes. */
  fullDataBytes: number;
}

export interface RepoSetup {
  env: BenchEnv;
  domain: string;
  device: string;
  sizeBytes: number;
  reps: number;
  log: (line: string) => void;
}

export async function benchRepository(s: RepoSetup): Promise<RepoResults> {
  const { env, domain, device, sizeBytes, reps, log } = s;
  const repo = env.subdir('repo');
  const clusters = Math.floor(sizeBytes / CLUSTER_BYTES);
  const dirtyCount = Math.max(1, Math.round(clusters * 0.01));
  const prng = new Prng(99);
  const r: RepoResults = {
    virtualBytes: sizeBytes,
    backupFullMs: 0,
    backupIncrementalMs: [],
    incrementalDirtyBytes: dirtyCount * CLUSTER_BYTES,
    restoreMs: [],
    convertMs: [],
    digestMs: [],
    verifyLatestMs: [],
    verifyAllMs: [],
    compareMs: [],
    chainFiles: 3,
    fullDataBytes: 0,
  };

  await syncAll();
  let t0 = now();
  await env.qb.repository.backup(domain, { repo, mode: 'push' });
  r.backupFullMs = now() - t0;
  r.fullDataBytes = env.qb.repository.list(repo, domain)[0]?.disks[0]?.bytesWritten ?? 0;
  log(`  repository full backup ${r.backupFullMs.toFixed(0)} ms`);
  for (let i = 0; i < r.chainFiles - 1; i++) {
    await env.withQmp(domain, async (qmp) => {
      for (const c of prng.sample(clusters, dirtyCount)) await hmpWrite(qmp, device, c * CLUSTER_BYTES, CLUSTER_BYTES, 0x70 + i);
    });
    await syncAll();
    t0 = now();
    const m = await env.qb.repository.backup(domain, { repo, mode: 'push' });
    r.backupIncrementalMs.push(now() - t0);
    if (m.disks.some((d) => d.level !== 'incremental')) throw new Error(`repository backup ${m.id} was not incremental`);
    log(`  repository incremental backup ${(r.backupIncrementalMs.at(-1) ?? 0).toFixed(0)} ms`);
  }
  const manifests = env.qb.repository.list(repo, domain);
  const latest = manifests.at(-1);
  const top = latest?.disks[0];
  if (latest === undefined || top === undefined) throw new Error('the repository has no backup');
  // The repository's layout: REPO/DOMAIN/<file as the manifest names it>.
  const topPath = join(repo, domain, top.file);

  // Every file of the newest backup's chain, read (untimed) before each timed run, as §1 does with its source.
  const chainFiles = manifests.map((m) => m.disks[0]?.file).filter((f): f is string => f !== undefined).map((f) => join(repo, domain, f));
  const warm = (): void => {
    for (const f of chainFiles) warmFile(f);
  };
  const out = env.subdir('restore');
  for (let rep = 0; rep < reps; rep++) {
    await syncAll();
    warm();
    const to = join(out, `r${rep}`);
    t0 = now();
    const restored = await env.qb.repository.restore(domain, { repo, to, backup: latest.id });
    r.restoreMs.push(now() - t0);
    const restoredFile = restored.disks[0]?.file ?? '';

    warmFile(restoredFile);
    t0 = now();
    await imageDigest(restoredFile, 'qcow2');
    r.digestMs.push(now() - t0);

    await syncAll();
    warm();
    const conv = join(out, `convert${rep}.qcow2`);
    t0 = now();
    await run('qemu-img', ['convert', '-O', 'qcow2', topPath, conv]);
    r.convertMs.push(now() - t0);
    rmSync(conv, { force: true });

    warm();
    t0 = now();
    await env.qb.repository.verify(repo, { domain, backup: latest.id });
    r.verifyLatestMs.push(now() - t0);

    warm();
    warmFile(restoredFile);
    t0 = now();
    await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', topPath, restoredFile]);
    r.compareMs.push(now() - t0);

    warm();
    t0 = now();
    const report = await env.qb.repository.verify(repo, { domain });
    r.verifyAllMs.push(now() - t0);
    if (report.problems.length > 0) throw new Error(`verify found problems: ${JSON.stringify(report.problems)}`);
    rmSync(to, { recursive: true, force: true });
    log(
      `  restore ${(r.restoreMs.at(-1) ?? 0).toFixed(0)} ms (convert ${(r.convertMs.at(-1) ?? 0).toFixed(0)} ms), ` +
        `verify ${(r.verifyLatestMs.at(-1) ?? 0).toFixed(0)} ms (compare ${(r.compareMs.at(-1) ?? 0).toFixed(0)} ms), verify all ${(r.verifyAllMs.at(-1) ?? 0).toFixed(0)} ms`,
    );
  }
  return r;
}
