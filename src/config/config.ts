// The effective configuration: what config.yaml says, checked and with names
// resolved, in the shapes the CLI and the daemon use. Built by load.ts; the
// library never reads the file itself (adapters hand these values in).
//
// Invariants:
// - Every name a section refers to (a schedule's repository or notification
//   targets, the default repository) exists in the configuration.
// - Secrets are never held here: a repository names where its passphrase is
//   (a file or a command), and they are read only when the passphrase is used.

import type { RetentionPolicy } from '../repository/repository.js';

export type QuiesceDefault = 'none' | 'optional' | 'required';

export interface RepositoryConfig {
  name: string;
  /** A local directory or an s3:// URL, as the library takes it. */
  location: string;
  endpoint?: string | undefined;
  region?: string | undefined;
  pathStyle?: boolean | undefined;
  /** AWS shared-credentials file (an INI with aws_access_key_id and aws_secret_access_key). */
  credentialsFile?: string | undefined;
  passwordFile?: string | undefined;
  /** Run by /bin/sh; its standard output (less one trailing newline) is the passphrase. */
  passwordCommand?: string | undefined;
}

export type ScheduleRun = 'backup' | 'verify' | 'gc' | 'copy';

export interface ScheduleConfig {
  name: string;
  run: ScheduleRun;
  domain?: string | undefined;
  /** Backup: a connection's name under `connections`, or a URI (default: defaults.connection, else the daemon's own). */
  connection?: string | undefined;
  when: string;
  /** A configured repository's name. */
  repository: string;
  /** copy: the target repository's name. */
  to?: string | undefined;
  full?: boolean | undefined;
  retention?: RetentionPolicy | undefined;
  readDataPercent?: number | undefined;
  /** Dead man's switch: fetched after each successful run, with /fail appended after a failed one. */
  pingUrl?: string | undefined;
  /** Notification targets for this schedule's outcomes (default: all). */
  notify?: string[] | undefined;
}

export type NotifyOn = 'failure' | 'success';

export interface NotificationTarget {
  name: string;
  webhook?: string | undefined;
  email?: string | undefined;
  /** The sendmail program (default /usr/sbin/sendmail). */
  sendmail?: string | undefined;
  on: NotifyOn[];
  /** Extra attempts of a webhook after the first (default 3). */
  retries?: number | undefined;
}

export interface ServerConfig {
  listen?: string | undefined;
  tlsCert?: string | undefined;
  tlsKey?: string | undefined;
  maxTasks?: number | undefined;
  stateDir?: string | undefined;
}

export interface QbackupConfig {
  /** The file it was read from; undefined for the empty configuration used when none exists. */
  file: string | undefined;
  repositories: Map<string, RepositoryConfig>;
  /**
   * Repository locations the daemon may reach beyond the named ones. When the
   * configuration names no repository and lists none here, the daemon is open
   * to any location (as before configuration files existed).
   */
  allowRepositories: string[];
  /** Hypervisor connections by name: qbackup:/// (this host's QEMU) or qemu:///system (libvirt); carried through as given. */
  connections: Map<string, string>;
  defaults: {
    repository?: string | undefined;
    connection?: string | undefined;
    retention?: RetentionPolicy | undefined;
    quiesce?: QuiesceDefault | undefined;
    /** MiB/s. */
    bandwidth?: number | undefined;
  };
  schedules: ScheduleConfig[];
  notifications: NotificationTarget[];
  metrics: 'public' | 'token';
  server: ServerConfig;
}

export function emptyConfig(): QbackupConfig {
  return {
    file: undefined,
    repositories: new Map(),
    allowRepositories: [],
    connections: new Map(),
    defaults: {},
    schedules: [],
    notifications: [],
    metrics: 'token',
    server: {},
  };
}

/** Is the daemon restricted to named (and listed) repositories? */
export function restrictsRepositories(config: QbackupConfig): boolean {
  return config.repositories.size > 0 || config.allowRepositories.length > 0;
}
