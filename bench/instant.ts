// `npm run bench:instant`: instant restore against a plain restore, per disk
// size. For each size a domain with that disk is backed up into a fresh
// repository (untimed); then, in turn within each repetition:
// - instant: `qbackup restore --instant --as …` as a user runs it (the CLI,
//   so Node.js start-up and the server's start are inside the time) until it
//   returns with the domain running ("VM runs"), then until every byte is
//   local and the server stopped (polled as `domjobinfo` reads it, "data moved");
// - plain: `qbackup restore --to DIR` (qcow2), then define and start a domain
//   on the restored image ("VM runs" = restore + start).
// Writes the results into docs/benchmarks.md between the "instant restore"
// markers (the main bench keeps that block when it rewrites the file).
//
// Options: --sizes-gib 1,8 (default), --reps N (default 3), --no-doc.

import { withSection } from './doc-sections.js';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { BenchEnv, CLUSTER_BYTES, createRandomImage, halfDataLayout, type DataLayout } from './env.js';
import { loadAverage } from './machine.js';
import { fmtMs, GiB, MiB, now, sleep, summarize, type Summary } from './util.js';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '..', '..');
const cli = join(root, 'bin', 'qbackup');

interface SizeResult {
  sizeBytes: number;
  dataBytes: number;
  instantRunsMs: Summary;
  instantDoneMs: Summary;
  plainRestoreMs: Summary;
  plainRunsMs: Summary;
}

/** 1 GiB: about half of it random data; larger: sparse, 256 MiB of random data spread over the disk. */
function layoutFor(sizeBytes: number): DataLayout {
  if (sizeBytes <= GiB) return halfDataLayout(sizeBytes, 11);
  const extents: DataLayout['extents'] = [];
  const runs = 64;
  const runBytes = (256 * MiB) / runs;
  const stride = Math.floor(sizeBytes / runs / CLUSTER_BYTES) * CLUSTER_BYTES;
  for (let i = 0; i < runs; i++) extents.push({ offset: i * stride, length: runBytes });
  return { sizeBytes, extents, dataBytes: runs * runBytes };
}

function qb(env: BenchEnv, args: readonly string[]): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [cli, '--state-dir', env.stateDir, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolvePromise(Buffer.concat(out).toString()) : reject(new Error(`qbackup ${args.join(' ')}: ${Buffer.concat(err).toString()}`))));
  });
}

async function oneSize(env: BenchEnv, sizeBytes: number, reps: number, log: (l: string) => void): Promise<SizeResult> {
  const gib = sizeBytes / GiB;
  const name = `src${gib}`;
  const layout = layoutFor(sizeBytes);
  const source = env.path(`${name}-sda.qcow2`);
  log(`${gib} GiB: creating the disk (${(layout.dataBytes / MiB).toFixed(0)} MiB of random data)`);
  await createRandomImage(source, layout);
  await env.defineAndStart(name, [{ target: 'sda', file: source }]);
  const repo = env.path(`repo-${gib}`);
  await env.qb.repository.backup(name, { repo });
  await env.qb.domains.shutdown(name);
  const s = { instantRuns: [] as number[], instantDone: [] as number[], plainRestore: [] as number[], plainRuns: [] as number[] };
  for (let i = 0; i < reps; i++) {
    const inst = `ir${gib}-${i}`;
    const plain = `pr${gib}-${i}`;
    env.onCleanup(() => dropDomains(env, [inst, plain]));
    let t0 = now();
    await qb(env, ['restore', name, '--repo', repo, '--instant', '--as', inst, '--to', env.path(inst)]);
    s.instantRuns.push(now() - t0);
    // Polled in this process (a CLI per poll would take CPU from the copy on a small machine).
    while ((await env.qb.instant.info(inst)) !== undefined) await sleep(100);
    s.instantDone.push(now() - t0);
    await env.qb.domains.destroy(inst);
    await env.qb.domains.undefine(inst);
    rmSync(env.path(inst), { recursive: true, force: true });

    t0 = now();
    await qb(env, ['restore', name, '--repo', repo, '--to', env.path(plain)]);
    s.plainRestore.push(now() - t0);
    await env.qb.domains.define(`<domain><name>${plain}</name><memory unit='MiB'>128</memory><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${env.path(plain, 'sda.qcow2')}'/><target dev='sda' bus='scsi'/></disk></devices></domain>`);
    await qb(env, ['start', plain]);
    s.plainRuns.push(now() - t0);
    await env.qb.domains.destroy(plain);
    await env.qb.domains.undefine(plain);
    rmSync(env.path(plain), { recursive: true, force: true });
    log(`${gib} GiB rep ${i + 1}: instant runs ${fmtMs(s.instantRuns.at(-1) ?? 0)}, moved ${fmtMs(s.instantDone.at(-1) ?? 0)}; plain restore ${fmtMs(s.plainRestore.at(-1) ?? 0)}, runs ${fmtMs(s.plainRuns.at(-1) ?? 0)}`);
  }
  return {
    sizeBytes, dataBytes: layout.dataBytes,
    instantRunsMs: summarize(s.instantRuns), instantDoneMs: summarize(s.instantDone),
    plainRestoreMs: summarize(s.plainRestore), plainRunsMs: summarize(s.plainRuns),
  };
}

/** Interrupted: the restored domains go, and with them their servers (undefine stops them). */
async function dropDomains(env: BenchEnv, names: readonly string[]): Promise<void> {
  for (const n of names) {
    if (!env.qb.domains.list({ all: true }).some((d) => d.name === n)) continue;
    if (env.qb.domains.info(n).state === 'running') await env.qb.domains.destroy(n);
    await env.qb.domains.undefine(n);
  }
}

const fmt = (x: Summary): string => (x.n > 1 ? `${fmtMs(x.median)} (${fmtMs(x.min)}–${fmtMs(x.max)})` : fmtMs(x.median));

function formatSection(results: readonly SizeResult[], meta: { startedAt: string; reps: number; loadStart: string; loadEnd: string; argv: string[] }): string {
  const rows = results.map((r) => `| ${r.sizeBytes / GiB} GiB (${(r.dataBytes / MiB).toFixed(0)} MiB data) | ${fmt(r.instantRunsMs)} | ${fmt(r.plainRunsMs)} | ${fmt(r.instantDoneMs)} | ${fmt(r.plainRestoreMs)} |`);
  return `## 9. Instant restore

Measured by \`npm run bench:instant${meta.argv.length > 0 ? ` -- ${meta.argv.join(' ')}` : ''}\` (\`bench/instant.ts\`) at ${meta.startedAt}, median (min–max) of ${meta.reps}
repetitions; load average at start ${meta.loadStart}, at end ${meta.loadEnd}. The machine is
shared with other QEMU work at times: both methods run in turn within each repetition, so
load hits them alike, but single numbers move.

"VM runs": \`qbackup restore --instant --as NEW\` from the command line until it returns
with the domain running (Node.js start-up, the \`serve-backup\` process start,
overlay creation, define, QEMU start and the first \`block-stream\` included),
against a plain \`qbackup restore --to DIR\` followed by \`qbackup start\`. "Data
moved": until every byte is in the local overlay, the server stopped and the
definition without backing (the library's \`instant.info\`, what \`domjobinfo\` shows, polled every 100 ms), against the plain restore alone. The disk holds random data
(incompressible; about half of the 1 GiB disk, 256 MiB spread over larger ones), the rest holes.

| disk | VM runs: instant | VM runs: plain restore + start | data moved: instant | plain restore |
|---|---|---|---|---|
${rows.join('\n')}

Targets (issue 23): the VM runs in under 3 s at 8 GiB; the data copy after the VM runs (data
moved less VM runs, medians) within 1.2× of the plain restore's time.

${results.map((r) => {
  const copyMs = r.instantDoneMs.median - r.instantRunsMs.median;
  const ratio = copyMs / r.plainRestoreMs.median;
  return `- ${r.sizeBytes / GiB} GiB: VM runs in ${fmtMs(r.instantRunsMs.median)} (${r.instantRunsMs.median < 3000 ? 'met' : '**not met**'}); data copy ${fmtMs(copyMs)}, ${ratio.toFixed(2)}× the plain restore (${ratio <= 1.2 ? 'met' : '**not met**'}).`;
}).join('\n')}

What the VM waits for is fixed work (two Node.js processes start, one \`qemu-img create\` and
one \`qemu-io\` per disk, QEMU starts); the index is read once to mark the holes, so it grows
with the disk's size in metadata only. Holes cost nothing (they are zero clusters in the
overlay before the start). Moving the data: \`block-stream\` in QEMU 7.2 copies one 512 KiB
piece at a time, so each piece waits for a round trip to the server, while the plain restore
keeps four runs of 64 chunks in flight. The server reads ahead of the stream (the next
batches of chunks are read, checked and decompressed before they are asked for, so a piece
is answered from memory), sends each piece's data as one NBD chunk, and offers no
\`base:allocation\` to the restore (the stream asked for it twice per piece). What remains
per piece is the round trip itself: the server's event loop and QEMU each wake for the
request, the reply (larger than the socket's buffer, so written in several rounds) and the
write into the overlay, which on a loaded 2-core machine costs milliseconds. Closing the rest
of the gap needs many requests in flight: \`blockdev-mirror\` into a new image and a pivot
(which changes the disk's image under the domain: its definition, node names and bitmaps),
not done yet.

The server's memory for reads is reused (src/repository/read-buffers.ts): pack ranges are
read into pooled buffers, the decode workers hand the plaintexts back in the same memory,
and a buffer returns to the pool once no cache entry and no reply being written refers to
it. Measured on the \`serve-backup\` path alone (a 1 GiB disk with 512 MiB of random data,
copied by \`nbdcopy --connections=1 --requests=1 --request-size=524288\` to \`null:\`, one
512 KiB request at a time as \`block-stream\` asks; before and after in turn, four times,
load average 4–5): the server's main thread spent 477, 350, 317, 437 ms in garbage
collection before (\`--cpu-prof\`) and 48, 57, 74, 55 ms after; it was busy 1.09–1.53 s
before and 0.72–0.95 s after (\`--trace-gc\`: 56–61 collections, 145–198 ms of pauses, before;
38–40 and 56–90 ms after); the copy took 1.41–1.87 s before and 1.01–1.55 s after. Through
\`npm run bench:instant -- --sizes-gib 1 --reps 2\` in turn with the code before (same load):
data copy (data moved less VM runs) 2.98, 4.55, 4.68, 5.74, 8.11, 10.4 s before (median
5.2 s), 1.94, 2.11, 2.70, 2.99, 3.04, 3.47, 3.95, 9.85 s after (median 3.0 s), about 2× the
plain restore of the same runs: the one-request-at-a-time round trip remains.
`;
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const { values } = parseArgs({ args: argv, options: { 'sizes-gib': { type: 'string' }, reps: { type: 'string' }, 'no-doc': { type: 'boolean', default: false } }, strict: true });
  const sizes = (values['sizes-gib'] ?? '1,8').split(',').map((x) => Math.round(Number(x) * GiB));
  const reps = Number(values.reps ?? '3');
  if (sizes.some((x) => !(x > 0)) || !(reps > 0)) throw new Error('--sizes-gib and --reps need positive numbers');
  const log = (l: string): void => void process.stdout.write(`${l}\n`);
  const env = new BenchEnv();
  const loadStart = loadAverage();
  const startedAt = new Date().toISOString();
  const results: SizeResult[] = [];
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      log(`${signal}: cleaning up`);
      void env.cleanup().finally(() => process.exit(130));
    });
  }
  try {
    for (const size of sizes) results.push(await oneSize(env, size, reps, log));
  } finally {
    await env.cleanup();
  }
  const section = formatSection(results, { startedAt, reps, loadStart, loadEnd: loadAverage(), argv });
  log(section);
  const doc = join(root, 'docs', 'benchmarks.md');
  if (values['no-doc'] !== true && existsSync(doc)) {
    writeFileSync(doc, withSection(readFileSync(doc, 'utf8'), 'instant-restore', section));
    log(`wrote ${doc}`);
  }
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((err: unknown) => {
    process.stderr.write(`bench failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exitCode = 1;
  });
}
