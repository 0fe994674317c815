// The one reader of QEMU's block node graph (`query-named-block-nodes`): per
// node its image size and dirty bitmaps, parsed once into typed values. Every
// caller that needs bitmap states, a bitmap's dirty count or a disk's virtual
// size reads them from here.

import type { QmpClient } from '../qmp/index.js';

export interface NodeBitmap {
  name: string;
  recording: boolean;
  persistent: boolean;
  /** Not stored cleanly (QEMU crashed while it was loaded): unusable, only removable. */
  inconsistent: boolean;
  busy: boolean;
  granularity: number;
  /** Dirty bytes. */
  count: number;
}

export interface BlockNode {
  nodeName: string;
  /** The image's virtual size in bytes (0 when QEMU does not report it). */
  virtualSize: number;
  bitmaps: NodeBitmap[];
}

interface RawNode {
  'node-name'?: string;
  image?: { 'virtual-size'?: number };
  'dirty-bitmaps'?: Array<{
    name?: string;
    recording?: boolean;
    persistent?: boolean;
    busy?: boolean;
    inconsistent?: boolean;
    granularity?: number;
    count?: number;
  }>;
}

/** Every named node, by node name. */
export async function readBlockNodes(qmp: QmpClient): Promise<Map<string, BlockNode>> {
  const raw = await qmp.execute<RawNode[]>('query-named-block-nodes', { flat: true });
  const out = new Map<string, BlockNode>();
  for (const n of raw) {
    const nodeName = n['node-name'];
    if (nodeName === undefined || nodeName === '') continue;
    out.set(nodeName, {
      nodeName,
      virtualSize: n.image?.['virtual-size'] ?? 0,
      bitmaps: (n['dirty-bitmaps'] ?? []).map((b) => ({
        name: b.name ?? '',
        recording: b.recording ?? false,
        persistent: b.persistent ?? false,
        inconsistent: b.inconsistent ?? false,
        busy: b.busy ?? false,
        granularity: b.granularity ?? 0,
        count: b.count ?? 0,
      })),
    });
  }
  return out;
}
