// The S3 backend against a real radosgw (test/helpers/ceph.ts): the shared
// conformance suite, then what only object storage can get wrong (credentials,
// buckets, prefixes, the endpoint going away, foreign objects).

import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import { parseS3Url, S3Backend } from '../../src/repository/backend/s3.js';
import { acquireLock, CLOCK_SKEW_MS, liveLocks } from '../../src/repository/locks.js';
import { backendConformance } from '../helpers/backend-conformance.js';
import { ceph, stopCeph } from '../helpers/ceph.js';
import { waitFor } from '../helpers/repo.js';

after(stopCeph);

backendConformance('S3 (Ceph radosgw)', async () => (await ceph()).freshBackend());

describe('S3 backend on radosgw', () => {
  it('parses s3:// URLs and refuses credentials in them without echoing them', () => {
    assert.deepEqual(parseS3Url('s3://bkt/a/b'), { bucket: 'bkt', prefix: 'a/b/', pathStyle: false });
    assert.deepEqual(parseS3Url('s3://bkt?path-style=1'), { bucket: 'bkt', prefix: '', pathStyle: true });
    assert.throws(() => parseS3Url('s3://AKIA:topsecret@bkt/x'), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT') && !(err as Error).message.includes('topsecret'));
    assert.throws(() => parseS3Url('s3://bkt/../x'), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT'));
    assert.throws(() => parseS3Url('s3://Bad_Bucket/x'), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT'));
    assert.throws(() => parseS3Url('s3://bkt/x?region=eu'), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT'));
  });

  it('keeps repositories under different prefixes of one bucket apart', async () => {
    const c = await ceph();
    const bucket = c.bucket();
    const a = new S3Backend({ bucket, prefix: 'a/', pathStyle: true }, c.settings);
    const b = new S3Backend({ bucket, prefix: 'a2/', pathStyle: true }, c.settings);
    await a.createContainer();
    await a.putIfAbsent('config', Buffer.from('A'));
    assert.equal(await b.putIfAbsent('config', Buffer.from('B')), true);
    assert.deepEqual((await a.list('')).map((o) => o.key), ['config']);
    assert.equal((await b.get('config')).toString(), 'B');
    assert.equal(a.location, `s3://${bucket}/a`);
  });

  it('lists past one page (pagination)', async () => {
    const b = await (await ceph()).freshBackend();
    const keys = Array.from({ length: 1010 }, (_, i) => `index/k${String(i).padStart(4, '0')}`);
    for (let i = 0; i < keys.length; i += 50) await Promise.all(keys.slice(i, i + 50).map((k) => b.putIfAbsent(k, Buffer.from('x'))));
    const listed = (await b.list('index/')).map((o) => o.key).sort();
    assert.deepEqual(listed, keys);
  });

  it('wrong credentials: one sentence, REPO_ACCESS_DENIED, no secret in it', async () => {
    const c = await ceph();
    const good = await c.freshBackend();
    const bad = new S3Backend(good.where, { ...c.settings, credentials: { accessKeyId: c.settings.credentials?.accessKeyId ?? '', secretAccessKey: 'wrong-secret-value' } });
    for (const op of [() => bad.get('config'), () => bad.putIfAbsent('config', Buffer.from('x')), () => bad.list('')]) {
      await assert.rejects(op(), (err: unknown) => {
        assert.ok(isQbackupError(err, 'REPO_ACCESS_DENIED'), String(err));
        const msg = (err as Error).message;
        assert.ok(!msg.includes('wrong-secret-value') && !msg.includes(c.settings.credentials?.accessKeyId ?? 'none'), msg);
        assert.match(msg, /^Cannot .* in repository "s3:\/\/.*": the object store refused the credentials/);
        return true;
      });
    }
  });

  it('a missing bucket is REPO_INVALID naming the bucket, on every operation', async () => {
    const c = await ceph();
    const b = new S3Backend({ bucket: c.bucket(), prefix: '', pathStyle: true }, c.settings);
    for (const op of [() => b.get('config'), () => b.stat('config'), () => b.list('keys/'), () => b.putIfAbsent('config', Buffer.from('x'))]) {
      await assert.rejects(op(), (err: unknown) => isQbackupError(err, 'REPO_INVALID') && /bucket ".*" does not exist/.test((err as Error).message));
    }
  });

  it('an endpoint that is down is REPO_UNAVAILABLE after retries, and works again once it is back', async () => {
    const c = await ceph();
    const b = await c.freshBackend();
    await b.putIfAbsent('config', Buffer.from('x'));
    await c.stopGateway();
    try {
      const quick = new S3Backend(b.where, { ...c.settings, maxAttempts: 3 });
      await assert.rejects(quick.get('config'), (err: unknown) => isQbackupError(err, 'REPO_UNAVAILABLE') && /cannot be reached .*after 3 attempts/.test((err as Error).message));
    } finally {
      await c.startGateway();
    }
    assert.equal((await b.get('config')).toString(), 'x');
  });

  it('objects other tools put under the prefix are not listed', async () => {
    const c = await ceph();
    const b = await c.freshBackend();
    const raw = new S3Backend({ bucket: b.where.bucket, prefix: '', pathStyle: true }, c.settings);
    await raw.putIfAbsent('repo/data/ok', Buffer.from('1'));
    // A segment starting with '.' cannot be one of our keys: write one through a backend whose prefix ends in it.
    const foreign = new S3Backend({ bucket: b.where.bucket, prefix: 'repo/data/.hidden-', pathStyle: true }, c.settings);
    await foreign.putIfAbsent('x', Buffer.from('2'));
    assert.deepEqual((await b.list('data/')).map((o) => o.key), ['data/ok']);
  });

  it('locks on the bucket: the expired lease of a dead host is taken over, a live one is honoured, renewals rotate', async () => {
    const b = await (await ceph()).freshBackend();
    const now = Date.now();
    const lease = (domain: string, leaseMs: number): Buffer => Buffer.from(JSON.stringify({ kind: 'backup', domain, host: 'dead-host.invalid', boot: 'x', pid: 7, pidStart: '1', takenMs: now - 600_000, leaseMs }));
    await b.putIfAbsent('locks/00000000000000d1', lease('web', now - CLOCK_SKEW_MS - 5_000));
    await b.putIfAbsent('locks/00000000000000a1', lease('db', now + 60_000));
    const web = await acquireLock(b, 'backup', 'web', { leaseMs: 8000 });
    await assert.rejects(acquireLock(b, 'backup', 'db'), (err: unknown) => isQbackupError(err, 'REPO_LOCKED'));
    const firstId = web.id;
    // Renewed every quarter of the lease; waited for, not timed.
    assert.ok(await waitFor(() => web.id !== firstId, 60_000), 'renewed');
    await web.assertHeld();
    // A listing can fall inside a renewal (the new lease written, the old one
    // not yet deleted, or the id moving on meanwhile): list again until one
    // falls between renewals.
    let ids: string[] = [];
    for (const end = Date.now() + 60_000; Date.now() < end; ) {
      const before = web.id;
      ids = (await liveLocks(b)).map((l) => l.id).sort();
      if (web.id === before && ids.length === 2) break;
    }
    assert.deepEqual(ids, ['00000000000000a1', web.id].sort(), 'the dead lease is gone, the renewed one and the live one stay');
    await web.release();
  });
});
