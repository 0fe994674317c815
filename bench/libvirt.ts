// The libvirt row: one disk under one libvirt domain (software emulation,
// type='qemu'), backed up by qbackup through its libvirt driver (the CLI as a
// user types it: `qbackup backup DOMAIN --repo R --connect qemu:///system`)
// and by virtnbdbackup (`-l full`, `-l inc`), a full and then an incremental
// after 1 % of the disk's clusters were dirtied as random 64 KiB clusters
// written by the guest (HMP qemu-io through libvirt's monitor passthrough),
// then an incremental with nothing dirtied. Time, CPU, bytes read from the VM
// and bytes stored, with ratios ours ÷ theirs, all in one run.
//
// Both tools run on the same domain in turn. virtnbdbackup refuses a domain
// holding a checkpoint it did not create, so before each tool's chain every
// checkpoint of the domain is deleted (libvirt merges their bitmaps away);
// the order of the two tools alternates between repetitions, and both see
// the same writes at the same offsets within a repetition.
//
// libvirtd comes from the tests' helper (the running one, or one started and
// later stopped by pid), which also holds the machine-wide lock the libvirt
// test files take, so the bench never stops a daemon under a test.
//
// Standalone: `npm run bench:libvirt -- --size 1G --reps 2` writes its
// section of docs/benchmarks.md; `npm run bench -- --peers` runs it too.

import { randomFillSync } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { LIBVIRT, LibvirtClient, type LibvirtDomainRef } from '../src/drivers/libvirt/index.js';
import type { Manifest } from '../src/repository/manifest.js';
import { diskAlias, libvirtTestDir, removeTestDomain, startLibvirt, testDomainName, testDomainXml } from '../test/helpers/libvirt.js';
import { withSection } from './doc-sections.js';
import { CLUSTER_BYTES, createRandomImage, halfDataLayout, processCpuMs, warmFile } from './env.js';
import { loadAverage } from './machine.js';
import { findTool, toolVersion } from './peers.js';
import { qbackupCli } from './cli.js';
import { fmtBytes, fmtMs, GiB, MiB, Prng, run, runWithCpu, summarize } from './util.js';

export type LvTool = 'qbackup' | 'virtnbdbackup';
export type LvStep = 'full' | 'incremental' | 'empty';
const LV_TOOLS: readonly LvTool[] = ['qbackup', 'virtnbdbackup'];
const LV_STEPS: readonly LvStep[] = ['full', 'incremental', 'empty'];

export interface LvSample {
  ms: number;
  /** User + system CPU of the tool's process (/usr/bin/time). */
  cpuMs: number;
  /** CPU of the domain's QEMU during the run. */
  qemuCpuMs: number;
  /** qbackup: the manifest's bytesRead; virtnbdbackup: the data file it wrote. */
  bytesRead: number;
  /** Growth of the repository or backup directory (du -sb). */
  storedBytes: number;
}

export interface LibvirtResults {
  /** 'ran', or why not. */
  status: string;
  sizeBytes: number;
  dataBytes: number;
  dirtyBytes: number;
  reps: number;
  versions: Record<string, string>;
  libvirtd: string;
  samples: Record<LvStep, Record<LvTool, LvSample[]>>;
  load: [string, string];
  startedAt: string;
}

export interface LibvirtSetup {
  sizeBytes: number;
  reps: number;
  log: (line: string) => void;
}

const here = dirname(fileURLToPath(import.meta.url));

/** Why the row cannot run here, or undefined. */
function missing(): string | undefined {
  const tools = ['virtnbdbackup', 'libvirtd', 'virtlogd', 'virsh'].filter((t) => findTool(t) === undefined);
  return tools.length === 0 ? undefined : `${tools.join(', ')} not installed (apt-get install -y virtnbdbackup libvirt-daemon-system libvirt-clients)`;
}

async function du(path: string): Promise<number> {
  if (!existsSync(path)) return 0;
  return Number((await run('du', ['-sb', path])).stdout.split(/\s/)[0]);
}

function dataFiles(dir: string): Map<string, number> {
  const out = new Map<string, number>();
  if (!existsSync(dir)) return out;
  for (const f of readdirSync(dir)) if (f.endsWith('.data')) out.set(f, statSync(join(dir, f)).size);
  return out;
}

export async function benchLibvirt(s: LibvirtSetup): Promise<LibvirtResults> {
  const { sizeBytes, reps, log } = s;
  const layout = halfDataLayout(sizeBytes, 21);
  const dirtyClusters = Math.max(1, Math.round((sizeBytes / CLUSTER_BYTES) * 0.01));
  const r: LibvirtResults = {
    status: 'ran',
    sizeBytes,
    dataBytes: layout.dataBytes,
    dirtyBytes: dirtyClusters * CLUSTER_BYTES,
    reps,
    versions: {},
    libvirtd: '',
    samples: { full: { qbackup: [], virtnbdbackup: [] }, incremental: { qbackup: [], virtnbdbackup: [] }, empty: { qbackup: [], virtnbdbackup: [] } },
    load: [loadAverage(), ''],
    startedAt: new Date().toISOString(),
  };
  const why = missing();
  if (why !== undefined) {
    r.status = `skipped: ${why}`;
    log(`  ${r.status}`);
    return r;
  }
  r.versions = {
    virtnbdbackup: await toolVersion('virtnbdbackup', ['-V']),
    libvirt: await toolVersion('libvirtd', ['--version']),
    node: process.version,
  };
  const { dir, remove } = libvirtTestDir();
  const name = testDomainName('bench');
  const daemon = await startLibvirt();
  let client: LibvirtClient | undefined;
  try {
    r.libvirtd = daemon.started ? 'started by the bench, stopped at the end' : 'the running libvirtd';
    client = await LibvirtClient.connect(daemon.uri);
    const image = join(dir, 'sda.qcow2');
    log(`  creating the disk: ${fmtBytes(layout.dataBytes)} of random data on ${fmtBytes(sizeBytes)}`);
    await createRandomImage(image, layout);
    const dom = await client.create(await client.defineXml(testDomainXml(name, [{ target: 'sda', file: image }])));
    const qemuPid = Number(readFileSync(`/run/libvirt/qemu/${name}.pid`, 'utf8').trim());
    const alias = diskAlias(await client.getXmlDesc(dom), 'sda');
    const stateDir = join(dir, 'state');
    const scratch = join(dir, 'vb-scratch');
    const writesDir = join(dir, 'writes');
    mkdirSync(writesDir, { recursive: true, mode: 0o755 });
    const prng = new Prng(31);
    const clusters = Math.floor(sizeBytes / CLUSTER_BYTES);
    const lvClient = client;

    const runTool = async (tool: LvTool, step: LvStep, target: string): Promise<LvSample> => {
      await run('sync', []);
      warmFile(image);
      const before = await du(target);
      const q0 = processCpuMs(qemuPid);
      if (tool === 'qbackup') {
        const res = await qbackupCli(['--state-dir', stateDir, '--connect', daemon.uri, '--json', 'backup', name, '--repo', target]);
        const m = JSON.parse(res.stdout) as Manifest;
        const want = step === 'full' ? 'full' : 'incremental';
        if (m.disks.some((d) => d.level !== want)) throw new Error(`qbackup's ${step} backup of "${name}" was ${m.disks.map((d) => d.level).join(', ')}`);
        return { ms: res.ms, cpuMs: res.cpuMs, qemuCpuMs: processCpuMs(qemuPid) - q0, bytesRead: m.disks.reduce((n, d) => n + d.bytesRead, 0), storedBytes: (await du(target)) - before };
      }
      mkdirSync(scratch, { recursive: true, mode: 0o755 });
      const files0 = dataFiles(target);
      const res = await runWithCpu('virtnbdbackup', ['-d', name, '-l', step === 'full' ? 'full' : 'inc', '-o', target, '-S', scratch, '-n']);
      const read = [...dataFiles(target)].filter(([f]) => !files0.has(f)).reduce((n, [, size]) => n + size, 0);
      return { ms: res.ms, cpuMs: res.cpuMs, qemuCpuMs: processCpuMs(qemuPid) - q0, bytesRead: read, storedBytes: (await du(target)) - before };
    };

    const deleteCheckpoints = async (d: LibvirtDomainRef): Promise<void> => {
      // Leaves first is not needed: libvirt merges a deleted checkpoint's bitmap into its parent or child.
      for (const c of await lvClient.listAllCheckpoints(d)) await lvClient.checkpointDelete(c);
    };

    const guestWrites = async (offsets: readonly number[], files: readonly string[]): Promise<void> => {
      for (let i = 0; i < offsets.length; i++) {
        const out = await lvClient.qemuMonitorCommand(dom, `qemu-io -d ${alias} "write -q -s ${files[i]} ${offsets[i]} ${CLUSTER_BYTES}"`, LIBVIRT.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP);
        if (/error|fail/i.test(out)) throw new Error(`qemu-io write into libvirt domain "${name}" failed: ${out.trim()}`);
      }
    };

    for (let rep = 0; rep < reps; rep++) {
      const offsets = prng.sample(clusters, dirtyClusters).map((c) => c * CLUSTER_BYTES);
      const order = rep % 2 === 0 ? LV_TOOLS : [...LV_TOOLS].reverse();
      for (const tool of order) {
        await deleteCheckpoints(dom);
        const target = join(dir, `${tool}-${rep}`);
        rmSync(target, { recursive: true, force: true });
        const full = await runTool(tool, 'full', target);
        r.samples.full[tool].push(full);
        // Fresh random data for each tool's writes, at the same offsets.
        const files = offsets.map((_, i) => {
          const f = join(writesDir, `${i}.bin`);
          writeFileSync(f, randomFillSync(Buffer.allocUnsafe(CLUSTER_BYTES)), { mode: 0o644 });
          return f;
        });
        await guestWrites(offsets, files);
        const inc = await runTool(tool, 'incremental', target);
        r.samples.incremental[tool].push(inc);
        const empty = await runTool(tool, 'empty', target);
        r.samples.empty[tool].push(empty);
        log(`  rep ${rep + 1}/${reps} ${tool.padEnd(13)} full ${fmtMs(full.ms)} (read ${fmtBytes(full.bytesRead)}, +${fmtBytes(full.storedBytes)}), 1 % ${fmtMs(inc.ms)} (read ${fmtBytes(inc.bytesRead)}, +${fmtBytes(inc.storedBytes)}), nothing dirty ${fmtMs(empty.ms)}`);
        rmSync(target, { recursive: true, force: true });
      }
    }
    await deleteCheckpoints(dom);
  } catch (err) {
    r.status = `failed: ${err instanceof Error ? err.message : String(err)}`;
    log(`  ${r.status}`);
  } finally {
    if (client !== undefined) {
      await removeTestDomain(client, name).catch(() => undefined);
      await client.close();
    }
    await daemon.stop();
    remove();
  }
  r.load[1] = loadAverage();
  return r;
}

const STEP_LABEL: Record<LvStep, string> = { full: 'full', incremental: '1 % incremental', empty: 'incremental, nothing dirty' };

function med(xs: readonly LvSample[], key: keyof LvSample): number {
  return summarize(xs.map((x) => x[key])).median;
}

function range(xs: readonly LvSample[], key: keyof LvSample): string {
  const s = summarize(xs.map((x) => x[key]));
  return `${fmtMs(s.median)} (${fmtMs(s.min)}–${fmtMs(s.max)})`;
}

const ratio = (a: number, b: number, digits = 2): string => (Number.isFinite(a) && Number.isFinite(b) && b > 0 ? `${(a / b).toFixed(digits)}×` : '–');

/** The section of docs/benchmarks.md for these results. */
export function formatLibvirt(r: LibvirtResults, command: string): string {
  const lines: string[] = [];
  lines.push('## 12. libvirt domains: qbackup (libvirt driver) against virtnbdbackup', '');
  lines.push(`\`${command}\` (bench/libvirt.ts, also run by \`npm run bench -- --peers\`), ${r.startedAt}.`);
  if (r.status !== 'ran') {
    lines.push('', `Not measured: ${r.status}`);
    return lines.join('\n');
  }
  lines.push(
    '',
    `One ${fmtBytes(r.sizeBytes)} qcow2 disk with ${fmtBytes(r.dataBytes)} of random data under one libvirt domain (\`type='qemu'\`, software emulation, no guest OS).`,
    'Both tools back up the same domain in turn: qbackup as a user types it (`qbackup backup DOMAIN --repo R --connect qemu:///system`, a new process each time),',
    'virtnbdbackup with `-l full` / `-l inc -n` (uncompressed). Each repetition and tool: every checkpoint of the domain deleted (virtnbdbackup refuses',
    `checkpoints it did not create), a full, ${fmtBytes(r.dirtyBytes)} (1 % of the clusters) written by the guest as random 64 KiB clusters at random places`,
    '(HMP `qemu-io` through libvirt\'s monitor passthrough; the same offsets for both tools), an incremental, then an incremental with nothing dirty.',
    'The tools\' order alternates between repetitions; written data is synced and the image read once before each run.',
    `Median (min–max) of ${r.reps}; ratios are ours ÷ theirs (below 1: qbackup took less time or bytes).`,
    '',
    `Versions: virtnbdbackup ${r.versions['virtnbdbackup'] ?? '?'}; ${r.versions['libvirt'] ?? '?'}; Node.js ${r.versions['node'] ?? '?'}. libvirtd: ${r.libvirtd}.`,
    `Load average (1, 5, 15 min) of the 2-core machine, shared with other work: start ${r.load[0]}, end ${r.load[1]}.`,
    '',
    '| Step | Tool | Time | CPU of the tool | QEMU CPU | Read from the VM | Stored |',
    '|---|---|---|---|---|---|---|',
  );
  for (const step of LV_STEPS) {
    for (const tool of LV_TOOLS) {
      const xs = r.samples[step][tool];
      lines.push(`| ${STEP_LABEL[step]} | ${tool === 'qbackup' ? '**qbackup**' : 'virtnbdbackup'} | ${range(xs, 'ms')} | ${fmtMs(med(xs, 'cpuMs'))} | ${fmtMs(med(xs, 'qemuCpuMs'))} | ${fmtBytes(med(xs, 'bytesRead'))} | ${fmtBytes(med(xs, 'storedBytes'))} |`);
    }
  }
  lines.push('', '| Step | Time ÷ virtnbdbackup\'s | Read ÷ | Stored ÷ | Target |', '|---|---|---|---|---|');
  for (const step of LV_STEPS) {
    const q = r.samples[step].qbackup;
    const v = r.samples[step].virtnbdbackup;
    const t = med(q, 'ms') / med(v, 'ms');
    const met = (ok: boolean): string => (ok ? 'met' : '**not met**');
    const bytes = (field: 'bytesRead' | 'storedBytes'): boolean => med(q, field) <= med(v, field);
    const target =
      step === 'incremental'
        ? `time ≤ 1.0×: ${met(t <= 1)}; read ≤ 1.0×: ${met(bytes('bytesRead'))}; stored ≤ 1.0×: ${met(bytes('storedBytes'))}`
        : step === 'full'
          ? `time ≤ 1.0×: ${met(t <= 1)}`
          : '(report)';
    lines.push(`| ${STEP_LABEL[step]} | ${ratio(med(q, 'ms'), med(v, 'ms'))} | ${ratio(med(q, 'bytesRead'), med(v, 'bytesRead'), 3)} | ${ratio(med(q, 'storedBytes'), med(v, 'storedBytes'), 3)} | ${target} |`);
  }
  return lines.join('\n');
}

function parseSize(v: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([KMG]?)i?B?$/i.exec(v.trim());
  if (m === null) throw new Error(`--size needs a size such as 1G or 512M, got "${v}"`);
  const unit = { '': 1, K: 1024, M: MiB, G: GiB }[(m[2] ?? '').toUpperCase() as '' | 'K' | 'M' | 'G'];
  return Math.round((Number(m[1]) * unit) / MiB) * MiB;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { size: { type: 'string', default: '4G' }, reps: { type: 'string', default: '3' }, doc: { type: 'string' }, 'no-doc': { type: 'boolean', default: false }, json: { type: 'string' } },
    strict: true,
  });
  const sizeBytes = parseSize(values.size ?? '4G');
  const reps = Math.max(1, Math.floor(Number(values.reps)));
  const log = (line: string): void => void process.stdout.write(`${line}\n`);
  log(`libvirt bench: ${fmtBytes(sizeBytes)} disk, ${reps} repetitions; load average ${loadAverage()}`);
  const r = await benchLibvirt({ sizeBytes, reps, log });
  const command = `npm run bench:libvirt -- --size ${values.size ?? '4G'} --reps ${reps}`;
  const section = formatLibvirt(r, command);
  log(section);
  if (values.json !== undefined) writeFileSync(values.json, `${JSON.stringify(r, null, 1)}\n`);
  if (values['no-doc'] !== true) {
    const doc = resolve(values.doc ?? resolve(here, '..', '..', 'docs', 'benchmarks.md'));
    writeFileSync(doc, withSection(readFileSync(doc, 'utf8'), 'libvirt', section));
    log(`wrote ${doc}`);
  }
  if (r.status !== 'ran') process.exitCode = 1;
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((err: unknown) => {
    process.stderr.write(`bench failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exitCode = 1;
  });
}
