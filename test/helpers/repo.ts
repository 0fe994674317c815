// Helpers for the repository (format 2) integration tests: reference copies of
// a running domain's disks, byte-exact comparison of restored images, random
// data files for qemu-io "write -s", a CLI child that can be killed mid-way,
// and an independent look at what a repository holds on disk (packs, pack
// indexes, disk indexes, and which of them the manifests keep alive).

import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { imageInfo } from '../../src/image/qemu-img.js';
import { runTool } from '../../src/image/tools.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { ZERO_ID } from '../../src/repository/chunk.js';
import type { FullIndex } from '../../src/repository/disk-index.js';
import type { Manifest } from '../../src/repository/manifest.js';
import { Store } from '../../src/repository/store.js';
import { cliPath, guestWrite, type CliResult, type TestEnv } from './env.js';

export const KiB = 1024;
export const MiB = 1024 * 1024;

/** Flushes the disk of a running domain and copies it (as raw) to `file`: the bytes a backup started now must restore to. */
export async function referenceCopy(env: TestEnv, domain: string, target: string, file: string): Promise<string> {
  const disk = env.qb.domains.blockList(domain).find((d) => d.target === target);
  if (disk === undefined) throw new Error(`domain ${domain} has no disk ${target}`);
  await guestWrite(env.qb, domain, target, 'flush');
  await runTool('qemu-img', ['convert', '-U', '-f', disk.format, '-O', 'raw', disk.source, file]);
  return file;
}

/** Reference copies of every disk of a domain, by target. */
export async function referenceCopies(env: TestEnv, domain: string, tag: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const d of env.qb.domains.blockList(domain)) out.set(d.target, await referenceCopy(env, domain, d.target, env.path(`ref-${domain}-${tag}-${d.target}.raw`)));
  return out;
}

/**
 * Why `image` (raw or qcow2) does not hold exactly the bytes of the raw file
 * `reference`, or undefined when it does (same virtual size, same content).
 */
export async function imageDiffers(image: string, format: 'raw' | 'qcow2', reference: string): Promise<string | undefined> {
  const refSize = statSync(reference).size;
  const size = (await imageInfo(image, format, { shared: true })).virtualSize;
  if (size !== refSize) return `${image} has ${size} bytes, the reference ${refSize}`;
  if (format === 'raw') {
    const a = readFileSync(image);
    const b = readFileSync(reference);
    if (a.equals(b)) return undefined;
    let at = 0;
    while (at < a.length && a[at] === b[at]) at++;
    return `${image} differs from ${reference} first at byte ${at}`;
  }
  try {
    await runTool('qemu-img', ['compare', '-U', '-f', format, '-F', 'raw', image, reference]);
    return undefined;
  } catch (err) {
    return `${image} differs from ${reference}: ${(err as Error).message.split('\n')[0] ?? ''}`;
  }
}

/** A file of random bytes (for qemu-io "write -s file"), so every 64 KiB chunk of it is distinct. */
export function randomFile(env: TestEnv, name: string, bytes: number): string {
  const file = env.path(name);
  writeFileSync(file, randomBytes(bytes));
  return file;
}

/** The CLI as a child process the test can kill; `done` resolves when it ends. */
export function spawnCli(env: TestEnv, args: readonly string[], extraEnv: Record<string, string> = {}): { child: ChildProcess; done: Promise<CliResult> } {
  const child = spawn(process.execPath, [cliPath, '--state-dir', env.stateDir, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, QBACKUP_LOCK_TIMEOUT: '5', ...extraEnv },
  });
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  child.stdout?.on('data', (b: Buffer) => out.push(b));
  child.stderr?.on('data', (b: Buffer) => err.push(b));
  const done = new Promise<CliResult>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code: code ?? -1, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString(), signal }));
  });
  return { child, done };
}

/** Polls `check` every 10 ms until it is true; false after `timeoutMs`. */
export async function waitFor(check: () => boolean, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (check()) return true;
    await new Promise((r) => setTimeout(r, 10));
  }
  return check();
}

/** Polls an async `check` every 50 ms until it is true; false after `timeoutMs`. */
export async function eventually(check: () => Promise<boolean> | boolean, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await check()) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return check();
}

/** Every file under `dir` (relative path → size), following no symlinks. */
export function fileTree(dir: string): Map<string, number> {
  const out = new Map<string, number>();
  const walk = (d: string): void => {
    if (!existsSync(d)) return;
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else out.set(relative(dir, p), e.isSymbolicLink() ? -1 : statSync(p).size);
    }
  };
  walk(dir);
  return out;
}

/** Pack ids under REPO/data, disk index ids under REPO/indexes, and pack index ids under REPO/index. */
export function repoObjects(repo: string): { packs: Set<string>; packIndexes: Set<string>; indexes: Set<string> } {
  const names = (sub: string): Set<string> => new Set([...fileTree(join(repo, sub)).keys()].map((k) => k.split('/').at(-1) ?? '').filter((n) => /^[0-9a-f]{64}$/.test(n)));
  return { packs: names('data'), packIndexes: names('index'), indexes: names('indexes') };
}

/**
 * What the manifests keep alive: every index of every chain, every chunk any
 * of those indexes names (`named`: what gc must keep, since a chain's older
 * links stay whole), and the chunks each backup's disk resolves to, with the
 * backups that use each (`chunks`).
 */
export async function liveObjects(repo: string, password?: string): Promise<{ indexes: Set<string>; named: Set<string>; chunks: Map<string, Set<string>>; store: Store }> {
  const store = await Store.open(new LocalBackend(repo), password !== undefined ? { password } : {});
  await store.loadChunks();
  const indexes = new Set<string>();
  const named = new Set<string>();
  const chunks = new Map<string, Set<string>>();
  for (const m of await store.manifests()) {
    for (const d of m.disks) {
      let at: string | undefined = d.index;
      while (at !== undefined) {
        indexes.add(at);
        const index = await store.getIndex(at);
        for (let i = 0; i < index.ids.length; i += 32) {
          const id = index.ids.subarray(i, i + 32);
          if (!id.equals(ZERO_ID)) named.add(id.toString('hex'));
        }
        at = index.kind === 'delta' ? index.parent : undefined;
      }
      const table = await store.resolveIndex(d.index);
      for (let i = 0; i < table.ids.length; i += 32) {
        const id = table.ids.subarray(i, i + 32);
        if (id.equals(ZERO_ID)) continue;
        const hex = id.toString('hex');
        const users = chunks.get(hex) ?? new Set<string>();
        users.add(`${m.domain}/${m.id}`);
        chunks.set(hex, users);
      }
    }
  }
  return { indexes, named, chunks, store };
}

/** Flips one byte of a file in place. */
export function flipByte(file: string, offset: number): void {
  const data = readFileSync(file);
  if (offset >= data.length) throw new Error(`${file} has no byte ${offset}`);
  data[offset] = (data[offset] ?? 0) ^ 0xff;
  writeFileSync(file, data);
}

/** The one-line error of a failed CLI run with --json: its code and message. */
export function cliError(r: CliResult): { code: string; message: string } {
  const lines = r.stderr.trim().split('\n');
  if (lines.length !== 1) throw new Error(`expected one line on stderr, got: ${r.stderr}`);
  const parsed = JSON.parse(lines[0] ?? '') as { error?: { code?: unknown; message?: unknown } };
  if (typeof parsed.error?.code !== 'string' || typeof parsed.error.message !== 'string') throw new Error(`not an error line: ${r.stderr}`);
  return { code: parsed.error.code, message: parsed.error.message };
}

/**
 * The manifest of a full backup of one disk "vda" of domain "vm" whose disk
 * index is `index` (for unit tests that write chunks and an index by hand).
 */
export function oneDiskFullManifest(id: string, index: string, virtualSize: number, chunks: { total: number; new: number }): Manifest {
  return {
    format: 2,
    id,
    domain: 'vm',
    uuid: '00000000-0000-0000-0000-000000000000',
    time: '2026-01-01T00:00:00.000Z',
    endTime: '2026-01-01T00:00:01.000Z',
    checkpoint: 'c1',
    consistency: 'crash',
    domainXml: '<domain/>',
    disks: [{ target: 'vda', diskId: 'dk00000001', virtualSize, level: 'full', fullReason: 'first', index, bytesRead: virtualSize, bytesStored: 1, chunks: chunks.total, newChunks: chunks.new }],
  };
}

/**
 * Stores a disk of `slots` chunks of `chunkBytes` into `store` (slots in
 * `holes` stay zero and unstored; the others hold `dataOf(slot)`): the
 * disk's bytes and its full index (not yet put).
 */
export async function storeChunkDisk(store: Store, slots: number, chunkBytes: number, holes: ReadonlySet<number>, dataOf: (slot: number) => Buffer): Promise<{ disk: Buffer; table: FullIndex }> {
  const disk = Buffer.alloc(slots * chunkBytes);
  const ids = Buffer.alloc(slots * 32);
  const writer = store.chunkWriter();
  for (let s = 0; s < slots; s++) {
    if (holes.has(s)) continue;
    const data = dataOf(s);
    data.copy(disk, s * chunkBytes);
    const id = store.chunkId(data);
    await writer.add(id, data);
    id.copy(ids, s * 32);
  }
  await writer.flush();
  return { disk, table: { kind: 'full', chunkSize: chunkBytes, virtualSize: slots * chunkBytes, ids } };
}
