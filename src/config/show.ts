// The effective configuration as `qbackup config check` prints it: every
// default filled in, names resolved, and anything that may hold a secret
// masked. A password-command is shown as "(set)" (a command line can carry
// the secret itself), URLs lose their user info and query string (webhook
// and ping URLs often carry a token there). Files are named, never read.

import { createRequire } from 'node:module';
import type { QbackupConfig } from './config.js';

export const MASK = '(set)';

/** A URL without user info, query or fragment; the path stays (it names the endpoint). */
export function maskUrl(url: string): string {
  try {
    const u = new URL(url);
    const hidden = u.username !== '' || u.password !== '' || u.search !== '' || u.hash !== '';
    u.username = '';
    u.password = '';
    u.search = '';
    u.hash = '';
    return hidden ? `${u.toString()} (credentials or query hidden)` : u.toString();
  } catch {
    return MASK;
  }
}

/** The configuration as a plain object safe to print or log. */
export function effectiveConfig(config: QbackupConfig): Record<string, unknown> {
  return {
    file: config.file ?? null,
    repositories: Object.fromEntries(
      [...config.repositories.values()].map((r) => [
        r.name,
        {
          location: r.location.startsWith('s3://') ? maskUrl(r.location).replace(/ \(credentials or query hidden\)$/, '') : r.location,
          endpoint: r.endpoint !== undefined ? maskUrl(r.endpoint) : undefined,
          region: r.region,
          pathStyle: r.pathStyle,
          credentialsFile: r.credentialsFile,
          passwordFile: r.passwordFile,
          passwordCommand: r.passwordCommand !== undefined ? MASK : undefined,
          encrypted: r.passwordFile !== undefined || r.passwordCommand !== undefined ? true : undefined,
        },
      ]),
    ),
    allowRepositories: config.allowRepositories,
    connections: Object.fromEntries(config.connections),
    defaults: config.defaults,
    schedules: config.schedules.map((s) => ({ ...s, pingUrl: s.pingUrl !== undefined ? maskUrl(s.pingUrl) : undefined })),
    notifications: config.notifications.map((n) => ({ ...n, webhook: n.webhook !== undefined ? maskUrl(n.webhook) : undefined, sendmail: n.email !== undefined ? (n.sendmail ?? '/usr/sbin/sendmail') : undefined })),
    metrics: config.metrics,
    server: config.server,
  };
}

/** The same as YAML for people. */
export function describeConfig(config: QbackupConfig): string {
  // Loaded when a configuration is shown (start-up time of every other command).
  const { stringify } = createRequire(import.meta.url)('yaml') as typeof import('yaml');
  return stringify(JSON.parse(JSON.stringify(effectiveConfig(config))) as unknown).trimEnd();
}
