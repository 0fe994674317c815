// A real object store for the S3 tests: the single-node Ceph of
// scripts/ceph.sh (radosgw on 127.0.0.1), started once per test file on
// first use and stopped (by PID) by `stopCeph`, which each file registers as
// a top-level `after` hook, and at the latest when the process exits. When
// it cannot start, the tests that need it fail: they are never skipped.
//
// QBACKUP_TEST_CEPH_DIR may name the directory of a cluster already up
// (scripts/ceph.sh up DIR); it is then used and left running.

import { execFile, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { S3Backend, type S3Settings } from '../../src/repository/backend/s3.js';
import { repoRoot } from './env.js';

const run = promisify(execFile);
// The SDK's notice about its future Node versions is noise in test output.
process.env['AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED'] ??= 'true';
const script = join(repoRoot, 'scripts', 'ceph.sh');

export interface Ceph {
  dir: string;
  /** The variables a qbackup process needs (AWS_*, QBACKUP_S3_PATH_STYLE). */
  env: Record<string, string>;
  /** The same, as library settings. */
  settings: S3Settings;
  /** A bucket name no other test uses. */
  bucket(): string;
  /** An S3Backend on a new bucket (created), for the conformance suite. */
  freshBackend(): Promise<S3Backend>;
  stopGateway(): Promise<void>;
  startGateway(): Promise<void>;
  /** The radosgw process id (to stop it mid-request). */
  gatewayPid(): number;
}

let started: Promise<Ceph> | undefined;
let stopper: (() => void) | undefined;

/** Stops this file's cluster (if it started one); idempotent. */
export function stopCeph(): void {
  stopper?.();
  started = undefined;
}

/** The cluster of this test file, started on first call. */
export function ceph(): Promise<Ceph> {
  started ??= bringUp();
  return started;
}

async function bringUp(): Promise<Ceph> {
  const given = process.env['QBACKUP_TEST_CEPH_DIR'];
  const dir = given ?? join(mkdtempSync(join(tmpdir(), 'qb-ceph-')), 'cluster');
  if (given === undefined) {
    stopper = (): void => {
      stopper = undefined;
      try {
        execFileSync(script, ['down', dir], { stdio: 'ignore' });
      } catch {
        // best effort
      }
    };
    process.once('exit', () => stopper?.());
    for (const signal of ['SIGINT', 'SIGTERM'] as const) {
      process.once(signal, () => {
        stopper?.();
        process.exit(1);
      });
    }
    try {
      await run(script, ['up', dir], { timeout: 120_000 });
    } catch (err) {
      throw new Error(`Cannot start the test Ceph cluster with scripts/ceph.sh (are ceph-mon, ceph-osd, radosgw and ceph-common installed?): ${(err as Error).message}`);
    }
  }
  const env: Record<string, string> = {};
  for (const line of readFileSync(join(dir, 'env'), 'utf8').split('\n')) {
    const m = /^([A-Z0-9_]+)=(.*)$/.exec(line);
    if (m?.[1] !== undefined && m[2] !== undefined) env[m[1]] = m[2];
  }
  const settings: S3Settings = {
    endpoint: env['AWS_ENDPOINT_URL_S3'] ?? '',
    region: env['AWS_REGION'] ?? 'us-east-1',
    credentials: { accessKeyId: env['AWS_ACCESS_KEY_ID'] ?? '', secretAccessKey: env['AWS_SECRET_ACCESS_KEY'] ?? '' },
    pathStyle: true,
  };
  const c: Ceph = {
    dir,
    env: { AWS_ENDPOINT_URL_S3: env['AWS_ENDPOINT_URL_S3'] ?? '', AWS_REGION: settings.region ?? '', AWS_ACCESS_KEY_ID: env['AWS_ACCESS_KEY_ID'] ?? '', AWS_SECRET_ACCESS_KEY: env['AWS_SECRET_ACCESS_KEY'] ?? '', QBACKUP_S3_PATH_STYLE: '1' },
    settings,
    bucket: () => `qbt-${randomBytes(6).toString('hex')}`,
    async freshBackend() {
      const b = new S3Backend({ bucket: c.bucket(), prefix: 'repo/', pathStyle: true }, settings);
      await b.createContainer();
      return b;
    },
    async stopGateway() {
      await run(script, ['stop-rgw', dir]);
    },
    async startGateway() {
      await run(script, ['restart-rgw', dir], { timeout: 90_000 });
    },
    gatewayPid: () => Number(readFileSync(join(dir, 'pid', 'rgw'), 'utf8').trim()),
  };
  return c;
}
