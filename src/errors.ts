// The single error tree of qbackup. Every condition a user, a peer or the
// environment can cause is a QbackupError with a stable string `code` (listed
// with their meanings in ERROR_CODES); the CLI prints `message` (one sentence
// naming the object and the cause) and exits non-zero. Anything else that
// escapes is a bug (a failed `assert` from src/util/assert.ts, or any other
// exception) and is printed with its stack.
//
//   Error
//   ├── QbackupError { code, details, cause }   conditions users, peers and the environment cause
//   │   ├── QmpCommandError, QmpProtocolError  (src/qmp/)
//   │   └── NbdCommandError, NbdProtocolError  (src/nbd/errors.ts)
//   └── AssertionError                         a bug in qbackup or in its caller

/**
 * Every error code, grouped, with what it means. The HTTP layer maps these to
 * statuses in one table; a code never changes meaning once released.
 */
export const ERROR_CODES = {
  // -- the caller's request
  INVALID_ARGUMENT: 'a request that cannot be carried out as given (conflicting options, a path that exists, …)',
  INVALID_NAME: 'a domain, disk or checkpoint name outside the allowed pattern',
  INVALID_XML: 'a libvirt document that is malformed or breaks its schema',
  NOT_SUPPORTED: 'a valid request qbackup refuses rather than weakening it (TLS, encryption, …)',
  DRIVER_UNAVAILABLE: 'a connection URI names a hypervisor driver this qbackup does not have (or a URI it cannot read)',
  // -- objects that are missing, present or busy
  DOMAIN_NOT_FOUND: 'no domain of that name',
  DOMAIN_EXISTS: 'a domain of that name or UUID exists',
  DOMAIN_RUNNING: 'the domain must be shut off for this',
  DOMAIN_NOT_RUNNING: 'the domain must be running for this',
  DOMAIN_LOCKED: 'another command holds the domain',
  DISK_NOT_FOUND: 'the domain has no disk of that target',
  DISK_EXISTS: 'the target or the image is in use',
  IMAGE_NOT_FOUND: 'an image file does not exist',
  IMAGE_ERROR: 'an image cannot be opened or read as its format',
  CHECKPOINT_NOT_FOUND: 'no checkpoint of that name',
  CHECKPOINT_EXISTS: 'a checkpoint of that name exists, or checkpoints block the request',
  CHECKPOINT_INVALID: 'a checkpoint definition that cannot be redefined as given',
  BITMAP_INCONSISTENT: 'coverage is lost and the request needs it (e.g. --strict)',
  BACKUP_RUNNING: 'a backup job runs on the domain',
  RESTORE_RUNNING: "an instant restore is still copying the domain's data",
  JOB_NOT_FOUND: 'no backup job to show, wait for or abort',
  BACKUP_NOT_FOUND: 'no backup of that id in the repository',
  FILE_NOT_FOUND: 'no file or directory at that path in a backed-up filesystem',
  FILESYSTEM_NOT_FOUND: 'a backup has no filesystem of that device, or none to choose on its own',
  FILE_TOO_LARGE: 'a file or listing is larger than the limit of one operation',
  // -- outcomes of work that ran
  BACKUP_FAILED: 'a backup job or repository backup did not complete',
  VERIFY_FAILED: 'verification found damage',
  TOOL_FAILED: 'a QEMU tool (qemu-img, nbdcopy, …) failed; its own message is included',
  BACKUP_SERVER: 'the process serving a backup to an instant restore did not start, or serves other disks or sizes than the restore recorded',
  // -- QEMU and its protocols
  QEMU_START_FAILED: 'QEMU did not start',
  QEMU_DIED: 'QEMU exited while a command ran',
  QMP_ERROR: 'QEMU refused a QMP command',
  QMP_PROTOCOL: 'QEMU sent something that is not QMP',
  QMP_DISCONNECTED: 'the QMP connection closed',
  QMP_TIMEOUT: 'QEMU did not answer in time',
  QMP_STATE: 'a QMP call in the wrong connection state',
  NBD_PROTOCOL: 'an NBD peer broke the protocol',
  NBD_ERROR: 'an NBD server answered a request with an error',
  NBD_DISCONNECTED: 'the NBD connection closed',
  NBD_TIMEOUT: 'an NBD server did not answer in time',
  NBD_STATE: 'an NBD call in the wrong connection state',
  NBD_HANDSHAKE: 'the NBD handshake failed',
  NBD_EXPORT_NOT_FOUND: 'the NBD server has no export of that name',
  NBD_TLS: 'TLS with an NBD server could not be set up (STARTTLS refused, an untrusted or unacceptable certificate); never answered by falling back to plain',
  SECRET_NOT_FOUND: 'the passphrase file of a secret (STATE_DIR/secrets/UUID) is missing, empty, unreadable or readable by others',
  TLS_CREDENTIALS: 'a TLS certificate directory is missing, unreadable or lacks a file it needs (ca-cert.pem, server-cert.pem, …)',
  APPLIANCE_FAILED: 'the libguestfs appliance that reads backed-up filesystems cannot start or stopped',
  APPLIANCE_TIMEOUT: 'the libguestfs appliance did not finish an operation in time (it was stopped)',
  GUEST_AGENT: 'quiescing or writing files into a guest needs the guest agent and it is not configured, did not answer, does not allow the commands needed, or refused one',
  // -- qbackup's own state
  STATE_DIR: 'the state directory or metadata database cannot be used',
  METADATA_INCONSISTENT: 'stored metadata contradicts itself or is damaged',
  REPO_INVALID: 'a repository that is missing, damaged or of another format',
  REPO_LOCKED: 'another process holds the repository for this domain',
  REPO_OBJECT_NOT_FOUND: 'a repository object (pack, index, manifest, key) is missing',
  REPO_DAMAGED: 'a repository object does not match its id or cannot be decoded',
  REPO_FULL: 'the storage under the repository is full',
  REPO_ACCESS_DENIED: 'the object store refused the credentials, or none are configured',
  REPO_UNAVAILABLE: 'the object store cannot be reached or kept failing (after retries)',
  WRONG_PASSWORD: 'no key of the repository opens with the given passphrase',
  // -- the configuration file
  CONFIG_INVALID: 'the configuration file cannot be read, is not YAML, or breaks its schema (the message names the file and line)',
  REPOSITORY_NOT_ALLOWED: 'the daemon reaches only the repositories its configuration names, and this is not one of them',
  CONNECTION_NOT_ALLOWED: 'the daemon reaches only the hypervisor connections its configuration names (and its own default), and this is not one of them',
  PASSWORD_UNAVAILABLE: 'a passphrase file or command of a repository gave no passphrase',
  // -- the daemon (qbackup serve)
  TASK_NOT_FOUND: 'no task of that id (it may have aged out of the kept history)',
  TASK_CANCELLED: 'a task was cancelled while it ran',
  CANCELLED: 'the caller cancelled a long operation (its AbortSignal fired)',
  TASK_NOT_CANCELLABLE: 'the task cannot stop mid-way; it ends on its own',
  TASK_INTERRUPTED: 'the daemon stopped while the task was running',
  SCHEDULE_NOT_FOUND: 'no schedule of that id',
  SCHEDULE_FROM_CONFIG: 'a schedule imported from the configuration file is changed in that file, not through the API',
  AUTH_REQUIRED: 'the request carries no API token, or one that is unknown or revoked',
  READ_ONLY_TOKEN: 'a read-only token asked for a change',
  ROUTE_NOT_FOUND: 'no API endpoint at that path and method',
  REQUEST_TOO_LARGE: 'the request body is larger than the daemon accepts',
  RATE_LIMITED: 'too many requests from one client; retry later',
  // -- libvirt (the libvirt driver's RPC client, src/drivers/libvirt/)
  LIBVIRT_UNAVAILABLE: 'no libvirt daemon answers at the connection URI (no socket, or nothing listening on it)',
  LIBVIRT_ACCESS_DENIED: "libvirt refused this client: permission denied on its socket, or an authentication qbackup does not do (polkit, SASL)",
  LIBVIRT_ERROR: "libvirt refused a call; its own message is kept",
  LIBVIRT_PROTOCOL: 'the libvirt daemon sent something that is not its RPC protocol',
  LIBVIRT_DISCONNECTED: 'the connection to the libvirt daemon closed',
  LIBVIRT_TIMEOUT: 'the libvirt daemon did not answer in time',
  LIBVIRT_STATE: 'a libvirt call in the wrong connection state',
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

export class QbackupError extends Error {
  readonly code: ErrorCode;
  readonly details: Readonly<Record<string, unknown>>;

  constructor(code: ErrorCode, message: string, options: { cause?: unknown; details?: Record<string, unknown> } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'QbackupError';
    this.code = code;
    this.details = options.details ?? {};
  }
}

export function isQbackupError(err: unknown, code?: ErrorCode): err is QbackupError {
  return err instanceof QbackupError && (code === undefined || err.code === code);
}

/** Short description of any thrown value, for wrapping causes into messages. */
export function describeError(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}
