// `node dist/bench/restore.js`: restore of the newest backup alone, as a user
// runs it (`qbackup restore … --to DIR`, one process per restore, its CPU
// with every thread and every child it waited for: qemu-img, qemu-nbd),
// against the floor measured in the same run (`qemu-img convert` of a qcow2
// copy of the disk). Several builds can be compared interleaved (`--builds
// A,B`: each a directory holding bin/qbackup and dist/), so that a shared,
// noisy machine treats them alike.
//
// Setup (once, reused with --keep DIR): a qcow2 disk with random data
// scattered between holes (halfDataLayout) and, with --text-mib N, a region of
// compressible log-like text; one full backup of it in-process; a raw
// reference copy. Every restore is compared byte for byte with it (cmp for
// raw, `qemu-img compare` for qcow2) and a qcow2 restore must allocate no
// more than the disk's data.
//
// Options: --size-gib N (default 2), --text-mib N (default 0), --reps N
// (default 3), --formats raw,qcow2, --builds DIR,DIR (default: this build),
// --keep DIR (set up there once and reuse it), --drop-caches (before each run;
// needs root), --restic (also time `restic restore latest` + sync of the
// restic repository in RESTIC_REPOSITORY / RESTIC_PASSWORD, made by the user
// with `restic backup --stdin < DIR/disk.raw`, after the raw restores).

import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync, writeFileSync, openSync, writeSync, closeSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { BenchEnv, createRandomImage, halfDataLayout } from './env.js';
import { loadAverage } from './machine.js';
import { GiB, MiB, fmtMs, run, summarize } from './util.js';

const here = dirname(fileURLToPath(import.meta.url));

function parse(): { sizeBytes: number; textBytes: number; reps: number; formats: string[]; builds: string[]; keep: string | undefined; dropCaches: boolean; restic: boolean } {
  const { values } = parseArgs({
    options: {
      'size-gib': { type: 'string' },
      'text-mib': { type: 'string' },
      reps: { type: 'string' },
      formats: { type: 'string' },
      builds: { type: 'string' },
      keep: { type: 'string' },
      'drop-caches': { type: 'boolean', default: false },
      restic: { type: 'boolean', default: false },
    },
    strict: true,
  });
  return {
    sizeBytes: Math.round((Number(values['size-gib'] ?? '2') * GiB) / MiB) * MiB,
    textBytes: Math.round(Number(values['text-mib'] ?? '0')) * MiB,
    reps: Number(values.reps ?? '3'),
    formats: (values.formats ?? 'raw,qcow2').split(','),
    builds: (values.builds ?? resolve(here, '..', '..')).split(',').map((b) => resolve(b)),
    keep: values.keep,
    dropCaches: values['drop-caches'] === true,
    restic: values.restic === true,
  };
}

/** Log-like text, every 64 KiB distinct, written at the disk's first `bytes`. */
function writeText(file: string, bytes: number): void {
  const fd = openSync(file, 'r+');
  try {
    const block = Buffer.alloc(64 * 1024);
    for (let at = 0; at < bytes; at += block.length) {
      let s = '';
      for (let i = 0; s.length < block.length; i++) s += `10.0.${(at >> 16) & 255}.${i & 255} - - [07/Dec/2026:01:${String(i % 60).padStart(2, '0')}:00 +0000] "GET /item/${at + i} HTTP/1.1" 200 ${(at * 7 + i * 13) % 9999}\n`;
      block.write(s.slice(0, block.length), 'latin1');
      writeSync(fd, block, 0, block.length, at);
    }
  } finally {
    closeSync(fd);
  }
}

async function setup(dir: string, sizeBytes: number, textBytes: number): Promise<void> {
  const env = new BenchEnv();
  try {
    const layout = halfDataLayout(sizeBytes, 7);
    const source = env.path('sda.qcow2');
    await createRandomImage(source, layout);
    if (textBytes > 0) {
      const raw = env.path('text.raw');
      await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', source, raw]);
      writeText(raw, textBytes);
      rmSync(source);
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, source]);
      rmSync(raw);
    }
    await env.defineAndStart('bench', [{ target: 'sda', file: source }]);
    mkdirSync(dir, { recursive: true });
    await env.qb.repository.backup('bench', { repo: join(dir, 'repo') });
    await env.qb.domains.destroy('bench');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', source, join(dir, 'disk.raw')]);
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', source, join(dir, 'disk.qcow2')]);
    writeFileSync(join(dir, 'ready'), `${new Date().toISOString()} data ${layout.dataBytes} text ${textBytes}\n`);
  } finally {
    await env.cleanup();
  }
}

/** Wall and CPU (user + system, children included) of one command, through /usr/bin/time. */
function timed(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env): { ms: number; cpuMs: number } {
  const r = spawnSync('/usr/bin/time', ['-f', '%e %U %S', cmd, ...args], { encoding: 'utf8', env });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  const last = r.stderr.trim().split('\n').at(-1) ?? '';
  const [e, u, s] = last.split(' ').map(Number);
  return { ms: (e ?? NaN) * 1000, cpuMs: ((u ?? NaN) + (s ?? NaN)) * 1000 };
}

function allocatedBytes(file: string): number {
  const out = execFileSync('qemu-img', ['info', '--output=json', '-U', file], { encoding: 'utf8' });
  return (JSON.parse(out) as { 'actual-size': number })['actual-size'];
}

async function main(): Promise<void> {
  const o = parse();
  const dir = o.keep !== undefined ? resolve(o.keep) : join(process.env['TMPDIR'] ?? '/tmp', `qbrestore-${process.pid}`);
  if (!existsSync(join(dir, 'ready'))) {
    process.stdout.write(`setting up in ${dir}\n`);
    await setup(dir, o.sizeBytes, o.textBytes);
  }
  const out = join(dir, 'out');
  const stateDir = join(dir, 'state');
  mkdirSync(stateDir, { recursive: true });
  const samples = new Map<string, Array<{ ms: number; cpuMs: number }>>();
  const add = (k: string, s: { ms: number; cpuMs: number }): void => void (samples.get(k) ?? samples.set(k, []).get(k))?.push(s);
  const drop = (): void => {
    execFileSync('sync');
    if (o.dropCaches) writeFileSync('/proc/sys/vm/drop_caches', '3\n');
  };
  process.stdout.write(`restore bench in ${dir}, load ${loadAverage()}\n`);
  try {
    for (let rep = 0; rep < o.reps; rep++) {
      for (const format of o.formats) {
        for (const build of o.builds) {
          rmSync(out, { recursive: true, force: true });
          drop();
          const s = timed(join(build, 'bin', 'qbackup'), ['restore', 'bench', '--repo', join(dir, 'repo'), '--to', out, '--format', format], { ...process.env, QBACKUP_STATE_DIR: stateDir });
          const file = join(out, `sda.${format}`);
          if (format === 'raw') execFileSync('cmp', [file, join(dir, 'disk.raw')]);
          else execFileSync('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', file, join(dir, 'disk.raw')]);
          const allocated = allocatedBytes(file);
          add(`${format} ${build}`, s);
          process.stdout.write(`rep ${rep + 1} ${format} ${build}: ${fmtMs(s.ms)} cpu ${fmtMs(s.cpuMs)} allocated ${(allocated / MiB).toFixed(0)} MiB, byte-exact\n`);
        }
        if (format === 'raw' && o.restic) {
          const target = join(dir, 'restic-out');
          rmSync(target, { recursive: true, force: true });
          drop();
          const r = timed('sh', ['-c', 'restic restore latest --target "$1" -q && sync "$1"/*', 'sh', target]);
          execFileSync('cmp', [join(target, 'disk.raw'), join(dir, 'disk.raw')]);
          rmSync(target, { recursive: true, force: true });
          add('raw restic', r);
          process.stdout.write(`rep ${rep + 1} raw restic restore: ${fmtMs(r.ms)} cpu ${fmtMs(r.cpuMs)}, byte-exact\n`);
        }
        rmSync(join(dir, 'floor'), { force: true });
        drop();
        // Until the output is on disk, as a restore is (it syncs its image).
        const f = timed('sh', ['-c', 'qemu-img convert -f qcow2 -O "$1" "$2" "$3" && sync "$3"', 'sh', format, join(dir, 'disk.qcow2'), join(dir, 'floor')]);
        add(`${format} floor`, f);
        process.stdout.write(`rep ${rep + 1} ${format} floor (qemu-img convert): ${fmtMs(f.ms)} cpu ${fmtMs(f.cpuMs)}\n`);
      }
    }
  } finally {
    rmSync(out, { recursive: true, force: true });
    rmSync(join(dir, 'floor'), { force: true });
    if (o.keep === undefined) rmSync(dir, { recursive: true, force: true });
  }
  process.stdout.write(`medians of ${o.reps}, load ${loadAverage()}:\n`);
  for (const [k, v] of samples) process.stdout.write(`  ${k}: ${fmtMs(summarize(v.map((x) => x.ms)).median)} cpu ${fmtMs(summarize(v.map((x) => x.cpuMs)).median)}\n`);
}

await main();
