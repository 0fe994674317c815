// §5 of the report: the repository against virtnbdbackup and restic. The
// targets come from the issue that asked for this benchmark; each is marked
// met or not from this run's medians, and every miss gets the measurement
// that says what limits it (the breakdown of a full backup's time).
//
// Ratios in this section are time ratios, ours ÷ theirs (below 1 means
// qbackup took less time), because that is how the targets are written.
// The in-process method's results come first (targets, tables, breakdown);
// the CLI method's (as a user runs it, caches dropped) follow with the same
// steps, peers and time targets, from the same run.

import type { BackupSample, Breakdown, MethodSamples, RepoResults, RestoreKey, StepName, Tool } from './repository.js';
import { STEPS, TOOLS } from './repository.js';
import { fmtBytes, fmtMs, fmtPct, fmtSummaryMs, MiB, summarize } from './util.js';

const med = (values: readonly number[]): number => summarize(values).median;
const ms = (xs: readonly BackupSample[]): number[] => xs.map((x) => x.ms);
const medOf = (xs: readonly BackupSample[], f: (x: BackupSample) => number): number => med(xs.map(f));
const cell = (values: readonly number[]): string => (values.length === 0 ? '–' : fmtSummaryMs(summarize(values)));
const times = (r: number): string => (Number.isFinite(r) ? `${r.toFixed(2)}×` : '–');
const mibps = (bytes: number, t: number): string => (Number.isFinite(t) && t > 0 ? `${(bytes / MiB / (t / 1000)).toFixed(0)} MiB/s` : '–');

export interface RepoTarget {
  what: string;
  target: string;
  measured: string;
  ok: boolean | undefined;
}

const STEP_LABEL: Record<StepName, string> = { full: 'full', spread: 'incremental, 1 % spread', clustered: 'incremental, 1 % clustered' };

/**
 * Every target of the issue, evaluated on this run's medians: of the
 * in-process method by default, or of `m` (the CLI method's samples; then
 * the targets measured once per run, dedup, workers and the NBD client's
 * CPU, are left to the in-process list).
 */
export function repoTargets(r: RepoResults, m: MethodSamples = r): RepoTarget[] {
  const once = m === r;
  const b = m.backups;
  const out: RepoTarget[] = [];
  const vs = (what: string, ours: number, theirs: number, limit: number, peer: Tool): void => {
    const skipped = peer !== 'qbackup' ? r.peers[peer] : 'ran';
    if (skipped !== 'ran' || !Number.isFinite(theirs)) {
      out.push({ what, target: `≤ ${limit.toFixed(1)}×`, measured: `skipped: ${skipped}`, ok: undefined });
      return;
    }
    const ratio = ours / theirs;
    out.push({ what, target: `≤ ${limit.toFixed(1)}×`, measured: `${times(ratio)} (${fmtMs(ours)} vs ${fmtMs(theirs)})`, ok: ratio <= limit });
  };
  // A method that did not run in this run (e.g. --method cli) has no targets of its own.
  if (b.full.qbackup.length > 0) {
    const qFull = med(ms(b.full.qbackup));
    const vbFull = med(ms(b.full.virtnbdbackup));
    vs('Full backup time vs virtnbdbackup full (uncompressed)', qFull, vbFull, 1.0, 'virtnbdbackup');
    if (m.encryptedFull.length > 0) vs('Full backup time, encrypted repository, vs virtnbdbackup full', med(ms(m.encryptedFull)), vbFull, 1.3, 'virtnbdbackup');
    vs('Full backup time vs restic (--stdin of the raw disk)', qFull, med(ms(b.full.restic)), 0.3, 'restic');
    // CPU per GiB read, the VM's QEMU included, against virtnbdbackup's (both read the same data).
    const cpuOf = (xs: readonly BackupSample[]): number => medOf(xs, (x) => x.cpuMs + x.qemuCpuMs);
    vs('Full backup CPU (the tool and its QEMU) vs virtnbdbackup\'s, same data', cpuOf(b.full.qbackup), b.full.virtnbdbackup.length > 0 ? cpuOf(b.full.virtnbdbackup) : Number.NaN, 2.0, 'virtnbdbackup');
    for (const step of ['spread', 'clustered'] as const) {
      const q = b[step].qbackup;
      const label = STEP_LABEL[step];
      if (!once) {
        // Bytes and growth do not depend on the method; the in-process list has them.
        vs(`${label}: time vs virtnbdbackup's incremental`, med(ms(q)), med(ms(b[step].virtnbdbackup)), 1.0, 'virtnbdbackup');
        continue;
      }
      const read = medOf(q, (x) => x.bytesRead) / r.dirtyBytes;
      out.push({ what: `${label}: bytes read from the VM ÷ dirty bytes`, target: '≤ 1.1×', measured: `${times(read)} (${fmtBytes(medOf(q, (x) => x.bytesRead))} for ${fmtBytes(r.dirtyBytes)})`, ok: read <= 1.1 });
      const grow = medOf(q, (x) => x.growthBytes) / r.dirtyBytes;
      out.push({ what: `${label}: repository growth ÷ dirty bytes`, target: '≤ 1.2×', measured: `${times(grow)} (${fmtBytes(medOf(q, (x) => x.growthBytes))})`, ok: grow <= 1.2 });
      vs(`${label}: time vs virtnbdbackup's incremental`, med(ms(q)), med(ms(b[step].virtnbdbackup)), 1.0, 'virtnbdbackup');
      const share = med(ms(q)) / qFull;
      out.push({ what: `${label}: time ÷ our full`, target: '≤ 3 %', measured: `${fmtPct(share)} (${fmtMs(med(ms(q)))})`, ok: share <= 0.03 });
    }
    const rs = m.restore;
    vs('Restore (raw) vs restic restore', med(rs.qbackupRaw), med(rs.restic), 0.5, 'restic');
    vs('Restore (qcow2) vs virtnbdrestore', med(rs.qbackupQcow2), med(rs.virtnbdrestore), 0.5, 'virtnbdbackup');
    vs('Restore (qcow2) vs `qemu-img convert` of a qcow2 copy (the floor)', med(rs.qbackupQcow2), med(rs.convertQcow2), 2.0, 'qbackup');
    vs('Restore (raw) vs `qemu-img convert` of a qcow2 copy (the floor)', med(rs.qbackupRaw), med(rs.convertQcow2), 2.0, 'qbackup');
    const v = m.verify;
    if (v.qbackup.length > 0) {
      vs('`verify --read-data` vs `restic check --read-data`', med(v.qbackup.map((x) => x.ms)), v.restic.length > 0 ? med(v.restic.map((x) => x.ms)) : Number.NaN, 0.8, 'restic');
      out.push({
        what: '`verify --read-data`, encrypted repository (a full backup only)',
        target: '(report)',
        measured: `${fmtMs(med(v.qbackupEncrypted.map((x) => x.ms)))} for ${fmtBytes(med(v.qbackupEncrypted.map((x) => x.repoBytes)))}`,
        ok: undefined,
      });
    }
  }
  if (!once) return out;
  const d = r.dedup;
  if (d !== undefined) {
    const share = d.growthBytes / d.dataBytes;
    out.push({ what: 'Dedup: a second domain on a copy of the disk adds to the store', target: '≤ 2 % of its data', measured: `${fmtPct(share)} (${fmtBytes(d.growthBytes)} for ${fmtBytes(d.dataBytes)})`, ok: share <= 0.02 });
  }
  const w1 = r.workers['1'] ?? [];
  const w2 = r.workers['2'] ?? [];
  if (w1.length > 0 && w2.length > 0) {
    const bytes = medOf(w1, (x) => x.bytesRead);
    const gain = med(ms(w1)) / med(ms(w2));
    out.push({
      what: 'Worker threads: full backup throughput with 2 workers ÷ with 1',
      target: '≥ 1.7×',
      measured: `${times(gain)} (${mibps(bytes, med(ms(w2)))} and ${mibps(bytes, med(ms(w1)))})`,
      ok: gain >= 1.7,
    });
  }
  const bd = r.breakdown;
  if (bd?.nbdReadCpuMs !== undefined && bd.nbdcopyNullCpuMs !== undefined && Number.isFinite(bd.nbdcopyNullCpuMs)) {
    // Both read the same data slots of the same export: the ratio of their CPU is the ratio of their CPU per GiB.
    const ratio = bd.nbdReadCpuMs / bd.nbdcopyNullCpuMs;
    out.push({
      what: "The NBD pull client's CPU per GiB vs nbdcopy's (the same export to null)",
      target: '≤ 1.0×',
      measured: `${times(ratio)} (${fmtMs(perGiB(bd.nbdReadCpuMs, bd.dataBytes))}/GiB vs ${fmtMs(perGiB(bd.nbdcopyNullCpuMs, bd.dataBytes))}/GiB)`,
      ok: ratio <= 1.0,
    });
  }
  return out;
}

const perGiB = (cpuMs: number, bytes: number): number => cpuMs / (bytes / (1024 * MiB));

export function repoSummary(r: RepoResults, log: (line: string) => void): void {
  methodSummary(r, 'repository', log);
  if (r.cli !== undefined) methodSummary(r.cli, 'repository CLI, caches dropped:', log);
  for (const [t, why] of Object.entries(r.peers)) if (why !== 'ran') log(`repository: skipped: ${t}: ${why}`);
  for (const c of [...r.restoreCheck, ...(r.cli?.restoreCheck ?? [])]) log(`repository restore check: ${c}`);
}

function methodSummary(r: MethodSamples, prefix: string, log: (line: string) => void): void {
  for (const step of STEPS) {
    const parts = TOOLS.filter((t) => r.backups[step][t].length > 0).map((t) => `${t} ${cell(ms(r.backups[step][t]))}`);
    log(`${prefix} ${STEP_LABEL[step]}: ${parts.join(', ')}`);
  }
  const rs = r.restore;
  log(`${prefix} restore: qbackup qcow2 ${cell(rs.qbackupQcow2)}, raw ${cell(rs.qbackupRaw)}, virtnbdrestore ${cell(rs.virtnbdrestore)}, restic ${cell(rs.restic)}, convert→qcow2 ${cell(rs.convertQcow2)}, convert→raw ${cell(rs.convertRaw)}`);
  const v = r.verify;
  log(`${prefix} verify --read-data: qbackup ${cell(v.qbackup.map((x) => x.ms))}, encrypted ${cell(v.qbackupEncrypted.map((x) => x.ms))}, restic check ${cell(v.restic.map((x) => x.ms))}`);
}

function table(header: readonly string[], rows: ReadonlyArray<readonly string[]>): string {
  const lines = [`| ${header.join(' | ')} |`, `|${header.map(() => '---').join('|')}|`];
  for (const row of rows) lines.push(`| ${row.join(' | ')} |`);
  return lines.join('\n');
}

const TOOL_LABEL: Record<Tool, string> = {
  qbackup: '**qbackup** `repository.backup`',
  virtnbdbackup: 'virtnbdbackup (`-l full` / `-l inc`)',
  restic: 'restic `backup --stdin` (raw disk)',
};

/** How each method names qbackup's steps in its tables. */
interface Flavor {
  backup: string;
  encrypted: string;
  restore: string;
  verify: string;
}

const IN_PROCESS: Flavor = {
  backup: TOOL_LABEL.qbackup,
  encrypted: '**qbackup**, encrypted repository',
  restore: '**qbackup** `repository.restore`',
  verify: '**qbackup** `verify --read-data` (in-process)',
};

const CLI: Flavor = {
  backup: '**qbackup** `qbackup backup D --repo R`',
  encrypted: '**qbackup** `qbackup backup`, encrypted repository',
  restore: '**qbackup** `qbackup restore D --repo R --to DIR`',
  verify: '**qbackup** `qbackup verify --repo R --read-data`',
};

const verdict = (ok: boolean | undefined): string => (ok === undefined ? '' : ok ? 'met' : '**not met**');

function backupTable(r: RepoResults, m: MethodSamples, f: Flavor): string {
  const rows: string[][] = [];
  for (const step of STEPS) {
    for (const t of TOOLS) {
      const xs = m.backups[step][t];
      if (xs.length === 0) continue;
      rows.push([
        STEP_LABEL[step],
        t === 'qbackup' ? f.backup : TOOL_LABEL[t],
        cell(ms(xs)),
        cell(xs.map((x) => x.cpuMs)),
        t === 'restic' ? '–' : cell(xs.map((x) => x.qemuCpuMs)),
        fmtBytes(medOf(xs, (x) => x.bytesRead)),
        fmtBytes(medOf(xs, (x) => x.growthBytes)),
        step === 'full' ? '–' : times(medOf(xs, (x) => x.growthBytes) / r.dirtyBytes),
      ]);
      if (step === 'full' && t === 'qbackup' && m.encryptedFull.length > 0) {
        const xs2 = m.encryptedFull;
        rows.push(['full', f.encrypted, cell(ms(xs2)), cell(xs2.map((x) => x.cpuMs)), cell(xs2.map((x) => x.qemuCpuMs)), fmtBytes(medOf(xs2, (x) => x.bytesRead)), fmtBytes(medOf(xs2, (x) => x.growthBytes)), '–']);
      }
    }
  }
  return table(['Step', 'Tool', 'Time', 'CPU', 'QEMU CPU', 'Read', 'Growth', 'Growth ÷ dirty'], rows);
}

function restoreTable(m: MethodSamples, f: Flavor): string {
  const rs = m.restore;
  const floor = med(rs.convertQcow2);
  const withCpu = rs.cpuMs !== undefined;
  const row = (label: string, key: RestoreKey): string[] => [label, cell(rs[key]), ...(withCpu ? [cell(rs.cpuMs?.[key] ?? [])] : []), key === 'convertQcow2' ? '1.00×' : times(med(rs[key]) / floor)];
  const rows: string[][] = [
    row(`${f.restore} → qcow2`, 'qbackupQcow2'),
    row(`${f.restore} → raw (sparse)`, 'qbackupRaw'),
    ...(rs.virtnbdrestore.length > 0 ? [row('virtnbdrestore → qcow2', 'virtnbdrestore')] : []),
    ...(rs.restic.length > 0 ? [row('`restic restore latest` → raw (written whole)', 'restic')] : []),
    row('`qemu-img convert -O qcow2` of a qcow2 copy (the floor)', 'convertQcow2'),
    row('`qemu-img convert -O raw` of a qcow2 copy', 'convertRaw'),
  ];
  return `${table(['Method', 'Time', ...(withCpu ? ['CPU'] : []), '÷ floor'], rows)}${orderNote(rs)}`;
}

/** qbackup's two restores alternate their order between repetitions; what each took when it ran first and second. */
function orderNote(rs: MethodSamples['restore']): string {
  const first = rs.firstFormat;
  if (first === undefined || first.length === 0) return '';
  const pick = (xs: readonly number[], format: 'qcow2' | 'raw', wantFirst: boolean): number[] => xs.filter((_, i) => (first[i] === format) === wantFirst);
  const part = (xs: readonly number[], format: 'qcow2' | 'raw'): string => {
    const a = pick(xs, format, true);
    const b = pick(xs, format, false);
    return `${format} ${a.length > 0 ? cell(a) : '–'} when it ran first (${a.length}×), ${b.length > 0 ? cell(b) : '–'} when second (${b.length}×)`;
  };
  return `\n\nqbackup's two restores alternate their order (qcow2 first in the 1st, 3rd, … repetition, raw first in the others): ${part(rs.qbackupQcow2, 'qcow2')}; ${part(rs.qbackupRaw, 'raw')}.`;
}

function verifyTable(m: MethodSamples, f: Flavor): string {
  const v = m.verify;
  const row = (label: string, xs: ReadonlyArray<{ ms: number; cpuMs: number; repoBytes: number }>): string[] => [
    label,
    cell(xs.map((x) => x.ms)),
    cell(xs.map((x) => x.cpuMs)),
    fmtBytes(med(xs.map((x) => x.repoBytes))),
    mibps(med(xs.map((x) => x.repoBytes)), med(xs.map((x) => x.ms))),
  ];
  const rows: string[][] = [
    ...(v.qbackup.length > 0 ? [row(`${f.verify}, the repository restored from`, v.qbackup)] : []),
    ...(v.qbackupEncrypted.length > 0 ? [row(`${f.verify}, encrypted repository (one full)`, v.qbackupEncrypted)] : []),
    ...(v.restic.length > 0 ? [row('`restic check --read-data`, the repository restored from', v.restic)] : []),
  ];
  return rows.length > 0 ? table(['Method', 'Time', 'CPU', 'Repository', 'Throughput'], rows) : '';
}

/** Every step of every tool by both methods, medians side by side: what the method changes, for qbackup and for the peers alike. */
function sideBySide(r: RepoResults, c: MethodSamples): string {
  const rows: string[][] = [];
  const row = (what: string, a: readonly number[], b: readonly number[], ca?: readonly number[], cb?: readonly number[]): void => {
    if (a.length === 0 && b.length === 0) return;
    const cpu = ca !== undefined && cb !== undefined ? `${fmtMs(med(ca))} → ${fmtMs(med(cb))}` : '–';
    rows.push([what, fmtMs(med(a)), fmtMs(med(b)), times(med(b) / med(a)), cpu]);
  };
  for (const step of STEPS) {
    for (const t of TOOLS) {
      const a = r.backups[step][t];
      const b = c.backups[step][t];
      row(`${STEP_LABEL[step]}: ${t}`, ms(a), ms(b), a.map((x) => x.cpuMs), b.map((x) => x.cpuMs));
      if (step === 'full' && t === 'qbackup') row('full: qbackup, encrypted', ms(r.encryptedFull), ms(c.encryptedFull), r.encryptedFull.map((x) => x.cpuMs), c.encryptedFull.map((x) => x.cpuMs));
    }
  }
  row('incremental, nothing dirty: qbackup', r.emptyIncremental.qbackup, c.emptyIncremental.qbackup);
  row('incremental, nothing dirty: virtnbdbackup', r.emptyIncremental.virtnbdbackup, c.emptyIncremental.virtnbdbackup);
  const a = r.restore;
  const b = c.restore;
  const restoreRow = (what: string, key: RestoreKey): void => row(what, a[key], b[key], a.cpuMs?.[key], b.cpuMs?.[key]);
  restoreRow('restore: qbackup → qcow2', 'qbackupQcow2');
  restoreRow('restore: qbackup → raw', 'qbackupRaw');
  restoreRow('restore: virtnbdrestore', 'virtnbdrestore');
  restoreRow('restore: restic', 'restic');
  restoreRow('floor: `qemu-img convert -O qcow2`', 'convertQcow2');
  restoreRow('`qemu-img convert -O raw`', 'convertRaw');
  const v = (xs: ReadonlyArray<{ ms: number }>): number[] => xs.map((x) => x.ms);
  const vc = (xs: ReadonlyArray<{ cpuMs: number }>): number[] => xs.map((x) => x.cpuMs);
  row('verify --read-data: qbackup', v(r.verify.qbackup), v(c.verify.qbackup), vc(r.verify.qbackup), vc(c.verify.qbackup));
  row('verify --read-data: qbackup, encrypted', v(r.verify.qbackupEncrypted), v(c.verify.qbackupEncrypted), vc(r.verify.qbackupEncrypted), vc(c.verify.qbackupEncrypted));
  row('`restic check --read-data`', v(r.verify.restic), v(c.verify.restic), vc(r.verify.restic), vc(c.verify.restic));
  return table(['Step: tool', 'In-process, warm', 'CLI, caches dropped', '÷ in-process', 'CPU (in-process → CLI)'], rows);
}

/** The CLI method's part of §5: the same steps, peers and time targets, as a user runs them. */
function cliPart(r: RepoResults, m: NonNullable<RepoResults['cli']>, withInProcess: boolean): string {
  const n = m.backups.full.qbackup.length;
  const verify = verifyTable(m, CLI);
  return `### As a user runs it: the CLI, caches dropped

${
    withInProcess
      ? `The same steps and peers in the same run (both methods in every repetition, the one that goes first
alternating, each with its own full backups, incrementals, restores and verifies; ${n} repetition${n === 1 ? '' : 's'}).`
      : `The steps and peers above, ${n} repetition${n === 1 ? '' : 's'}.`
  } Every
qbackup step is the command line a user types (\`node bin/qbackup …\`, a new process per command,
on the bench's state directory), timed from spawn to exit, its CPU that process's (all threads,
\`/usr/bin/time\`). Page cache: ${m.caches}. Dropping it changes every tool's figures, not only
qbackup's: inputs come from the disk (the side-by-side table at the end shows by how much, tool by tool).

**Targets (as a user runs it)**

${table(
  ['Target', 'Goal', 'This run', ''],
  repoTargets(r, m).map((t) => [t.what, t.target, t.measured, verdict(t.ok)]),
)}

**Backups (as a user runs it)** (median (min–max); columns as above):

${backupTable(r, m, CLI)}

An incremental with nothing dirtied: qbackup ${cell(m.emptyIncremental.qbackup)}${m.emptyIncremental.virtnbdbackup.length > 0 ? `, virtnbdbackup ${cell(m.emptyIncremental.virtnbdbackup)}` : ''}.

**Restore of the newest backup (as a user runs it)**:

${restoreTable(m, CLI)}

${m.restoreCheck.length > 0 ? `Restored images compared with \`qemu-img compare\` (first repetition): ${m.restoreCheck.join('; ')}.\n\n` : ''}${
    verify !== '' ? `**Reading back every stored byte (as a user runs it)**:\n\n${verify}\n\n` : ''
  }${
    withInProcess
      ? `**Both methods side by side** (medians; the peers and floors ran the same way in both, only the page cache
before them differs; qbackup also differs in running as its own process):

${sideBySide(r, m)}
`
      : ''
  }`;
}

/** §5; `command` names the run (the command line that produced it) in the section. */
export function repoSection(r: RepoResults, command?: string): string {
  const data = r.randomBytes + r.compressibleBytes;
  const skipped = Object.entries(r.peers).filter(([, why]) => why !== 'ran');
  const w = (n: string): BackupSample[] => r.workers[n] ?? [];
  const wBytes = medOf(w('1'), (x) => x.bytesRead);
  const d = r.dedup;
  const stored = med(r.qbackupFullStoredBytes);
  const verify = verifyTable(r, IN_PROCESS);
  const took = r.durationMs !== undefined ? `${(r.durationMs / 60000).toFixed(1)} minutes, ` : '';
  const ran = command !== undefined && r.startedAt !== undefined ? `This section comes from \`${command}\` at ${r.startedAt} (${took}load average ${r.load[0]} at the start, ${r.load[1]} at the end).\n\n` : '';
  const methods = r.methods ?? ['inprocess'];
  const inproc = r.backups.full.qbackup.length > 0;
  return `## 5. Repository against virtnbdbackup and restic

${ran}A ${fmtBytes(r.sizeBytes)} disk holding ${fmtBytes(data)} of data: ${fmtBytes(r.randomBytes)} random
(incompressible) and ${fmtBytes(r.compressibleBytes)} of web-server-log-like text (compressible, every
64 KiB distinct), scattered between holes. Three byte-identical copies: a qcow2 for
qbackup's domain, a qcow2 for a libvirt domain (${r.accel}, like ours) that
virtnbdbackup backs up, and a sparse raw file that restic reads on standard input.
Each of the ${r.reps} repetitions takes full backups into fresh repositories,
dirties ${fmtBytes(r.dirtyBytes)} (1 % of the clusters) spread (single 64 KiB clusters of random data
at random places) and takes incrementals, dirties as much again clustered (one run) and takes
incrementals, then restores the newest backup with every tool. The same writes
go to all three copies (HMP \`qemu-io -d … "write -s FILE"\` into both running
domains, as a guest would write; pwrite into the raw file). The tools run in turn
within each repetition. Restores are timed until their output is on disk (\`sync FILE\`
inside the time: qbackup flushes anyway, the others do not). Ratios here are
**time ratios, ours ÷ theirs** (below 1: qbackup took less time).

${
    !inproc
      ? `qbackup runs **as a user runs it** only (\`--method cli\`: "As a user runs it" below); the dedup, worker-thread and
breakdown rows below call its library in the bench's process, as always.`
      : methods.includes('cli')
      ? `Two methods in this run, both in every repetition (the one that goes first alternating): **in-process** (the tables right below: qbackup's
library called in the bench's process, every tool's input synced and read once, untimed, before each timed
run, so every tool starts from the page cache) and **as a user runs it** (the \`qbackup\` command line, the
page cache dropped before every tool's timed run: "As a user runs it" below).`
      : `qbackup runs **in-process** (its library called in the bench's process); before each timed run written data
is synced and every tool's input read once, untimed, so every tool starts from the page cache
(\`--method cli\` or \`both\` adds the command line as a user types it, caches dropped).`
  }

${skipped.length > 0 ? `${skipped.map(([t, why]) => `Skipped: ${t}: ${why}.`).join('\n')}\n\n` : ''}Peers: ${Object.entries(r.versions).map(([k, v]) => `${k}: ${v}`).join('; ') || 'none'}. libvirtd: ${r.libvirt}.

${
    inproc
      ? `**Targets (in-process)**

${table(
  ['Target', 'Goal', 'This run', ''],
  repoTargets(r).map((t) => [t.what, t.target, t.measured, verdict(t.ok)]),
)}

**Backups (in-process)** (median (min–max) of ${r.backups.full.qbackup.length}; "CPU" is the tool's process, qbackup's
with its worker threads; "QEMU CPU" is the QEMU serving the export; "read" is
what the tool read from the VM: qbackup's manifest, virtnbdbackup's data file,
all of the disk for restic; "growth" is \`du -sb\` of the repository or backup directory):

${backupTable(r, r, IN_PROCESS)}

qbackup's full backups stored ${fmtBytes(stored)} of chunks for ${fmtBytes(data)} of data
(zstd level 1: the text compresses, the random data is stored raw). Their CPU by thread
(median): main ${fmtMs(medOf(r.backups.full.qbackup, (x) => x.threads?.mainMs ?? Number.NaN))}, chunk workers ${fmtMs(medOf(r.backups.full.qbackup, (x) => x.threads?.workersMs ?? Number.NaN))},
V8 and libuv helper threads ${fmtMs(medOf(r.backups.full.qbackup, (x) => x.threads?.helpersMs ?? Number.NaN))}.

An incremental with nothing dirtied (the fixed cost of a backup): qbackup ${cell(r.emptyIncremental.qbackup)}${
    r.emptyIncremental.virtnbdbackup.length > 0 ? `, virtnbdbackup ${cell(r.emptyIncremental.virtnbdbackup)}` : ''
  }.${
    r.fixedCosts !== undefined
      ? ` Pieces of qbackup's, measured alone: opening the repository and reading its ${r.fixedCosts.packs} pack indexes ${fmtMs(r.fixedCosts.openAndLoadMs)}, starting two chunk workers ${fmtMs(r.fixedCosts.poolStartMs)} (only backups with more than 64 MiB to read start them), a pull job's start and end ${fmtMs(r.fixedCosts.pullJobMs)}.`
      : ''
  }

**Restore of the newest backup (in-process)** (a full and two incrementals):

${restoreTable(r, IN_PROCESS)}

${r.restoreCheck.length > 0 ? `Restored images compared with \`qemu-img compare\` (first repetition): ${r.restoreCheck.join('; ')}.\n\n` : ''}${
    verify !== ''
      ? `**Reading back every stored byte (in-process)** (median (min–max); each repository read once, untimed, first; "CPU" is the tool's process, all threads):

${verify}

`
      : ''
  }`
      : `**Targets measured once per run**

${table(
  ['Target', 'Goal', 'This run', ''],
  repoTargets(r).map((t) => [t.what, t.target, t.measured, verdict(t.ok)]),
)}

`
  }**Dedup and worker threads**

${table(
  ['What', 'Result'],
  [
    ...(d !== undefined
      ? [[
          'A second domain on a copy of the disk, backed up into the same repository',
          `${fmtMs(d.ms)}; read ${fmtBytes(d.dataBytes)}, ${d.newChunks} of ${d.chunks} chunks new, stored ${fmtBytes(d.bytesStored)}, repository grew ${fmtBytes(d.growthBytes)} (${fmtPct(d.growthBytes / d.dataBytes)} of its data: the new disk index and manifest)`,
        ]]
      : []),
    [`Full backup, 1 worker thread (${w('1').length} runs)`, `${cell(ms(w('1')))}, ${mibps(wBytes, med(ms(w('1'))))} of data, CPU ${cell(w('1').map((x) => x.cpuMs))}`],
    [`Full backup, 2 worker threads (${w('2').length} runs)`, `${cell(ms(w('2')))}, ${mibps(wBytes, med(ms(w('2'))))} of data, CPU ${cell(w('2').map((x) => x.cpuMs))}`],
  ],
)}
${r.breakdown !== undefined ? `\n${breakdownTable(r.breakdown, qbFullMs(r))}\n` : ''}${r.cli !== undefined ? `\n${cliPart(r, r.cli, inproc)}` : ''}`;
}

function qbFullMs(r: RepoResults): number {
  return med(ms(r.backups.full.qbackup));
}

function breakdownTable(b: Breakdown, fullMs: number): string {
  const cpu = (x: number | undefined): string => (x === undefined || !Number.isFinite(x) ? '–' : `${fmtMs(x)} (${fmtMs(perGiB(x, b.dataBytes))}/GiB)`);
  const rows = [
    ['NBD read of the data slots (our client, 1 MiB requests into reused buffers, 8 in flight)', fmtMs(b.nbdReadMs), mibps(b.dataBytes, b.nbdReadMs), cpu(b.nbdReadCpuMs), 'main thread + QEMU'],
    ['`nbdcopy EXPORT null:` (reference)', fmtMs(b.nbdcopyNullMs), mibps(b.dataBytes, b.nbdcopyNullMs), cpu(b.nbdcopyNullCpuMs), '–'],
    ['zero check', fmtMs(b.zeroCheckMs), mibps(b.dataBytes, b.zeroCheckMs), '', 'workers'],
    ['SHA-256 (chunk ids)', fmtMs(b.hashMs), mibps(b.dataBytes, b.hashMs), '', 'workers'],
    [`zstd level 1 (→ ${fmtBytes(b.compressedBytes)})`, fmtMs(b.compressMs), mibps(b.dataBytes, b.compressMs), '', 'workers'],
    ['pack assembly (each chunk copied into the pack buffer, then SHA-256 of each pack)', fmtMs(b.packFinishMs), mibps(b.compressedBytes, b.packFinishMs), '', 'main thread (copy), a pool worker (hash)'],
    [`pack writes (${b.packs} packs + their indexes: write, fsync, link, fsync dir)`, fmtMs(b.packWriteMs), mibps(b.compressedBytes, b.packWriteMs), '', 'I/O'],
  ];
  const ratio = b.nbdReadCpuMs !== undefined && b.nbdcopyNullCpuMs !== undefined ? b.nbdReadCpuMs / b.nbdcopyNullCpuMs : Number.NaN;
  const work = b.zeroCheckMs + b.hashMs + b.compressMs;
  return `**Where a full backup's time goes.** Each stage alone on the same ${fmtBytes(b.dataBytes)} of data
(${b.chunks} chunks), in one thread, measured after the repetitions:

${table(['Stage', 'Time', 'Throughput', 'CPU', 'Runs on'], rows)}

CPU of the NBD read: our client's is this process's (all threads) during the read loop, nbdcopy's its process's
(\`/usr/bin/time\`), QEMU's not counted in either; ours ÷ nbdcopy's: ${times(ratio)} (target ≤ 1.0×).
Zero check + hashing + compression: ${fmtMs(work)} of CPU, ${fmtMs(work / 2)} when spread over 2 workers;
the full backup took ${fmtMs(fullMs)}.`;
}

/** What limits the repository where a target is missed; numbers come from the run. */
export function repoAnalysis(r: RepoResults): string {
  const targets = repoTargets(r);
  const missed = targets.filter((t) => t.ok === false);
  const out: string[] = [`**Repository (§5): ${missed.length === 0 ? 'every target with a measurement was met' : `${missed.length} of ${targets.filter((t) => t.ok !== undefined).length} targets not met`}.**`, ''];
  const b = r.backups;
  const full = b.full.qbackup;
  const fullMs = med(ms(full));
  const data = medOf(full, (x) => x.bytesRead);
  const th = (f: (t: NonNullable<BackupSample['threads']>) => number): number => medOf(full, (x) => (x.threads !== undefined ? f(x.threads) : Number.NaN));
  const cpu = medOf(full, (x) => x.cpuMs);
  const qemu = medOf(full, (x) => x.qemuCpuMs);
  const bd = r.breakdown;
  const isMissed = (prefix: string): boolean => missed.some((t) => t.what.startsWith(prefix));
  if (isMissed('Full backup')) {
    const vb = b.full.virtnbdbackup;
    const rs = b.full.restic;
    const vbCpu = vb.length > 0 ? medOf(vb, (x) => x.cpuMs) + medOf(vb, (x) => x.qemuCpuMs) : Number.NaN;
    const w2 = r.workers['2'] ?? [];
    const calmer = w2.length > 0 ? ` The same full backup, run again for the worker-thread rows after the repetitions, took ${cell(ms(w2))}.` : '';
    out.push(`*Full backup* (${fmtMs(fullMs)} for ${fmtBytes(data)} of data, ${mibps(data, fullMs)}).${calmer} The machine was shared
(load average ${r.load[0]} when §5 started, ${r.load[1]} when it ended, on 2 cores), so wall time follows the CPU each tool
asks for. qbackup's full used ${fmtMs(cpu)} of CPU in this process (main thread ${fmtMs(th((t) => t.mainMs))}, the two chunk
workers ${fmtMs(th((t) => t.workersMs))}, V8's garbage collection and libuv's file threads ${fmtMs(th((t) => t.helpersMs))}) plus
${fmtMs(qemu)} in QEMU serving the export${
      vb.length > 0
        ? `; virtnbdbackup used ${fmtMs(medOf(vb, (x) => x.cpuMs))} plus ${fmtMs(medOf(vb, (x) => x.qemuCpuMs))} in its QEMU (we used ${times((cpu + qemu) / vbCpu)} as much): it copies the data into a file, with no hashing, no compression and no dedup`
        : ''
    }${rs.length > 0 ? `; restic used ${fmtMs(medOf(rs, (x) => x.cpuMs))} for the whole disk (content-defined chunking, SHA-256, zstd, AES)` : ''}.${
      bd !== undefined
        ? ` The stages alone, one thread, on the same data: NBD read ${fmtMs(bd.nbdReadMs)} (\`nbdcopy\` reads the same export to null
in ${fmtMs(bd.nbdcopyNullMs)}), zero check ${fmtMs(bd.zeroCheckMs)}, SHA-256 ${fmtMs(bd.hashMs)}, zstd
${fmtMs(bd.compressMs)}, pack assembly ${fmtMs(bd.packFinishMs)}, pack writes ${fmtMs(bd.packWriteMs)}. Where the work runs: the main thread
reads the export into reused 1 MiB buffers (eight reads in flight), each batch moves to a chunk worker and back without a
copy (zero check, SHA-256 for the chunk ids, a zstd probe of each chunk's first 4 KiB, zstd for what shrinks), and each new
chunk is copied once, into a reused 16 MiB pack buffer; a pool worker hashes each full pack (its id) and three packs are
stored at once (write, fsync, link, fsync of the directory, for the pack and its index). So every byte is hashed twice
(chunk id, pack id), copied once by us and once by the kernel, and made durable before the backup lists it; virtnbdbackup
hashes nothing and does not sync.`
        : ''
    }
`);
  }
  const slowIncs = (['spread', 'clustered'] as const).filter((step) => isMissed(`${STEP_LABEL[step]}: time ÷ our full`));
  if (slowIncs.length > 0) {
    const empty = med(r.emptyIncremental.qbackup);
    const fc = r.fixedCosts;
    const which = slowIncs.map((step) => `${step} ${fmtMs(med(ms(b[step].qbackup)))} (${fmtPct(med(ms(b[step].qbackup)) / fullMs)} of the full)`).join(', ');
    out.push(`*Incrementals, time ÷ our full*: ${which}. The bytes follow the dirty data (see the targets), but every
backup has a fixed cost: an incremental with nothing dirty took ${fmtMs(empty)}${
      fc !== undefined
        ? `. Pieces of it measured alone: opening the repository and reading its ${fc.packs} pack indexes ${fmtMs(fc.openAndLoadMs)} (one file per pack, so this grows with the repository), a pull
job's start and end ${fmtMs(fc.pullJobMs)}; the rest is the checkpoint (QMP and SQLite commits with fsync), coverage,
the repository lock, block status, and the index and manifest writes (each fsynced). A backup with more than 64 MiB to
read also starts two chunk workers (${fmtMs(fc.poolStartMs)} here); smaller ones no longer do (see the changes below)`
        : ''
    }. Against a full of ${fmtMs(fullMs)}, the 3 % target needs that floor below ${fmtMs(0.03 * fullMs)}.${
      r.emptyIncremental.virtnbdbackup.length > 0 ? ` virtnbdbackup's floor, measured the same way, is ${fmtMs(med(r.emptyIncremental.virtnbdbackup))}.` : ''
    }
`);
  }
  const w1 = r.workers['1'] ?? [];
  const w2 = r.workers['2'] ?? [];
  if (w1.length > 0 && w2.length > 0) {
    const gain = med(ms(w1)) / med(ms(w2));
    out.push(`*Worker threads.* Two workers took ${times(1 / gain)} the time of one (${fmtMs(med(ms(w2)))} against ${fmtMs(med(ms(w1)))}).${
      gain < 1.15
        ? ' On 2 cores that QEMU, the main thread and the garbage collector already keep busy (and that other work shared), a second worker finds no free core; the workers\' share of the CPU is about a third.'
        : ' The hashing and compression spread over both cores.'
    }
`);
  }
  const slowRestores = missed.filter((x) => x.what.startsWith('Restore'));
  if (slowRestores.length > 0) {
    out.push(`*Restore*: ${slowRestores.map((t) => `${t.what}: ${t.measured}`).join('; ')}. A restore from a local repository has the decode
workers do all of it: each reads a run of adjacent chunks from its pack (one ranged read into a buffer it keeps), checks
every chunk against its id (SHA-256 of the plaintext${bd !== undefined ? `: ${fmtMs(bd.hashMs)} alone for this much data, on one thread` : ''}),
decompresses what was compressed, and writes the plaintexts to the image with positional writes; a qcow2 image is laid out
from the disk index first (header, tables, then the data clusters in disk order) and written the same way, without
qemu-nbd. Zero chunks are never written (holes stay holes). The image is then synced. The floor, \`qemu-img convert\` of a
qcow2 copy, checks nothing and (in this bench) is timed until \`sync\` too.
`);
  }
  for (const t of missed.filter((x) => !x.what.startsWith('Full') && !x.what.startsWith('Restore') && !x.what.includes('time ÷ our full'))) {
    // Bytes, growth, dedup: no explanation prepared; the numbers say what happened.
    out.push(`*${t.what}*: ${t.measured}.`);
  }
  return `${out.join('\n')}\n`;
}
