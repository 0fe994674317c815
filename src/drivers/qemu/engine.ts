// Our own QEMU engine, assembled: the domain service (processes, disks, the
// per-domain lock), checkpoints (persistent dirty bitmaps) and backup jobs
// (QMP transactions, NBD exports), on one metadata database, with their
// lifecycle hooks wired in the one order they must run. Only the QEMU driver
// (./driver.ts) and the CLI's and HTTP's libvirt-style commands (which manage
// this engine's own domains) use it directly.

import { join } from 'node:path';
import { BackupService } from '../../backup/jobs.js';
import { CheckpointService } from '../../checkpoint/checkpoints.js';
import { DomainService, refuseWhileRestoring, type DomainContext, type DomainServiceOptions } from '../../domain/domains.js';
import type { QmpClient } from '../../qmp/index.js';
import { CheckpointStore } from '../../store/checkpoints.js';
import type { Db } from '../../store/db.js';
import { DomainStore } from '../../store/domains.js';
import { JobStore } from '../../store/jobs.js';
import type { Faults } from '../../util/faults.js';
import type { LifecycleHooks } from '../driver.js';
import { QemuSession } from './session.js';

export interface QemuEngineOptions extends DomainServiceOptions {
  /** Certificate directory of pull exports over TCP with TLS. Default: STATE_DIR/pki/qbackup. */
  tlsCertDir?: string | undefined;
  /** Passphrases of LUKS targets and scratch images. Default: STATE_DIR/secrets. */
  secretsDir?: string | undefined;
  /** Test-only fault injection (src/util/faults.ts). */
  faults?: Faults | undefined;
}

export class QemuEngine {
  readonly domains: DomainService;
  readonly checkpoints: CheckpointService;
  readonly backups: BackupService;
  private lifecycle: LifecycleHooks = {};

  constructor(db: Db, options: QemuEngineOptions) {
    this.domains = new DomainService(new DomainStore(db), options);
    this.checkpoints = new CheckpointService(this.domains, new CheckpointStore(db), { faults: options.faults });
    this.backups = new BackupService(this.domains, this.checkpoints, new JobStore(db), {
      tlsCertDir: options.tlsCertDir ?? join(options.stateDir, 'pki', 'qbackup'),
      secretsDir: options.secretsDir ?? join(options.stateDir, 'secrets'),
      faults: options.faults,
    });
    this.wireHooks();
  }

  /** The instant restore's hooks (through the driver interface); once. */
  setLifecycleHooks(hooks: LifecycleHooks): void {
    this.lifecycle = hooks;
  }

  session(ctx: DomainContext, qmp?: QmpClient): QemuSession {
    return new QemuSession(this.domains, ctx, qmp);
  }

  /**
   * Every hook, in the order it must run. On open: first complete or roll
   * back an interrupted checkpoint change, then settle a backup job (which may
   * commit its checkpoint), then an instant restore (finalize a finished copy,
   * bring back a dead server or copy job). A start serves the backup of an
   * instant restore first, and copies after.
   */
  private wireHooks(): void {
    this.domains.setHooks({
      onOpen: async (ctx) => {
        await this.checkpoints.recover(ctx);
        await this.backups.reap(ctx);
        await this.lifecycle.onOpen?.(this.session(ctx));
      },
      beforeStart: async (ctx) => {
        await this.lifecycle.beforeStart?.(this.session(ctx));
      },
      afterStart: async (ctx, qmp) => {
        await this.checkpoints.reconcile(ctx, qmp);
        await this.lifecycle.afterStart?.(this.session(ctx, qmp));
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
        this.lifecycle.beforeUndefine?.(this.session(ctx));
      },
    });
  }
}
