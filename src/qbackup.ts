// The library's entry point: one Qbackup per state directory, owning the
// metadata database and the services built on it. The CLI (and any embedding
// application) creates one, calls its services, and closes it.

import assert from 'node:assert/strict';
import { chmodSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QbackupError } from './errors.js';
import type { BackupService } from './backup/jobs.js';
import type { CheckpointService } from './checkpoint/checkpoints.js';
import type { DomainService } from './domain/domains.js';
import type { HypervisorDriver } from './drivers/driver.js';
import { LibvirtDriver } from './drivers/libvirt/driver.js';
import { openDriver, parseConnectionUri } from './drivers/open.js';
import { QEMU_DRIVER_URI, QemuDriver } from './drivers/qemu/driver.js';
import { QemuEngine } from './drivers/qemu/engine.js';
import { openDatabase, type Db } from './store/db.js';
import { InstantRestoreService, type Credentials } from './instant/restore.js';
import type { BackendSettings } from './repository/backend/open.js';
import { RepositoryService } from './repository/repository.js';
import type { Faults } from './util/faults.js';
import { makePrivateDir } from './util/private-dir.js';
import type { Logger } from './util/operation.js';

export interface QbackupOptions {
  /** Directory for metadata, QMP sockets and QEMU logs. Created (mode 0700) if missing. */
  stateDir: string;
  /**
   * The hypervisor the repository, instant restore and the daemon work with
   * (src/drivers/open.ts): qbackup:/// (the default) is our own QEMU engine.
   */
  connect?: string | undefined;
  /** The caller's $XDG_RUNTIME_DIR, where qemu:///session finds the user's libvirt daemon. */
  runtimeDir?: string | undefined;
  /** How long a command waits for another one on the same domain. Default 30 s. */
  lockTimeoutMs?: number | undefined;
  accel?: 'auto' | 'kvm' | 'tcg' | undefined;
  qemuBinary?: string | undefined;
  detachTimeoutMs?: number | undefined;
  shutdownTimeoutMs?: number | undefined;
  /** How long a start, or the adoption of a QEMU a killed start left, waits for QMP. Default 30 s. */
  startTimeoutMs?: number | undefined;
  qmpTrace?: ((direction: 'send' | 'recv', message: object) => void) | undefined;
  /**
   * Certificate directory of pull-mode exports over TCP with TLS (ca-cert.pem,
   * server-cert.pem, server-key.pem; libvirt's backup_tls_x509_cert_dir), and
   * of the repository backup's own TLS client (ca-cert.pem, client-cert.pem,
   * client-key.pem). Default: STATE_DIR/pki/qbackup. Read only when TLS is used.
   */
  tlsCertDir?: string | undefined;
  /**
   * Passphrases of LUKS-encrypted push targets and scratch images, one file
   * per libvirt secret UUID holding the passphrase's bytes (0600). Default:
   * STATE_DIR/secrets.
   */
  secretsDir?: string | undefined;
  /**
   * Passphrases and the environment helper processes get (the server of an
   * instant restore): one provider, from the caller. The library reads no
   * environment of its own.
   */
  credentials?: Credentials | undefined;
  /** The program that serves a backup over NBD to an instant restore (argv prefix); default: this qbackup's `serve-backup`. */
  backupServerCommand?: readonly string[] | undefined;
  /** How long starting that server may take. Default 60 s. */
  backupServerTimeoutMs?: number | undefined;
  /** Test-only fault injection (src/util/faults.ts). */
  faults?: Faults | undefined;
  /** Where warnings of opening the state directory go (e.g. a mode made private). */
  logger?: Logger | undefined;
  /** How to reach repositories on object storage (s3://…). */
  backends?: BackendSettings | undefined;
}

/** One hypervisor connection with the services that work through it. */
export interface Connection {
  readonly uri: string;
  readonly driver: HypervisorDriver;
  readonly repository: RepositoryService;
  readonly instant: InstantRestoreService;
}

export class Qbackup implements Disposable {
  readonly db: Db;
  /** Our own QEMU engine: the domains, checkpoints and backup jobs of qbackup's libvirt-style commands. */
  readonly engine: QemuEngine;
  /** The hypervisor the repository, instant restore and the daemon use, chosen by `connect`. */
  readonly driver: HypervisorDriver;
  readonly repository: RepositoryService;
  readonly instant: InstantRestoreService;
  private closed = false;
  /** Connections other than `driver`'s, opened on first use (the daemon serves several), by normalized URI. */
  private readonly others = new Map<string, Connection>();

  private constructor(readonly options: QbackupOptions) {
    prepareStateDir(options.stateDir, options.logger);
    this.db = openDatabase(join(options.stateDir, 'qbackup.db'));
    this.engine = new QemuEngine(this.db, { ...options, lockTimeoutMs: options.lockTimeoutMs ?? 30_000 });
    this.driver = this.openDriver(options.connect);
    this.repository = this.repositoryService(this.driver);
    this.instant = this.instantService(this.driver, this.repository);
  }

  private openDriver(uri: string | undefined): HypervisorDriver {
    const options = this.options;
    return openDriver(uri, {
      qemu: () => new QemuDriver(this.engine),
      libvirt: (u) => new LibvirtDriver({ uri: u.uri, runtimeDir: options.runtimeDir, socketParentDir: tmpdir(), shutdownTimeoutMs: options.shutdownTimeoutMs, faults: options.faults }),
    });
  }

  private repositoryService(driver: HypervisorDriver): RepositoryService {
    const options = this.options;
    return new RepositoryService(driver, { backends: options.backends ?? {}, runDir: join(options.stateDir, 'run'), faults: options.faults });
  }

  private instantService(driver: HypervisorDriver, repository: RepositoryService): InstantRestoreService {
    const options = this.options;
    return new InstantRestoreService(driver, repository, this.db, {
      stateDir: options.stateDir,
      serverCommand: options.backupServerCommand,
      serverTimeoutMs: options.backupServerTimeoutMs,
      s3: options.backends?.s3,
      credentials: options.credentials,
      faults: options.faults,
    });
  }

  /**
   * The services of a hypervisor connection: `driver`'s own for undefined or
   * its URI, else another driver opened on first use and kept until close()
   * (the daemon lists and backs up qbackup's own domains and libvirt's side
   * by side). A URI that names no usable driver is DRIVER_UNAVAILABLE.
   */
  connection(uri?: string | undefined): Connection {
    const key = uri === undefined ? this.driver.uri : parseConnectionUri(uri).uri;
    if (key === this.driver.uri) return { uri: key, driver: this.driver, repository: this.repository, instant: this.instant };
    let c = this.others.get(key);
    if (c === undefined) {
      assert(!this.closed, `connection "${key}" asked of a closed Qbackup`);
      const driver = this.openDriver(key);
      const repository = this.repositoryService(driver);
      c = { uri: key, driver, repository, instant: this.instantService(driver, repository) };
      this.others.set(key, c);
    }
    return c;
  }

  // The engine's own services serve the domains qbackup runs itself; under
  // another connection they would answer for the wrong hypervisor, so they
  // refuse in one sentence.
  get domains(): DomainService {
    return this.ownEngine().domains;
  }

  get checkpoints(): CheckpointService {
    return this.ownEngine().checkpoints;
  }

  get backups(): BackupService {
    return this.ownEngine().backups;
  }

  private ownEngine(): QemuEngine {
    if (this.driver.uri !== QEMU_DRIVER_URI) {
      throw new QbackupError('NOT_SUPPORTED', `This command works on the domains qbackup runs itself, not through "${this.driver.uri}": use virsh for libvirt's domains, or qbackup's list, backup, restore and backup-list with --connect`);
    }
    return this.engine;
  }

  static open(options: QbackupOptions): Qbackup {
    return new Qbackup(options);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    // The libvirt driver's connection; closing it cannot fail in a way the caller could act on.
    void this.driver.close?.().catch(() => undefined);
    for (const c of this.others.values()) void c.driver.close?.().catch(() => undefined);
    this.others.clear();
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
