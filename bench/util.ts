// Small helpers for the benchmarks: wall-clock timing, sample statistics,
// running external tools with their time measured, a seeded PRNG for data
// layouts, and number formatting. Nothing here asserts anything: timings are
// reported, never pass/fail.

import { spawn } from 'node:child_process';
import { closeSync, existsSync, openSync } from 'node:fs';
import { performance } from 'node:perf_hooks';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** A set of timings (ms) or other samples of one measured thing. */
export interface Samples {
  values: number[];
}

export interface Summary {
  n: number;
  median: number;
  min: number;
  max: number;
}

export function summarize(values: readonly number[]): Summary {
  if (values.length === 0) return { n: 0, median: Number.NaN, min: Number.NaN, max: Number.NaN };
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  const median = sorted.length % 2 === 1 ? (sorted[mid] ?? Number.NaN) : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
  return { n: sorted.length, median, min: sorted[0] ?? Number.NaN, max: sorted[sorted.length - 1] ?? Number.NaN };
}

export async function timed<T>(fn: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const t0 = performance.now();
  const value = await fn();
  return { ms: performance.now() - t0, value };
}

export function now(): number {
  return performance.now();
}

export interface RunResult {
  ms: number;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion; rejects on a non-zero exit with its stderr. */
export interface RunOptions {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** A file the command reads as its standard input (default: none). */
  stdinFile?: string;
}

export function run(command: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const stdin = options.stdinFile !== undefined ? openSync(options.stdinFile, 'r') : 'ignore';
    const t0 = performance.now();
    const child = spawn(command, args, { stdio: [stdin, 'pipe', 'pipe'], env: options.env ?? process.env, ...(options.cwd !== undefined ? { cwd: options.cwd } : {}) });
    if (typeof stdin === 'number') closeSync(stdin); // the child has its own copy
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout?.on('data', (b: Buffer) => out.push(b));
    child.stderr?.on('data', (b: Buffer) => err.push(b));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      const ms = performance.now() - t0;
      const stdout = Buffer.concat(out).toString();
      const stderr = Buffer.concat(err).toString();
      if (code === 0) resolve({ ms, stdout, stderr });
      else reject(new Error(`${command} ${args.join(' ')} failed (${signal ?? `status ${String(code)}`}): ${stderr.trim() || stdout.trim()}`));
    });
  });
}

const TIME_TOOL = existsSync('/usr/bin/time') ? '/usr/bin/time' : undefined;

/**
 * Runs a command and also returns its user + system CPU time (ms) when
 * /usr/bin/time is there (NaN otherwise).
 */
export async function runWithCpu(command: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult & { cpuMs: number }> {
  if (TIME_TOOL === undefined) return { ...(await run(command, args, options)), cpuMs: Number.NaN };
  const r = await run(TIME_TOOL, ['-f', 'QBTIME %U %S', command, ...args], options);
  const m = /QBTIME ([\d.]+) ([\d.]+)\s*$/.exec(r.stderr);
  return { ...r, cpuMs: m !== null ? (Number(m[1]) + Number(m[2])) * 1000 : Number.NaN };
}

/** User + system CPU of this process while `fn` runs, in ms. */
export async function withOwnCpu<T>(fn: () => Promise<T>): Promise<{ value: T; cpuMs: number }> {
  const c0 = process.cpuUsage();
  const value = await fn();
  const c = process.cpuUsage(c0);
  return { value, cpuMs: (c.user + c.system) / 1000 };
}

/** mulberry32: a tiny seeded PRNG, so every run lays data out the same way. */
export class Prng {
  private state: number;

  constructor(seed: number) {
    this.state = seed >>> 0;
  }

  /** Uniform in [0, 1). */
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** Integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }

  /** `count` distinct integers in [0, n), in increasing order. */
  sample(n: number, count: number): number[] {
    if (count > n) throw new Error(`cannot pick ${count} of ${n}`);
    const picked = new Set<number>();
    while (picked.size < count) picked.add(Math.floor(this.next() * n));
    return [...picked].sort((a, b) => a - b);
  }
}

export function fmtMs(ms: number): string {
  if (!Number.isFinite(ms)) return '–';
  if (ms >= 10_000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms >= 1000) return `${(ms / 1000).toFixed(2)} s`;
  if (ms >= 100) return `${ms.toFixed(0)} ms`;
  if (ms >= 10) return `${ms.toFixed(1)} ms`;
  return `${ms.toFixed(2)} ms`;
}

export function fmtSummaryMs(s: Summary): string {
  return `${fmtMs(s.median)} (${fmtMs(s.min)}–${fmtMs(s.max)})`;
}

export function fmtBytes(bytes: number): string {
  if (bytes >= GiB) return `${(bytes / GiB).toFixed(2)} GiB`;
  if (bytes >= MiB) return `${(bytes / MiB).toFixed(1)} MiB`;
  if (bytes >= KiB) return `${(bytes / KiB).toFixed(0)} KiB`;
  return `${bytes} B`;
}

/** MiB/s for `bytes` moved in `ms`. */
export function mibPerSec(bytes: number, ms: number): number {
  return bytes / MiB / (ms / 1000);
}

export function fmtRate(bytes: number, ms: number): string {
  return `${mibPerSec(bytes, ms).toFixed(0)} MiB/s`;
}

export function fmtRatio(r: number): string {
  return Number.isFinite(r) ? `${r.toFixed(2)}×` : '–';
}

export function fmtPct(r: number): string {
  if (!Number.isFinite(r)) return '–';
  return r < 0.01 ? `${(r * 100).toFixed(2)} %` : `${(r * 100).toFixed(1)} %`;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
