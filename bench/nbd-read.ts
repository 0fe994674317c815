// The NBD client's read path against nbdcopy, on one export: a raw file of
// random data served read-only by qemu-nbd, read whole into nothing. Our
// client reads it the way the repository backup does (src/repository/
// read-disk.ts: 1 MiB reads into new buffers, 4 in flight), the same into
// reused buffers, and the way copy.ts does (4 MiB reads into reused buffers,
// 8 in flight); nbdcopy copies it to `null:` with one connection and
// with its default four. Reported per method: wall time and the CPU time
// (user + system) of the reading process — ours from process.cpuUsage(),
// nbdcopy's from /usr/bin/time. Nothing is asserted.
//
//   npm run build && node dist/bench/nbd-read.js [--size-mib 1024] [--reps 3] [--only ours|nbdcopy]
// Run a single configuration under `node --cpu-prof` with --only ours --reps 1.

import { spawn, type ChildProcess } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, existsSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { NbdClient } from '../src/nbd/client.js';
import { runPool } from '../src/util/run-pool.js';
import { MiB, fmtMs, now, runWithCpu, summarize, withOwnCpu } from './util.js';

const { values } = parseArgs({
  options: {
    'size-mib': { type: 'string', default: '1024' },
    reps: { type: 'string', default: '3' },
    only: { type: 'string' },
  },
});
const sizeBytes = Number(values['size-mib']) * MiB;
const reps = Number(values.reps);

interface Method {
  name: string;
  ours: boolean;
  run: (socket: string) => Promise<{ ms: number; cpuMs: number }>;
}

/**
 * Reads the whole export with requests of `requestBytes`, `inFlight` at
 * once, dropping the data: each into a new buffer (`read`, as the repository
 * backup does: the buffers move on to worker threads), or into buffers the
 * reader reuses (`readInto`, as copy.ts does).
 */
function ourRead(requestBytes: number, inFlight: number, reuse: boolean): (socket: string) => Promise<{ ms: number; cpuMs: number }> {
  return async (socket) => {
    await using client = await NbdClient.connect({ socket }, { exportName: '' });
    const t0 = now();
    const { cpuMs } = await withOwnCpu(async () => {
      let next = 0;
      let sink = 0;
      const free: Buffer[] = [];
      const pieces: Iterator<number> = { next: () => (next < client.size ? { done: false, value: (next += requestBytes) - requestBytes } : { done: true, value: undefined }) };
      await runPool(pieces, inFlight, async (offset) => {
        const length = Math.min(requestBytes, client.size - offset);
        if (!reuse) {
          const data = await client.read(offset, length);
          sink ^= data[length - 1] ?? 0;
          return;
        }
        const buffer = free.pop() ?? Buffer.allocUnsafe(requestBytes);
        await client.readInto(offset, buffer.subarray(0, length));
        sink ^= buffer[length - 1] ?? 0;
        free.push(buffer);
      });
      return sink;
    });
    return { ms: now() - t0, cpuMs };
  };
}

function nbdcopy(connections: number): (socket: string) => Promise<{ ms: number; cpuMs: number }> {
  return async (socket) => {
    const r = await runWithCpu('nbdcopy', [`--connections=${connections}`, `nbd+unix:///?socket=${socket}`, 'null:']);
    return { ms: r.ms, cpuMs: r.cpuMs };
  };
}

const methods: Method[] = [
  { name: 'qbackup `read`, 1 MiB × 4 in flight, new buffers (repository backup)', ours: true, run: ourRead(MiB, 4, false) },
  { name: 'qbackup `readInto`, 1 MiB × 4 in flight, reused buffers', ours: true, run: ourRead(MiB, 4, true) },
  { name: 'qbackup `readInto`, 4 MiB × 8 in flight, reused buffers (copy.ts)', ours: true, run: ourRead(4 * MiB, 8, true) },
  { name: '`nbdcopy --connections=1 EXPORT null:`', ours: false, run: nbdcopy(1) },
  { name: '`nbdcopy EXPORT null:` (4 connections)', ours: false, run: nbdcopy(4) },
].filter((m) => values.only === undefined || (values.only === 'ours') === m.ours);

function makeImage(file: string): void {
  const fd = openSync(file, 'w');
  const block = Buffer.allocUnsafe(16 * MiB);
  try {
    for (let at = 0; at < sizeBytes; at += block.length) writeSync(fd, randomFillSync(block), 0, Math.min(block.length, sizeBytes - at));
  } finally {
    closeSync(fd);
  }
}

async function startServer(file: string, socket: string): Promise<ChildProcess> {
  const child = spawn('qemu-nbd', ['--read-only', '--persistent', '--shared=8', '--format=raw', `--socket=${socket}`, '--export-name=', file], { stdio: 'ignore' });
  for (let i = 0; i < 200 && !existsSync(socket); i++) await new Promise((r) => setTimeout(r, 25));
  if (!existsSync(socket)) throw new Error('qemu-nbd did not start');
  return child;
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'qb-nbd-read-'));
  const file = join(dir, 'disk.raw');
  const socket = join(dir, 'nbd.sock');
  let server: ChildProcess | undefined;
  try {
    makeImage(file);
    server = await startServer(file, socket);
    const results = new Map<string, Array<{ ms: number; cpuMs: number }>>();
    for (const m of methods) await m.run(socket); // warm-up: page cache, qemu-nbd's threads
    for (let rep = 0; rep < reps; rep++) {
      for (const m of methods) {
        const r = await m.run(socket);
        results.set(m.name, [...(results.get(m.name) ?? []), r]);
      }
    }
    console.log(`Export: ${sizeBytes / MiB} MiB raw file of random data, qemu-nbd --read-only; ${reps} repetitions, median (min–max)`);
    console.log('| Method | Time | Throughput | CPU (user + system) | CPU per GiB |');
    console.log('|---|---|---|---|---|');
    for (const m of methods) {
      const rs = results.get(m.name) ?? [];
      const t = summarize(rs.map((r) => r.ms));
      const c = summarize(rs.map((r) => r.cpuMs));
      const mibps = sizeBytes / MiB / (t.median / 1000);
      console.log(`| ${m.name} | ${fmtMs(t.median)} (${fmtMs(t.min)}–${fmtMs(t.max)}) | ${mibps.toFixed(0)} MiB/s | ${fmtMs(c.median)} (${fmtMs(c.min)}–${fmtMs(c.max)}) | ${fmtMs(c.median / (sizeBytes / (1024 * MiB)))} |`);
    }
  } finally {
    server?.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
