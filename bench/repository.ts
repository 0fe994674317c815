// §5 The repository (format 2) against the backup tools people use today, on
// the same bytes: virtnbdbackup 1.9 (libvirt pull-mode backups, a libvirt
// domain on a byte-identical copy of the image) and restic (`--stdin` of the
// raw disk, from a byte-identical sparse raw copy), with qbackup backing up
// its own domain into a chunk store.
//
// The disk: about half of its clusters random data (incompressible) plus
// about a tenth text-like data (compressible, every 64 KiB distinct). Each
// repetition: full backups by every tool into fresh repositories, 1 % of the
// clusters dirtied spread (random single 64 KiB clusters of random data) and
// incrementals, 1 % dirtied clustered (one run) and incrementals, then
// restores of the newest backup by every tool and the floor (`qemu-img
// convert` of a qcow2 copy), then `verify --read-data` against `restic check
// --read-data` of the repositories just restored from. qbackup also takes a
// full backup into an encrypted repository in each repetition (and verifies
// it). The same writes go to all three copies: HMP
// qemu-io (as a guest would write) into both running domains, pwrite into
// the raw file. Then, once: dedup (a second domain on a copy of the disk,
// backed up into the same repository), worker-thread scaling (1 and 2
// workers, interleaved), and where a full backup's time goes (NBD read,
// zero check, hashing, compression, pack assembly and writes, each measured
// alone on the same data).
//
// Two methods, both in every repetition, the one that goes first alternating
// between repetitions (each takes its own full backups, incrementals,
// restores and verifies; the peers run in both):
// - in-process (`inprocess`): qbackup's library called in this process;
//   before every timed run of every tool, written data is synced and the
//   run's input is read once (untimed), so every tool starts from the page
//   cache;
// - as a user runs it (`cli`): each qbackup step is the `qbackup` command line
//   (bench/cli.ts: one process per command, timed from spawn to exit, CPU of
//   the process from /usr/bin/time), and before every timed run of every tool
//   (qbackup, the peers and the floors) written data is synced and the page
//   cache dropped (`echo 3 > /proc/sys/vm/drop_caches`; root only: otherwise
//   inputs are warmed as in-process, and the results say so).
// The restores of each repetition alternate their order (qcow2 first in the
// 1st, 3rd, … repetition of a method, raw first in the others). Every restore
// ends with `sync FILE` on its output, inside the measured time (restic,
// virtnbdrestore and qemu-img convert do not flush on their own; qbackup
// does), so every restore is measured until its output is durable.

import { randomFillSync } from 'node:crypto';
import { chmodSync, closeSync, existsSync, ftruncateSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { serverAddress, exportUri } from '../src/backup/job.js';
import { NbdClient } from '../src/nbd/client.js';
import { NBD_CONTEXT_BASE_ALLOCATION, NBD_STATE_ZERO } from '../src/nbd/constants.js';
import { runPool } from '../src/util/run-pool.js';
import { LocalBackend } from '../src/repository/backend/local.js';
import { encodeChunkParts, encodedParts, isZero } from '../src/repository/chunk.js';
import { ChunkCompressor } from '../src/repository/compress.js';
import { chunkId } from '../src/repository/crypto.js';
import type { Manifest } from '../src/repository/manifest.js';
import { PACK_TARGET_BYTES, PackBuilder, packIndexKey, packKey, releasePackBuffer } from '../src/repository/pack.js';
import { ChunkPool } from '../src/repository/pool.js';
import { Store } from '../src/repository/store.js';
import { CLUSTER_BYTES, halfDataLayout, processCpuMs, warmFile, type BenchEnv, type DataLayout } from './env.js';
import { loadAverage } from './machine.js';
import { Libvirt, peerMissing, Restic, toolVersion, virtnbdbackup, virtnbdrestore, type LibvirtDomain } from './peers.js';
import { qbackupCli, type CliOptions } from './cli.js';
import { KiB, MiB, now, Prng, run, runWithCpu } from './util.js';

export type Tool = 'qbackup' | 'virtnbdbackup' | 'restic';
export const TOOLS: readonly Tool[] = ['qbackup', 'virtnbdbackup', 'restic'];

export interface ThreadCpu {
  /** This process's main thread (NBD client, dedup decisions, pack assembly, writes). */
  mainMs: number;
  /** The chunk pool's worker threads (zero check, SHA-256, zstd): threads that started and ended during the backup. */
  workersMs: number;
  /** Threads that outlive the backup: V8's platform threads (garbage collection) and libuv's pool (file I/O). */
  helpersMs: number;
}

export interface BackupSample {
  ms: number;
  /** qbackup only: where this process's CPU went, by thread. */
  threads?: ThreadCpu;
  /** CPU of the backup tool's process (qbackup: this process, all threads). */
  cpuMs: number;
  /** CPU of the QEMU serving the export (qbackup, virtnbdbackup), NaN otherwise. */
  qemuCpuMs: number;
  /** qbackup: the manifest's bytesRead; virtnbdbackup: the data file it wrote; restic: the disk (it reads all of stdin). */
  bytesRead: number;
  /** Growth of the repository or backup directory (du -sb). */
  growthBytes: number;
}

export type StepName = 'full' | 'spread' | 'clustered';
export const STEPS: readonly StepName[] = ['full', 'spread', 'clustered'];

export interface RestoreResults {
  /** Which of qbackup's two restores ran first, each repetition (absent in results of older runs). */
  firstFormat?: Array<'qcow2' | 'raw'>;
  qbackupQcow2: number[];
  qbackupRaw: number[];
  virtnbdrestore: number[];
  restic: number[];
  convertQcow2: number[];
  convertRaw: number[];
  /** CPU (ms) of each restore above, by the same keys: the tool's process, all threads (absent in results of older runs). */
  cpuMs?: Record<RestoreKey, number[]>;
}

export type RestoreKey = 'qbackupQcow2' | 'qbackupRaw' | 'virtnbdrestore' | 'restic' | 'convertQcow2' | 'convertRaw';

export interface Breakdown {
  dataBytes: number;
  chunks: number;
  /** Our NBD client reading the data slots exactly as a backup does (1 MiB requests into reused buffers, 8 in flight), discarding them. */
  nbdReadMs: number;
  /** CPU of this process (all threads) during our read loop; absent in results of older runs. */
  nbdReadCpuMs?: number;
  /** nbdcopy of the same export to null: (reads data, skips what block status says is zero). */
  nbdcopyNullMs: number;
  /** nbdcopy's CPU (its process, from /usr/bin/time); absent in results of older runs. */
  nbdcopyNullCpuMs?: number;
  /** One thread, every chunk: */
  zeroCheckMs: number;
  hashMs: number;
  compressMs: number;
  compressedBytes: number;
  /** Pack assembly (concatenation + SHA-256 of the pack for its id), on the main thread in a backup. */
  packFinishMs: number;
  /** Pack and pack-index writes through the local backend (write, fsync, link, fsync dir). */
  packWriteMs: number;
  packs: number;
}

/** How qbackup's steps run: its library in this process with warm caches, or its command line with the caches dropped. */
export type Method = 'inprocess' | 'cli';
export const METHODS: readonly Method[] = ['inprocess', 'cli'];

/** What one method measured: the steps every repetition takes, by every tool. */
export interface MethodSamples {
  backups: Record<StepName, Record<Tool, BackupSample[]>>;
  /** qbackup's stored bytes (after dedup and compression) of its full backups. */
  qbackupFullStoredBytes: number[];
  /** An incremental with nothing dirtied: the fixed cost of a backup. */
  emptyIncremental: Record<'qbackup' | 'virtnbdbackup', number[]>;
  restore: RestoreResults;
  /** qbackup's full backup into an encrypted repository, each repetition. */
  encryptedFull: BackupSample[];
  /** Reading back and checking every stored byte: qbackup `verify --read-data` (plain, encrypted) and `restic check --read-data`. */
  verify: Record<'qbackup' | 'qbackupEncrypted' | 'restic', Array<{ ms: number; cpuMs: number; repoBytes: number }>>;
  /** Restored images compared across tools (first repetition). */
  restoreCheck: string[];
}

/** The in-process method's samples are RepoResults' own fields (as in results of older runs); the CLI method's are under `cli`. */
export interface RepoResults extends MethodSamples {
  /** When the section started (ISO) and how long it took; absent in results of older runs. */
  startedAt?: string;
  durationMs?: number;
  /** The methods that ran (absent in results of older runs: in-process only). */
  methods?: Method[];
  /** The CLI method's samples, and what was done about the page cache before each timed step. */
  cli?: MethodSamples & { caches: string };
  sizeBytes: number;
  randomBytes: number;
  compressibleBytes: number;
  dirtyBytes: number;
  reps: number;
  /** Per tool: 'ran', or why it did not. */
  peers: Record<Exclude<Tool, 'qbackup'>, string>;
  libvirt: string;
  versions: Record<string, string>;
  accel: string;
  /** Pieces of that fixed cost, measured alone on the last repository. */
  fixedCosts: { poolStartMs: number; openAndLoadMs: number; packs: number; pullJobMs: number } | undefined;
  dedup: { dataBytes: number; bytesStored: number; growthBytes: number; newChunks: number; chunks: number; ms: number } | undefined;
  workers: Record<string, BackupSample[]>;
  breakdown: Breakdown | undefined;
  /** Load average (1, 5, 15 min) when the section started and ended. */
  load: [string, string];
}

export interface RepoSetup {
  env: BenchEnv;
  sizeBytes: number;
  reps: number;
  /** Run virtnbdbackup and restic (--peers). */
  peers: boolean;
  /** The accelerator our QEMU uses, for the libvirt domain: 'kvm' or 'qemu' (TCG). */
  accel: 'kvm' | 'qemu';
  /** The methods to run (at least one), alternating between repetitions. */
  methods: readonly Method[];
  /** The CLI method drops the page cache before each timed step (when this process may). */
  dropCaches: boolean;
  log: (line: string) => void;
}

interface Write {
  offset: number;
  length: number;
  file: string;
}

const DOMAIN = 'rb';

export async function benchRepository(s: RepoSetup): Promise<RepoResults> {
  const { env, sizeBytes, reps, log } = s;
  // libvirt's QEMU runs as another user: it must reach the image and the data files of the writes.
  chmodSync(env.dir, 0o711);
  const dir = env.subdir('rb');
  chmodSync(dir, 0o755);
  const layout = halfDataLayout(sizeBytes, 11);
  const compressible = compressibleExtents(layout, 0.1, 12);
  const r: RepoResults = {
    sizeBytes,
    randomBytes: layout.dataBytes,
    compressibleBytes: compressible.reduce((n, e) => n + e.length, 0),
    dirtyBytes: Math.max(1, Math.round((sizeBytes / CLUSTER_BYTES) * 0.01)) * CLUSTER_BYTES,
    reps,
    peers: { virtnbdbackup: 'ran', restic: 'ran' },
    libvirt: '–',
    versions: {},
    accel: s.accel === 'kvm' ? 'KVM' : 'TCG',
    startedAt: new Date().toISOString(),
    methods: [...s.methods],
    ...emptySamples(),
    fixedCosts: undefined,
    dedup: undefined,
    workers: { '1': [], '2': [] },
    breakdown: undefined,
    load: [loadAverage(), ''],
  };
  const t0 = now();
  if (s.methods.length === 0) throw new Error('benchRepository needs at least one method');
  let dropping = false;
  if (s.methods.includes('cli')) {
    const caches = await cacheMode(s.dropCaches);
    dropping = caches.drop;
    r.cli = { ...emptySamples(), caches: caches.note };
    log(`  CLI method: page cache ${caches.note}`);
  }

  const raw = join(dir, 'sda.raw');
  const qbImage = join(dir, 'qb-sda.qcow2');
  const lvImage = join(dir, 'lv-sda.qcow2');
  log(`  creating the disk: ${mib(r.randomBytes)} MiB random + ${mib(r.compressibleBytes)} MiB text-like data on ${mib(sizeBytes)} MiB`);
  writeRawImage(raw, layout, compressible);
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qbImage]);
  await run('cp', ['--sparse=always', qbImage, lvImage]);
  await env.defineAndStart(DOMAIN, [{ target: 'sda', file: qbImage }]);
  const qemuPid = env.qb.domains.info(DOMAIN).pid ?? 0;

  // Peers, each only when asked for and installed.
  let lv: LibvirtDomain | undefined;
  if (!s.peers) {
    r.peers = { virtnbdbackup: 'not requested (run the bench with --peers)', restic: 'not requested (run the bench with --peers)' };
  } else {
    const vMissing = peerMissing('virtnbdbackup');
    const rMissing = peerMissing('restic');
    if (rMissing !== undefined) r.peers.restic = rMissing;
    if (vMissing !== undefined) r.peers.virtnbdbackup = vMissing;
    else {
      try {
        const libvirt = await Libvirt.start(dir);
        env.onCleanup(() => libvirt.stop());
        r.libvirt = libvirt.how;
        const name = `qbbench-${process.pid}`;
        lv = await libvirt.startDomain(name, lvImage, s.accel, join(dir, 'lv.xml'));
        const dom = lv;
        env.onCleanup(() => dom.remove());
      } catch (err) {
        r.peers.virtnbdbackup = `libvirt could not run a domain here: ${err instanceof Error ? err.message : String(err)}`;
        lv = undefined;
      }
    }
  }
  const useRestic = r.peers.restic === 'ran';
  for (const [t, why] of Object.entries(r.peers)) if (why !== 'ran') log(`  skipped: ${t}: ${why}`);
  r.versions = {
    ...(lv !== undefined ? { virtnbdbackup: await toolVersion('virtnbdbackup', ['-V']), libvirt: await toolVersion('libvirtd', ['--version']) } : {}),
    ...(useRestic ? { restic: await toolVersion('restic', ['version']) } : {}),
  };

  const prng = new Prng(77);
  const clusters = Math.floor(sizeBytes / CLUSTER_BYTES);
  const count = r.dirtyBytes / CLUSTER_BYTES;
  const dirtyDir = join(dir, 'dirty');
  mkdirSync(dirtyDir, { recursive: true, mode: 0o755 });
  chmodSync(dirtyDir, 0o755);
  let lastRepo = '';
  let copyImage = '';

  for (let rep = 0; rep < reps; rep++) {
    // The methods alternate their order between repetitions, so neither always runs first.
    const order = rep % 2 === 0 ? s.methods : [...s.methods].reverse();
    for (const [i, method] of order.entries()) {
      const cli = method === 'cli';
      const m: MethodSamples = cli && r.cli !== undefined ? r.cli : r;
      const prep = cli && dropping ? async (): Promise<void> => dropCaches() : prepare;
      const qb = cli ? cliRunner(env, qemuPid) : inProcessRunner(env, qemuPid);
      const tag = `${cli ? 'c' : ''}${rep}`;
      const label = cli ? `rep ${rep + 1}/${reps} CLI` : `rep ${rep + 1}/${reps}`;
      const qbRepo = join(dir, `qb${tag}`);
      const qbEncRepo = join(dir, `qbe${tag}`);
      const vbDir = join(dir, `vb${tag}`);
      const restic = useRestic ? new Restic(join(dir, `rs${tag}`), join(dir, 'restic-cache')) : undefined;
      await restic?.init();

      for (const step of STEPS) {
        if (step !== 'full') {
          const writes = planDirty(prng, clusters, count, step, dirtyDir, `${tag}-${step}`);
          await applyWrites(env, writes, lv, raw, join(dir, 'virsh-writes.txt'));
          for (const w of writes) rmSync(w.file, { force: true });
        }
        const b = m.backups[step];
        // qbackup
        await prep([qbImage]);
        const ours = await qb.backup(qbRepo, step === 'full' ? 'full' : 'incremental', undefined);
        b.qbackup.push(ours.sample);
        if (step === 'full') {
          m.qbackupFullStoredBytes.push(ours.manifest.disks.reduce((n, d) => n + d.bytesStored, 0));
          await env.qb.repository.init({ repo: qbEncRepo, password: ENCRYPTION_PASSWORD });
          await prep([qbImage]);
          m.encryptedFull.push((await qb.backup(qbEncRepo, 'full', ENCRYPTION_PASSWORD)).sample);
        }
        // virtnbdbackup
        if (lv !== undefined) {
          await prep([lvImage]);
          const before = await du(vbDir);
          const dataBefore = dataFiles(vbDir);
          const q0 = lv.cpuMs();
          const res = await virtnbdbackup(lv.name, step === 'full' ? 'full' : 'inc', vbDir, join(dir, 'lv-scratch'));
          const read = [...dataFiles(vbDir)].filter(([f]) => !dataBefore.has(f)).reduce((n, [, size]) => n + size, 0);
          b.virtnbdbackup.push({ ms: res.ms, cpuMs: res.cpuMs, qemuCpuMs: lv.cpuMs() - q0, bytesRead: read, growthBytes: (await du(vbDir)) - before });
        }
        // restic
        if (restic !== undefined) {
          await prep([raw]);
          const before = await du(restic.repo);
          const res = await restic.backup(raw, 'sda.raw');
          b.restic.push({ ms: res.ms, cpuMs: res.cpuMs, qemuCpuMs: Number.NaN, bytesRead: sizeBytes, growthBytes: (await du(restic.repo)) - before });
        }
        log(`  ${label} ${step.padEnd(9)} ${TOOLS.map((t) => describe(t, b[t].at(-1))).filter((x) => x !== '').join('  ')}`);
      }

      // Nothing dirtied: what every backup costs whatever it copies.
      await prep([qbImage]);
      m.emptyIncremental.qbackup.push((await qb.backup(qbRepo, 'incremental', undefined)).sample.ms);
      if (lv !== undefined) {
        await prep([lvImage]);
        m.emptyIncremental.virtnbdbackup.push((await virtnbdbackup(lv.name, 'inc', vbDir, join(dir, 'lv-scratch'))).ms);
      }
      log(`  ${label} nothing dirty: qbackup ${sec(m.emptyIncremental.qbackup.at(-1))}${lv !== undefined ? `, virtnbdbackup ${sec(m.emptyIncremental.virtnbdbackup.at(-1))}` : ''}`);

      const keepCopy = rep === reps - 1 && i === order.length - 1;
      copyImage = await restores(m, rep, { env, dir, qbRepo, vbDir, restic, lv: lv !== undefined, keepCopy, log, prepare: prep, qb, label, checkLabel: cli ? 'CLI: ' : '' });
      await verifies(m, { qbRepo, qbEncRepo, restic, log, prepare: prep, qb, label });
      rmSync(qbEncRepo, { recursive: true, force: true });
      rmSync(vbDir, { recursive: true, force: true });
      if (restic !== undefined) rmSync(restic.repo, { recursive: true, force: true });
      if (lastRepo !== '') rmSync(lastRepo, { recursive: true, force: true });
      lastRepo = qbRepo;
    }
  }

  r.fixedCosts = await fixedCosts(env, lastRepo, log);
  r.dedup = await dedup(env, lastRepo, copyImage, log);
  rmSync(lastRepo, { recursive: true, force: true });
  rmSync(copyImage, { force: true });

  for (let rep = 0; rep < reps; rep++) {
    for (const w of [1, 2]) {
      const repo = join(dir, `w${w}-${rep}`);
      await prepare([qbImage]);
      const res = await qbackupBackup(env, repo, qemuPid, w, 'full');
      r.workers[String(w)]?.push(res.sample);
      rmSync(repo, { recursive: true, force: true });
    }
    log(`  workers rep ${rep + 1}/${reps}: 1 worker ${sec(r.workers['1']?.at(-1)?.ms)}, 2 workers ${sec(r.workers['2']?.at(-1)?.ms)}`);
  }

  await prepare([qbImage]);
  r.breakdown = await breakdown(env, join(dir, 'scratch-repo'), log);
  rmSync(join(dir, 'scratch-repo'), { recursive: true, force: true });
  r.load[1] = loadAverage();
  r.durationMs = now() - t0;
  return r;
}

function emptySamples(): MethodSamples {
  return {
    backups: { full: emptyTools(), spread: emptyTools(), clustered: emptyTools() },
    qbackupFullStoredBytes: [],
    emptyIncremental: { qbackup: [], virtnbdbackup: [] },
    restore: { firstFormat: [], qbackupQcow2: [], qbackupRaw: [], virtnbdrestore: [], restic: [], convertQcow2: [], convertRaw: [] },
    encryptedFull: [],
    verify: { qbackup: [], qbackupEncrypted: [], restic: [] },
    restoreCheck: [],
  };
}

function emptyTools(): Record<Tool, BackupSample[]> {
  return { qbackup: [], virtnbdbackup: [], restic: [] };
}

const mib = (bytes: number): string => (bytes / MiB).toFixed(0);
const sec = (ms: number | undefined): string => (ms === undefined ? '–' : `${(ms / 1000).toFixed(2)} s`);

function describe(tool: Tool, x: BackupSample | undefined): string {
  if (x === undefined) return '';
  return `${tool} ${sec(x.ms)} (read ${mib(x.bytesRead)} MiB, +${mib(x.growthBytes)} MiB)`;
}

/** What comes before a timed run: prepare() (warm inputs) or dropCaches(). */
type Prepare = (inputs: readonly string[]) => Promise<void>;

const DROP_CACHES = '/proc/sys/vm/drop_caches';

/** Syncs written data, then drops the page cache (clean pages, dentries and inodes), so the timed run reads from the disk. */
async function dropCaches(): Promise<void> {
  await run('sync', []);
  writeFileSync(DROP_CACHES, '3\n');
}

/** Whether the CLI method can drop the page cache here, and a phrase saying what it does about it. */
async function cacheMode(wanted: boolean): Promise<{ drop: boolean; note: string }> {
  const warmed = 'inputs synced and read once, untimed, before each timed step, as in the in-process method';
  if (!wanted) return { drop: false, note: `not dropped (--no-drop-caches): ${warmed}` };
  if (process.getuid?.() !== 0) return { drop: false, note: `not dropped (dropping the page cache needs root; the bench ran as uid ${process.getuid?.() ?? '?'}): ${warmed}` };
  try {
    await dropCaches();
    return { drop: true, note: `dropped before each timed step of every tool (\`sync; echo 3 > ${DROP_CACHES}\`)` };
  } catch (err) {
    return { drop: false, note: `not dropped (writing ${DROP_CACHES} failed: ${err instanceof Error ? err.message : String(err)}): ${warmed}` };
  }
}

/** Syncs written data, then reads the inputs once so the timed run finds them in the page cache. */
async function prepare(inputs: readonly string[]): Promise<void> {
  await run('sync', []);
  for (const f of inputs) {
    if (statSync(f).isDirectory()) warmDir(f);
    else warmFile(f);
  }
}

function warmDir(dir: string): void {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) warmDir(p);
    else if (e.isFile()) warmFile(p);
  }
}

/** Apparent size of everything under `path` (0 when it does not exist). */
async function du(path: string): Promise<number> {
  if (!existsSync(path)) return 0;
  const out = await run('du', ['-sb', path]);
  return Number(out.stdout.split(/\s/)[0]);
}

/** virtnbdbackup's data files in a backup directory, with their sizes. */
function dataFiles(dir: string): Map<string, number> {
  const out = new Map<string, number>();
  if (!existsSync(dir)) return out;
  for (const f of readdirSync(dir)) if (f.endsWith('.data')) out.set(f, statSync(join(dir, f)).size);
  return out;
}

/** CPU (ms) of each thread of this process, by thread id (/proc/self/task; 10 ms resolution). */
function threadCpu(): Map<string, number> {
  const out = new Map<string, number>();
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      const stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      out.set(tid, (Number(f[11]) + Number(f[12])) * 10);
    } catch {
      // the thread ended meanwhile
    }
  }
  return out;
}

/** The passphrase of the encrypted repositories the bench makes. */
const ENCRYPTION_PASSWORD = 'qbackup-bench';

async function qbackupBackup(env: BenchEnv, repo: string, qemuPid: number, workers: number | undefined, level: 'full' | 'incremental', password?: string | undefined): Promise<{ sample: BackupSample; manifest: Manifest }> {
  const before = await du(repo);
  const threads0 = threadCpu();
  const cpu0 = process.cpuUsage();
  const q0 = processCpuMs(qemuPid);
  const t0 = now();
  const m = await env.qb.repository.backup(DOMAIN, { ...access(repo, password), workers });
  const ms = now() - t0;
  const cpu = process.cpuUsage(cpu0);
  const qemuCpuMs = processCpuMs(qemuPid) - q0;
  const threads1 = threadCpu();
  const main = String(process.pid);
  const mainMs = (threads1.get(main) ?? 0) - (threads0.get(main) ?? 0);
  let helpersMs = 0;
  for (const [tid, t] of threads1) if (tid !== main && threads0.has(tid)) helpersMs += t - (threads0.get(tid) ?? 0);
  const cpuMs = (cpu.user + cpu.system) / 1000;
  if (m.disks.some((d) => d.level !== level)) throw new Error(`qbackup backup ${m.id} is ${m.disks.map((d) => d.level).join(', ')}, expected ${level}`);
  return {
    manifest: m,
    sample: { ms, cpuMs, threads: { mainMs, helpersMs, workersMs: Math.max(0, cpuMs - mainMs - helpersMs) }, qemuCpuMs, bytesRead: m.disks.reduce((n, d) => n + d.bytesRead, 0), growthBytes: (await du(repo)) - before },
  };
}

// ---- the disk and its writes --------------------------------------------------

/** Extents in the layout's holes, about `share` of the disk, for text-like data. */
export function compressibleExtents(layout: DataLayout, share: number, seed: number): DataLayout['extents'] {
  const prng = new Prng(seed);
  const out: DataLayout['extents'] = [];
  const holesShare = 1 - layout.dataBytes / layout.sizeBytes;
  const p = Math.min(1, share / Math.max(holesShare, 0.01));
  let pos = 0;
  for (const e of [...layout.extents, { offset: layout.sizeBytes, length: 0 }]) {
    if (e.offset > pos && prng.next() < p) out.push({ offset: pos, length: e.offset - pos });
    pos = e.offset + e.length;
  }
  return out;
}

/** A sparse raw file with random data in the layout's extents and text-like data in `text`. */
export function writeRawImage(file: string, layout: DataLayout, text: DataLayout['extents']): void {
  const fd = openSync(file, 'w', 0o644);
  const prng = new Prng(13);
  const state = { n: 0 };
  try {
    ftruncateSync(fd, layout.sizeBytes);
    const buf = Buffer.allocUnsafe(4 * MiB);
    for (const [extents, fill] of [
      [layout.extents, (b: Buffer) => randomFillSync(b)],
      [text, (b: Buffer) => fillText(b, prng, state)],
    ] as const) {
      for (const e of extents) {
        for (let pos = e.offset; pos < e.offset + e.length; pos += buf.length) {
          const n = Math.min(buf.length, e.offset + e.length - pos);
          fill(buf.subarray(0, n));
          writeSync(fd, buf, 0, n, pos);
        }
      }
    }
  } finally {
    closeSync(fd);
  }
}

/** Web-server-log-like lines (zstd -1 packs them about 3–4×); a running counter keeps every 64 KiB distinct. */
function fillText(buf: Buffer, prng: Prng, state: { n: number }): void {
  let pos = 0;
  while (pos < buf.length) {
    const n = state.n++;
    const t = `2026-11-${String(10 + ((n >> 20) % 20)).padStart(2, '0')}T${String((n >> 12) % 24).padStart(2, '0')}:${String((n >> 6) % 60).padStart(2, '0')}:${String(n % 60).padStart(2, '0')}.${String(prng.int(0, 999)).padStart(3, '0')}Z`;
    const line = `${t} web-${prng.int(1, 8)} nginx[${1000 + prng.int(0, 50)}]: 10.0.${prng.int(0, 255)}.${prng.int(0, 255)} "GET /api/v1/items/${n} HTTP/1.1" ${prng.next() < 0.95 ? 200 : 404} ${prng.int(200, 9000)} ${prng.int(1, 900)}ms\n`;
    pos += buf.write(line, pos, 'latin1');
  }
}

/** 1 % of the clusters as files of random data: single clusters at random places (spread), or one run in 16 MiB pieces (clustered). */
function planDirty(prng: Prng, clusters: number, count: number, pattern: 'spread' | 'clustered', dir: string, tag: string): Write[] {
  const writes: Write[] = [];
  if (pattern === 'spread') {
    for (const c of prng.sample(clusters, count)) writes.push({ offset: c * CLUSTER_BYTES, length: CLUSTER_BYTES, file: '' });
  } else {
    const start = prng.int(0, clusters - count) * CLUSTER_BYTES;
    const end = start + count * CLUSTER_BYTES;
    for (let pos = start; pos < end; pos += 16 * MiB) writes.push({ offset: pos, length: Math.min(16 * MiB, end - pos), file: '' });
  }
  writes.forEach((w, i) => {
    w.file = join(dir, `${tag}-${i}.bin`);
    writeFileSync(w.file, randomFillSync(Buffer.allocUnsafe(w.length)), { mode: 0o644 });
  });
  return writes;
}

/** The same writes into our domain and the libvirt domain (HMP qemu-io, as a guest writes) and into the raw copy. */
async function applyWrites(env: BenchEnv, writes: readonly Write[], lv: LibvirtDomain | undefined, raw: string, scratch: string): Promise<void> {
  await env.withQmp(DOMAIN, async (qmp) => {
    for (const w of writes) {
      const out = await qmp.humanMonitorCommand(`qemu-io -d sda "write -q -s ${w.file} ${w.offset} ${w.length}"`);
      if (/error|fail/i.test(out)) throw new Error(`qemu-io write failed: ${out}`);
    }
  });
  await lv?.write(writes, scratch);
  const fd = openSync(raw, 'r+');
  try {
    for (const w of writes) writeSync(fd, readFileSync(w.file), 0, w.length, w.offset);
  } finally {
    closeSync(fd);
  }
  await run('sync', []);
}

// ---- restore ------------------------------------------------------------------

interface RestoreSetup {
  env: BenchEnv;
  dir: string;
  qbRepo: string;
  vbDir: string;
  restic: Restic | undefined;
  lv: boolean;
  keepCopy: boolean;
  log: (line: string) => void;
  prepare: Prepare;
  qb: QbRunner;
  /** Start of the log lines ("rep 1/3", "rep 1/3 CLI"). */
  label: string;
  /** Start of the restore checks' lines (the method). */
  checkLabel: string;
}

/** Times `fn` and a `sync` of the file it produced; its CPU is what `fn` reports (the sync's is the kernel's). */
async function timedDurable(fn: () => Promise<{ file: string; cpuMs: number }>): Promise<{ ms: number; cpuMs: number }> {
  const t0 = now();
  const { file, cpuMs } = await fn();
  await run('sync', [file]);
  return { ms: now() - t0, cpuMs };
}

/** Records one restore's time and CPU under `key`. */
function push(rr: RestoreResults, key: RestoreKey, x: { ms: number; cpuMs: number }): void {
  rr[key].push(x.ms);
  const cpu = (rr.cpuMs ??= { qbackupQcow2: [], qbackupRaw: [], virtnbdrestore: [], restic: [], convertQcow2: [], convertRaw: [] });
  cpu[key].push(x.cpuMs);
}

/** Restores of the newest backup by every tool, and the floor; returns our qcow2 restore when keepCopy (for dedup), else ''. */
async function restores(r: MethodSamples, rep: number, s: RestoreSetup): Promise<string> {
  const prepare = s.prepare;
  const out = join(s.dir, 'restore');
  rmSync(out, { recursive: true, force: true });
  mkdirSync(out, { recursive: true });
  const rr = r.restore;
  const qcow2 = join(out, 'qb-qcow2', 'sda.qcow2');
  const rawOut = join(out, 'qb-raw', 'sda.raw');

  // qcow2 first in the 1st, 3rd, … repetition, raw first in the others: whatever running first costs or saves falls on both.
  const first = rep % 2 === 0 ? 'qcow2' : 'raw';
  (rr.firstFormat ??= []).push(first);
  for (const format of first === 'qcow2' ? (['qcow2', 'raw'] as const) : (['raw', 'qcow2'] as const)) {
    await prepare([s.qbRepo]);
    const file = format === 'qcow2' ? qcow2 : rawOut;
    push(rr, format === 'qcow2' ? 'qbackupQcow2' : 'qbackupRaw', await timedDurable(async () => ({ file, ...(await s.qb.restore(s.qbRepo, join(out, `qb-${format}`), format)) })));
  }

  let vbFile = '';
  if (s.lv) {
    await prepare([s.vbDir]);
    const vbOut = join(out, 'vb');
    push(
      rr,
      'virtnbdrestore',
      await timedDurable(async () => {
        const res = await virtnbdrestore(s.vbDir, vbOut);
        vbFile = join(vbOut, readdirSync(vbOut).find((f) => f.endsWith('.qcow2')) ?? 'missing.qcow2');
        return { file: vbFile, cpuMs: res.cpuMs };
      }),
    );
  }
  let rsFile = '';
  if (s.restic !== undefined) {
    const restic = s.restic;
    await prepare([restic.repo]);
    rsFile = join(out, 'rs', 'sda.raw');
    push(rr, 'restic', await timedDurable(async () => ({ file: rsFile, cpuMs: (await restic.restore(join(out, 'rs'))).cpuMs })));
  }
  await prepare([qcow2]);
  push(rr, 'convertQcow2', await timedDurable(async () => ({ file: join(out, 'floor.qcow2'), cpuMs: (await runWithCpu('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', qcow2, join(out, 'floor.qcow2')])).cpuMs })));
  rmSync(join(out, 'floor.qcow2'), { force: true });
  await prepare([qcow2]);
  push(rr, 'convertRaw', await timedDurable(async () => ({ file: join(out, 'floor.raw'), cpuMs: (await runWithCpu('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow2, join(out, 'floor.raw')])).cpuMs })));
  rmSync(join(out, 'floor.raw'), { force: true });

  s.log(
    `  ${s.label} restore (${first} first): qbackup qcow2 ${sec(rr.qbackupQcow2.at(-1))}, raw ${sec(rr.qbackupRaw.at(-1))}` +
      `${s.lv ? `, virtnbdrestore ${sec(rr.virtnbdrestore.at(-1))}` : ''}${s.restic !== undefined ? `, restic ${sec(rr.restic.at(-1))}` : ''}` +
      `; qemu-img convert → qcow2 ${sec(rr.convertQcow2.at(-1))}, → raw ${sec(rr.convertRaw.at(-1))}`,
  );
  if (rep === 0) {
    // The tools backed up byte-identical disks: their restores must be equal.
    const compare = async (what: string, a: string, fa: string, b: string, fb: string): Promise<void> => {
      try {
        await run('qemu-img', ['compare', '-f', fa, '-F', fb, a, b]);
        r.restoreCheck.push(`${s.checkLabel}${what}: identical`);
      } catch (err) {
        r.restoreCheck.push(`${s.checkLabel}${what}: DIFFERENT (${err instanceof Error ? err.message.slice(0, 200) : String(err)})`);
      }
      s.log(`  check ${r.restoreCheck.at(-1) ?? ''}`);
    };
    await compare('qbackup qcow2 vs qbackup raw', qcow2, 'qcow2', rawOut, 'raw');
    if (vbFile !== '') await compare('qbackup vs virtnbdrestore', qcow2, 'qcow2', vbFile, 'qcow2');
    if (rsFile !== '') await compare('qbackup vs restic', rawOut, 'raw', rsFile, 'raw');
  }
  let copy = '';
  if (s.keepCopy) {
    copy = join(s.dir, 'copy-sda.qcow2');
    renameSync(qcow2, copy);
  }
  rmSync(out, { recursive: true, force: true });
  return copy;
}

// ---- verify --------------------------------------------------------------------

/**
 * Every stored byte read back and checked, by each tool, on the repositories
 * the restores just read: qbackup's (a full and three incrementals), its
 * encrypted one (a full) and restic's (three snapshots of the disk), each
 * after `prepare` (its files read once, untimed, or the page cache dropped).
 */
async function verifies(
  r: MethodSamples,
  s: { qbRepo: string; qbEncRepo: string; restic: Restic | undefined; log: (line: string) => void; prepare: Prepare; qb: QbRunner; label: string },
): Promise<void> {
  const timed = async (repo: string, password: string | undefined): Promise<{ ms: number; cpuMs: number; repoBytes: number }> => {
    await s.prepare([repo]);
    return { ...(await s.qb.verify(repo, password)), repoBytes: await du(repo) };
  };
  r.verify.qbackup.push(await timed(s.qbRepo, undefined));
  r.verify.qbackupEncrypted.push(await timed(s.qbEncRepo, ENCRYPTION_PASSWORD));
  const restic = s.restic;
  if (restic !== undefined) {
    await s.prepare([restic.repo]);
    const res = await restic.check(true);
    r.verify.restic.push({ ms: res.ms, cpuMs: res.cpuMs, repoBytes: await du(restic.repo) });
  }
  const v = r.verify;
  s.log(`  ${s.label} verify --read-data: qbackup ${sec(v.qbackup.at(-1)?.ms)}, encrypted ${sec(v.qbackupEncrypted.at(-1)?.ms)}${restic !== undefined ? `, restic check --read-data ${sec(v.restic.at(-1)?.ms)}` : ''}`);
}

// ---- qbackup's steps, in-process or as the command line -------------------------

/** qbackup's backup, restore and verify of the bench's domain, by one method. */
interface QbRunner {
  backup(repo: string, level: 'full' | 'incremental', password: string | undefined): Promise<{ sample: BackupSample; manifest: Manifest }>;
  /** The repository's newest backup of the domain into `to`. */
  restore(repo: string, to: string, format: 'qcow2' | 'raw'): Promise<{ cpuMs: number }>;
  /** `verify --read-data`; throws unless it read chunks and found no problem. */
  verify(repo: string, password: string | undefined): Promise<{ ms: number; cpuMs: number }>;
}

function checkVerify(repo: string, report: { problems: readonly unknown[]; chunksRead: number }): void {
  if (report.problems.length > 0 || report.chunksRead === 0) throw new Error(`verify --read-data of "${repo}", a repository the bench just wrote: ${JSON.stringify(report).slice(0, 300)}`);
}

/** A repository and its passphrase, as the library takes them (RepoAccess has no room for an undefined passphrase). */
function access(repo: string, password: string | undefined): { repo: string; password?: string } {
  return password !== undefined ? { repo, password } : { repo };
}

/** The library, in this process. */
function inProcessRunner(env: BenchEnv, qemuPid: number): QbRunner {
  return {
    backup: (repo, level, password) => qbackupBackup(env, repo, qemuPid, undefined, level, password),
    restore: async (repo, to, format) => {
      const cpu0 = process.cpuUsage();
      await env.qb.repository.restore(DOMAIN, { repo, to, format });
      const cpu = process.cpuUsage(cpu0);
      return { cpuMs: (cpu.user + cpu.system) / 1000 };
    },
    verify: async (repo, password) => {
      const cpu0 = process.cpuUsage();
      const t0 = now();
      const report = await env.qb.repository.verify(access(repo, password), { readData: true });
      const ms = now() - t0;
      const cpu = process.cpuUsage(cpu0);
      checkVerify(repo, report);
      return { ms, cpuMs: (cpu.user + cpu.system) / 1000 };
    },
  };
}

/** The command line a user types, one process per command, on the bench's state directory. */
function cliRunner(env: BenchEnv, qemuPid: number): QbRunner {
  const options = (password: string | undefined): CliOptions => ({ stateDir: env.stateDir, password });
  return {
    backup: async (repo, level, password) => {
      const before = await du(repo);
      const q0 = processCpuMs(qemuPid);
      const res = await qbackupCli(['--json', 'backup', DOMAIN, '--repo', repo], options(password));
      const qemuCpuMs = processCpuMs(qemuPid) - q0;
      const m = JSON.parse(res.stdout) as Manifest;
      if (m.disks.some((d) => d.level !== level)) throw new Error(`qbackup backup ${m.id} is ${m.disks.map((d) => d.level).join(', ')}, expected ${level}`);
      return { manifest: m, sample: { ms: res.ms, cpuMs: res.cpuMs, qemuCpuMs, bytesRead: m.disks.reduce((n, d) => n + d.bytesRead, 0), growthBytes: (await du(repo)) - before } };
    },
    restore: async (repo, to, format) => {
      const res = await qbackupCli(['restore', DOMAIN, '--repo', repo, '--to', to, '--format', format], options(undefined));
      return { cpuMs: res.cpuMs };
    },
    verify: async (repo, password) => {
      const res = await qbackupCli(['--json', 'verify', '--repo', repo, '--read-data'], options(password));
      checkVerify(repo, JSON.parse(res.stdout) as { problems: unknown[]; chunksRead: number });
      return { ms: res.ms, cpuMs: res.cpuMs };
    },
  };
}

// ---- the fixed cost of a backup ----------------------------------------------

/** Starting the chunk pool's two workers, opening the repository and reading every pack's index, and a pull job's start and end. */
async function fixedCosts(env: BenchEnv, repo: string, log: (line: string) => void): Promise<RepoResults['fixedCosts']> {
  let t0 = now();
  const store = await Store.open(new LocalBackend(repo));
  await store.loadChunks();
  await store.manifests(DOMAIN);
  const openAndLoadMs = now() - t0;
  const packs = (await store.backend.list('index/')).length;
  t0 = now();
  const pool = new ChunkPool(store, 2);
  // The pool's workers are unref'd (a backup's NBD socket keeps the process alive); here nothing else would.
  const keepAlive = setInterval(() => undefined, 1000);
  try {
    // One tiny batch per worker makes both start and answer.
    const writer = store.chunkWriter();
    await Promise.all([pool.storeChunks([Buffer.alloc(4096, 1)], writer), pool.storeChunks([Buffer.alloc(4096, 2)], writer)]);
  } finally {
    clearInterval(keepAlive);
    await pool.close();
  }
  const poolStartMs = now() - t0;
  t0 = now();
  await env.qb.backups.begin(DOMAIN, { mode: 'pull' });
  await env.qb.backups.abort(DOMAIN);
  const pullJobMs = now() - t0;
  log(`  fixed costs: open + load ${packs} pack indexes ${sec(openAndLoadMs)}, start 2 workers ${sec(poolStartMs)}, pull job start + end ${sec(pullJobMs)}`);
  return { poolStartMs, openAndLoadMs, packs, pullJobMs };
}

// ---- dedup --------------------------------------------------------------------

async function dedup(env: BenchEnv, repo: string, copyImage: string, log: (line: string) => void): Promise<RepoResults['dedup']> {
  const name = 'rbcopy';
  await env.defineAndStart(name, [{ target: 'sda', file: copyImage }]);
  try {
    await prepare([copyImage]);
    const before = await du(repo);
    const t0 = now();
    const m = await env.qb.repository.backup(name, { repo });
    const ms = now() - t0;
    const d = {
      dataBytes: m.disks.reduce((n, x) => n + x.bytesRead, 0),
      bytesStored: m.disks.reduce((n, x) => n + x.bytesStored, 0),
      growthBytes: (await du(repo)) - before,
      newChunks: m.disks.reduce((n, x) => n + x.newChunks, 0),
      chunks: m.disks.reduce((n, x) => n + x.chunks, 0),
      ms,
    };
    log(`  dedup: a copy of the disk (${mib(d.dataBytes)} MiB of data) grew the repository by ${(d.growthBytes / KiB).toFixed(0)} KiB (${d.newChunks} new chunks of ${d.chunks}) in ${sec(ms)}`);
    return d;
  } finally {
    await env.qb.domains.destroy(name);
  }
}

// ---- where a full backup's time goes -------------------------------------------

const RUN_CHUNKS = 16;
const READS_IN_FLIGHT = 8;

/**
 * Each stage of a full backup alone, on the same data: reading the data
 * slots through a pull job's export (as read-disk.ts does), nbdcopy of the
 * same export to null, then in one thread the zero check, SHA-256 and zstd of
 * every chunk, pack assembly and pack writes into a scratch directory.
 */
async function breakdown(env: BenchEnv, scratch: string, log: (line: string) => void): Promise<Breakdown> {
  const job = await env.qb.backups.begin(DOMAIN, { mode: 'pull' });
  try {
    const server = job.server;
    const exportName = job.disks[0]?.pull?.exportName ?? 'sda';
    if (server === undefined) throw new Error(`pull job ${job.id} has no server`);
    await using client = await NbdClient.connect(serverAddress(server), { exportName, metaContexts: [NBD_CONTEXT_BASE_ALLOCATION] });
    const chunkSize = CLUSTER_BYTES;
    const runs = await dataRuns(client, chunkSize);
    const b: Breakdown = { dataBytes: 0, chunks: 0, nbdReadMs: 0, nbdcopyNullMs: 0, zeroCheckMs: 0, hashMs: 0, compressMs: 0, compressedBytes: 0, packFinishMs: 0, packWriteMs: 0, packs: 0 };
    for (const r of runs) b.dataBytes += Math.min(r.count * chunkSize, client.size - r.first * chunkSize);
    b.chunks = runs.reduce((n, r) => n + r.count, 0);

    let t0 = now();
    const cpu0 = process.cpuUsage();
    const free: Buffer[] = [];
    await runPool(runs[Symbol.iterator](), READS_IN_FLIGHT, async (r) => {
      const buf = free.pop() ?? Buffer.allocUnsafeSlow(RUN_CHUNKS * chunkSize);
      await client.readInto(r.first * chunkSize, buf.subarray(0, Math.min(r.count * chunkSize, client.size - r.first * chunkSize)));
      free.push(buf);
    });
    b.nbdReadMs = now() - t0;
    const cpu = process.cpuUsage(cpu0);
    b.nbdReadCpuMs = (cpu.user + cpu.system) / 1000;
    const nbdcopy = await runWithCpu('nbdcopy', [exportUri(server, exportName), 'null:']);
    b.nbdcopyNullMs = nbdcopy.ms;
    b.nbdcopyNullCpuMs = nbdcopy.cpuMs;

    const compressor = new ChunkCompressor(1);
    const backend = new LocalBackend(scratch);
    let pack = new PackBuilder();
    const store = async (): Promise<void> => {
      let t = now();
      const { packId, pack: bytes, header } = pack.finish(undefined);
      b.packFinishMs += now() - t;
      releasePackBuffer(bytes);
      t = now();
      await backend.putIfAbsent(packKey(packId), bytes);
      await backend.putIfAbsent(packIndexKey(packId), header);
      b.packWriteMs += now() - t;
      b.packs++;
      pack = new PackBuilder();
    };
    for (const r of runs) {
      const offset = r.first * chunkSize;
      const data = await client.read(offset, Math.min(r.count * chunkSize, client.size - offset));
      for (let at = 0; at < data.length; at += chunkSize) {
        const c = data.subarray(at, Math.min(at + chunkSize, data.length));
        t0 = now();
        const zero = isZero(c);
        b.zeroCheckMs += now() - t0;
        if (zero) continue;
        t0 = now();
        const id = chunkId(c, undefined);
        b.hashMs += now() - t0;
        t0 = now();
        const parts = encodedParts(encodeChunkParts(c, { compressor, key: undefined }));
        b.compressMs += now() - t0;
        t0 = now();
        pack.add(id, parts, c.length);
        b.packFinishMs += now() - t0;
        b.compressedBytes += parts.reduce((n, p) => n + p.length, 0);
        if (pack.bytes >= PACK_TARGET_BYTES) await store();
      }
    }
    if (pack.count > 0) await store();
    log(
      `  breakdown of ${mib(b.dataBytes)} MiB: NBD read ${sec(b.nbdReadMs)}, CPU ${sec(b.nbdReadCpuMs)} (nbdcopy → null ${sec(b.nbdcopyNullMs)}, CPU ${sec(b.nbdcopyNullCpuMs)}), zero check ${sec(b.zeroCheckMs)}, ` +
        `SHA-256 ${sec(b.hashMs)}, zstd ${sec(b.compressMs)} (→ ${mib(b.compressedBytes)} MiB), pack assembly ${sec(b.packFinishMs)}, pack writes ${sec(b.packWriteMs)} (${b.packs} packs)`,
    );
    return b;
  } finally {
    await env.qb.backups.abort(DOMAIN);
  }
}

/** The slots a full backup reads (not entirely zero per base:allocation), in runs of at most RUN_CHUNKS. */
async function dataRuns(client: NbdClient, chunkSize: number): Promise<Array<{ first: number; count: number }>> {
  const extents = await client.extents(NBD_CONTEXT_BASE_ALLOCATION);
  const slots = Math.ceil(client.size / chunkSize);
  const runs: Array<{ first: number; count: number }> = [];
  let e = 0;
  for (let s = 0; s < slots; s++) {
    const start = s * chunkSize;
    const end = Math.min(start + chunkSize, client.size);
    while (e < extents.length && (extents[e]?.offset ?? 0) + (extents[e]?.length ?? 0) <= start) e++;
    const ext = extents[e];
    if (ext !== undefined && (ext.flags & NBD_STATE_ZERO) !== 0 && ext.offset <= start && ext.offset + ext.length >= end) continue;
    const last = runs.at(-1);
    if (last !== undefined && last.first + last.count === s && last.count < RUN_CHUNKS) last.count++;
    else runs.push({ first: s, count: 1 });
  }
  return runs;
}
