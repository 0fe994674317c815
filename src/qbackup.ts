// The library's entry point: one Qbackup per state directory, owning the
// metadata database and the services built on it. The CLI (and any embedding
// application) creates one, calls its services, and closes it.

import { chmodSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { QbackupError } from './errors.js';
import { BackupService } from './backup/service.js';
import { CheckpointService } from './checkpoint/service.js';
import { DomainService, refuseWhileRestoring, type DomainServiceOptions } from './domain/service.js';
import { openDatabase, type Db } from './store/db.js';
import { CheckpointStore } from './store/checkpoints.js';
import { InstantRestoreService } from './repository/instant.js';
import type { BackendSettings } from './repository/backend/open.js';
import { RepositoryService } from './repository/service.js';
import { DomainStore } from './store/domains.js';
import { JobStore } from './store/jobs.js';
import { makePrivateDir } from './util/private-dir.js';
import type { Logger } from './util/operation.js';

export interface QbackupOptions {
  /** Directory for metadata, QMP sockets and QEMU logs. Created (mode 0700) if missing. */
  stateDir: string;
  /** How long a command waits for another one on the same domain. Default 30 s. */
  lockTimeoutMs?: number;
  accel?: 'auto' | 'kvm' | 'tcg';
  qemuBinary?: string;
  detachTimeoutMs?: number;
  shutdownTimeoutMs?: number;
  /** How long a start, or the adoption of a QEMU a killed start left, waits for QMP. Default 30 s. */
  startTimeoutMs?: number;
  qmpTrace?: (direction: 'send' | 'recv', message: object) => void;
  /**
   * Certificate directory of pull-mode exports over TCP with TLS (ca-cert.pem,
   * server-cert.pem, server-key.pem; libvirt's backup_tls_x509_cert_dir), and
   * of the repository backup's own TLS client (ca-cert.pem, client-cert.pem,
   * client-key.pem). Default: STATE_DIR/pki/qbackup. Read only when TLS is used.
   */
  tlsCertDir?: string;
  /**
   * Passphrases of LUKS-encrypted push targets and scratch images, one file
   * per libvirt secret UUID holding the passphrase's bytes (0600). Default:
   * STATE_DIR/secrets.
   */
  secretsDir?: string;
  /** The passphrase a command uses when it must restart the server of an instant restore from an encrypted repository. */
  repositoryPassword?: string;
  /** The program that serves a backup over NBD to an instant restore (argv prefix); default: this qbackup's `serve-backup`. */
  backupServerCommand?: readonly string[];
  /** How long starting that server may take. Default 60 s. */
  backupServerTimeoutMs?: number;
  /** Test-only fault injection: qbackup kills itself (SIGKILL) at this point. */
  crashAt?: string;
  /** Where warnings of opening the state directory go (e.g. a mode made private). */
  logger?: Logger | undefined;
  /** How to reach repositories on object storage (s3://…). */
  backends?: BackendSettings;
}

export class Qbackup implements Disposable {
  readonly db: Db;
  readonly domains: DomainService;
  readonly checkpoints: CheckpointService;
  readonly backups: BackupService;
  readonly repository: RepositoryService;
  readonly instant: InstantRestoreService;
  private closed = false;

  private constructor(readonly options: QbackupOptions) {
    prepareStateDir(options.stateDir, options.logger);
    this.db = openDatabase(join(options.stateDir, 'qbackup.db'));
    const domainOptions: DomainServiceOptions = {
      stateDir: options.stateDir,
      lockTimeoutMs: options.lockTimeoutMs ?? 30_000,
      ...(options.accel !== undefined ? { accel: options.accel } : {}),
      ...(options.qemuBinary !== undefined ? { qemuBinary: options.qemuBinary } : {}),
      ...(options.detachTimeoutMs !== undefined ? { detachTimeoutMs: options.detachTimeoutMs } : {}),
      ...(options.shutdownTimeoutMs !== undefined ? { shutdownTimeoutMs: options.shutdownTimeoutMs } : {}),
      ...(options.startTimeoutMs !== undefined ? { startTimeoutMs: options.startTimeoutMs } : {}),
      ...(options.qmpTrace !== undefined ? { qmpTrace: options.qmpTrace } : {}),
    };
    this.domains = new DomainService(new DomainStore(this.db), domainOptions);
    this.checkpoints = new CheckpointService(this.domains, new CheckpointStore(this.db), options.crashAt);
    this.backups = new BackupService(this.domains, this.checkpoints, new JobStore(this.db), options.crashAt, {
      tlsCertDir: options.tlsCertDir ?? join(options.stateDir, 'pki', 'qbackup'),
      secretsDir: options.secretsDir ?? join(options.stateDir, 'secrets'),
    });
    this.instant = new InstantRestoreService(this.domains, {
      ...(options.backupServerCommand !== undefined ? { serverCommand: options.backupServerCommand } : {}),
      ...(options.backupServerTimeoutMs !== undefined ? { serverTimeoutMs: options.backupServerTimeoutMs } : {}),
      ...(options.backends?.s3 !== undefined ? { s3: options.backends.s3 } : {}),
    });
    this.instant.password = options.repositoryPassword;
    this.repository = new RepositoryService(this.domains, this.checkpoints, this.backups, this.instant, options.backends ?? {});
    // Every hook of the library, in the order it must run. On open: first
    // complete or roll back an interrupted checkpoint change, then settle a
    // backup job (which may commit its checkpoint), then an instant restore
    // (finalize a finished copy, bring back a dead server or copy job). A
    // start serves the backup of an instant restore first, and copies after.
    this.domains.setHooks({
      onOpen: async (ctx) => {
        await this.checkpoints.recover(ctx);
        await this.backups.reap(ctx);
        await this.instant.onOpen(ctx);
      },
      beforeStart: (ctx) => this.instant.beforeStart(ctx),
      afterStart: async (ctx, qmp) => {
        await this.checkpoints.reconcile(ctx, qmp);
        await this.instant.afterStart(ctx, qmp);
      },
      afterAttach: async (ctx, _disk, qmp) => {
        await this.checkpoints.reconcile(ctx, qmp);
      },
      sizesMayHaveChanged: (ctx, qmp) => this.checkpoints.noteSizes(ctx, qmp),
      beforeConfigChange: (ctx, what) => {
        this.backups.assertNoJob(ctx, what);
        // An undefine may end an instant restore (its server goes with it).
        if (what !== 'undefine') refuseWhileRestoring(ctx, what);
      },
      beforeUndefine: (ctx, options) => {
        this.checkpoints.assertUndefinable(ctx, options);
        this.instant.beforeUndefine(ctx);
      },
    });
  }

  static open(options: QbackupOptions): Qbackup {
    return new Qbackup(options);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.db.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

function prepareStateDir(dir: string, logger: Logger | undefined): void {
  try {
    const st = statSync(dir, { throwIfNoEntry: false });
    if (st !== undefined && !st.isDirectory()) {
      throw new QbackupError('STATE_DIR', `Cannot use state directory "${dir}": it is not a directory`);
    }
    // It holds the inventory, image paths, task history and token hashes: owner only.
    if (st !== undefined && (st.mode & 0o077) !== 0) {
      chmodSync(dir, 0o700);
      logger?.log({ level: 'warn', msg: `State directory "${dir}" was readable by others (mode 0${(st.mode & 0o777).toString(8)}): set it to 0700` });
    }
    makePrivateDir(join(dir, 'domains'));
  } catch (err) {
    if (err instanceof QbackupError) throw err;
    throw new QbackupError('STATE_DIR', `Cannot use state directory "${dir}": ${(err as Error).message}`, { cause: err });
  }
}
