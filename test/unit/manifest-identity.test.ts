// A manifest names the domain it is of: its UUID (always) and the connection
// it was backed up through (since it is recorded). Manifests written before
// the connection was recorded read as before; a hostile one is refused.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import { parseManifest, serializeManifestWithChecksum, type Manifest } from '../../src/repository/manifest.js';

const ID = '20261206T120000.000Z-ab12';

function manifest(extra: Partial<Manifest> = {}): Manifest {
  return {
    format: 2,
    id: ID,
    domain: 'web',
    uuid: '6f1c2d8e-1b2a-4c3d-9e8f-0a1b2c3d4e5f',
    time: '2026-12-06T12:00:00.000Z',
    endTime: '2026-12-06T12:00:01.000Z',
    checkpoint: `qb-${ID}`,
    consistency: 'crash',
    domainXml: '<domain/>',
    disks: [],
    ...extra,
  };
}

describe('manifest identity', () => {
  it('a manifest written before the connection was recorded reads as before', () => {
    const text = serializeManifestWithChecksum(manifest()).toString();
    const m = parseManifest(text, 'web', ID);
    assert.equal(m.connection, undefined);
    assert.equal(m.uuid, '6f1c2d8e-1b2a-4c3d-9e8f-0a1b2c3d4e5f');
  });

  it('the connection is kept, under the checksum', () => {
    const text = serializeManifestWithChecksum(manifest({ connection: 'qemu:///system' })).toString();
    assert.equal(parseManifest(text, 'web', ID).connection, 'qemu:///system');
    assert.throws(() => parseManifest(text.replace('qemu:///system', 'qemu:///session'), 'web', ID), (e: unknown) => isQbackupError(e, 'REPO_DAMAGED') && /checksum/.test((e as Error).message));
  });

  it('a connection that is not a string, or absurdly long, is refused in one sentence', () => {
    for (const connection of [42, 'x'.repeat(5000)]) {
      const text = JSON.stringify({ ...manifest(), connection });
      assert.throws(() => parseManifest(text, 'web', ID), (e: unknown) => isQbackupError(e, 'REPO_DAMAGED') && /an invalid connection/.test((e as Error).message));
    }
  });
});
