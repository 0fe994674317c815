// CI budget of the correctness oracle in libvirt mode: a few short seeded
// scenarios against a domain of the real libvirtd (started by the tests when
// none runs), through qbackup's libvirt driver, with the same model and
// checks as oracle.test.ts (every repository backup restored and compared
// byte for byte with the model). A failure writes the scenario's actions to a
// file and prints the command that replays (and shrinks) it. The longer soak
// is `npm run fuzz -- --libvirt --seeds 20 --steps 30` (see docs/testing.md).

import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { startLibvirt, type LibvirtDaemon } from '../helpers/libvirt.js';
import { formatScenario } from './actions.js';
import { runScenario } from './scenario.js';

const SEEDS = [11, 22, 33];
const STEPS = 25;

describe('oracle in libvirt mode', () => {
  let daemon: LibvirtDaemon;

  before(async () => {
    daemon = await startLibvirt();
  });

  after(async () => {
    await daemon?.stop();
  });

  for (const seed of SEEDS) {
    it(`libvirt oracle scenario seed ${seed} (${STEPS} steps)`, async () => {
      const r = await runScenario({ seed, steps: STEPS, libvirtUri: daemon.uri });
      let message = '';
      if (r.failure !== undefined) {
        const dir = join(tmpdir(), 'qbfuzz-failures');
        mkdirSync(dir, { recursive: true });
        const file = join(dir, `libvirt-seed-${seed}-ci.actions`);
        writeFileSync(file, formatScenario(r.scenario, `failing libvirt scenario of seed ${seed}: ${r.failure.message}`));
        message = `seed ${seed} failed at action ${r.failure.index + 1} (${r.failure.action}) [${r.failure.check}]: ${r.failure.message}\nreplay and shrink: npm run fuzz -- --libvirt --replay ${file}`;
      }
      assert.equal(r.failure, undefined, message);
      assert.ok(r.backupsChecked > 0, 'the scenario checked backups');
    });
  }
});
