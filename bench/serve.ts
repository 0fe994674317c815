// Benchmark of serving a backup over NBD (run on its own: `npm run build &&
// node dist/bench/serve.js [--size-mib N] [--reps N]`): a repository made
// in-process holding one disk (half random chunks, three eighths text, one
// eighth holes), served by `serveBackup`, read by nbdinfo --map, nbdcopy and
// qemu-img convert; beside it the same reads of the same bytes as a raw file
// served by qemu-nbd (what the tools can do with no repository in between),
// and `restore --format raw` of the backup. Prints a markdown table.

import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startQemuNbd } from '../src/image/qemu-nbd.js';
import { LocalBackend } from '../src/repository/backend/local.js';
import { restoreToFile } from '../src/repository/restore.js';
import { serveBackup } from '../src/repository/serve.js';
import { Store } from '../src/repository/store.js';
import { MiB, fmtRate, run, summarize } from './util.js';

const CHUNK = 64 * 1024;

function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(name);
  const v = i >= 0 ? Number(process.argv[i + 1]) : fallback;
  if (!Number.isFinite(v) || v <= 0) throw new Error(`bad ${name}`);
  return v;
}

/** A repository with one backup of one disk of `slots` chunks; returns the disk's bytes as a raw file too. */
async function makeRepository(dir: string, slots: number): Promise<string> {
  const store = await Store.init(new LocalBackend(join(dir, 'repo')));
  const writer = store.chunkWriter();
  const ids = Buffer.alloc(slots * 32);
  const raw = Buffer.alloc(slots * CHUNK);
  for (let s = 0; s < slots; s++) {
    if (s % 8 === 7) continue;
    const data = s % 2 === 0 ? randomBytes(CHUNK) : Buffer.alloc(CHUNK, `block ${s}: some text that compresses. `);
    data.copy(raw, s * CHUNK);
    const id = store.chunkId(data);
    await writer.add(id, data);
    id.copy(ids, s * 32);
  }
  await writer.flush();
  const index = await store.putIndex({ kind: 'full', chunkSize: CHUNK, virtualSize: slots * CHUNK, ids });
  const disk = { target: 'sda', diskId: 'dk00000001', virtualSize: slots * CHUNK, level: 'full' as const, fullReason: 'bench', index, bytesRead: 0, bytesStored: 0, chunks: 0, newChunks: 0 };
  await store.putManifest({ format: 2, id: '20260101T000000.000Z-0001', domain: 'bench', uuid: '0', time: '2026-01-01T00:00:00.000Z', endTime: '2026-01-01T00:00:00.000Z', checkpoint: 'c1', consistency: 'crash', domainXml: '<domain/>', disks: [disk] });
  const file = join(dir, 'disk.raw');
  writeFileSync(file, raw);
  return file;
}

async function reps(n: number, fn: () => Promise<void>): Promise<number> {
  const ms: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await fn();
    ms.push(performance.now() - t0);
  }
  return summarize(ms).median;
}

async function main(): Promise<void> {
  const sizeMiB = arg('--size-mib', 512);
  const n = arg('--reps', 3);
  const dir = mkdtempSync(join(tmpdir(), 'qbbench-serve-'));
  try {
    const size = sizeMiB * MiB;
    const rawFile = await makeRepository(dir, size / CHUNK);
    const store = await Store.open(new LocalBackend(join(dir, 'repo')));
    const t0 = performance.now();
    const served = await serveBackup(store, { domain: 'bench', listen: { transport: 'unix' }, runDir: join(dir, 'run') });
    const readyMs = performance.now() - t0;
    const baseline = await startQemuNbd(rawFile, { format: 'raw', readOnly: true });
    const ours = served.exports[0]?.uri ?? '';
    const theirs = `nbd+unix:///${baseline.exportName}?socket=${baseline.socket}`;
    const out = join(dir, 'out.raw');
    const rows: string[] = [];
    for (const [what, tool] of [
      ['nbdinfo --map', (uri: string) => run('nbdinfo', ['--map', uri])],
      ['nbdcopy to a file', (uri: string) => run('nbdcopy', [uri, out])],
      ['qemu-img convert -O raw', (uri: string) => run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out])],
    ] as const) {
      const cpu0 = process.cpuUsage();
      const a = await reps(n, async () => void (await tool(ours)));
      const cpu = process.cpuUsage(cpu0);
      const serverCpuMs = (cpu.user + cpu.system) / 1000 / n;
      const b = await reps(n, async () => void (await tool(theirs)));
      const rate = what === 'nbdinfo --map' ? '' : ` (${fmtRate(size, a)})`;
      rows.push(`| ${what} | ${a.toFixed(0)} ms${rate} | ${serverCpuMs.toFixed(0)} ms | ${b.toFixed(0)} ms |`);
    }
    await served.close();
    await baseline.stop();
    await store.loadChunks();
    const table = await store.resolveIndex((await store.manifests('bench'))[0]?.disks[0]?.index ?? '');
    const restoreMs = await reps(n, async () => {
      rmSync(out, { force: true });
      await restoreToFile(store, table, out, 'raw', { what: 'bench disk' });
    });
    console.log(`${sizeMiB} MiB disk, median of ${n}; serving ready after ${readyMs.toFixed(0)} ms (lock, manifest, index, pack headers, listen)\n`);
    console.log('| read | from `serve-backup` | its server CPU | same bytes from qemu-nbd (raw file) |\n|---|---|---|---|');
    for (const r of rows) console.log(r);
    console.log(`\n\`restore --format raw\` of the same backup: ${restoreMs.toFixed(0)} ms (${fmtRate(size, restoreMs)})`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
