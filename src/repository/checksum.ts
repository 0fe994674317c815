// Self-checking JSON objects of a repository (the config, key files): the
// object's last field "sha256" is the SHA-256 of the object serialized without
// it (JSON, two-space indent, fields in their stored order), so any flipped
// byte that leaves valid JSON is still detected. Manifests use the same rule
// (manifest.ts). Objects written before the field existed have none and are
// read as before; readers that predate it ignore the extra field, so the
// repository format does not change.

import { createHash } from 'node:crypto';

export type ChecksumState = 'ok' | 'absent' | 'mismatch';

function digest(body: object): string {
  return createHash('sha256').update(JSON.stringify(body, null, 2)).digest('hex');
}

/** The stored form of `body`: its JSON (two-space indent) with the checksum as last field, and a newline. */
export function serializeWithChecksum(body: object): Buffer {
  const { ...rest } = body as Record<string, unknown>;
  delete rest['sha256'];
  return Buffer.from(`${JSON.stringify({ ...rest, sha256: digest(rest) }, null, 2)}\n`);
}

/** Whether a parsed object's checksum matches the rest of it ('absent' for objects written before checksums). */
export function checksumState(parsed: Record<string, unknown>): ChecksumState {
  if (!('sha256' in parsed)) return 'absent';
  const { sha256, ...rest } = parsed;
  return typeof sha256 === 'string' && sha256 === digest(rest) ? 'ok' : 'mismatch';
}
