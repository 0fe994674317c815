// Which backend a repository string names: `s3://BUCKET/PREFIX` is an
// S3-compatible bucket (loaded only when used: the SDK is large), anything
// else without a scheme is a local directory.

import { resolve } from 'node:path';
import { QbackupError } from '../../errors.js';
import type { Backend } from './backend.js';
import { LocalBackend } from './local.js';
import type { S3Settings } from './s3.js';

/** Backend settings the adapters pass in (the library reads no environment). */
export interface BackendSettings {
  s3?: S3Settings;
  /** Settings of one s3:// location (a configured repository's endpoint and keys), used instead of `s3`; asked when the repository is opened. */
  s3For?: ((location: string) => S3Settings | undefined) | undefined;
}

/** True when `repo` names object storage rather than a local directory. */
export function isRemoteRepo(repo: string): boolean {
  return /^[a-z0-9+.-]+:\/\//i.test(repo);
}

export async function openBackend(repo: string, settings: BackendSettings = {}): Promise<Backend> {
  if (repo.startsWith('s3://')) {
    const { S3Backend, parseS3Url } = await import('./s3.js');
    return new S3Backend(parseS3Url(repo), settings.s3For?.(repo) ?? settings.s3 ?? {});
  }
  if (isRemoteRepo(repo)) {
    const scheme = repo.slice(0, repo.indexOf(':'));
    throw new QbackupError('NOT_SUPPORTED', `Cannot open repository "${scheme}://…": only local directories and s3:// buckets are supported`);
  }
  return new LocalBackend(resolve(repo));
}
