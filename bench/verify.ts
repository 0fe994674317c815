// `npm run bench:verify`: `qbackup verify --read-data` against `restic check
// --read-data` on the same data, in one run, interleaved. The disk is the
// repository bench's kind (bench/repository.ts): about half random data
// (incompressible) and a tenth text-like data (compressible), scattered
// between holes. qbackup backs up its domain on a qcow2 of it into a plain
// and an encrypted repository; restic backs up the raw image (`--stdin`, as
// bench/peers.ts runs it). Each repetition then times every method once, in
// an order that rotates between repetitions: qbackup in-process
// (`repository.verify`, worker threads warm) and through the CLI as a user
// types it, on both repositories, and restic. Before each timed run every
// repository's files are read once (untimed), so every tool reads from the
// page cache. CPU is user + system of every thread (the bench process for
// in-process runs, /usr/bin/time for the others); "cores" is CPU ÷ time.
// Every qbackup run must report no problem and every chunk read.
//
// With --baseline-cli PATH (the bin/qbackup of another build) its CLI runs
// too, interleaved, so a change is compared with its predecessor under the
// same load. With --prof DIR, one more untimed CLI run of each repository
// (and of the baseline) runs under `node --cpu-prof` (a profile per
// thread) and the top self-time functions of each busy thread are listed.
//
// Options: --size-gib N (default 2), --reps N (default 3), --baseline-cli
// PATH, --prof DIR, --notes FILE.md (measured by hand, follows the tables),
// --json FILE (keep the results), --from-json FILE (write the section from
// kept results without measuring), --doc FILE | --no-doc. Writes the marked
// section "verify" of docs/benchmarks.md.

import { mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { cliEnv as sharedCliEnv, qbackupCli } from './cli.js';
import { withSection } from './doc-sections.js';
import { BenchEnv, halfDataLayout, warmFile } from './env.js';
import { loadAverage } from './machine.js';
import { Restic, peerMissing } from './peers.js';
import { readProfileDir, type ThreadProfile } from './profile.js';
import { compressibleExtents, writeRawImage } from './repository.js';
import { GiB, MiB, fmtBytes, fmtMs, fmtRatio, now, run, runWithCpu, summarize } from './util.js';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '..', '..');
const PASSWORD = 'qbackup-bench';
const DOMAIN = 'vb';

interface Method {
  name: string;
  run: () => Promise<{ ms: number; cpuMs: number }>;
}

interface Row {
  name: string;
  ms: number[];
  cpuMs: number[];
}

interface Options {
  sizeBytes: number;
  reps: number;
  baseline: string | undefined;
  prof: string | undefined;
  notes: string | undefined;
  json: string | undefined;
  fromJson: string | undefined;
  doc: string | undefined;
}

function parse(): Options {
  const { values } = parseArgs({
    options: { 'size-gib': { type: 'string', default: '2' }, reps: { type: 'string', default: '3' }, 'baseline-cli': { type: 'string' }, prof: { type: 'string' }, notes: { type: 'string' }, json: { type: 'string' }, 'from-json': { type: 'string' }, doc: { type: 'string' }, 'no-doc': { type: 'boolean', default: false } },
    strict: true,
  });
  return {
    sizeBytes: Math.round((Number(values['size-gib']) * GiB) / MiB) * MiB,
    reps: Math.max(1, Math.floor(Number(values.reps))),
    baseline: values['baseline-cli'] !== undefined ? resolve(values['baseline-cli']) : undefined,
    prof: values.prof !== undefined ? resolve(values.prof) : undefined,
    notes: values.notes !== undefined ? readFileSync(resolve(values.notes), 'utf8').trim() : undefined,
    json: values.json !== undefined ? resolve(values.json) : undefined,
    fromJson: values['from-json'] !== undefined ? resolve(values['from-json']) : undefined,
    doc: values['no-doc'] ? undefined : resolve(values.doc ?? join(root, 'docs', 'benchmarks.md')),
  };
}

/** Every file under `dir`, read once: what a timed run reads then comes from the page cache. */
function warmTree(dir: string): number {
  let bytes = 0;
  for (const e of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (!e.isFile()) continue;
    const file = join(e.parentPath, e.name);
    warmFile(file);
    bytes += statSync(file).size;
  }
  return bytes;
}

function cliEnv(stateDir: string, encrypted: boolean): NodeJS.ProcessEnv {
  return sharedCliEnv({ stateDir, password: encrypted ? PASSWORD : undefined });
}

async function main(): Promise<void> {
  const o = parse();
  if (o.fromJson !== undefined) {
    const kept = JSON.parse(readFileSync(o.fromJson, 'utf8')) as ReportInput;
    write({ ...kept, o: { ...kept.o, notes: o.notes, doc: o.doc } });
    return;
  }
  const log = (line: string): void => void process.stdout.write(`${line}\n`);
  const missing = peerMissing('restic');
  if (missing !== undefined) throw new Error(`restic is needed: ${missing}`);
  const loadStart = loadAverage();
  const env = new BenchEnv();
  const rows = new Map<string, Row>();
  const profiles: Array<{ name: string; threads: ThreadProfile[] }> = [];
  let repoBytes: Record<string, number> = {};
  const layout = halfDataLayout(o.sizeBytes, 11);
  const text = compressibleExtents(layout, 0.1, 12);
  const textBytes = text.reduce((n, e) => n + e.length, 0);
  let chunks = 0;
  try {
    const raw = env.path('sda.raw');
    const image = env.path('sda.qcow2');
    log(`verify bench: ${fmtBytes(o.sizeBytes)} disk, ${fmtBytes(layout.dataBytes)} random + ${fmtBytes(textBytes)} text-like data, ${o.reps} repetitions, load ${loadStart}`);
    writeRawImage(raw, layout, text);
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, image]);
    await env.defineAndStart(DOMAIN, [{ target: 'sda', file: image }]);
    const plain = env.path('repo-plain');
    const encrypted = env.path('repo-encrypted');
    const resticRepo = env.path('repo-restic');
    await env.qb.repository.init({ repo: plain });
    await env.qb.repository.init({ repo: encrypted, password: PASSWORD });
    await env.qb.repository.backup(DOMAIN, { repo: plain });
    await env.qb.repository.backup(DOMAIN, { repo: encrypted, password: PASSWORD });
    // The guest is not needed any more; its QEMU would only take CPU from what is measured.
    await env.qb.domains.destroy(DOMAIN);
    const restic = new Restic(resticRepo, env.subdir('restic-cache'));
    await restic.init();
    await restic.backup(raw, 'sda.raw');
    rmSync(raw);
    repoBytes = { 'qbackup plain': warmTree(plain), 'qbackup encrypted': warmTree(encrypted), restic: warmTree(resticRepo) };
    log(`  repositories: ${Object.entries(repoBytes).map(([k, v]) => `${k} ${fmtBytes(v)}`).join(', ')}`);

    const inProcess = (repo: string, password: string | undefined) => async (): Promise<{ ms: number; cpuMs: number }> => {
      const t0 = now();
      const c0 = process.cpuUsage();
      const report = await env.qb.repository.verify(password !== undefined ? { repo, password } : { repo }, { readData: true });
      const c = process.cpuUsage(c0);
      const ms = now() - t0;
      if (report.problems.length > 0 || report.chunksRead !== report.chunksChecked || report.chunksRead === 0) {
        throw new Error(`verify of "${repo}" found problems or read too few chunks: ${JSON.stringify({ ...report, problems: report.problems.slice(0, 3) })}`);
      }
      chunks = report.chunksRead;
      return { ms, cpuMs: (c.user + c.system) / 1000 };
    };
    const stateDir = env.subdir('cli-state');
    const cli = (bin: string, repo: string, isEncrypted: boolean) => async (): Promise<{ ms: number; cpuMs: number }> => {
      const r = await qbackupCli(['verify', '--repo', repo, '--read-data'], { bin, stateDir, password: isEncrypted ? PASSWORD : undefined });
      return { ms: r.ms, cpuMs: r.cpuMs };
    };
    const ours = join(root, 'bin', 'qbackup');
    const methods: Method[] = [
      { name: 'qbackup in-process, plain', run: inProcess(plain, undefined) },
      { name: 'qbackup in-process, encrypted', run: inProcess(encrypted, PASSWORD) },
      { name: 'qbackup CLI, plain', run: cli(ours, plain, false) },
      { name: 'qbackup CLI, encrypted', run: cli(ours, encrypted, true) },
      ...(o.baseline !== undefined
        ? [
            { name: 'baseline CLI, plain', run: cli(o.baseline, plain, false) },
            { name: 'baseline CLI, encrypted', run: cli(o.baseline, encrypted, true) },
          ]
        : []),
      { name: 'restic `check --read-data`', run: () => restic.check(true) },
    ];
    for (const m of methods) rows.set(m.name, { name: m.name, ms: [], cpuMs: [] });
    // One untimed run of each first: workers started, code compiled, caches as a user's second run finds them.
    for (const m of methods) await m.run();
    for (let rep = 0; rep < o.reps; rep++) {
      const order = methods.map((_, i) => methods[(i + rep) % methods.length] as Method);
      const line: string[] = [];
      for (const m of order) {
        for (const dir of [plain, encrypted, resticRepo]) warmTree(dir);
        const r = await m.run();
        const row = rows.get(m.name) as Row;
        row.ms.push(r.ms);
        row.cpuMs.push(r.cpuMs);
        line.push(`${m.name} ${fmtMs(r.ms)} (cpu ${fmtMs(r.cpuMs)})`);
      }
      log(`  rep ${rep + 1}: ${line.join(', ')}`);
    }
    if (o.prof !== undefined) {
      const bins = [{ label: 'qbackup', bin: ours }, ...(o.baseline !== undefined ? [{ label: 'baseline', bin: o.baseline }] : [])];
      for (const { label, bin } of bins) {
        for (const [kind, repo, isEncrypted] of [['plain', plain, false], ['encrypted', encrypted, true]] as const) {
          const dir = join(o.prof, `${label}-${kind}`);
          rmSync(dir, { recursive: true, force: true });
          mkdirSync(dir, { recursive: true });
          await run(process.execPath, ['--cpu-prof', '--cpu-prof-dir', dir, bin, 'verify', '--repo', repo, '--read-data'], { env: cliEnv(stateDir, isEncrypted) });
          profiles.push({ name: `${label} CLI, ${kind}`, threads: readProfileDir(dir, 6) });
        }
      }
    }
  } finally {
    await env.cleanup();
  }
  const loadEnd = loadAverage();
  const input: ReportInput = { o, at: new Date().toISOString(), rows: [...rows.values()], profiles, repoBytes, dataBytes: layout.dataBytes, textBytes, chunks, loadStart, loadEnd, restic: await Restic.version() };
  if (o.json !== undefined) writeFileSync(o.json, `${JSON.stringify(input, null, 1)}\n`);
  write(input);
}

function write(input: ReportInput): void {
  const section = report(input);
  process.stdout.write(`${section}\n`);
  if (input.o.doc !== undefined) {
    writeFileSync(input.o.doc, withSection(readFileSync(input.o.doc, 'utf8'), 'verify', section));
    process.stdout.write(`wrote ${input.o.doc}\n`);
  }
}

interface ReportInput {
  o: Options;
  at: string;
  rows: Row[];
  profiles: Array<{ name: string; threads: ThreadProfile[] }>;
  repoBytes: Record<string, number>;
  dataBytes: number;
  textBytes: number;
  chunks: number;
  loadStart: string;
  loadEnd: string;
  restic: string;
}

function report(r: ReportInput): string {
  const med = (xs: readonly number[]): number => summarize(xs).median;
  const resticRow = r.rows.find((x) => x.name.startsWith('restic'));
  const resticMs = resticRow !== undefined ? med(resticRow.ms) : Number.NaN;
  const resticCpuMs = resticRow !== undefined ? med(resticRow.cpuMs) : Number.NaN;
  const pairedRatio = (x: Row): number => med(x.ms.map((ms, i) => ms / (resticRow?.ms[i] ?? Number.NaN)));
  const range = (xs: readonly number[]): string => `${fmtMs(med(xs))} (${fmtMs(Math.min(...xs))}–${fmtMs(Math.max(...xs))})`;
  const lines = [
    '## 16. verify --read-data against restic check --read-data',
    '',
    `\`node dist/bench/verify.js --size-gib ${r.o.sizeBytes / GiB} --reps ${r.o.reps}${r.o.baseline !== undefined ? ' --baseline-cli …' : ''}${r.o.prof !== undefined ? ' --prof …' : ''}\` (bench/verify.ts), ${r.at}, Node.js ${process.version}, ${r.restic}; load average ${r.loadStart} → ${r.loadEnd}.`,
    '',
    `A ${fmtBytes(r.o.sizeBytes)} disk with ${fmtBytes(r.dataBytes)} of random and ${fmtBytes(r.textBytes)} of text-like data between holes, backed up once by`,
    `qbackup into a plain and an encrypted repository (${r.chunks} chunks) and by restic (\`backup --stdin\` of the raw image). Repository sizes:`,
    `${Object.entries(r.repoBytes).map(([k, v]) => `${k} ${fmtBytes(v)}`).join(', ')}. Every method ran once untimed, then ${r.o.reps} times interleaved`,
    '(the order rotating), each time after every repository was read into the page cache; medians (min–max). CPU is user + system of all',
    'threads; "cores" is CPU ÷ time. Every qbackup run reported no problem and read every chunk.',
    '',
    '| Method | Time | CPU | Cores | Time ÷ restic | Same repetition: time ÷ restic | CPU ÷ restic |',
    '|---|---|---|---|---|---|---|',
    ...r.rows.map((x) => `| ${x.name} | ${range(x.ms)} | ${fmtMs(med(x.cpuMs))} | ${(med(x.cpuMs) / med(x.ms)).toFixed(2)} | ${fmtRatio(med(x.ms) / resticMs)} | ${fmtRatio(pairedRatio(x))} | ${fmtRatio(med(x.cpuMs) / resticCpuMs)} |`),
    '',
    '"Same repetition": the median over the repetitions of the method\'s time ÷ restic\'s in that repetition (the two ran',
    'close together, so they saw a more similar load than runs far apart).',
    '',
    '| Target | Goal | This run |  |',
    '|---|---|---|---|',
  ];
  for (const name of ['qbackup CLI, plain', 'qbackup CLI, encrypted', 'qbackup in-process, plain', 'qbackup in-process, encrypted']) {
    const row = r.rows.find((x) => x.name === name);
    if (row === undefined) continue;
    const ratio = med(row.ms) / resticMs;
    lines.push(`| ${name} vs restic \`check --read-data\` (medians; same repetition) | ≤ 0.8× | ${fmtRatio(ratio)} (${fmtMs(med(row.ms))} vs ${fmtMs(resticMs)}); ${fmtRatio(pairedRatio(row))} | ${ratio <= 0.8 ? 'met' : '**not met**'} |`);
  }
  if (r.profiles.length > 0) {
    lines.push('', 'Profiles (`node --cpu-prof`, one untimed CLI run each): busy time and top self-time functions (share of all of the thread\'s samples, idle included) of each thread busy more than 50 ms.', '');
    for (const p of r.profiles) {
      const threads = p.threads.filter((t) => t.busyMs > 50);
      // node names each thread's file CPU.<date>.<time>.<pid>.<thread>.<seq>.cpuprofile; thread 0 is the main thread.
      const label = (t: ThreadProfile): string => (t.file.split('.')[4] === '0' ? 'main thread' : 'worker');
      lines.push(`- ${p.name}: ${threads.map((t) => `${label(t)} ${fmtMs(t.busyMs)} busy: ${t.hot.filter((h) => h.name !== '(idle)').map((h) => `\`${h.name}\` ${h.pct.toFixed(0)} %`).join(', ')}`).join('; ')}`);
    }
  }
  if (r.o.notes !== undefined) lines.push('', r.o.notes);
  return lines.join('\n');
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exitCode = 1;
});
