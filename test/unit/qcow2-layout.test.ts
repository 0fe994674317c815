// A qcow2 image written directly from a planned layout (image/qcow2-layout.ts,
// what a restore to a new qcow2 image does) is one QEMU reads as intended:
// `qemu-img check` finds no error and no leak, it holds the same bytes as a
// raw file written with the same data, and only the planned clusters are
// allocated. Sizes cover a partial last cluster, several L2 tables, no data
// at all, and more clusters than one refcount block counts.

import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, ftruncateSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { planQcow2, QCOW2_CLUSTER_BYTES } from '../../src/image/qcow2-layout.js';
import { seededRandom } from './seeded.js';

const C = QCOW2_CLUSTER_BYTES;
const MiB = 1024 * 1024;
const SEED = Number(process.env['QCOW2_LAYOUT_SEED'] ?? '23');

describe('qcow2 layout written directly', () => {
  const dir = mkdtempSync(join(tmpdir(), 'qb-qcow2-layout-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  /**
   * Writes `writes` (guest offset, bytes; inside allocated clusters) into a
   * qcow2 image laid out for `allocated` and into a sparse raw file, then
   * checks the image with qemu-img.
   */
  function check(name: string, virtualSize: number, allocated: (c: number) => boolean, writes: Array<{ offset: number; data: Buffer }>): void {
    const layout = planQcow2(virtualSize, allocated);
    const qcow2 = join(dir, `${name}.qcow2`);
    const raw = join(dir, `${name}.raw`);
    const q = openSync(qcow2, 'wx');
    const r = openSync(raw, 'wx');
    try {
      ftruncateSync(q, layout.fileSize);
      ftruncateSync(r, virtualSize);
      for (const m of layout.metadata) writeSync(q, m.data, 0, m.data.length, m.offset);
      for (const w of writes) {
        writeSync(r, w.data, 0, w.data.length, w.offset);
        for (const h of layout.hostRanges(w.offset, w.data.length)) writeSync(q, w.data, h.at, h.length, h.host);
      }
    } finally {
      closeSync(q);
      closeSync(r);
    }
    const checked = spawnSync('qemu-img', ['check', '-f', 'qcow2', '--output=json', qcow2], { encoding: 'utf8' });
    assert.equal(checked.status, 0, `qemu-img check of ${name}: ${checked.stdout}${checked.stderr}`);
    const report = JSON.parse(checked.stdout) as { 'check-errors': number; leaks?: number; corruptions?: number; 'allocated-clusters'?: number };
    assert.equal(report['check-errors'], 0);
    assert.equal(report.leaks ?? 0, 0, `${name} leaks no cluster`);
    assert.equal(report.corruptions ?? 0, 0, `${name} has no corruption`);
    let planned = 0;
    for (let c = 0; c < Math.ceil(virtualSize / C); c++) if (allocated(c)) planned++;
    assert.equal(report['allocated-clusters'] ?? 0, planned, `${name} allocates exactly the planned clusters`);
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', qcow2], { encoding: 'utf8' })) as { 'virtual-size': number };
    assert.equal(info['virtual-size'], virtualSize);
    const compared = spawnSync('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow2, raw], { encoding: 'utf8' });
    assert.equal(compared.status, 0, `${name} holds the raw file's bytes: ${compared.stdout}${compared.stderr}`);
    rmSync(qcow2);
    rmSync(raw);
  }

  /** Random allocation of clusters and writes of random bytes covering runs of them, in pieces that cross cluster boundaries. */
  function randomCase(seed: number, virtualSize: number, density: number): { allocated: (c: number) => boolean; writes: Array<{ offset: number; data: Buffer }> } {
    const random = seededRandom(seed);
    const clusters = Math.ceil(virtualSize / C);
    const set = new Uint8Array(clusters);
    for (let c = 0; c < clusters; c++) set[c] = random.chance(density) ? 1 : 0;
    const writes: Array<{ offset: number; data: Buffer }> = [];
    for (let c = 0; c < clusters; ) {
      if (set[c] === 0) {
        c++;
        continue;
      }
      let end = c;
      while (end < clusters && set[end] === 1) end++;
      // The allocated run [c, end): written in random pieces, with gaps left unwritten (they read zero).
      const runEnd = Math.min(end * C, virtualSize);
      for (let at = c * C; at < runEnd; ) {
        const n = Math.min(runEnd - at, 1 + random.int(3 * C));
        if (random.chance(0.8)) writes.push({ offset: at, data: random.bytes(Math.min(n, 4096)).subarray(0, Math.min(n, 4096)) });
        if (n > 4096 && random.chance(0.5)) writes.push({ offset: at + 4096, data: Buffer.alloc(n - 4096, 1 + random.int(255)) });
        at += n;
      }
      c = end;
    }
    return { allocated: (c) => set[c] === 1, writes };
  }

  test(`random allocations and writes, a partial last cluster, several L2 tables (seed ${SEED}; replay with QCOW2_LAYOUT_SEED=${SEED})`, () => {
    for (const [k, size] of [C, 3 * C + 512, 10 * MiB + 4096, 1200 * MiB].entries()) {
      const { allocated, writes } = randomCase(SEED + k, size, size > 100 * MiB ? 0.02 : 0.5);
      check(`random-${k}`, size, allocated, writes);
    }
  });

  test('an image with no data, and one with every cluster allocated', () => {
    check('empty', 64 * MiB, () => false, []);
    const full = Buffer.alloc(8 * MiB + 512, 0xab);
    check('full', full.length, () => true, [{ offset: 0, data: full }]);
  });

  test('more clusters than one refcount block counts (the data left as holes, reading zero)', () => {
    // 40000 data clusters: a second refcount block, which counts itself.
    check('refblocks', 3 * 1024 * MiB, (c) => c % 5 !== 0 && c < 50_000, []);
  });
});
