// Public library API of qbackup: the entry point, its services, the typed
// specs callers pass in and the results they get back, the error tree, and
// the libvirt XML layer for applications that speak libvirt's formats.
export { Qbackup, type QbackupOptions } from './qbackup.js';
export { ERROR_CODES, QbackupError, isQbackupError, describeError, type ErrorCode } from './errors.js';

// domains
export * from './domain/domains.js';
export type { DomainDefinition, DiskDefinition, DiskBus, DiskFormat, KernelBoot, GuestAgentChannel } from './model/definition.js';
export { freezeGuest, withQuiesce, type Consistency, type Frozen, type QuiesceMode, type QuiesceTarget, type QuiesceTimeouts } from './domain/quiesce.js';

// checkpoints
export { CheckpointService, type CheckpointCreateOptions, type CheckpointInfo, type DeleteOptions, type ListFilters } from './checkpoint/checkpoints.js';
export { CHECKPOINT_NAME_PATTERN, assertCheckpointName, type CheckpointSpec, type CheckpointDiskSpec, type CheckpointDiskType } from './checkpoint/spec.js';
export type { DiskCoverage, CoverageProblem, CoverageReason } from './checkpoint/coverage.js';

// backup jobs
export { BackupService, type BackupBeginOptions } from './backup/jobs.js';
export { validateBackupSpec, type BackupSpec, type BackupDiskSpec, type BackupMode, type BackupDiskMode, type BackupTargetFormat, type NbdServerSpec } from './backup/spec.js';
export { exportUri, type JobInfo, type JobDisk, type JobState, type DiskJobState, type NbdServer } from './backup/job.js';

// hypervisor drivers (what the repository, instant restore and the daemon use)
export type { HypervisorDriver, DriverDomain, DriverDisk, PullBackup, PullBackupRequest, PullExport, ExportServer, DomainSession, CopyJob, LifecycleHooks } from './drivers/driver.js';
export { openDriver, parseConnectionUri, registerLibvirtDriver, type ConnectionUri, type DriverSources, type LibvirtDriverFactory } from './drivers/open.js';
export { QemuDriver, QEMU_DRIVER_URI } from './drivers/qemu/driver.js';
export { LibvirtDriver, OWN_CHECKPOINT_PREFIX, type LibvirtDriverOptions } from './drivers/libvirt/driver.js';

// instant restore
export { InstantRestoreService, type InstantRestoreInfo, type InstantDiskInfo, type InstantRestoreOptions, type InstantServiceOptions } from './instant/restore.js';
export type { Credentials } from './util/credentials.js';
export type { Faults } from './util/faults.js';

// the repository
export {
  RepositoryService,
  type Progress,
  type RepoAccess,
  type RepoBackupOptions,
  type RestoreOptions,
  type RestoredDisk,
  type PruneResult,
  type PrunePlan,
  type RetentionPolicy,
  type GcReport,
  type RepoStats,
  type VerifyProblem,
  type VerifyReport,
  type Manifest,
  type ManifestDisk,
} from './repository/repository.js';

// libvirt XML at the edge
export { parseDomainXml, formatDomainXml } from './model/definition-xml.js';
export { parseCheckpointXml, formatCheckpointXml, type FormatCheckpointOptions } from './libvirt/checkpoint.js';
export { parseBackupXml, formatBackupXml, parseBackupSpec, backupSpecFromXml, formatJobXml, type BackupXml } from './libvirt/backup.js';

// protocol clients
export { QmpClient } from './qmp/index.js';
export { NbdClient } from './nbd/index.js';

// the service (what `qbackup serve` runs; src/http is its HTTP adapter)
export { QbackupService, BACKUP_TASK, type ServiceOptions, type BackupRequest } from './service/daemon-service.js';
export { TaskManager, type TaskInfo, type TaskState, type TaskProgress, type TaskContext, type TaskRequest, type TaskEvent, type TaskManagerOptions } from './service/tasks.js';
export { Schedules, Scheduler, cronFor, nextRun, systemClock, type Clock, type ScheduleSpec, type ScheduleInfo } from './service/schedules.js';
export { TokenStore, TOKEN_NAME_PATTERN, type TokenInfo } from './store/tokens.js';
export { GuestAgentClient, type GuestAgentOptions } from './qemu/guest-agent.js';
