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
// Options: --size-mib N (default 1024), --dirty-pct P (default 1).

import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { BenchEnv, CLUSTER_BYTES, createRandomImage, halfDataLayout, hmpWrite } from './env.js';
import { loadAverage } from './machine.js';
import { MiB, Prng, fmtRatio, mibPerSec, run, runWithCpu, timed } from './util.js';

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
  const { values } = parseArgs({ options: { 'size-mib': { type: 'string' }, 'dirty-pct': { type: 'string' } }, strict: true });
  const sizeBytes = Number(values['size-mib'] ?? '1024') * MiB;
  const dirtyPct = Number(values['dirty-pct'] ?? '1');
  process.env['AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED'] ??= 'true';
  const given = process.env['QBACKUP_BENCH_CEPH_DIR'];
  const cephDir = given ?? join(BenchEnvDir(), 'ceph');
  if (given === undefined) execFileSync(script, ['up', cephDir], { stdio: ['ignore', 'ignore', 'inherit'] });
  const s3env = readEnv(join(cephDir, 'env'));
  const env = new BenchEnv({ s3: { endpoint: s3env['AWS_ENDPOINT_URL_S3'] ?? '', region: 'us-east-1', credentials: { accessKeyId: s3env['AWS_ACCESS_KEY_ID'] ?? '', secretAccessKey: s3env['AWS_SECRET_ACCESS_KEY'] ?? '' }, pathStyle: true } });
  try {
    const rows = await measure(env, s3env, sizeBytes, dirtyPct);
    print(rows, sizeBytes, dirtyPct);
  } finally {
    await env.cleanup();
    if (given === undefined) execFileSync(script, ['down', cephDir], { stdio: 'ignore' });
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
async function measure(env: BenchEnv, s3env: Record<string, string>, sizeBytes: number, dirtyPct: number): Promise<Row[]> {
  const image = env.path('vm.qcow2');
  await createRandomImage(image, halfDataLayout(sizeBytes, 16));
  await env.defineAndStart('vm', [{ target: 'sda', file: image }]);
  const password = 'qbackup-bench';
  const suffix = `${process.pid}-${Date.now()}`;
  const repo = `s3://qbbench-${suffix}/qbackup`;
  await env.qb.repository.init({ repo, password });
  const endpoint = s3env['AWS_ENDPOINT_URL_S3'] ?? '';
  const resticBucket = `qbbench-restic-${suffix}`;
  const resticEnv = { ...process.env, RESTIC_PASSWORD: password, RESTIC_REPOSITORY: `s3:${endpoint}/${resticBucket}`, RESTIC_CACHE_DIR: env.subdir('restic-cache'), AWS_ACCESS_KEY_ID: s3env['AWS_ACCESS_KEY_ID'] ?? '', AWS_SECRET_ACCESS_KEY: s3env['AWS_SECRET_ACCESS_KEY'] ?? '' };
  await run('restic', ['init'], { env: resticEnv });
  const raw = env.path('vm.raw');
  const rawCopy = async (): Promise<void> => {
    await env.withQmp('vm', (qmp) => qmp.humanMonitorCommand('qemu-io -d sda "flush"'));
    rmSync(raw, { force: true });
    await run('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image, raw]);
  };
  const rows: Row[] = [];
  const resticBackup = async (): Promise<number> => (await runWithCpu('restic', ['backup', '--stdin', '--stdin-filename', 'sda.raw', '--host', 'bench', '-q'], { env: resticEnv, stdinFile: raw })).ms;
  // Full.
  await rawCopy();
  const qFull = await timed(() => env.qb.repository.backup('vm', { repo, password }));
  const rFull = await resticBackup();
  rows.push({ step: 'full', qbackupMs: qFull.ms, resticMs: rFull, bytes: sizeBytes, qbackupBytesRead: qFull.value.disks[0]?.bytesRead ?? 0 });
  // Incremental after dirtying clusters at random.
  const prng = new Prng(7);
  const clusters = sizeBytes / CLUSTER_BYTES;
  const dirty = Math.max(1, Math.round((clusters * dirtyPct) / 100));
  await env.withQmp('vm', async (qmp) => {
    for (const [i, c] of prng.sample(clusters, dirty).entries()) await hmpWrite(qmp, 'sda', c * CLUSTER_BYTES, CLUSTER_BYTES, 0x40 + (i % 64));
  });
  await rawCopy();
  const qInc = await timed(() => env.qb.repository.backup('vm', { repo, password }));
  const rInc = await resticBackup();
  rows.push({ step: `incremental (${dirtyPct} % of clusters)`, qbackupMs: qInc.ms, resticMs: rInc, bytes: sizeBytes, qbackupBytesRead: qInc.value.disks[0]?.bytesRead ?? 0 });
  // Restore of the latest backup to a raw file, flushed to disk.
  const qOut = env.subdir('qb-restore');
  const qRes = await timed(async () => {
    await env.qb.repository.restore('vm', { repo, password, to: qOut, format: 'raw' });
    await run('sync', [join(qOut, 'sda.raw')]);
  });
  const rOut = env.subdir('rs-restore');
  const rRes = await timed(async () => {
    await run('restic', ['restore', 'latest', '--target', rOut, '-q'], { env: resticEnv });
    await run('sync', [join(rOut, 'sda.raw')]);
  });
  await run('cmp', [join(qOut, 'sda.raw'), raw]);
  await run('cmp', [join(rOut, 'sda.raw'), raw]);
  rows.push({ step: 'restore (latest, raw)', qbackupMs: qRes.ms, resticMs: rRes.ms, bytes: sizeBytes });
  return rows;
}

function print(rows: readonly Row[], sizeBytes: number, dirtyPct: number): void {
  console.log(`S3 bench: disk ${sizeBytes / MiB} MiB (half random data), ${dirtyPct} % dirtied, radosgw (memstore OSD) on 127.0.0.1; load ${loadAverage()}`);
  console.log('| step | qbackup | restic | qbackup ÷ restic (throughput) |');
  console.log('|---|---|---|---|');
  for (const r of rows) {
    const q = `${(r.qbackupMs / 1000).toFixed(1)} s (${mibPerSec(r.bytes, r.qbackupMs).toFixed(0)} MiB/s${r.qbackupBytesRead !== undefined ? `, read ${(r.qbackupBytesRead / MiB).toFixed(0)} MiB` : ''})`;
    const rs = `${(r.resticMs / 1000).toFixed(1)} s (${mibPerSec(r.bytes, r.resticMs).toFixed(0)} MiB/s)`;
    console.log(`| ${r.step} | ${q} | ${rs} | ${fmtRatio(r.resticMs / r.qbackupMs)} |`);
  }
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? err.stack : String(err));
  process.exitCode = 1;
});
