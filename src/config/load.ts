// Reading config.yaml: the YAML library's parser (which keeps each node's
// position), then the JSON schema (ajv), then the references between
// sections. Every refusal is one sentence naming the file and the line:
//   Invalid configuration "/etc/qbackup/config.yaml", line 7: unknown key "pasword-file" in repositories.local
//
// Which file: --config F, else /etc/qbackup/config.yaml as root, else
// $XDG_CONFIG_HOME/qbackup/config.yaml (~/.config/qbackup/config.yaml). The
// default file may be absent (an empty configuration); a named one must exist.

import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { createRequire } from 'node:module';
import type { ErrorObject, ValidateFunction } from 'ajv';
import type { Document } from 'yaml';
import { QbackupError, describeError } from '../errors.js';
import type { RetentionPolicy } from '../repository/repository.js';
import { cronFor } from '../service/schedules.js';
import { emptyConfig, type NotificationTarget, type QbackupConfig, type RepositoryConfig, type ScheduleConfig } from './config.js';
import { CONFIG_SCHEMA } from './schema.js';

/** The file a command reads when no --config is given. */
export function defaultConfigFile(env: Readonly<Record<string, string | undefined>>, isRoot: boolean): string {
  if (isRoot) return '/etc/qbackup/config.yaml';
  return join(env['XDG_CONFIG_HOME'] || join(homedir(), '.config'), 'qbackup', 'config.yaml');
}

/** Reads a configuration file; `required`: a missing file is an error (else the empty configuration). */
export function loadConfigFile(file: string, required: boolean): QbackupConfig {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' && !required) return emptyConfig();
    const why = (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'it does not exist' : describeError(err);
    throw new QbackupError('CONFIG_INVALID', `Cannot read the configuration file "${file}": ${why}`, { cause: err });
  }
  return parseConfig(text, file);
}

interface Raw {
  repositories?: Record<string, Record<string, unknown>>;
  'allow-repositories'?: string[];
  connections?: Record<string, string>;
  defaults?: { repository?: string; connection?: string; retention?: Record<string, number>; quiesce?: 'none' | 'optional' | 'required'; bandwidth?: number };
  schedules?: Record<string, Record<string, unknown>>;
  notifications?: Record<string, Record<string, unknown>>;
  metrics?: 'public' | 'token';
  server?: Record<string, unknown>;
}

// The YAML parser and the schema validator are loaded, and the schema
// compiled, when a configuration file is first parsed: most commands run
// without one, and loading them is most of the CLI's start-up time.
const require = createRequire(import.meta.url);
let yamlModule: typeof import('yaml') | undefined;
function yaml(): typeof import('yaml') {
  yamlModule ??= require('yaml') as typeof import('yaml');
  return yamlModule;
}
let compiled: ValidateFunction<Raw> | undefined;
function validator(): ValidateFunction<Raw> {
  const { Ajv } = require('ajv') as typeof import('ajv');
  compiled ??= new Ajv({ allErrors: false, verbose: true, strict: true, strictRequired: false }).compile<Raw>(CONFIG_SCHEMA);
  return compiled;
}

/** Parses and checks the text of a configuration file (`file` names it in errors). */
export function parseConfig(text: string, file: string): QbackupConfig {
  const { LineCounter, parseDocument } = yaml();
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: false, uniqueKeys: true });
  const fail = (offset: number | undefined, what: string): QbackupError =>
    new QbackupError('CONFIG_INVALID', `Invalid configuration "${file}"${offset !== undefined ? `, line ${lines.linePos(offset).line}` : ''}: ${what}`, { details: { file, ...(offset !== undefined ? { line: lines.linePos(offset).line } : {}) } });
  const syntax = doc.errors[0];
  if (syntax !== undefined) throw fail(syntax.pos[0], `not valid YAML (${firstSentence(syntax.message)})`);
  const raw: unknown = doc.toJS() ?? {};
  const validate = validator();
  if (!validate(raw)) {
    const e = mostUseful(validate.errors ?? []);
    throw fail(offsetOf(doc, e), describeSchemaError(e));
  }
  const at = (path: (string | number)[]): number | undefined => nodeOffset(doc, path);
  return build(raw, file, (path, what) => fail(at(path), what));
}

function firstSentence(message: string): string {
  return (message.split('\n')[0] ?? message).replace(/[.:]\s*$/, '');
}

// ---- schema errors as sentences ----

function mostUseful(errors: readonly ErrorObject[]): ErrorObject {
  // A oneOf that failed says more than the required-errors of its branches.
  const oneOf = errors.find((e) => e.keyword === 'oneOf');
  const first = errors[0];
  if (first === undefined) return { keyword: 'type', instancePath: '', schemaPath: '', params: {}, message: 'is not valid' };
  return oneOf !== undefined && first.keyword === 'required' ? oneOf : first;
}

function where(instancePath: string): string {
  const parts = instancePath.split('/').slice(1).map((p) => p.replace(/~1/g, '/').replace(/~0/g, '~'));
  return parts.length === 0 ? 'the top level' : parts.join('.');
}

function describeSchemaError(e: ErrorObject): string {
  const at = where(e.instancePath);
  const params = e.params as Record<string, unknown>;
  switch (e.keyword) {
    case 'additionalProperties':
      return `unknown key "${String(params['additionalProperty'])}" in ${at}`;
    case 'required':
      return `${at} needs "${String(params['missingProperty'])}"`;
    case 'oneOf': {
      const branches = (e.schema as { required: string[] }[]).map((b) => `"${b.required[0] ?? ''}"`);
      return `${at} needs exactly one of ${branches.join(' or ')}`;
    }
    case 'enum':
      return `${at} is ${JSON.stringify(e.data)}: expected ${(params['allowedValues'] as unknown[]).map((v) => String(v)).join(' or ')}`;
    case 'propertyNames':
      return `the name ${JSON.stringify(params['propertyName'])} in ${at} is not allowed: use letters, digits, ".", "_" and "-"`;
    case 'pattern': {
      const pattern = String(params['pattern']);
      const expected = pattern === '^/' ? 'an absolute path' : pattern.startsWith('^https?') ? 'an http:// or https:// URL' : pattern.startsWith('^s3') ? 'an s3:// URL' : pattern.includes('@') ? 'an email address' : pattern.includes('://') ? 'a URI such as qemu:///system' : `text matching ${pattern}`;
      return `${at} is ${JSON.stringify(e.data)}: expected ${expected}`;
    }
    case 'type':
      return `${at} is ${JSON.stringify(e.data)}: expected ${String(params['type'])}`;
    case 'minimum':
    case 'exclusiveMinimum':
    case 'maximum':
      return `${at} is ${JSON.stringify(e.data)}: it ${e.message ?? 'is out of range'}`;
    default:
      return `${at} ${e.message ?? 'is not valid'}`;
  }
}

function pathOf(instancePath: string): string[] {
  return instancePath.split('/').slice(1).map((p) => p.replace(/~1/g, '/').replace(/~0/g, '~'));
}

/** Where in the text the error is: the unknown key itself, else the value at the path. */
function offsetOf(doc: Document, e: ErrorObject): number | undefined {
  const path = pathOf(e.instancePath);
  const params = e.params as Record<string, unknown>;
  const key = e.keyword === 'additionalProperties' ? params['additionalProperty'] : e.keyword === 'propertyNames' ? params['propertyName'] : undefined;
  const { isMap, isPair, isScalar, isNode } = yaml();
  if (typeof key === 'string') {
    const map = path.length === 0 ? doc.contents : doc.getIn(path, true);
    if (isMap(map)) {
      const pair = map.items.find((p) => isPair(p) && isScalar(p.key) && p.key.value === key);
      if (pair !== undefined && isNode(pair.key)) return pair.key.range?.[0];
    }
  }
  return nodeOffset(doc, path);
}

function nodeOffset(doc: Document, path: (string | number)[]): number | undefined {
  const { isNode } = yaml();
  for (let n = path.length; n >= 0; n--) {
    const node = n === 0 ? doc.contents : doc.getIn(path.slice(0, n), true);
    if (isNode(node) && node.range !== undefined && node.range !== null) return node.range[0];
  }
  return undefined;
}

// ---- the effective configuration ----

type Fail = (path: (string | number)[], what: string) => QbackupError;

function retentionOf(raw: Record<string, number> | undefined): RetentionPolicy | undefined {
  if (raw === undefined) return undefined;
  const r: RetentionPolicy = {};
  const keys = { 'keep-last': 'keepLast', 'keep-hourly': 'keepHourly', 'keep-daily': 'keepDaily', 'keep-weekly': 'keepWeekly', 'keep-monthly': 'keepMonthly', 'keep-yearly': 'keepYearly' } as const;
  for (const [k, v] of Object.entries(raw)) r[keys[k as keyof typeof keys]] = v;
  return r;
}

function build(raw: Raw, file: string, fail: Fail): QbackupConfig {
  const config = emptyConfig();
  config.file = file;
  for (const [name, r] of Object.entries(raw.repositories ?? {})) {
    const repo: RepositoryConfig = {
      name,
      location: (r['path'] ?? r['url']) as string,
      endpoint: r['endpoint'] as string | undefined,
      region: r['region'] as string | undefined,
      pathStyle: r['path-style'] as boolean | undefined,
      credentialsFile: r['credentials-file'] as string | undefined,
      passwordFile: r['password-file'] as string | undefined,
      passwordCommand: r['password-command'] as string | undefined,
    };
    if (repo.passwordFile !== undefined && repo.passwordCommand !== undefined) throw fail(['repositories', name], `repository "${name}" gives both "password-file" and "password-command": keep one`);
    if (!repo.location.startsWith('s3://') && (repo.endpoint !== undefined || repo.credentialsFile !== undefined || repo.region !== undefined || repo.pathStyle !== undefined)) {
      throw fail(['repositories', name], `repository "${name}" is a directory: "endpoint", "region", "path-style" and "credentials-file" belong to s3:// repositories`);
    }
    config.repositories.set(name, repo);
  }
  config.allowRepositories = raw['allow-repositories'] ?? [];
  for (const [name, uri] of Object.entries(raw.connections ?? {})) config.connections.set(name, uri);
  const d = raw.defaults ?? {};
  config.defaults = { repository: d.repository, connection: d.connection, retention: retentionOf(d.retention), quiesce: d.quiesce, bandwidth: d.bandwidth };
  if (d.repository !== undefined && !config.repositories.has(d.repository)) throw fail(['defaults', 'repository'], `defaults.repository names "${d.repository}", which is not under repositories`);
  if (d.connection !== undefined && !config.connections.has(d.connection)) throw fail(['defaults', 'connection'], `defaults.connection names "${d.connection}", which is not under connections`);
  for (const [name, n] of Object.entries(raw.notifications ?? {})) {
    const target: NotificationTarget = {
      name,
      webhook: n['webhook'] as string | undefined,
      email: n['email'] as string | undefined,
      sendmail: n['sendmail'] as string | undefined,
      on: (n['on'] as ('failure' | 'success')[] | undefined) ?? ['failure'],
      retries: n['retries'] as number | undefined,
    };
    config.notifications.push(target);
  }
  for (const [name, s] of Object.entries(raw.schedules ?? {})) config.schedules.push(scheduleOf(config, name, s, fail));
  config.metrics = raw.metrics ?? 'token';
  const srv = raw.server ?? {};
  config.server = { listen: srv['listen'] as string | undefined, tlsCert: srv['tls-cert'] as string | undefined, tlsKey: srv['tls-key'] as string | undefined, maxTasks: srv['max-tasks'] as number | undefined, stateDir: srv['state-dir'] as string | undefined };
  void file;
  return config;
}

function scheduleOf(config: QbackupConfig, name: string, s: Record<string, unknown>, fail: Fail): ScheduleConfig {
  const path = ['schedules', name];
  const run = (s['run'] as ScheduleConfig['run'] | undefined) ?? 'backup';
  const repository = (s['repository'] as string | undefined) ?? config.defaults.repository;
  if (repository === undefined) throw fail(path, `schedule "${name}" names no repository and there is no defaults.repository`);
  if (!config.repositories.has(repository)) throw fail([...path, 'repository'], `schedule "${name}" names repository "${repository}", which is not under repositories`);
  const to = s['to'] as string | undefined;
  if (to !== undefined && !config.repositories.has(to)) throw fail([...path, 'to'], `schedule "${name}" copies to "${to}", which is not under repositories`);
  if (run === 'copy' && to === undefined) throw fail(path, `copy schedule "${name}" needs "to"`);
  if (run !== 'copy' && to !== undefined) throw fail([...path, 'to'], `"to" belongs to copy schedules, and schedule "${name}" runs ${run}`);
  const domain = s['domain'] as string | undefined;
  if (run === 'backup' && domain === undefined) throw fail(path, `backup schedule "${name}" needs "domain"`);
  if (run === 'gc' && domain !== undefined) throw fail([...path, 'domain'], `gc schedule "${name}" works on the whole repository, not on a domain`);
  const connection = s['connection'] as string | undefined;
  if (connection !== undefined && run !== 'backup') throw fail([...path, 'connection'], `"connection" belongs to backup schedules, and schedule "${name}" runs ${run}`);
  if (connection !== undefined && !config.connections.has(connection) && !connection.includes('://')) throw fail([...path, 'connection'], `schedule "${name}" names connection "${connection}", which is not under connections (give a name from there or a URI such as qemu:///system)`);
  if (run !== 'backup' && (s['retention'] !== undefined || s['full'] !== undefined)) throw fail(path, `"retention" and "full" belong to backup schedules, and schedule "${name}" runs ${run}`);
  if (run !== 'verify' && s['read-data-percent'] !== undefined) throw fail([...path, 'read-data-percent'], `"read-data-percent" belongs to verify schedules`);
  const when = s['when'] as string;
  try {
    cronFor(when);
  } catch (err) {
    throw fail([...path, 'when'], `schedule "${name}": ${describeError(err).replace(/\.$/, '')}`);
  }
  const notify = s['notify'] as string[] | undefined;
  for (const [i, target] of (notify ?? []).entries()) {
    if (!config.notifications.some((n) => n.name === target)) throw fail([...path, 'notify', i], `schedule "${name}" notifies "${target}", which is not under notifications`);
  }
  return {
    name,
    run,
    domain,
    connection,
    when,
    repository,
    to,
    full: s['full'] as boolean | undefined,
    retention: retentionOf(s['retention'] as Record<string, number> | undefined) ?? (run === 'backup' ? config.defaults.retention : undefined),
    readDataPercent: s['read-data-percent'] as number | undefined,
    pingUrl: s['ping-url'] as string | undefined,
    notify,
  };
}
