// Errors as the HTTP API shows them: every QbackupError code maps to one
// status in HTTP_STATUS (a Record over ErrorCode, so a new code does not
// compile until it has a status), and every error body is `{ code, message }`
// with the same one-sentence message the CLI prints. Request errors found by
// fastify (schema validation, bad JSON, a body too large) become the same
// shape with a sentence built from what was wrong.

import { QbackupError, describeError, type ErrorCode } from '../errors.js';

export const HTTP_STATUS: Readonly<Record<ErrorCode, number>> = {
  INVALID_ARGUMENT: 400,
  INVALID_NAME: 400,
  INVALID_XML: 400,
  NOT_SUPPORTED: 501,
  DRIVER_UNAVAILABLE: 501,
  DOMAIN_NOT_FOUND: 404,
  DOMAIN_EXISTS: 409,
  DOMAIN_RUNNING: 409,
  DOMAIN_NOT_RUNNING: 409,
  DOMAIN_LOCKED: 409,
  DISK_NOT_FOUND: 404,
  DISK_EXISTS: 409,
  IMAGE_NOT_FOUND: 404,
  IMAGE_ERROR: 422,
  CHECKPOINT_NOT_FOUND: 404,
  CHECKPOINT_EXISTS: 409,
  CHECKPOINT_INVALID: 422,
  BITMAP_INCONSISTENT: 409,
  BACKUP_RUNNING: 409,
  RESTORE_RUNNING: 409,
  JOB_NOT_FOUND: 404,
  BACKUP_NOT_FOUND: 404,
  FILE_NOT_FOUND: 404,
  FILESYSTEM_NOT_FOUND: 404,
  FILE_TOO_LARGE: 413,
  APPLIANCE_FAILED: 503,
  APPLIANCE_TIMEOUT: 504,
  BACKUP_FAILED: 500,
  VERIFY_FAILED: 500,
  TOOL_FAILED: 500,
  BACKUP_SERVER: 502,
  QEMU_START_FAILED: 500,
  QEMU_DIED: 500,
  GUEST_AGENT: 502,
  QMP_ERROR: 500,
  QMP_PROTOCOL: 502,
  QMP_DISCONNECTED: 502,
  QMP_TIMEOUT: 504,
  QMP_STATE: 500,
  NBD_PROTOCOL: 502,
  NBD_ERROR: 502,
  NBD_DISCONNECTED: 502,
  NBD_TIMEOUT: 504,
  NBD_STATE: 500,
  NBD_HANDSHAKE: 502,
  NBD_EXPORT_NOT_FOUND: 404,
  NBD_TLS: 502,
  TLS_CREDENTIALS: 422,
  SECRET_NOT_FOUND: 422,
  STATE_DIR: 500,
  METADATA_INCONSISTENT: 500,
  REPO_INVALID: 422,
  REPO_LOCKED: 409,
  REPO_OBJECT_NOT_FOUND: 500,
  REPO_DAMAGED: 500,
  REPO_FULL: 507,
  CONFIG_INVALID: 500,
  REPOSITORY_NOT_ALLOWED: 403,
  CONNECTION_NOT_ALLOWED: 403,
  PASSWORD_UNAVAILABLE: 422,
  REPO_ACCESS_DENIED: 502,
  REPO_UNAVAILABLE: 503,
  WRONG_PASSWORD: 403,
  TASK_NOT_FOUND: 404,
  SCHEDULE_FROM_CONFIG: 409,
  TASK_CANCELLED: 409,
  CANCELLED: 409,
  TASK_NOT_CANCELLABLE: 409,
  TASK_INTERRUPTED: 500,
  SCHEDULE_NOT_FOUND: 404,
  AUTH_REQUIRED: 401,
  READ_ONLY_TOKEN: 403,
  ROUTE_NOT_FOUND: 404,
  REQUEST_TOO_LARGE: 413,
  RATE_LIMITED: 429,
  LIBVIRT_UNAVAILABLE: 503,
  LIBVIRT_ACCESS_DENIED: 502,
  LIBVIRT_ERROR: 502,
  LIBVIRT_PROTOCOL: 502,
  LIBVIRT_DISCONNECTED: 502,
  LIBVIRT_TIMEOUT: 504,
  LIBVIRT_STATE: 500,
};

export interface ErrorBody {
  code: string;
  message: string;
}

export const ERROR_BODY_SCHEMA = {
  type: 'object',
  properties: { code: { type: 'string' }, message: { type: 'string' } },
  required: ['code', 'message'],
} as const;

/** What fastify attaches to its own errors. */
interface FastifyLikeError extends Error {
  code?: string;
  statusCode?: number;
  validation?: Array<{ instancePath: string; keyword: string; message?: string; params: Record<string, unknown> }>;
  validationContext?: string;
}

/** The status and body for anything a handler threw. `internal` is set for bugs (to be logged with their stack). */
export function httpError(err: unknown): { status: number; body: ErrorBody; internal: boolean } {
  if (err instanceof QbackupError) return { status: HTTP_STATUS[err.code], body: { code: err.code, message: err.message }, internal: false };
  const e = err as FastifyLikeError;
  if (e instanceof Error && Array.isArray(e.validation)) return { status: 400, body: { code: 'INVALID_ARGUMENT', message: validationMessage(e) }, internal: false };
  if (e instanceof Error && e.code === 'FST_ERR_CTP_BODY_TOO_LARGE') {
    return { status: 413, body: { code: 'REQUEST_TOO_LARGE', message: 'The request body is larger than the daemon accepts' }, internal: false };
  }
  if (e instanceof Error && e.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') {
    return { status: 415, body: { code: 'INVALID_ARGUMENT', message: 'The request body has a content type the API does not take: send application/json (or application/xml where libvirt XML is accepted)' }, internal: false };
  }
  if (e instanceof Error && typeof e.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500) {
    return { status: e.statusCode, body: { code: 'INVALID_ARGUMENT', message: sentence(e.message) }, internal: false };
  }
  return { status: 500, body: { code: 'INTERNAL', message: `Internal error (a bug in qbackup, please report it): ${describeError(err)}` }, internal: true };
}

function sentence(text: string): string {
  const t = text.replace(/\s+/g, ' ').trim();
  return t.length === 0 ? 'The request is invalid' : t.charAt(0).toUpperCase() + t.slice(1);
}

function validationMessage(e: FastifyLikeError): string {
  const where = e.validationContext === 'body' ? 'request body' : e.validationContext === 'querystring' ? 'query string' : e.validationContext === 'params' ? 'path' : 'request';
  const first = e.validation?.[0];
  if (first === undefined) return `Invalid ${where}`;
  const field = first.instancePath.replace(/^\//, '').replace(/\//g, '.');
  const at = field === '' ? '' : ` field "${field}"`;
  switch (first.keyword) {
    case 'additionalProperties':
      return `Invalid ${where}${at}: unknown field "${String(first.params['additionalProperty'])}"`;
    case 'required':
      return `Invalid ${where}${at}: missing field "${String(first.params['missingProperty'])}"`;
    case 'type':
      return `Invalid ${where}${at}: expected ${String(first.params['type'])}`;
    case 'enum':
      return `Invalid ${where}${at}: expected one of ${(first.params['allowedValues'] as unknown[]).map((v) => JSON.stringify(v)).join(', ')}`;
    default:
      return `Invalid ${where}${at}: it ${first.message ?? 'is not acceptable'}`;
  }
}
