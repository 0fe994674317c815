// `npm run bench:chunks`: the chunk path alone (a full backup, restores to
// raw and qcow2, `verify --read-data`), in-process, with the floors measured
// in the same run on the same image: `nbdcopy` of the image through qemu-nbd
// to null (what reading the data costs) and `qemu-img convert` of the image
// to qcow2 and raw (what writing it out costs). Each run is saved as JSON
// under a label; `--report A.json,B.json` writes the comparison of saved runs
// as the marked section "chunks" of docs/benchmarks.md. Ratios against the
// floors of the same run are what to compare between runs on a shared,
// noisy machine; absolute times drift with the load.
//
// With --prof, each step is also profiled (the main thread, through the
// inspector) and the top self-time functions are kept in the JSON.
//
// With --drop-caches (root only), the page cache is emptied (`sync`, then
// `echo 3 > /proc/sys/vm/drop_caches`) before each timed step, as on a host
// whose memory other work has used since: buffered writes then pay for
// finding pages, which they do not when recently freed cache is reused.
//
// Options: --size-gib N (default 1), --reps N (default 2), --label NAME,
// --json FILE, --prof, --drop-caches, --report FILE,FILE… [--notes FILE.md] [--doc FILE]
// (the notes, measured by hand, follow the generated table).

import { execFileSync } from 'node:child_process';
import { readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { Session, type Profiler } from 'node:inspector';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { withSection } from './doc-sections.js';
import { BenchEnv, createRandomImage, halfDataLayout, warmFile } from './env.js';
import { loadAverage } from './machine.js';
import { hotFunctions, type HotFunction } from './profile.js';
import { GiB, MiB, fmtMs, now, run, summarize } from './util.js';

const STEPS = ['full', 'restoreRaw', 'restoreQcow2', 'verify', 'nbdcopyNull', 'convertQcow2', 'convertRaw'] as const;
type Step = (typeof STEPS)[number];

interface ChunkBenchResult {
  label: string;
  startedAt: string;
  sizeBytes: number;
  dataBytes: number;
  reps: number;
  loadStart: string;
  loadEnd: string;
  ms: Record<Step, number[]>;
  /** The page cache was dropped before each timed step. */
  dropCaches?: boolean;
  /** CPU (user + system, every thread of this process) of each in-process step, ms. */
  cpuMs?: Partial<Record<Step, number[]>>;
  profiles: Partial<Record<Step, HotFunction[]>>;
}

function parse(): { sizeBytes: number; reps: number; label: string; json: string | undefined; prof: boolean; dropCaches: boolean; report: string[] | undefined; notes: string | undefined; doc: string } {
  const { values } = parseArgs({
    options: {
      'size-gib': { type: 'string' },
      reps: { type: 'string' },
      label: { type: 'string' },
      json: { type: 'string' },
      prof: { type: 'boolean', default: false },
      'drop-caches': { type: 'boolean', default: false },
      report: { type: 'string' },
      notes: { type: 'string' },
      doc: { type: 'string' },
    },
    strict: true,
  });
  const here = dirname(fileURLToPath(import.meta.url));
  return {
    sizeBytes: Math.round((Number(values['size-gib'] ?? '1') * GiB) / MiB) * MiB,
    reps: Number(values.reps ?? '2'),
    label: values.label ?? 'run',
    json: values.json,
    prof: values.prof === true,
    dropCaches: values['drop-caches'] === true,
    report: values.report?.split(','),
    notes: values.notes,
    doc: resolve(values.doc ?? resolve(here, '..', '..', 'docs', 'benchmarks.md')),
  };
}

/** Runs `fn`, profiling the main thread when `session` is given; returns the top self-time functions. */
async function profiled(session: Session | undefined, fn: () => Promise<unknown>): Promise<{ ms: number; cpuMs: number; hot: HotFunction[] | undefined }> {
  const post = <T>(method: string, params?: object): Promise<T> =>
    new Promise((res, rej) => session?.post(method, params ?? {}, (err, r) => (err !== null ? rej(err) : res(r as T))));
  if (session !== undefined) {
    await post('Profiler.enable');
    await post('Profiler.setSamplingInterval', { interval: 500 });
    await post('Profiler.start');
  }
  const t0 = now();
  const c0 = process.cpuUsage();
  await fn();
  const ms = now() - t0;
  const c = process.cpuUsage(c0);
  const cpuMs = (c.user + c.system) / 1000;
  if (session === undefined) return { ms, cpuMs, hot: undefined };
  const { profile } = await post<{ profile: Profiler.Profile }>('Profiler.stop');
  return { ms, cpuMs, hot: hotFunctions(profile) };
}

/** Writes back and empties the page cache (needs root). */
function dropCaches(): void {
  execFileSync('sync');
  writeFileSync('/proc/sys/vm/drop_caches', '3\n');
}

async function measure(o: ReturnType<typeof parse>): Promise<ChunkBenchResult> {
  if (o.dropCaches && process.getuid?.() !== 0) throw new Error('--drop-caches needs root (it writes /proc/sys/vm/drop_caches)');
  const log = (line: string): void => void process.stdout.write(`${line}\n`);
  const env = new BenchEnv();
  const session = o.prof ? new Session() : undefined;
  session?.connect();
  const result: ChunkBenchResult = {
    label: o.label, startedAt: new Date().toISOString(), sizeBytes: o.sizeBytes, dataBytes: 0, reps: o.reps, dropCaches: o.dropCaches, loadStart: loadAverage(), loadEnd: '',
    ms: Object.fromEntries(STEPS.map((s) => [s, []])) as unknown as Record<Step, number[]>, cpuMs: {}, profiles: {},
  };
  try {
    const layout = halfDataLayout(o.sizeBytes, 7);
    result.dataBytes = layout.dataBytes;
    const source = env.path('sda.qcow2');
    log(`chunks bench "${o.label}": ${o.sizeBytes / GiB} GiB disk, ${(layout.dataBytes / MiB).toFixed(0)} MiB random data, ${o.reps} repetitions, load ${result.loadStart}`);
    await createRandomImage(source, layout);
    await env.defineAndStart('bench', [{ target: 'sda', file: source }]);
    const repo = env.path('repo');
    const out = env.subdir('out');
    for (let rep = 0; rep < o.reps; rep++) {
      const prof = rep === 0 ? session : undefined;
      const cold = (): void => {
        if (o.dropCaches) dropCaches();
      };
      const keep = (step: Step, r: { ms: number; cpuMs: number; hot: HotFunction[] | undefined }): void => {
        result.ms[step].push(r.ms);
        const cpu = (result.cpuMs ??= {});
        (cpu[step] ??= []).push(r.cpuMs);
        if (r.hot !== undefined) result.profiles[step] = r.hot;
      };
      rmSync(repo, { recursive: true, force: true });
      cold();
      // The disk is read from memory, as before: the steps differ in what they write.
      warmFile(source);
      keep('full', await profiled(prof, () => env.qb.repository.backup('bench', { repo })));
      cold();
      keep('restoreRaw', await profiled(prof, () => env.qb.repository.restore('bench', { repo, to: join(out, 'raw'), format: 'raw' })));
      cold();
      keep('restoreQcow2', await profiled(prof, () => env.qb.repository.restore('bench', { repo, to: join(out, 'qcow2'), format: 'qcow2' })));
      cold();
      keep('verify', await profiled(prof, () => env.qb.repository.verify({ repo }, { readData: true })));
      cold();
      warmFile(source);
      keep('nbdcopyNull', await profiled(undefined, () => run('nbdcopy', ['--', '[', 'qemu-nbd', '-r', '--image-opts', `driver=qcow2,file.driver=file,file.filename=${source},file.locking=off`, ']', 'null:'])));
      cold();
      warmFile(source);
      keep('convertQcow2', await profiled(undefined, () => run('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'qcow2', source, join(out, 'floor.qcow2')])));
      cold();
      warmFile(source);
      keep('convertRaw', await profiled(undefined, () => run('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', source, join(out, 'floor.raw')])));
      // Correctness, untimed: both restores hold the disk's bytes.
      execFileSync('cmp', [join(out, 'raw', 'sda.raw'), join(out, 'floor.raw')]);
      execFileSync('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'raw', join(out, 'qcow2', 'sda.qcow2'), join(out, 'floor.raw')]);
      log(`  rep ${rep + 1}: ${STEPS.map((s) => `${s} ${fmtMs(result.ms[s].at(-1) ?? NaN)} (cpu ${fmtMs(result.cpuMs?.[s]?.at(-1) ?? NaN)})`).join(', ')}; restored bytes equal the disk's (raw ${statSync(join(out, 'raw', 'sda.raw')).size} B)`);
      rmSync(out, { recursive: true, force: true });
      env.subdir('out');
    }
  } finally {
    session?.disconnect();
    await env.cleanup();
  }
  result.loadEnd = loadAverage();
  return result;
}

/** Runs with the same label (interleaved with others) as one: their samples together, the first profile, the loads of each. */
function mergeByLabel(runs: readonly ChunkBenchResult[]): ChunkBenchResult[] {
  const out: ChunkBenchResult[] = [];
  for (const r of runs) {
    const m = out.find((x) => x.label === r.label);
    if (m === undefined) {
      const cpuMs: Partial<Record<Step, number[]>> = {};
      for (const s of STEPS) if (r.cpuMs?.[s] !== undefined) cpuMs[s] = [...(r.cpuMs[s] ?? [])];
      out.push({ ...r, ms: Object.fromEntries(STEPS.map((s) => [s, [...r.ms[s]]])) as unknown as Record<Step, number[]>, cpuMs, profiles: { ...r.profiles } });
      continue;
    }
    for (const s of STEPS) m.ms[s].push(...r.ms[s]);
    for (const s of STEPS) if (r.cpuMs?.[s] !== undefined) ((m.cpuMs ??= {})[s] ??= []).push(...(r.cpuMs[s] ?? []));
    for (const s of STEPS) {
      const hot = r.profiles[s];
      if (m.profiles[s] === undefined && hot !== undefined) m.profiles[s] = hot;
    }
    m.reps += r.reps;
    m.loadStart = `${m.loadStart}; ${r.loadStart}`;
  }
  return out;
}

function median(xs: readonly number[]): number {
  return summarize(xs).median;
}

/** The comparison of saved runs, as markdown. */
export function formatChunksReport(runs: readonly ChunkBenchResult[]): string {
  const lines: string[] = [];
  const first = runs[0];
  lines.push('## 11. The chunk path: full backup, restore and verify against the floors');
  lines.push('');
  lines.push(
    `\`npm run bench:chunks\` (bench/chunks.ts), in-process, ${first !== undefined ? `${first.sizeBytes / GiB} GiB disk with ${(first.dataBytes / MiB).toFixed(0)} MiB of random data` : ''}, ` +
      'medians of the repetitions. Measured on a shared 2-core machine with other work running (load averages below): absolute times are noisy, ' +
      'so compare the ratios to the floors measured in the same run: `nbdcopy` of the image through `qemu-nbd` to `null:` for the backup, ' +
      '`qemu-img convert` of the image to qcow2 / raw for the restores. Every restore was compared byte for byte with the disk.',
  );
  lines.push('');
  lines.push(`| step | ${runs.map((r) => `${r.label} (${r.reps} runs)`).join(' | ')} |`);
  lines.push(`|---|${runs.map(() => '---|').join('')}`);
  const row = (name: string, step: Step, floor: Step | undefined): void => {
    lines.push(`| ${name} | ${runs.map((r) => `${fmtMs(median(r.ms[step]))}${floor !== undefined ? ` (${(median(r.ms[step]) / median(r.ms[floor])).toFixed(1)}× floor)` : ''}`).join(' | ')} |`);
  };
  row('full backup', 'full', 'nbdcopyNull');
  row('restore raw', 'restoreRaw', 'convertRaw');
  row('restore qcow2', 'restoreQcow2', 'convertQcow2');
  row('verify --read-data', 'verify', undefined);
  const cpuRow = (name: string, step: Step): void => {
    lines.push(`| ${name} | ${runs.map((r) => (r.cpuMs?.[step] !== undefined ? fmtMs(median(r.cpuMs[step] ?? [])) : '–')).join(' | ')} |`);
  };
  cpuRow('CPU of qbackup, full backup', 'full');
  cpuRow('CPU of qbackup, restore raw', 'restoreRaw');
  cpuRow('CPU of qbackup, restore qcow2', 'restoreQcow2');
  cpuRow('CPU of qbackup, verify --read-data', 'verify');
  row('floor: nbdcopy → null', 'nbdcopyNull', undefined);
  row('floor: qemu-img convert → qcow2', 'convertQcow2', undefined);
  row('floor: qemu-img convert → raw', 'convertRaw', undefined);
  lines.push('');
  for (const r of runs) lines.push(`Load averages (1, 5, 15 min) at the start of each "${r.label}" run: ${r.loadStart}.`);
  for (const r of runs) {
    const steps = (['full', 'restoreRaw', 'restoreQcow2', 'verify'] as const).filter((s) => r.profiles[s] !== undefined);
    if (steps.length === 0) continue;
    lines.push('');
    lines.push(`Top self-time functions of the main thread, "${r.label}" (first repetition, sampled through the inspector; worker threads not included):`);
    lines.push('');
    for (const s of steps) {
      lines.push(`- ${s}: ${(r.profiles[s] ?? []).map((h) => `\`${h.name}\`${h.where !== '' ? ` (${h.where})` : ''} ${h.pct.toFixed(0)} %`).join(', ')}`);
    }
  }
  return lines.join('\n');
}

async function main(): Promise<void> {
  const o = parse();
  if (o.report !== undefined) {
    const runs = mergeByLabel(o.report.map((f) => JSON.parse(readFileSync(resolve(f), 'utf8')) as ChunkBenchResult));
    const notes = o.notes !== undefined ? `\n\n${readFileSync(resolve(o.notes), 'utf8').trim()}` : '';
    const text = `${formatChunksReport(runs)}${notes}`;
    writeFileSync(o.doc, withSection(readFileSync(o.doc, 'utf8'), 'chunks', text));
    process.stdout.write(`${text}\n\nwrote ${o.doc}\n`);
    return;
  }
  const r = await measure(o);
  if (o.json !== undefined) writeFileSync(o.json, `${JSON.stringify(r, null, 1)}\n`);
  for (const s of STEPS) process.stdout.write(`${s}: ${fmtMs(median(r.ms[s]))}\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exitCode = 1;
});
