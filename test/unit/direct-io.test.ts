// Direct writes (util/direct-io.ts): memory from alignedBuffer is page
// aligned (the kernel accepts an O_DIRECT write from it, and refuses one from
// a plain Buffer), and a DirectWriter puts every byte of aligned and
// unaligned writes (any position, length and memory; write and writev,
// several at once) where it belongs, whether the file takes direct I/O or not
// (a file in /dev/shm, and a writer with no direct descriptor); ranged reads
// (direct where the file takes it) return exactly the file's bytes.

import assert from 'node:assert/strict';
import { closeSync, constants, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { alignedBuffer, DIRECT_ALIGNMENT, DirectWriter, isAlignedMemory, readRangeSync, sliceParts } from '../../src/util/direct-io.js';
import { seededRandom } from './seeded.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Opens `path` with O_DIRECT, or undefined where the filesystem refuses direct I/O. */
function openDirect(path: string): number | undefined {
  try {
    return openSync(path, constants.O_WRONLY | constants.O_CREAT | constants.O_DIRECT, 0o600);
  } catch {
    return undefined;
  }
}

describe('direct I/O', () => {
  const dir = mkdtempSync(join(tmpdir(), 'qb-direct-io-'));
  const shm = mkdtempSync('/dev/shm/qb-direct-io-');
  after(() => {
    rmSync(dir, { recursive: true, force: true });
    rmSync(shm, { recursive: true, force: true });
  });

  test('aligned buffers are page aligned: the kernel takes a direct write from them', (t) => {
    const fd = openDirect(join(dir, 'aligned'));
    if (fd === undefined) {
      t.skip(`${dir} does not take O_DIRECT`);
      return;
    }
    try {
      for (const shared of [false, true]) {
        const buf = alignedBuffer(MiB, { shared });
        assert.equal(buf.buffer instanceof SharedArrayBuffer, shared);
        assert.ok(isAlignedMemory(buf) && buf.length >= MiB);
        buf.fill(shared ? 7 : 9);
        assert.equal(writeSync(fd, buf, 0, MiB, 0), MiB);
        assert.ok(readFileSync(join(dir, 'aligned')).equals(buf.subarray(0, MiB)));
      }
      // The check means something: plain memory is refused (it is not page aligned), and is never registered as aligned.
      const plain = Buffer.allocUnsafeSlow(MiB + 1).subarray(1);
      assert.ok(!isAlignedMemory(plain));
      assert.throws(() => writeSync(fd, plain, 0, 64 * KiB, 0), { code: 'EINVAL' });
    } finally {
      closeSync(fd);
    }
  });

  for (const where of ['disk', 'tmpfs', 'buffered only'] as const) {
    test(`every byte of aligned and unaligned writes lands in place (${where})`, async () => {
      const rnd = seededRandom(where.length);
      const random = (): number => rnd.next();
      const size = 12 * MiB;
      const path = join(where === 'tmpfs' ? shm : dir, `file-${where.replace(' ', '-')}`);
      const fd = openSync(path, 'w+', 0o600);
      const model = Buffer.alloc(size);
      const writer = where === 'buffered only' ? DirectWriter.over(fd, undefined) : await DirectWriter.open(fd);
      try {
        const probe = where === 'disk' ? openDirect(join(dir, 'probe')) : undefined;
        if (probe !== undefined) closeSync(probe);
        if (probe !== undefined) assert.notEqual(writer.directFd, undefined, 'a file on this disk takes direct writes');
        if (where === 'buffered only') assert.equal(writer.directFd, undefined);
        const pool = alignedBuffer(4 * MiB);
        for (let i = 0; i < 80; i++) {
          // Positions and lengths aligned, off by a little, or anywhere; memory aligned or not.
          const pick = (max: number): number => {
            const r = random();
            const n = Math.floor(random() * max);
            return r < 0.4 ? n - (n % DIRECT_ALIGNMENT) : r < 0.6 ? n - (n % DIRECT_ALIGNMENT) + 1 : n;
          };
          const length = Math.max(1, Math.min(pick(3 * MiB), size - 1));
          const position = Math.min(pick(size), size - length);
          const kind = i % 5;
          const bytes = Buffer.from(Array.from({ length: 256 }, () => Math.floor(random() * 256)));
          const fill = (b: Uint8Array): void => {
            for (let k = 0; k < b.length; k += 256) b.set(bytes.subarray(0, Math.min(256, b.length - k)), k);
          };
          if (kind === 0 || kind === 1) {
            const offset = kind === 0 ? position % DIRECT_ALIGNMENT : Math.floor(random() * 64);
            const data = pool.subarray(offset, offset + Math.min(length, pool.length - offset));
            fill(data);
            await writer.write(data, position);
            data.copy(model, position);
          } else if (kind === 2) {
            const data = Buffer.allocUnsafe(length);
            fill(data);
            await writer.write(data, position);
            data.copy(model, position);
          } else {
            const data = Buffer.allocUnsafe(length);
            fill(data);
            // Parts of uneven sizes, as a restore's back-to-back chunks.
            const cuts = [0, ...Array.from({ length: 5 }, () => Math.floor(random() * length)).sort((a, b) => a - b), length];
            const parts = cuts.slice(1).map((c, k) => data.subarray(cuts[k], c)).filter((p) => p.length > 0);
            if (kind === 3) await writer.writev(parts, position);
            else await Promise.all([writer.writev(parts.slice(0, 1), position), writer.writev(parts.slice(1), position + (parts[0]?.length ?? 0))]);
            data.copy(model, position);
          }
        }
        const last = pool.subarray(0, 2 * MiB);
        fill2(last);
        await writer.write(last, size - last.length);
        last.copy(model, size - last.length);
      } finally {
        await writer.close();
        await writer.close();
        closeSync(fd);
      }
      assert.ok(readFileSync(path).equals(model), 'the file holds exactly what was written, in place');
    });
  }

  for (const where of ['disk', 'tmpfs'] as const) {
    test(`ranged reads return exactly the file's bytes, cut at its end (${where})`, () => {
      const rnd = seededRandom(7 + where.length);
      const size = 5 * MiB + 123;
      const content = rnd.bytes(size);
      const path = join(where === 'tmpfs' ? shm : dir, `read-${where}`);
      writeFileSync(path, content);
      const fd = openSync(path, 'r');
      try {
        let scratch: Buffer | undefined;
        for (let i = 0; i < 40; i++) {
          const offset = i % 3 === 0 ? rnd.int(1024) * DIRECT_ALIGNMENT : rnd.int(size);
          const length = 1 + (i % 4 === 0 ? rnd.int(64) : rnd.int(2 * MiB));
          const read = readRangeSync(fd, offset, length, scratch);
          scratch = read.scratch;
          const expected = content.subarray(offset, offset + length);
          assert.equal(read.done, expected.length, `read ${length} at ${offset}`);
          assert.ok(read.bytes.subarray(0, read.done).equals(expected), `read ${length} at ${offset}: the file's bytes`);
        }
      } finally {
        closeSync(fd);
      }
    });
  }

  test('sliceParts cuts a range out of parts laid back to back', () => {
    const parts = [Buffer.from('abc'), Buffer.from('de'), Buffer.from(''), Buffer.from('fghij')];
    for (let s = 0; s <= 10; s++) for (let e = s; e <= 10; e++) assert.equal(Buffer.concat(sliceParts(parts, s, e)).toString(), 'abcdefghij'.slice(s, e));
  });
});

function fill2(b: Buffer): void {
  for (let k = 0; k < b.length; k++) b[k] = (k * 31 + 7) & 0xff;
}
