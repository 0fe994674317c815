// `npm run bench:copy`: how fast `qbackup copy` moves one full backup
// between two local repositories, without QEMU: a source repository gets a
// disk index of N random 64 KiB chunks (half of them compressible), then it
// is copied into a plain repository (same keys: chunks move in their stored
// form after their check) and into an encrypted one (keys differ: every chunk
// is decoded, re-hashed under the target's key, compressed and sealed on the
// worker threads); a second copy of each shows the no-op. Timing only, never
// asserted.
//
// Options: --size-mib N (default 256), --workers N (default 2).

import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { LocalBackend } from '../src/repository/backend/local.js';
import { copyBackups } from '../src/repository/copy.js';
import { Store } from '../src/repository/store.js';
import { loadAverage } from './machine.js';

const CHUNK = 64 * 1024;

async function sourceRepository(dir: string, chunks: number): Promise<Store> {
  const store = await Store.init(new LocalBackend(join(dir, 'source')));
  const writer = store.chunkWriter();
  const ids: Buffer[] = [];
  for (let i = 0; i < chunks; i++) {
    // Odd chunks random (stored raw), even ones mostly a repeated byte (zstd shrinks them).
    const data = i % 2 === 1 ? randomBytes(CHUNK) : Buffer.alloc(CHUNK, i & 0xff);
    if (i % 2 === 0) randomBytes(512).copy(data, 0);
    const id = store.chunkId(data);
    await writer.add(id, data);
    ids.push(id);
  }
  await writer.flush();
  const index = await store.putIndex({ kind: 'full', chunkSize: CHUNK, virtualSize: chunks * CHUNK, ids: Buffer.concat(ids) });
  const time = new Date().toISOString();
  await store.putManifest({
    format: 2, id: '20260101T000000.000Z-0001', domain: 'bench', uuid: '00000000-0000-0000-0000-000000000000', time, endTime: time, checkpoint: 'qb-bench', consistency: 'crash', domainXml: '<domain/>',
    disks: [{ target: 'sda', diskId: 'dk00000001', virtualSize: chunks * CHUNK, level: 'full', fullReason: 'bench', index, bytesRead: 0, bytesStored: 0, chunks, newChunks: chunks }],
  });
  return store;
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { 'size-mib': { type: 'string', default: '256' }, workers: { type: 'string', default: '2' } } });
  const sizeMiB = Number(values['size-mib']);
  const workers = Number(values.workers);
  const dir = mkdtempSync(join(tmpdir(), 'qb-bench-copy-'));
  try {
    const source = await sourceRepository(dir, Math.floor((sizeMiB * 1024 * 1024) / CHUNK));
    console.log(`copy of one ${sizeMiB} MiB full backup (load average ${loadAverage()})`);
    console.log('target      | first copy          | again');
    for (const [name, password] of [['plain', undefined], ['encrypted', 'bench']] as const) {
      const target = await Store.init(new LocalBackend(join(dir, name)), password !== undefined ? { password } : {});
      let t0 = Date.now();
      const first = await copyBackups(source, target, { workers });
      const firstMs = Date.now() - t0;
      t0 = Date.now();
      await copyBackups(source, target, { workers });
      const againMs = Date.now() - t0;
      const rate = first.bytesRead / 2 ** 20 / (firstMs / 1000);
      console.log(`${name.padEnd(11)} | ${(firstMs / 1000).toFixed(1).padStart(6)} s ${rate.toFixed(0).padStart(5)} MiB/s | ${againMs} ms`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
