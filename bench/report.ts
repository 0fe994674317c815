// Turns the measurements into the console summary and docs/benchmarks.md:
// medians with min–max, throughput, ratios against QEMU's tools, and each
// target with whether this run met it. The prose on what limits us is kept
// next to the numbers it explains; numbers in it come from the run.

import type { ControlResults, Timing } from './control.js';
import type { FullResults, Measured } from './full.js';
import type { IncrementalCase } from './incremental.js';
import type { MachineInfo } from './machine.js';
import type { RepoResults } from './repository.js';
import type { LibvirtResults } from './libvirt.js';
import { markedSection } from './doc-sections.js';
import { repoAnalysis, repoSection, repoSummary, repoTargets } from './report-repository.js';
import { fmtBytes, fmtMs, fmtPct, fmtRatio, fmtSummaryMs, GiB, mibPerSec, summarize } from './util.js';
import { WRITE_CONFIGS, type WriteConfig, type WriteResults, type WriteSamples } from './writes.js';

export interface BenchConfig {
  quick: boolean;
  /** The repository section also runs virtnbdbackup and restic. */
  peers: boolean;
  sizeBytes: number;
  reps: number;
  chainLength: number;
  controlSamples: number;
  writeDiskBytes: number;
  smallWrites: number;
  benchWrites: number;
  argv: string[];
}

export interface BenchResults {
  config: BenchConfig;
  machine: MachineInfo;
  layout: { sizeBytes: number; dataBytes: number; extents: number };
  startedAt: string;
  durationMs: number;
  loadStart: string;
  loadEnd: string;
  full?: FullResults;
  incremental?: IncrementalCase[];
  repository?: RepoResults;
  /** §12, with --peers: the libvirt row (bench/libvirt.ts). */
  libvirt?: LibvirtResults;
  control?: ControlResults;
  writes?: WriteResults;
}

const med = (values: readonly number[]): number => summarize(values).median;

/** Throughput ratio of `ours` against `theirs` for the same bytes: > 1 means we are faster. */
const speedRatio = (ours: readonly number[], theirs: readonly number[]): number => med(theirs) / med(ours);

function cell(values: readonly number[]): string {
  return fmtSummaryMs(summarize(values));
}

function rate(bytes: number, values: readonly number[]): string {
  return `${mibPerSec(bytes, med(values)).toFixed(0)} MiB/s`;
}

function verdict(ok: boolean): string {
  return ok ? 'met' : '**not met**';
}

interface Headline {
  what: string;
  target: string;
  measured: string;
  ok: boolean | undefined;
}

function headlines(r: BenchResults): Headline[] {
  const out: Headline[] = [];
  const f = r.full;
  if (f !== undefined) {
    const push = speedRatio(f.push.ms, f.convert.ms);
    out.push({ what: 'Full push vs `qemu-img convert -O qcow2`', target: '≥ 0.9×', measured: fmtRatio(push), ok: push >= 0.9 });
    out.push({
      what: 'Full push vs `qemu-img convert -t writeback` (flushes, as the backup does)',
      target: '(≥ 0.9×)',
      measured: fmtRatio(speedRatio(f.push.ms, f.convertWriteback.ms)),
      ok: undefined,
    });
    const pull = speedRatio(f.pull.ms, f.nbdcopy.ms);
    out.push({ what: 'Full pull (our NBD client) vs nbdcopy, same export, same qemu-nbd target', target: '≥ 0.8×', measured: fmtRatio(pull), ok: pull >= 0.8 });
  }
  const inc = r.incremental;
  if (inc !== undefined && f !== undefined) {
    for (const c of inc.filter((x) => x.fraction === 0.01)) {
      const share = med(c.pushMs) / med(f.push.ms);
      out.push({ what: `Incremental push, 1 % ${c.pattern}, time vs full push`, target: '≤ 5 %', measured: fmtPct(share), ok: share <= 0.05 });
    }
  }
  const ctl = r.control;
  if (ctl !== undefined) {
    const create = med(ctl.createLate.wallMs);
    const cov = med(ctl.coverageLong.wallMs);
    out.push({ what: `Checkpoint create on a chain of ${ctl.chainLength} (median)`, target: '≤ 20 ms', measured: fmtMs(create), ok: create <= 20 });
    out.push({ what: `Coverage over a chain of ${ctl.chainLength} (median)`, target: '≤ 20 ms', measured: fmtMs(cov), ok: cov <= 20 });
  }
  const rep = r.repository;
  if (rep !== undefined) {
    for (const t of repoTargets(rep)) out.push({ what: `§5 ${t.what}${t.target.startsWith('≤') && t.what.includes(' vs ') && !t.what.includes('CPU') ? ' (time ratio)' : ''}`, target: t.target, measured: t.measured, ok: t.ok });
    if (rep.cli !== undefined) {
      // The time targets: the bytes and growth rows are the in-process ones again.
      for (const t of repoTargets(rep, rep.cli).filter((x) => x.what.includes(' vs '))) out.push({ what: `§5 as a user runs it (CLI, caches dropped): ${t.what}${t.target.startsWith('≤') && t.what.includes(' vs ') && !t.what.includes('CPU') ? ' (time ratio)' : ''}`, target: t.target, measured: t.measured, ok: t.ok });
    }
  }
  return out;
}

export function printSummary(r: BenchResults, log: (line: string) => void): void {
  log('');
  log('== summary (median (min–max); ratios are throughput, > 1 = qbackup faster) ==');
  for (const h of headlines(r)) {
    log(`${h.what}: ${h.measured}  [target ${h.target}${h.ok === undefined ? '' : h.ok ? ', met' : ', NOT met'}]`);
  }
  const f = r.full;
  if (f !== undefined) {
    log(`full: push ${cell(f.push.ms)}, qemu-img convert ${cell(f.convert.ms)}, convert -t writeback ${cell(f.convertWriteback.ms)}`);
    log(`      pull ${cell(f.pull.ms)}, nbdcopy→qemu-nbd ${cell(f.nbdcopy.ms)}, nbdcopy→raw ${cell(f.nbdcopyRaw.ms)}`);
  }
  for (const c of r.incremental ?? []) {
    log(`incremental ${c.pattern} ${(c.fraction * 100).toString()} %: push ${cell(c.pushMs)} (${fmtBytes(med(c.pushJobBytes))}), pull ${cell(c.pullMs)} (copy ${cell(c.pullCopyMs)})`);
  }
  const ctl = r.control;
  if (ctl !== undefined) {
    log(`control: create@1 ${cell(ctl.createEarly.wallMs)}, create@${ctl.chainLength} ${cell(ctl.createLate.wallMs)}, coverage@${ctl.chainLength} ${cell(ctl.coverageLong.wallMs)}, delete ${cell(ctl.deleteMiddle.wallMs)}, list ${cell(ctl.list.wallMs)}`);
    log(`         begin→job ${cell(ctl.beginJob.wallMs)}, begin→first byte ${cell(ctl.beginFirstByteMs)}, CLI --help ${cell(ctl.cliHelpMs)}, CLI list ${cell(ctl.cliListMs)}, node -e 0 ${cell(ctl.nodeBareMs)}`);
  }
  const w = r.writes;
  if (w !== undefined) {
    log(`writes (${w.smallWrites} × 4 KiB via HMP): ${WRITE_CONFIGS.map((c) => `${c} ${cell(w.small[c].wallMs)}`).join(', ')}`);
    log(`qemu-img bench (${w.benchWrites} × 4 KiB): ${WRITE_CONFIGS.map((c) => `${c} ${cell(w.offline[c].wallMs)}`).join(', ')}`);
  }
  if (r.repository !== undefined) repoSummary(r.repository, log);
  log(`load average: start ${r.loadStart}, end ${r.loadEnd}; ${(r.durationMs / 60000).toFixed(1)} min`);
}

// ---- docs/benchmarks.md ----------------------------------------------------------

function table(header: readonly string[], rows: ReadonlyArray<readonly string[]>): string {
  const lines = [`| ${header.join(' | ')} |`, `|${header.map(() => '---').join('|')}|`];
  for (const row of rows) lines.push(`| ${row.join(' | ')} |`);
  return lines.join('\n');
}

function timingRow(name: string, t: Timing): string[] {
  return [name, cell(t.wallMs), cell(t.cpuMs)];
}

function perWriteUs(samples: WriteSamples, writes: number, which: 'wallMs' | 'qemuCpuMs'): string {
  const values = samples[which];
  if (values.length === 0) return '–';
  const s = summarize(values.map((v) => (v * 1000) / writes));
  return `${s.median.toFixed(1)} (${s.min.toFixed(1)}–${s.max.toFixed(1)})`;
}

export function formatReport(r: BenchResults): string {
  const c = r.config;
  const m = r.machine;
  const parts: string[] = [];
  const size = `${c.sizeBytes / GiB} GiB`;
  parts.push(`# Benchmarks

Measured by \`npm run bench\` (\`bench/\`): qbackup against QEMU's own tools
and (§5, the repository) against virtnbdbackup and restic, on the same data, in
the same run. Every number is a median with the range (min–max) of ${c.reps}
repetitions unless a row says otherwise; ratios in §1–§4 are throughput ratios
(time of the other tool ÷ our time, so > 1 means qbackup is faster), in §5
time ratios as its targets are written (our time ÷ theirs, so < 1 means
qbackup is faster). Nothing here is a pass/fail test: the targets say what we
aim for, and the last section says what limits us where we fall short.

${c.quick ? '**This is a quick run (`--quick`): small disk, short chain, few repetitions. Do not quote it.**\n\n' : ''}Run: \`npm run bench${c.argv.length > 0 ? ` -- ${c.argv.join(' ')}` : ''}\` at ${r.startedAt}, ${(r.durationMs / 60000).toFixed(1)} minutes.

## Machine

| | |
|---|---|
| CPUs (\`nproc\`) | ${m.nproc} |
| CPU model | ${m.cpuModel} |
| Memory | ${m.memoryGiB} GiB |
| Kernel | ${m.kernel} |
| QEMU | ${m.qemu} |
| Accelerator | ${m.accel} |
| Tools | ${m.qemuImg}; ${m.nbdcopy}; Node.js ${m.node} |
| Files | ${m.tmpFilesystem} |
| Load average (1, 5, 15 min) | start ${r.loadStart}, end ${r.loadEnd} |
| Memory reclaim | ${m.reclaim ?? 'none found'} |

The machine is shared: other work ran during the measurements (see the load
average), so single numbers move by tens of percent between runs; the methods
of each comparison run in turn within each repetition, so load hits them
alike. Before each timed run, written data is synced and the inputs are read
once (both untimed), so every method starts with its input in the page cache${m.reclaim !== undefined ? ` (this kernel reclaims idle page cache, so inputs are read right before each run, not once)` : ''}.
Writing into memory the machine has not used for a while is slow here
(probably the VM giving freed memory back to its host): the same
\`qemu-img convert\` of a 4 GiB chain took 4.9 s and then 0.56 s when run twice
in a row while developing the bench. Write-heavy runs that follow other work
(§5) show it; the methods being compared pay it alike.

## How to run

\`\`\`sh
npm run bench -- --peers             # the run below: --size-gib 4 --reps 3, chain of 1000, with the peers of §5
npm run bench -- --peers --only repository   # §5 alone (both methods), written between its markers in the document
npm run bench                        # the same without virtnbdbackup and restic ("skipped: …" in §5)
npm run bench -- --quick             # small and fast, for development
npm run bench -- --size-gib 8 --reps 5 --only full,incremental --no-doc
npm run bench:s3 -- --size-mib 1024 --reps 2   # §10: qbackup and restic into a local radosgw (scripts/ceph.sh)
npm run bench:libvirt -- --size 1G --reps 3   # §12 alone: qbackup's libvirt driver vs virtnbdbackup on one libvirt domain (also run by --peers)
node dist/bench/empty-incremental.js --size-mib 1024 --reps 8   # §13: an empty incremental with and without the index cache; CLI start-up
npm run bench:verify -- --size-gib 2 --reps 5   # §16: verify --read-data against restic check --read-data (--baseline-cli OTHER/bin/qbackup to compare builds)
\`\`\`

Options: \`--size-gib N\`, \`--reps N\`, \`--quick\`, \`--chain N\`,
\`--only full,incremental,repository,control,writes,libvirt\`, \`--peers\`, \`--doc FILE\`, \`--no-doc\`,
\`--method inprocess|cli|both\` (§5: qbackup's library in the bench's process with warm caches, its command
line as a user types it with the page cache dropped before every tool's timed step, or both in one run; default
\`both\` with \`--peers\`, else \`inprocess\`), \`--no-drop-caches\` (the cli method warms inputs instead; dropping
needs root, and §5 says when it was not possible),
\`--json FILE\` (keep the raw results), \`--from-json FILE\` (rewrite the doc from
them without measuring). Needs \`/usr/bin/time\` for the tools' CPU columns.
The bench stops every QEMU and qemu-nbd it starts (by pid) and removes its
temporary directory.

\`--peers\` needs the peers installed (\`apt-get install -y virtnbdbackup
libvirt-daemon-system restic\`; only the bench needs them, never the tests or
CI). The bench then starts \`virtlogd\` and \`libvirtd\` as its own child
processes (or uses a libvirtd that already runs), defines a libvirt domain
\`qbbench-PID\` on a copy of the disk, and at the end removes the domain and
stops the daemons it started by their pids. A peer that is missing or cannot
run is reported as "skipped: …" and the rest runs.

## Headlines

${table(
  ['What', 'Target', 'This run', ''],
  headlines(r).map((h) => [h.what, h.target, h.measured, h.ok === undefined ? '' : verdict(h.ok)]),
)}
`);

  const f = r.full;
  if (f !== undefined) {
    const d = r.layout;
    const row = (name: string, m: Measured, ours: Measured): string[] => [
      name,
      cell(m.ms),
      rate(c.sizeBytes, m.ms),
      m.cpuMs.some((x) => Number.isFinite(x)) ? cell(m.cpuMs) : '–',
      fmtRatio(speedRatio(ours.ms, m.ms)),
    ];
    const rows: string[][] = [
      row('**qbackup push**: `backups.begin()` (full) + `wait()`', f.push, f.push),
      row('`qemu-img convert -U -O qcow2 SRC OUT`', f.convert, f.push),
      row('`qemu-img convert -U -t writeback -O qcow2 SRC OUT`', f.convertWriteback, f.push),
    ];
    const pullRows: string[][] = [
      row('**qbackup pull**: our NBD client (`bench/pull-copy.ts`) → qemu-nbd qcow2', f.pull, f.pull),
      row('`nbdcopy --flush EXPORT` → the same kind of qemu-nbd qcow2 target', f.nbdcopy, f.pull),
      row('`nbdcopy --flush EXPORT out.raw` (a raw file, for reference)', f.nbdcopyRaw, f.pull),
    ];
    parts.push(`## 1. Full backup

A ${size} qcow2 disk (64 KiB clusters) with ${fmtBytes(d.dataBytes)} of random
data (${fmtPct(d.dataBytes / d.sizeBytes)} of the clusters) in ${d.extents}
extents of 1–32 clusters scattered between holes, attached to a running domain.
Throughput is disk size ÷ time; "qbackup ÷ this" is qbackup's throughput over
the row's (so the target "push ≥ 0.9× qemu-img convert" reads off the convert
row). Every method ran once untimed before the repetitions (QEMU's I/O
thread pool starts, page cache memory is touched). The CPU column is the
user + system time of the process that copies: QEMU for push (its whole
process, read from \`/proc/PID/stat\`), qemu-img or nbdcopy (\`/usr/bin/time\`),
and the bench's own process for our NBD client.

The push job copied ${fmtBytes(f.pushBytes)} by QEMU's count (all of the
disk: holes are written as zero clusters). Push time runs from the
\`begin()\` call until \`wait()\` returns: creating the target, the QMP
transaction with the job, the copy, and the teardown, whose \`blockdev-del\` of
the target flushes it to disk; the job as qbackup recorded it (start to
finalized) took ${cell(f.pushJobMs)}. The pull copy wrote
${fmtBytes(f.pullDataBytes)} as data and the rest as zeroes.

**Push** (reads the disk in QEMU, writes a qcow2 file):

${table(['Method', 'Time', 'Throughput', 'CPU of the copying process', 'qbackup ÷ this'], rows)}

**Pull** (one pull job, its NBD export read by each method in turn; the
target is a fresh qcow2 served by qemu-nbd, as the format 1 repository's pull
path served it (the bench keeps that copier in \`bench/pull-copy.ts\`; the
format 2 repository reads into its chunk store instead, §5), qemu-nbd start
and stop included for both):

${table(['Method', 'Time', 'Throughput', 'CPU of the copying process', 'qbackup ÷ this'], pullRows)}
`);
  }

  const inc = r.incremental;
  if (inc !== undefined) {
    const fullPush = f !== undefined ? med(f.push.ms) : Number.NaN;
    const fullPull = f !== undefined ? med(f.pull.ms) : Number.NaN;
    const rows = inc.map((x) => [
      `${x.pattern}, ${(x.fraction * 100).toString()} % (${fmtBytes(x.dirtyBytes)})`,
      cell(x.pushMs),
      fmtPct(med(x.pushMs) / fullPush),
      fmtBytes(med(x.pushJobBytes)),
      fmtBytes(med(x.pushFileBytes)),
      cell(x.pullMs),
      cell(x.pullCopyMs),
      fmtPct(med(x.pullCopyMs) / fullPull),
      fmtBytes(med(x.pullDataBytes)),
    ]);
    parts.push(`## 2. Incremental backup

Each repetition creates a checkpoint, dirties the given share of the disk's
clusters through HMP \`qemu-io -d sda "write -P …"\` (spread: that many random
single clusters; clustered: one contiguous run at a random place), then takes
a push incremental since the checkpoint (\`begin({ incremental })\` + \`wait()\`)
and a pull incremental (a pull job exporting the merged bitmap; our NBD client
copies only the dirty extents into a qcow2 served by qemu-nbd). "vs full" is
against the full push${f !== undefined ? ` (${fmtMs(fullPush)})` : ''} and the
full pull copy${f !== undefined ? ` (${fmtMs(fullPull)})` : ''} of §1.

${table(
  ['Dirty', 'Push time', 'vs full push', 'Job bytes', 'File data', 'Pull: begin + copy + end', 'Pull: copy', 'vs full pull', 'Pull data'],
  rows,
)}
`);
  }

  const ctl = r.control;
  if (ctl !== undefined) {
    const n = ctl.chainLength;
    const s = ctl.createLate.wallMs.length;
    parts.push(`## 3. Control plane

In-process library calls on a running domain with one 64 MiB qcow2 disk. The
chain of ${n} checkpoints was built once (${fmtMs(ctl.buildMs)} for all
${n} creates, ${fmtMs(ctl.buildMs / n)} each on average). "CPU" is this
process's user + system time for the call (all its threads, so it can exceed
the wall time), which the machine's other load disturbs less than wall time; the rest of the wall time is QEMU, SQLite's
fsyncs and scheduling. Rows show ${s} samples where not stated.

${table(
  ['Operation', 'Wall', 'CPU (qbackup process)'],
  [
    timingRow(`checkpoint create, chain length 0–${s - 1}`, ctl.createEarly),
    timingRow(`checkpoint create, chain length ${n - s}–${n - 1}`, ctl.createLate),
    timingRow(`coverage from the root (path of ${n})`, ctl.coverageLong),
    timingRow('coverage from the current checkpoint (path of 1)', ctl.coverageShort),
    timingRow(`checkpoint delete in the middle (${ctl.deleteMiddle.wallMs.length} samples)`, ctl.deleteMiddle),
    timingRow(`checkpoint list (${ctl.list.wallMs.length} samples)`, ctl.list),
    timingRow(`backup begin, incremental over the whole chain (${ctl.beginIncrementalLong.wallMs.length} samples)`, ctl.beginIncrementalLong),
    timingRow(`backup begin on the ${size} disk: \`begin()\` returned, job running (${ctl.beginJob.wallMs.length} samples)`, ctl.beginJob),
    [`backup begin on the ${size} disk: until QEMU reports the first bytes copied`, cell(ctl.beginFirstByteMs), '–'],
  ],
)}

CLI start-up (a new process each, ${ctl.cliHelpMs.length} samples):

${table(
  ['Command', 'Wall'],
  [
    ['`node -e 0` (the floor)', cell(ctl.nodeBareMs)],
    ['`./bin/qbackup --help`', cell(ctl.cliHelpMs)],
    ['`./bin/qbackup list --all`', cell(ctl.cliListMs)],
  ],
)}
`);
  }

  const w = r.writes;
  if (w !== undefined) {
    const label: Record<WriteConfig, string> = {
      none: 'no bitmap',
      'chain-1': 'chain model, 1 checkpoint (1 bitmap, recording)',
      'chain-100': 'chain model, 100 checkpoints (100 bitmaps, 1 recording)',
      'flat-100': 'flat model (libvirt), 100 bitmaps all recording',
    };
    const offlineCpuUs = (cfg: WriteConfig): number => (med(w.offline[cfg].qemuCpuMs) * 1000) / w.benchWrites;
    const rows = WRITE_CONFIGS.map((cfg) => [
      label[cfg],
      cell(w.big[cfg].wallMs),
      perWriteUs(w.small[cfg], w.smallWrites, 'wallMs'),
      perWriteUs(w.small[cfg], w.smallWrites, 'qemuCpuMs'),
      perWriteUs(w.offline[cfg], w.benchWrites, 'wallMs'),
      perWriteUs(w.offline[cfg], w.benchWrites, 'qemuCpuMs'),
      cfg === 'none' ? '–' : `${(offlineCpuUs(cfg) - offlineCpuUs('none')).toFixed(1)} µs`,
    ]);
    parts.push(`## 4. Guest write cost with bitmaps

Four running domains with a ${fmtBytes(w.diskBytes)} qcow2 disk
(\`preallocation=metadata\`, so writes never allocate), one per
configuration, measured in turn in each repetition. The flat model's 100
bitmaps were added by hand (QMP \`block-dirty-bitmap-add\`, persistent,
enabled); the chain model's by \`checkpoints.create\`. The 64 MiB write is one
HMP \`qemu-io -d sda "write -P N 0 64M"\`; the small writes are ${w.smallWrites}
HMP \`write 4k\` commands at 64 KiB strides over one QMP connection (each sets a
bit in every recording bitmap), timed as a batch, shown per write with QEMU's
user CPU time per write (\`/proc/PID/stat\`, 10 ms resolution over the batch;
the bitmap work is user time, the I/O is system time, which is noisy on this
machine).
\`qemu-img bench -w -c ${w.benchWrites} -s 4096 -S 65536 -d 1\` runs the same
bitmap states offline (image files whose bitmaps were added with \`qemu-img
bitmap\`: the chain model's 99 disabled + 1 enabled, the flat model's 100
enabled), with no monitor round trip per write; its CPU is user time
(\`/usr/bin/time\`).

${table(['Configuration', '64 MiB write (HMP), wall', '4 KiB write (HMP), µs wall', '… µs QEMU user CPU', '4 KiB write (qemu-img bench), µs wall', '… µs user CPU', 'user CPU per write over no bitmap'], rows)}
`);
  }

  if (r.repository !== undefined) parts.push(markedSection('repository', repoSection(r.repository, `npm run bench -- ${r.config.argv.join(' ')}`)));

  parts.push(analysis(r));
  return `${parts.join('\n')}\n`;
}

/** What limits us, and what was changed in src/ for this benchmark. Numbers come from the run. */
function analysis(r: BenchResults): string {
  const out: string[] = ['## What limits us', ''];
  const f = r.full;
  const cpuRatio = (a: Measured, b: Measured): string => fmtRatio(med(a.cpuMs) / med(b.cpuMs));
  if (f !== undefined) {
    const pushVsConvert = speedRatio(f.push.ms, f.convert.ms);
    const pushVsWb = speedRatio(f.push.ms, f.convertWriteback.ms);
    const beginMs = r.control !== undefined ? med(r.control.beginJob.wallMs) : Number.NaN;
    const beginShare = Number.isFinite(beginMs) ? ` (${fmtMs(beginMs)}, §3: ${fmtPct(beginMs / med(f.push.ms))} of the full push)` : ' (§3)';
    out.push(`**Full push: ${fmtRatio(pushVsConvert)} of \`qemu-img convert\`, ${fmtRatio(pushVsWb)} of \`qemu-img convert -t writeback\`${pushVsConvert >= 0.9 ? '' : ' (target not met)'}.**
Two things separate us from the default \`qemu-img convert\`:

- *Durability.* \`qemu-img convert\` writes with \`cache=unsafe\` by default: it
  never flushes, and stops the clock with up to ${fmtBytes(r.layout.dataBytes)}
  still dirty in the page cache. A backup that is not on disk when it reports
  success is not a backup: QEMU flushes the target when qbackup removes it
  (\`blockdev-del\`), inside the measured time. \`convert -t writeback\` flushes
  too; it is the like-for-like comparison.
- *QEMU's backup job is heavier than qemu-img's convert loop.* The job used
  ${cpuRatio(f.push, f.convert)} the CPU of \`qemu-img convert\` for the same
  disk (CPU column). It copies the whole disk by its own count
  (${fmtBytes(f.pushBytes)}), writing every hole as zero clusters, while
  convert skips holes on a fresh target; it runs up to 64 copy workers on
  QEMU's I/O thread pool, where convert runs 8 coroutines. On
  ${r.machine.nproc} CPUs shared with other work, CPU time turns into wall
  time. While developing the bench, \`x-perf\` \`max-workers\` of 2–16 gave no
  consistent gain on this machine, so qbackup keeps QEMU's defaults (the
  option is also experimental).

qbackup's own share is \`begin()\` until the job runs${beginShare} and
the poll that notices the end (at most half the remaining time, 5–100 ms).
`);
    const pull = speedRatio(f.pull.ms, f.nbdcopy.ms);
    out.push(`**Full pull: ${fmtRatio(pull)} of nbdcopy${pull >= 0.8 ? '' : ' (target not met)'}.** Both read the same export
and write into the same kind of qemu-nbd target, so the difference is the
client, and on ${r.machine.nproc} CPUs shared with QEMU (serving the export), qemu-nbd
(writing the target) and other work, the client's CPU time decides. Ours used
${cpuRatio(f.pull, f.nbdcopy)} nbdcopy's CPU. Where it goes (\`--cpu-prof\`
while developing): every data payload is assembled from 64 KiB socket reads
into a fresh 1–4 MiB buffer (one copy of every byte, and large
external-memory allocations that the garbage collector then frees), then
written to the target socket; nbdcopy reuses its buffers and reads straight
into them. The next step would be a parser that hands a payload over as the
list of received chunks, written to the target with one \`writev\` (no copy,
no large allocations); that changes the NBD parser and client API, so it is
left for the NBD client's owners.
`);
  }
  const inc = r.incremental;
  if (inc !== undefined) {
    const small = inc.find((x) => x.fraction === 0.001 && x.pattern === 'spread');
    const one = inc.filter((x) => x.fraction === 0.01).map((x) => (f !== undefined ? med(x.pushMs) / med(f.push.ms) : Number.NaN));
    const worst = Math.max(...one);
    const sp = inc.find((x) => x.fraction === 0.01 && x.pattern === 'spread');
    const cl = inc.find((x) => x.fraction === 0.01 && x.pattern === 'clustered');
    const spreadVsClustered =
      sp !== undefined && cl !== undefined
        ? med(sp.pushMs) > 1.15 * med(cl.pushMs)
          ? `; spread writes cost more than clustered ones of the same size (1 %: ${fmtMs(med(sp.pushMs))} against ${fmtMs(med(cl.pushMs))}): QEMU's job copies each dirty cluster as its own operation and allocates each in the target, where a clustered run goes in large pieces`
          : `; spread and clustered writes of the same size cost about the same (1 %: ${fmtMs(med(sp.pushMs))} and ${fmtMs(med(cl.pushMs))})`
        : '';
    out.push(`**Incrementals${Number.isFinite(worst) ? `: 1 % dirty took at most ${fmtPct(worst)} of the full push${worst <= 0.05 ? '' : ' (target not met)'}` : ''}.**
Bytes follow the dirty data exactly (job bytes = dirty bytes = file data).
Time has a floor${small !== undefined ? ` (${fmtMs(med(small.pushMs))} at 0.1 %)` : ''}: one \`qemu-img create\`
process for the target, SQLite commits with \`synchronous=FULL\` (job
recorded, started, finished) whose fsyncs share the disk with the data the
job is writing, the QMP transaction, the job's first poll, and the teardown, whose
\`blockdev-del\` flushes the target. Above the floor, time grows with the
dirty bytes${spreadVsClustered}. A pull incremental adds starting and
stopping qemu-nbd for the target and the NBD server teardown, and its copy
runs at our NBD client's speed (see the full pull).

The repository's incrementals (§5) read only the dirty chunks too.
`);
  }
  const ctl = r.control;
  if (ctl !== undefined) {
    const create = med(ctl.createLate.wallMs);
    const cov = med(ctl.coverageLong.wallMs);
    out.push(`**Control plane: create ${fmtMs(create)}, coverage ${fmtMs(cov)} on a chain of ${ctl.chainLength}${create <= 20 && cov <= 20 ? ' (targets met)' : ' (target not met)'}.**
A create on a long chain reads the image's bitmaps from QEMU
(\`query-named-block-nodes\` lists every bitmap, so its reply grows with the
chain), reconciles them with the metadata, and commits an intent and the
outcome (two fsyncs with \`synchronous=FULL\`, kept: they make a create
crash-safe). Our own CPU per create is ${fmtMs(med(ctl.createLate.cpuMs))}; the rest is QEMU,
the fsyncs and the machine's other load. Coverage is the same bitmap query
and chain walk without commits. A delete merges one bitmap into its parent
and commits twice. The CLI's start-up is Node.js itself
(${fmtMs(med(ctl.nodeBareMs))}) plus loading qbackup's modules
(${fmtMs(med(ctl.cliHelpMs) - med(ctl.nodeBareMs))} for \`--help\`).
`);
  }
  const w = r.writes;
  if (w !== undefined) {
    const perUs = (cfg: WriteConfig): number => (med(w.offline[cfg].qemuCpuMs) * 1000) / w.benchWrites;
    const hmpUs = (med(w.small.none.wallMs) * 1000) / w.smallWrites;
    const over = (cfg: WriteConfig): number => perUs(cfg) - perUs('none');
    const flatExtra = over('flat-100') - over('chain-100');
    const conclusion =
      flatExtra > 1
        ? `So 100 recording bitmaps (flat) cost ${flatExtra.toFixed(1)} µs more per 4 KiB write than 100 checkpoints in the chain model, whose cost does not grow with the number of checkpoints: QEMU skips disabled bitmaps on every write and sets a bit in each enabled one.`
        : `Between the flat and the chain model with 100 checkpoints the difference (${flatExtra.toFixed(1)} µs) is within this machine's noise here. QEMU skips disabled bitmaps on every write and sets a bit in each enabled one, so the flat model's cost grows with the number of checkpoints and the chain model's does not; it is just small against the rest of a write.`;
    out.push(`**Guest writes.** Through HMP a 4 KiB write costs about ${hmpUs.toFixed(0)} µs,
almost all of it the monitor round trip and \`qemu-io\` command handling, so
bitmaps are lost in the noise there, and one 64 MiB write sets a few bits per
bitmap for 64 MiB of copying. \`qemu-img bench\` isolates the bitmap work per
write: user CPU per 4 KiB write over the run without bitmaps was
${over('chain-1').toFixed(1)} µs with 1 checkpoint, ${over('chain-100').toFixed(1)} µs with 100 checkpoints (chain model), and
${over('flat-100').toFixed(1)} µs with 100 recording bitmaps (flat model); the runs with 100 bitmaps also
load and store them when the image is opened and closed. ${conclusion}
`);
  }
  if (r.repository !== undefined) out.push(repoAnalysis(r.repository));
  out.push(`## Changes made in src/ for this benchmark

- \`src/repository/pool.ts\`, \`read-disk.ts\` (with §5): a disk with at most
  64 MiB to read is hashed and compressed on the main thread, and the chunk
  pool starts its worker threads only for the first batch that needs them
  (before, every backup started two workers, and a small incremental waited
  for them to boot and made two round trips per batch). Same chunks, ids and
  packs. A/B in one process on a 1 GiB disk with 1 % spread dirty (10 MiB),
  6 interleaved rounds on the loaded machine: a 1 % incremental took 684 ms
  (median) before and 463 ms after, faster in every round.
- \`src/repository/pool.ts\`, \`read-disk.ts\`: a read buffer that holds nothing
  but the read (the NBD client's fresh 1 MiB buffer) moves to the chunk worker
  with a transfer list instead of being copied into it. A/B in one process,
  1 GiB disk (530 MB of data), 5 interleaved full backups: CPU 6.21 s before,
  5.85 s after (lower in every round); wall time within the machine's noise.
- \`src/repository/restore.ts\`: the writes of a run of 64 chunks go out
  together (all settle before the run ends) instead of one round trip per
  64 KiB chunk. A/B on a calm machine, 4 GiB disk with 2 GiB of data: raw
  restore 6.53 s before, 5.08 s after; qcow2 9.4 s before, 8.7 s after.

Earlier rounds:

- \`src/nbd/client.ts\` \`read()\`: a reply that is a single data chunk covering
  the whole request is returned as is, instead of being copied into a fresh
  zero-filled buffer (one memset and one copy of every byte less in pull copies).
- \`src/checkpoint/checkpoints.ts\`, \`src/checkpoint/coverage.ts\`,
  \`src/store/checkpoints.ts\`: the chain is no longer walked quadratically, and
  the domain XML stored with every checkpoint is not read to walk it.
  \`reconcile\` scanned the metadata and the image's bitmap list for every
  checkpoint; \`checkpoint list\` re-read every row for every checkpoint and
  walked descendants with a filter per level (7.9 s for a chain of 1000
  before, under 60 ms after); coverage looked up each bitmap by scanning the
  image's list. A create reuses the bitmap state reconcile just read (when it
  changed nothing) instead of querying QEMU twice, looks up only the
  recording bitmaps' owners, and counts a new leaf's descendants in SQL.
  Together: checkpoint create on a chain of 1000 went from about 27 ms to
  about 15 ms, coverage from about 22 ms to about 13 ms, on the (loaded)
  machine while developing.
- \`src/store/lock.ts\`: the domain lock's row is committed without an fsync
  (\`synchronous=NORMAL\` for that statement: atomic, not durable; a lock only
  means something while its owner lives, and the next durable commit syncs it
  along). Every command took and released the lock with two fsyncs.
- \`src/backup/jobs.ts\` \`wait()\`: polled every 100 ms, which added up to
  100 ms to every backup, more than a 1 % incremental takes. It now sleeps
  half of the job's expected remaining time, between 5 and 100 ms.
`);
  return out.join('\n');
}
