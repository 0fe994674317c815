// Directories qbackup creates hold disk images, sockets and metadata, so each
// one it creates is owner-only (0700) whatever the umask. Directories that
// already exist are the user's and keep their mode.

import { chmodSync, mkdirSync } from 'node:fs';
import { dirname } from 'node:path';

/** Creates `dir` and any missing parents, each created one with mode 0700 exactly. */
export function makePrivateDir(dir: string): void {
  const first = mkdirSync(dir, { recursive: true, mode: 0o700 });
  if (first === undefined) return;
  // mkdir's mode is filtered by the umask; set it on every directory made here.
  for (let d = dir; ; d = dirname(d)) {
    chmodSync(d, 0o700);
    if (d === first || dirname(d) === d) break;
  }
}
