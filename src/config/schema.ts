// The JSON schema of the configuration file (config.yaml), as it is written:
// keys in kebab-case, every object closed (an unknown key is a mistake the
// admin is told about, with its line). References between sections (a
// schedule's repository, a notification target's name) and values with their
// own grammar (a schedule's `when`) are checked after the schema, in load.ts.

const name = { type: 'string', pattern: '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$' } as const;
const absolutePath = { type: 'string', pattern: '^/' } as const;
const httpUrl = { type: 'string', pattern: '^https?://[^\\s]+$' } as const;
const count = { type: 'integer', minimum: 1 } as const;

export const RETENTION_SCHEMA = {
  type: 'object',
  additionalProperties: false,
  properties: {
    'keep-last': count,
    'keep-hourly': count,
    'keep-daily': count,
    'keep-weekly': count,
    'keep-monthly': count,
    'keep-yearly': count,
  },
} as const;

const repository = {
  type: 'object',
  additionalProperties: false,
  properties: {
    path: absolutePath,
    url: { type: 'string', pattern: '^s3://[^\\s]+$' },
    endpoint: httpUrl,
    region: { type: 'string', minLength: 1 },
    'path-style': { type: 'boolean' },
    'credentials-file': absolutePath,
    'password-file': absolutePath,
    'password-command': { type: 'string', minLength: 1 },
  },
  oneOf: [{ required: ['path'] }, { required: ['url'] }],
} as const;

const schedule = {
  type: 'object',
  additionalProperties: false,
  required: ['when'],
  properties: {
    run: { enum: ['backup', 'verify', 'gc', 'copy'] },
    domain: { type: 'string', minLength: 1, maxLength: 256 },
    connection: { type: 'string', minLength: 1 },
    when: { type: 'string', minLength: 1 },
    repository: { type: 'string', minLength: 1 },
    to: { type: 'string', minLength: 1 },
    full: { type: 'boolean' },
    retention: RETENTION_SCHEMA,
    'read-data-percent': { type: 'number', exclusiveMinimum: 0, maximum: 100 },
    'ping-url': httpUrl,
    notify: { type: 'array', items: { type: 'string' } },
  },
} as const;

const notification = {
  type: 'object',
  additionalProperties: false,
  properties: {
    webhook: httpUrl,
    email: { type: 'string', pattern: '^[^\\s@]+@[^\\s@]+$' },
    sendmail: absolutePath,
    on: { type: 'array', items: { enum: ['failure', 'success'] }, minItems: 1 },
    retries: { type: 'integer', minimum: 0, maximum: 10 },
  },
  oneOf: [{ required: ['webhook'] }, { required: ['email'] }],
} as const;

export const CONFIG_SCHEMA = {
  type: 'object',
  additionalProperties: false,
  properties: {
    repositories: { type: 'object', propertyNames: name, additionalProperties: repository },
    'allow-repositories': { type: 'array', items: { type: 'string', minLength: 1 } },
    connections: { type: 'object', propertyNames: name, additionalProperties: { type: 'string', pattern: '^[a-z0-9+]+://' } },
    defaults: {
      type: 'object',
      additionalProperties: false,
      properties: {
        repository: { type: 'string', minLength: 1 },
        connection: { type: 'string', minLength: 1 },
        retention: RETENTION_SCHEMA,
        quiesce: { enum: ['none', 'optional', 'required'] },
        bandwidth: { type: 'number', exclusiveMinimum: 0 },
      },
    },
    schedules: { type: 'object', propertyNames: name, additionalProperties: schedule },
    notifications: { type: 'object', propertyNames: name, additionalProperties: notification },
    metrics: { enum: ['public', 'token'] },
    server: {
      type: 'object',
      additionalProperties: false,
      properties: {
        listen: { type: 'string', minLength: 1 },
        'tls-cert': absolutePath,
        'tls-key': absolutePath,
        'max-tasks': count,
        'state-dir': absolutePath,
      },
    },
  },
} as const;
