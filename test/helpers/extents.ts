// Reads "changed since checkpoint T" for a disk as the real extents QEMU holds:
// the chain T…current is merged into a temporary bitmap, exported read-only
// over NBD with that bitmap, and read back with nbdinfo --map. Tests compare
// these extents with the writes they issued.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Qbackup } from '../../src/qbackup.js';
import { nodeNamesFor } from '../../src/qemu/nodes.js';
import { runTool } from '../../src/image/tools.js';

export interface Extent {
  offset: number;
  length: number;
}

/** Dirty extents since T, or the coverage reasons when the disk has no coverage. */
export async function changedSince(qb: Qbackup, domain: string, checkpoint: string, target: string): Promise<Extent[] | { full: string[] }> {
  return qb.domains.withDomain(domain, 'test-changed-since', async (ctx) =>
    qb.domains.withQmp(ctx, 'test-changed-since', async (qmp) => {
      const cov = (await qb.checkpoints.coverageIn(ctx, qmp, checkpoint)).find((c) => c.target === target);
      if (cov === undefined) throw new Error(`no disk ${target}`);
      if (cov.mode === 'full') return { full: cov.reasons.map((r) => r.code) };
      return qb.checkpoints.withMergedBitmap(qmp, cov.diskId, cov.bitmaps, async (tmp) => {
        const dir = mkdtempSync(join(tmpdir(), 'qbt-nbd-'));
        const socket = join(dir, 'nbd.sock');
        const exportName = 'probe';
        await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socket } } });
        try {
          await qmp.execute('block-export-add', {
            type: 'nbd',
            id: 'probe',
            'node-name': nodeNamesFor(cov.diskId).format,
            name: exportName,
            writable: false,
            bitmaps: [tmp],
          });
          try {
            const { stdout } = await runTool('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${tmp}`, `nbd+unix:///${exportName}?socket=${socket}`]);
            const entries = JSON.parse(stdout) as Array<{ offset: number; length: number; type: number }>;
            return mergeAdjacent(entries.filter((e) => (e.type & 1) === 1).map((e) => ({ offset: e.offset, length: e.length })));
          } finally {
            const cursor = qmp.eventCursor();
            await qmp.execute('block-export-del', { id: 'probe' });
            await qmp.waitForEvent('BLOCK_EXPORT_DELETED', (e) => e.data['id'] === 'probe', 5000, cursor);
          }
        } finally {
          await qmp.execute('nbd-server-stop');
          rmSync(dir, { recursive: true, force: true });
        }
      });
    }),
  );
}

export function mergeAdjacent(extents: readonly Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of [...extents].sort((a, b) => a.offset - b.offset)) {
    const last = out.at(-1);
    if (last !== undefined && last.offset + last.length >= e.offset) last.length = Math.max(last.length, e.offset + e.length - last.offset);
    else out.push({ ...e });
  }
  return out;
}

/** The clusters (granularity-aligned) a list of writes dirties, as merged extents. */
export function clustersOf(writes: readonly Extent[], granularity = 65536): Extent[] {
  return mergeAdjacent(
    writes.map((w) => {
      const start = Math.floor(w.offset / granularity) * granularity;
      const end = Math.ceil((w.offset + w.length) / granularity) * granularity;
      return { offset: start, length: end - start };
    }),
  );
}
