// `npm run bench:s3`: qbackup and restic backing up the same disk into the
// same object store, a single-node Ceph radosgw on this machine
// (scripts/ceph.sh, started and stopped by the bench unless
// QBACKUP_BENCH_CEPH_DIR names one already up). Steps: a full backup of a
// disk half full of random data, an incremental after 1 % of its clusters
// changed at random, then a restore of the latest backup to a raw file.
// qbackup reads the VM through its pull export (only allocated or dirty
// clusters); restic reads a raw copy of the disk on standard input (the way
// its users back up block devices), so its incremental reads the whole disk
// again. Both repositories are encrypted. Prints a table; timing only, never
// asserted. Needs Debian's ceph-mon, ceph-osd, radosgw, ceph-common and restic
// (apt-get install -y …); the bench installs nothing.
//
// Options: --size-mib N (default 1024), --dirty-pct P (default 1), --reps N
// (default 2; medians), --doc FILE (default docs/benchmarks.md, its S3
// section between markers; `npm run bench` keeps that section), --no-doc.

import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { BenchEnv, CLUSTER_BYTES, createRandomImage, halfDataLayout, hmpWrite } from './env.js';
import { loadAverage } from './machine.js';
import { withSection } from './doc-sections.js';
import { MiB, Prng, fmtRatio, mibPerSec, run, runWithCpu, summarize, timed } from './util.js';

const here = dirname(fileURLToPath(import.meta.url));
const script = resolve(here, '..', '..', 'scripts', 'ceph.sh');

interface Row {
  step: string;
  qbackupMs: number;
  resticMs: number;
  /** Bytes the step is measured against (the disk's size). */
  bytes: number;
  qbackupBytesRead?: number;
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { 'size-mib': { type: 'string' }, 'dirty-pct': { type: 'string' }, reps: { type: 'string' }, doc: { type: 'string' }, 'no-doc': { type: 'boolean', default: false } }, strict: true });
  const sizeBytes = Number(values['size-mib'] ?? '1024') * MiB;
  const dirtyPct = Number(values['dirty-pct'] ?? '1');
  const reps = Number(values.reps ?? '2');
  process.env['AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED'] ??= 'true';
  const given = process.env['QBACKUP_BENCH_CEPH_DIR'];
  const cephDir = given ?? join(BenchEnvDir(), 'ceph');
  const started = new Date();
  const loadBefore = loadAverage();
  if (given === undefined) execFileSync(script, ['up', cephDir], { stdio: ['ignore', 'ignore', 'inherit'] });
  const s3env = readEnv(join(cephDir, 'env'));
  const env = new BenchEnv({ s3: { endpoint: s3env['AWS_ENDPOINT_URL_S3'] ?? '', region: 'us-east-1', credentials: { accessKeyId: s3env['AWS_ACCESS_KEY_ID'] ?? '', secretAccessKey: s3env['AWS_SECRET_ACCESS_KEY'] ?? '' }, pathStyle: true } });
  const samples: Row[][] = [];
  try {
    for (let rep = 0; rep < reps; rep++) {
      samples.push(await measure(env, s3env, sizeBytes, dirtyPct, rep));
      console.log(`rep ${rep + 1}/${reps}: ${samples.at(-1)?.map((r) => `${r.step} ${(r.qbackupMs / 1000).toFixed(1)} s vs ${(r.resticMs / 1000).toFixed(1)} s`).join('; ') ?? ''}`);
    }
  } finally {
    await env.cleanup();
    if (given === undefined) execFileSync(script, ['down', cephDir], { stdio: 'ignore' });
  }
  const restic = (await run('restic', ['version'])).stdout.trim().split(' compiled')[0] ?? 'restic';
  const section = report(samples, { sizeBytes, dirtyPct, reps, started, minutes: (Date.now() - started.getTime()) / 60_000, load: `${loadBefore} → ${loadAverage()}`, restic });
  console.log(section);
  if (values['no-doc'] !== true) {
    const doc = values.doc ?? resolve(here, '..', '..', 'docs', 'benchmarks.md');
    writeFileSync(doc, withSection(readFileSync(doc, 'utf8'), 's3', section));
    console.log(`wrote the S3 section of ${doc}`);
  }
}

function BenchEnvDir(): string {
  const d = join('/tmp', `qbbench-ceph-${process.pid}`);
  mkdirSync(d, { recursive: true });
  return d;
}

function readEnv(file: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    const m = /^([A-Z0-9_]+)=(.*)$/.exec(line);
    if (m?.[1] !== undefined && m[2] !== undefined) out[m[1]] = m[2];
  }
  return out;
}

// Long: one straight sequence of setup and measured steps, easier to read whole.
async function measure(env: BenchEnv, s3env: Record<string, string>, sizeBytes: number, dirtyPct: number, rep: number): Promise<Row[]> {
  const vm = `vm${rep}`;
  const image = env.path(`${vm}.qcow2`);
  await createRandomImage(image, halfDataLayout(sizeBytes, 16 + rep));
  await env.defineAndStart(vm, [{ target: 'sda', file: image }]);
  const password = 'qbackup-bench';
  const suffix = `${process.pid}-${rep}-${Date.now()}`;
  const repo = `s3://qbbench-${suffix}/qbackup`;
  await env.qb.repository.init({ repo, password });
  const endpoint = s3env['AWS_ENDPOINT_URL_S3'] ?? '';
  const resticBucket = `qbbench-restic-${suffix}`;
  const resticEnv = { ...process.env, RESTIC_PASSWORD: password, RESTIC_REPOSITORY: `s3:${endpoint}/${resticBucket}`, RESTIC_CACHE_DIR: env.subdir(`restic-cache-${rep}`), AWS_ACCESS_KEY_ID: s3env['AWS_ACCESS_KEY_ID'] ?? '', AWS_SECRET_ACCESS_KEY: s3env['AWS_SECRET_ACCESS_KEY'] ?? '' };
  await run('restic', ['init'], { env: resticEnv });
  const raw = env.path(`${vm}.raw`);
  const rawCopy = async (): Promise<void> => {
    await env.withQmp(vm, (qmp) => qmp.humanMonitorCommand('qemu-io -d sda "flush"'));
    rmSync(raw, { force: true });
    await run('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image, raw]);
  };
  const rows: Row[] = [];
  const resticBackup = async (): Promise<number> => (await runWithCpu('restic', ['backup', '--stdin', '--stdin-filename', 'sda.raw', '--host', 'bench', '-q'], { env: resticEnv, stdinFile: raw })).ms;
  // Full.
  await rawCopy();
  const qFull = await timed(() => env.qb.repository.backup(vm, { repo, password }));
  const rFull = await resticBackup();
  rows.push({ step: 'full', qbackupMs: qFull.ms, resticMs: rFull, bytes: sizeBytes, qbackupBytesRead: qFull.value.disks[0]?.bytesRead ?? 0 });
  // Incremental after dirtying clusters at random.
  const prng = new Prng(7 + rep);
  const clusters = sizeBytes / CLUSTER_BYTES;
  const dirty = Math.max(1, Math.round((clusters * dirtyPct) / 100));
  await env.withQmp(vm, async (qmp) => {
    for (const [i, c] of prng.sample(clusters, dirty).entries()) await hmpWrite(qmp, 'sda', c * CLUSTER_BYTES, CLUSTER_BYTES, 0x40 + (i % 64));
  });
  await rawCopy();
  const qInc = await timed(() => env.qb.repository.backup(vm, { repo, password }));
  const rInc = await resticBackup();
  rows.push({ step: `incremental (${dirtyPct} % of clusters)`, qbackupMs: qInc.ms, resticMs: rInc, bytes: sizeBytes, qbackupBytesRead: qInc.value.disks[0]?.bytesRead ?? 0 });
  // Restore of the latest backup to a raw file, flushed to disk.
  const qOut = env.subdir(`qb-restore-${rep}`);
  const qRes = await timed(async () => {
    await env.qb.repository.restore(vm, { repo, password, to: qOut, format: 'raw' });
    await run('sync', [join(qOut, 'sda.raw')]);
  });
  const rOut = env.subdir(`rs-restore-${rep}`);
  const rRes = await timed(async () => {
    await run('restic', ['restore', 'latest', '--target', rOut, '-q'], { env: resticEnv });
    await run('sync', [join(rOut, 'sda.raw')]);
  });
  await run('cmp', [join(qOut, 'sda.raw'), raw]);
  await run('cmp', [join(rOut, 'sda.raw'), raw]);
  rows.push({ step: 'restore (latest, raw)', qbackupMs: qRes.ms, resticMs: rRes.ms, bytes: sizeBytes });
  // Free the space for the next repetition (the buckets stay until the cluster goes).
  for (const dir of [qOut, rOut]) rmSync(dir, { recursive: true, force: true });
  rmSync(raw, { force: true });
  await env.qb.domains.destroy(vm);
  rmSync(image, { force: true });
  return rows;
}

interface RunInfo {
  sizeBytes: number;
  dirtyPct: number;
  reps: number;
  started: Date;
  minutes: number;
  load: string;
  restic: string;
}

/** The S3 section of docs/benchmarks.md: medians (min–max) and throughput ratios. */
function report(samples: readonly Row[][], info: RunInfo): string {
  const first = samples[0] ?? [];
  const med = (f: (r: Row) => number, i: number): { median: number; min: number; max: number } => summarize(samples.map((rows) => f(rows[i] ?? (first[i] as Row))));
  const sec = (s: { median: number; min: number; max: number }): string => `${(s.median / 1000).toFixed(1)} s (${(s.min / 1000).toFixed(1)}–${(s.max / 1000).toFixed(1)})`;
  const lines: string[] = [];
  lines.push('## 10. Repository on S3 (Ceph radosgw) against restic');
  lines.push('');
  lines.push(`Measured by \`npm run bench:s3 -- --size-mib ${info.sizeBytes / MiB} --reps ${info.reps}\` (\`bench/s3.ts\`) at ${info.started.toISOString()}, ${info.minutes.toFixed(1)} minutes; load average (1, 5, 15 min) ${info.load}. Needs Debian's ceph-mon, ceph-osd, radosgw, ceph-common and restic (the bench installs nothing).`);
  lines.push('');
  lines.push(`One disk of ${info.sizeBytes / MiB} MiB, half of it random data in runs scattered over the disk (as §5), in a running domain. Both tools write to the same radosgw (single-node Ceph of \`scripts/ceph.sh\`, memstore OSD, on this machine), each into its own bucket, both encrypted: qbackup through its pull export (reads only allocated or dirty clusters), ${info.restic} with \`backup --stdin\` of a raw copy of the disk (made untimed), so its incremental reads the whole disk again. The incremental follows ${info.dirtyPct} % of the 64 KiB clusters rewritten at random places. Restores write the latest backup to a raw file and end with \`sync FILE\`; both restored files are compared with the disk (\`cmp\`). Ratios are throughput ratios (restic's time ÷ qbackup's, > 1 means qbackup is faster); median (min–max) of ${info.reps} repetitions.`);
  lines.push('');
  lines.push('| step | qbackup | restic | qbackup ÷ restic (throughput) | target |');
  lines.push('|---|---|---|---|---|');
  const targets = ['≥ 1.5×', 'proportional to the change', '(report)'];
  first.forEach((r, i) => {
    const q = med((x) => x.qbackupMs, i);
    const rs = med((x) => x.resticMs, i);
    const read = r.qbackupBytesRead !== undefined ? `, read ${(med((x) => x.qbackupBytesRead ?? 0, i).median / MiB).toFixed(0)} MiB` : '';
    const ratio = rs.median / q.median;
    const verdict = i === 0 ? (ratio >= 1.5 ? ' — met' : ' — **not met**') : '';
    lines.push(`| ${r.step} | ${sec(q)}, ${mibPerSec(r.bytes, q.median).toFixed(0)} MiB/s${read} | ${sec(rs)}, ${mibPerSec(r.bytes, rs.median).toFixed(0)} MiB/s | ${fmtRatio(ratio)} | ${targets[i] ?? ''}${verdict} |`);
  });
  const full = med((x) => x.qbackupMs, 0).median;
  const inc = med((x) => x.qbackupMs, 1).median;
  const incRead = med((x) => x.qbackupBytesRead ?? 0, 1).median;
  lines.push('');
  lines.push(`Incremental: qbackup read ${(incRead / MiB).toFixed(1)} MiB (the dirty clusters) and took ${(inc / full * 100).toFixed(0)} % of its full's time; what remains is fixed cost per backup (checkpoint and pull job, loading the pack headers from the bucket, manifest and index writes, a round trip each). restic's incremental re-reads and re-chunks the whole disk.`);
  return lines.join('\n');
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? err.stack : String(err));
  process.exitCode = 1;
});
