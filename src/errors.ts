// The single error tree of qbackup. Every condition a user, a peer or the
// environment can cause is a QbackupError with a stable string `code`; the CLI
// prints `message` (one sentence naming the object and the cause) and exits
// non-zero. Anything else that escapes is a bug and is printed with its stack.

export type ErrorCode =
  | 'INVALID_ARGUMENT'
  | 'INVALID_NAME'
  | 'INVALID_XML'
  | 'DOMAIN_NOT_FOUND'
  | 'DOMAIN_EXISTS'
  | 'DOMAIN_RUNNING'
  | 'DOMAIN_NOT_RUNNING'
  | 'DOMAIN_LOCKED'
  | 'DISK_NOT_FOUND'
  | 'DISK_EXISTS'
  | 'IMAGE_NOT_FOUND'
  | 'IMAGE_ERROR'
  | 'QEMU_START_FAILED'
  | 'QEMU_DIED'
  | 'QMP_ERROR'
  | 'QMP_PROTOCOL'
  | 'QMP_DISCONNECTED'
  | 'QMP_TIMEOUT'
  | 'QMP_STATE'
  | 'NBD_PROTOCOL'
  | 'NBD_ERROR'
  | 'NBD_DISCONNECTED'
  | 'NBD_TIMEOUT'
  | 'NBD_STATE'
  | 'NBD_HANDSHAKE'
  | 'NBD_EXPORT_NOT_FOUND'
  | 'TOOL_FAILED'
  | 'STATE_DIR'
  | 'CHECKPOINT_NOT_FOUND'
  | 'CHECKPOINT_EXISTS'
  | 'CHECKPOINT_INVALID'
  | 'BITMAP_INCONSISTENT'
  | 'BACKUP_RUNNING'
  | 'BACKUP_FAILED'
  | 'JOB_NOT_FOUND'
  | 'METADATA_INCONSISTENT'
  | 'NOT_SUPPORTED'
  | 'REPO_INVALID'
  | 'REPO_LOCKED'
  | 'BACKUP_NOT_FOUND'
  | 'VERIFY_FAILED';

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
