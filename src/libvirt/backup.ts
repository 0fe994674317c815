// Reading and writing libvirt <domainbackup> documents
// (https://libvirt.org/formatbackup.html).
//
// Invariants (checked by both parseBackupXml and formatBackupXml):
// - mode is 'push' (the default) or 'pull'; <server> only appears in pull mode.
// - A tcp server has a name and a port in 1..65535; a unix server has an
//   absolute socket path and nothing else. transport defaults to tcp.
// - Disk names are unique. A disk with backup='no' carries nothing but its
//   name. Push-mode disks may have <target>, pull-mode disks <scratch>, never
//   the other; exportname/exportbitmap are pull-mode only. Paths are absolute.
// - backupmode='full' and a per-disk incremental checkpoint exclude each other.
// - Checkpoint names (<incremental>, incremental=…) match
//   CHECKPOINT_NAME_PATTERN (INVALID_NAME otherwise).
// - `disks` undefined means no <disks> element (all disks take part); an empty
//   array is an explicit empty <disks/>.
// - Malformed documents raise INVALID_XML; invalid values handed to
//   formatBackupXml raise INVALID_ARGUMENT. formatBackupXml's output parses
//   back to an equal BackupXml.
// - <encryption format='luks'><secret type='passphrase' uuid=…/></encryption>
//   inside a qcow2 target or scratch is kept (the job writes a LUKS-encrypted
//   qcow2); any other encryption (another format, a secret by usage, a raw
//   destination) is refused (NOT_SUPPORTED), never dropped. tls='yes' is kept
//   and served with TLS.
// Not modelled (dropped on parse): <seclabel> inside target/scratch,
// <privateData>.
//
// backupSpecFromXml maps a document onto the core's BackupSpec and
// formatJobXml shows a running job as a document (backup-dumpxml).

import type { Element } from '@xmldom/xmldom';
import { QbackupError } from '../errors.js';
import type { ErrorCode } from '../errors.js';
import { assertCheckpointName } from '../checkpoint/spec.js';
import {
  appendElement,
  attr,
  childElements,
  firstChild,
  newXmlDocument,
  parseUnsigned,
  parseXmlDocument,
  serializeIndented,
  textOf,
} from '../util/xml.js';
import type { JobInfo } from '../backup/job.js';
import type { BackupDiskSpec, BackupSpec } from '../backup/spec.js';

export type BackupMode = 'push' | 'pull';
export type BackupDiskMode = 'full' | 'incremental';
export type BackupStorageType = 'file' | 'block';
export type BackupDriverType = 'qcow2' | 'raw';

/** <server> of a pull-mode backup: where the NBD server listens. */
export interface BackupServer {
  transport: 'tcp' | 'unix';
  /** Host name or address to listen on (tcp only, required). */
  name?: string;
  /** TCP port, 1..65535 (tcp only, required). */
  port?: number;
  /** Absolute path of the listening UNIX socket (unix only, required). */
  socket?: string;
  /** tls='yes'|'no' (tcp only). */
  tls?: boolean;
}

/** One <disks><disk> entry. */
export interface BackupDiskXml {
  /** name=…: the disk's target dev, e.g. "vda". */
  name: string;
  /** backup='yes'|'no' (default yes). When false, no other field is set. */
  backup: boolean;
  /** backupmode=…: full, or incremental since `incremental` (or the backup's). */
  backupmode?: BackupDiskMode;
  /** incremental=…: per-disk checkpoint to back up changes since. */
  incremental?: string;
  /** type=…: kind of storage of the target/scratch; 'file' when absent. */
  type?: BackupStorageType;
  /** exportname=…: NBD export name (pull only; defaults to the disk name). */
  exportname?: string;
  /** exportbitmap=…: name of the exported dirty bitmap (pull only). */
  exportbitmap?: string;
  /** state=…: output only, for a running job (running, complete, failed, cancelled); ignored on input. */
  state?: string;
  /**
   * <driver type=…>: format of the destination — the target file in push mode,
   * the scratch file in pull mode. libvirt's default is qcow2.
   */
  driverType?: BackupDriverType;
  /** Push mode: <target file=…> (or dev=… for type='block'), the backup destination. */
  target?: string;
  /** Pull mode: <scratch file=…> (or dev=… for type='block'), the temporary overlay. */
  scratch?: string;
  /** <encryption format='luks'> inside the target or scratch: the passphrase secret's UUID. */
  encryption?: { format: 'luks'; secretUuid: string };
}

export interface BackupXml {
  mode: BackupMode;
  /** <incremental>: checkpoint the backup is relative to; absent = full backup. */
  incremental?: string;
  /** <server>: pull mode only. */
  server?: BackupServer;
  disks?: BackupDiskXml[];
}

class Checker {
  constructor(
    readonly code: ErrorCode,
    readonly what: string,
  ) {}

  fail(message: string): never {
    throw new QbackupError(this.code, message);
  }
}

function isAbsolute(path: string): boolean {
  return path.startsWith('/');
}

/** Validates the invariants listed at the top of this file. */
function validate(b: BackupXml, c: Checker): void {
  const what = c.what;
  if (b.mode !== 'push' && b.mode !== 'pull') c.fail(`${what} has an invalid mode.`);
  if (b.incremental !== undefined) assertCheckpointName(b.incremental, `Incremental checkpoint name of ${lower(what)}`);
  if (b.server !== undefined) {
    if (b.mode !== 'pull') c.fail(`${what} is a push-mode backup but has a <server>, which only pull mode uses.`);
    validateServer(b.server, c);
  }
  const seen = new Set<string>();
  for (const d of b.disks ?? []) {
    if (d.name === '') c.fail(`${what} has a <disk> without a name.`);
    if (seen.has(d.name)) c.fail(`${what} lists disk ${d.name} more than once.`);
    seen.add(d.name);
    validateDisk(d, b.mode, c);
  }
}

function validateServer(s: BackupServer, c: Checker): void {
  const what = c.what;
  if (s.transport === 'tcp') {
    if (s.name === undefined || s.name === '') c.fail(`${what} has a tcp <server> without a name.`);
    if (s.port === undefined) c.fail(`${what} has a tcp <server> without a port.`);
    if (!Number.isInteger(s.port) || s.port < 1 || s.port > 65535) {
      c.fail(`${what} has an invalid <server> port ${s.port}: expected 1 to 65535.`);
    }
    if (s.socket !== undefined) c.fail(`${what} has a tcp <server> with a socket, which only unix transport uses.`);
  } else if (s.transport === 'unix') {
    if (s.socket === undefined || s.socket === '') c.fail(`${what} has a unix <server> without a socket.`);
    if (!isAbsolute(s.socket)) c.fail(`${what} has a relative <server> socket path '${s.socket}'; it must be absolute.`);
    if (s.name !== undefined || s.port !== undefined) {
      c.fail(`${what} has a unix <server> with a name or port, which only tcp transport uses.`);
    }
  } else {
    c.fail(`${what} has an invalid <server> transport.`);
  }
}

function validateDisk(d: BackupDiskXml, mode: BackupMode, c: Checker): void {
  const what = c.what;
  const disk = `Disk ${d.name} of ${lower(what)}`;
  if (!d.backup) {
    const extra = Object.keys(d).filter((k) => k !== 'name' && k !== 'backup');
    if (extra.length > 0) c.fail(`${disk} is excluded with backup='no' but also sets ${extra.join(', ')}.`);
    return;
  }
  if (d.backupmode !== undefined && d.backupmode !== 'full' && d.backupmode !== 'incremental') {
    c.fail(`${disk} has an invalid backupmode.`);
  }
  if (d.incremental !== undefined) {
    assertCheckpointName(d.incremental, `Incremental checkpoint name of ${lower(disk)}`);
    if (d.backupmode === 'full') c.fail(`${disk} has backupmode='full' but also an incremental checkpoint.`);
  }
  if (d.type !== undefined && d.type !== 'file' && d.type !== 'block') c.fail(`${disk} has an invalid type.`);
  if (d.driverType !== undefined && d.driverType !== 'qcow2' && d.driverType !== 'raw') {
    c.fail(`${disk} has an invalid driver type.`);
  }
  if (mode === 'push') {
    if (d.scratch !== undefined) c.fail(`${disk} has a <scratch>, which only pull-mode backups use.`);
    if (d.exportname !== undefined || d.exportbitmap !== undefined) {
      c.fail(`${disk} sets exportname or exportbitmap, which only pull-mode backups use.`);
    }
  } else if (d.target !== undefined) {
    c.fail(`${disk} has a <target>, which only push-mode backups use.`);
  }
  if (d.exportname === '') c.fail(`${disk} has an empty exportname.`);
  if (d.exportbitmap === '') c.fail(`${disk} has an empty exportbitmap.`);
  for (const [elName, path] of [['target', d.target], ['scratch', d.scratch]] as const) {
    if (path !== undefined && !isAbsolute(path)) {
      c.fail(`${disk} has a relative <${elName}> path '${path}'; it must be absolute.`);
    }
  }
  if (d.encryption !== undefined) {
    if (d.target === undefined && d.scratch === undefined) c.fail(`${disk} has an encryption without a <target> or <scratch> to put it on.`);
    if (d.encryption.format !== 'luks' || !UUID_PATTERN.test(d.encryption.secretUuid)) c.fail(`${disk} has an invalid encryption.`);
    if (d.driverType === 'raw') {
      throw new QbackupError('NOT_SUPPORTED', `${disk} asks for an encrypted raw destination; qbackup encrypts qcow2 only (refusing rather than writing it unencrypted).`);
    }
  }
}

/** libvirt's secret UUIDs (any case; stored lower case). */
const UUID_PATTERN = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;

function lower(text: string): string {
  return text.charAt(0).toLowerCase() + text.slice(1);
}

function parseServer(el: Element, c: Checker): BackupServer {
  const transport = attr(el, 'transport') ?? 'tcp';
  if (transport !== 'tcp' && transport !== 'unix') {
    c.fail(`${c.what} has <server> transport '${transport}', but only tcp and unix are supported.`);
  }
  const server: BackupServer = { transport };
  const name = attr(el, 'name');
  if (name !== undefined) server.name = name;
  const port = attr(el, 'port');
  if (port !== undefined) {
    const n = parseUnsigned(port);
    if (n === undefined) c.fail(`${c.what} has an invalid <server> port '${port}': expected 1 to 65535.`);
    server.port = n;
  }
  const socket = attr(el, 'socket');
  if (socket !== undefined) server.socket = socket;
  const tls = attr(el, 'tls');
  if (tls !== undefined) {
    if (tls !== 'yes' && tls !== 'no') c.fail(`${c.what} has <server> tls='${tls}', but only 'yes' and 'no' are valid.`);
    server.tls = tls === 'yes';
  }
  return server;
}

/**
 * <encryption> inside <target>/<scratch>: LUKS with a passphrase secret named
 * by UUID is the one kind qbackup writes; anything else is refused, never dropped.
 */
function parseEncryption(el: Element, disk: string, c: Checker): BackupDiskXml['encryption'] {
  const enc = firstChild(el, 'encryption');
  if (enc === undefined) return undefined;
  const refuse = (why: string): never => {
    throw new QbackupError('NOT_SUPPORTED', `${disk} asks for an encrypted <${el.tagName}> ${why}, which qbackup does not support (refusing rather than writing it unencrypted).`);
  };
  const format = attr(enc, 'format');
  if (format !== 'luks') refuse(`in format '${format ?? ''}' (only luks is supported)`);
  const secrets = childElements(enc, 'secret');
  const secret = secrets[0];
  if (secrets.length !== 1 || secret === undefined) c.fail(`${disk} has an <encryption> without exactly one <secret>.`);
  if (attr(secret, 'type') !== 'passphrase') c.fail(`${disk} has an <encryption> <secret> whose type is not 'passphrase'.`);
  const uuid = attr(secret, 'uuid');
  if (uuid === undefined) return refuse('whose secret is named by usage, not by uuid');
  if (!UUID_PATTERN.test(uuid)) c.fail(`${disk} has an <encryption> secret uuid '${uuid}' that is not a UUID.`);
  return { format: 'luks', secretUuid: uuid.toLowerCase() };
}

/** Reads <target>/<scratch>: file=… for file storage, dev=… for block storage. */
function parseLocation(el: Element, type: BackupStorageType, disk: string, c: Checker): string {
  const key = type === 'block' ? 'dev' : 'file';
  const value = attr(el, key);
  if (value === undefined || value === '') c.fail(`${disk} has a <${el.tagName}> without ${key}=… for its ${type} storage.`);
  return value;
}

function parseDisk(el: Element, mode: BackupMode, c: Checker): BackupDiskXml {
  const name = attr(el, 'name');
  if (name === undefined || name === '') c.fail(`${c.what} has a <disk> without a name.`);
  const disk = `Disk ${name} of ${lower(c.what)}`;

  const backupAttr = attr(el, 'backup') ?? 'yes';
  if (backupAttr !== 'yes' && backupAttr !== 'no') c.fail(`${disk} has backup='${backupAttr}', but only 'yes' and 'no' are valid.`);
  if (backupAttr === 'no') return { name, backup: false };

  const d: BackupDiskXml = { name, backup: true };
  const backupmode = attr(el, 'backupmode');
  if (backupmode !== undefined) {
    if (backupmode !== 'full' && backupmode !== 'incremental') {
      c.fail(`${disk} has backupmode='${backupmode}', but only 'full' and 'incremental' are valid.`);
    }
    d.backupmode = backupmode;
  }
  const incremental = attr(el, 'incremental');
  if (incremental !== undefined) d.incremental = incremental;
  const type = attr(el, 'type');
  if (type !== undefined) {
    if (type !== 'file' && type !== 'block') c.fail(`${disk} has type='${type}', but only 'file' and 'block' are supported.`);
    d.type = type;
  }
  const exportname = attr(el, 'exportname');
  if (exportname !== undefined) d.exportname = exportname;
  const exportbitmap = attr(el, 'exportbitmap');
  if (exportbitmap !== undefined) d.exportbitmap = exportbitmap;

  const driver = firstChild(el, 'driver');
  const driverType = driver === undefined ? undefined : attr(driver, 'type');
  if (driverType !== undefined) {
    if (driverType !== 'qcow2' && driverType !== 'raw') {
      c.fail(`${disk} has driver type '${driverType}', but only qcow2 and raw are supported.`);
    }
    d.driverType = driverType;
  }

  const target = firstChild(el, 'target');
  if (target !== undefined) {
    if (mode !== 'push') c.fail(`${disk} has a <target>, which only push-mode backups use.`);
    d.target = parseLocation(target, d.type ?? 'file', disk, c);
    const encryption = parseEncryption(target, disk, c);
    if (encryption !== undefined) d.encryption = encryption;
  }
  const scratch = firstChild(el, 'scratch');
  if (scratch !== undefined) {
    if (mode !== 'pull') c.fail(`${disk} has a <scratch>, which only pull-mode backups use.`);
    d.scratch = parseLocation(scratch, d.type ?? 'file', disk, c);
    const encryption = parseEncryption(scratch, disk, c);
    if (encryption !== undefined) d.encryption = encryption;
  }
  return d;
}

/** Parses a libvirt `<domainbackup>` document. */
export function parseBackupXml(xml: string): BackupXml {
  const root = parseXmlDocument(xml, 'backup XML', 'domainbackup');
  const c: Checker = new Checker('INVALID_XML', 'Backup XML');

  const modeAttr = attr(root, 'mode') ?? 'push';
  if (modeAttr !== 'push' && modeAttr !== 'pull') {
    c.fail(`Backup XML has mode='${modeAttr}', but only 'push' and 'pull' are valid.`);
  }
  const b: BackupXml = { mode: modeAttr };

  const incEl = firstChild(root, 'incremental');
  if (incEl !== undefined) b.incremental = textOf(incEl).trim();

  const serverEl = firstChild(root, 'server');
  if (serverEl !== undefined) {
    if (b.mode !== 'pull') c.fail('Backup XML is a push-mode backup but has a <server>, which only pull mode uses.');
    b.server = parseServer(serverEl, c);
  }

  const disksEl = firstChild(root, 'disks');
  if (disksEl !== undefined) {
    const disks: BackupDiskXml[] = [];
    const seen = new Set<string>();
    for (const el of childElements(disksEl, 'disk')) {
      const d = parseDisk(el, b.mode, c);
      if (seen.has(d.name)) c.fail(`Backup XML lists disk ${d.name} more than once.`);
      seen.add(d.name);
      disks.push(d);
    }
    b.disks = disks;
  }

  validate(b, c);
  return b;
}

/**
 * Writes `b` as a `<domainbackup>` document in libvirt's order (incremental,
 * server, disks; disk attributes name, backup, type, backupmode, incremental,
 * exportname, exportbitmap; then <driver> and <target>/<scratch>), indented
 * with two spaces. The mode attribute is always written.
 */
export function formatBackupXml(b: BackupXml): string {
  validate(b, new Checker('INVALID_ARGUMENT', 'Backup description'));
  const root = newXmlDocument('domainbackup');
  root.setAttribute('mode', b.mode);
  if (b.incremental !== undefined) appendElement(root, 'incremental', b.incremental);

  if (b.server !== undefined) {
    const s = appendElement(root, 'server');
    s.setAttribute('transport', b.server.transport);
    if (b.server.name !== undefined) s.setAttribute('name', b.server.name);
    if (b.server.port !== undefined) s.setAttribute('port', String(b.server.port));
    if (b.server.socket !== undefined) s.setAttribute('socket', b.server.socket);
    if (b.server.tls !== undefined) s.setAttribute('tls', b.server.tls ? 'yes' : 'no');
  }

  if (b.disks !== undefined) {
    const disks = appendElement(root, 'disks');
    for (const d of b.disks) {
      const el = appendElement(disks, 'disk');
      el.setAttribute('name', d.name);
      el.setAttribute('backup', d.backup ? 'yes' : 'no');
      if (!d.backup) continue;
      if (d.type !== undefined) el.setAttribute('type', d.type);
      if (d.backupmode !== undefined) el.setAttribute('backupmode', d.backupmode);
      if (d.incremental !== undefined) el.setAttribute('incremental', d.incremental);
      if (d.exportname !== undefined) el.setAttribute('exportname', d.exportname);
      if (d.exportbitmap !== undefined) el.setAttribute('exportbitmap', d.exportbitmap);
      if (d.state !== undefined) el.setAttribute('state', d.state);
      if (d.driverType !== undefined) appendElement(el, 'driver').setAttribute('type', d.driverType);
      const key = d.type === 'block' ? 'dev' : 'file';
      const location = (name: 'target' | 'scratch', path: string): void => {
        const loc = appendElement(el, name);
        loc.setAttribute(key, path);
        if (d.encryption === undefined) return;
        const enc = appendElement(loc, 'encryption');
        enc.setAttribute('format', d.encryption.format);
        const secret = appendElement(enc, 'secret');
        secret.setAttribute('type', 'passphrase');
        secret.setAttribute('uuid', d.encryption.secretUuid);
      };
      if (d.target !== undefined) location('target', d.target);
      if (d.scratch !== undefined) location('scratch', d.scratch);
    }
  }
  return serializeIndented(root);
}

/** Parses a `<domainbackup>` document into the core's BackupSpec. */
export function parseBackupSpec(xml: string): BackupSpec {
  return backupSpecFromXml(parseBackupXml(xml));
}

/** The core's view of a parsed document: only disks that take part, libvirt's defaults applied. */
/**
 * A TCP export's TLS must be chosen: libvirt reads a missing `tls` as its
 * configured default, and qbackup puts no disk on the network in the clear
 * unless the description says so (tls='no').
 */
function explicitTls(s: NonNullable<BackupXml['server']>): boolean {
  if (s.tls !== undefined) return s.tls;
  throw new QbackupError(
    'INVALID_ARGUMENT',
    `Backup description serves over TCP (${s.name ?? ''}:${s.port ?? ''}) without choosing TLS: add tls='yes' for an encrypted, authenticated export, or tls='no' to allow a plain one that anyone who can reach the port can read`,
  );
}

export function backupSpecFromXml(b: BackupXml): BackupSpec {
  const spec: BackupSpec = { mode: b.mode };
  if (b.incremental !== undefined) spec.since = b.incremental;
  const s = b.server;
  if (s !== undefined) {
    spec.server =
      s.transport === 'unix'
        ? { transport: 'unix', socket: s.socket ?? '' }
        : { transport: 'tcp', host: s.name ?? '', port: s.port ?? 0, tls: explicitTls(s) };
  }
  if (b.disks !== undefined) {
    spec.disks = b.disks.filter((d) => d.backup).map((d) => {
      const disk: BackupDiskSpec = { target: d.name };
      if (d.backupmode !== undefined) disk.mode = d.backupmode;
      if (d.incremental !== undefined) disk.since = d.incremental;
      if (d.driverType !== undefined) disk.format = d.driverType;
      if (d.target !== undefined) disk.targetFile = d.target;
      if (d.scratch !== undefined) disk.scratchFile = d.scratch;
      if (d.exportname !== undefined) disk.exportName = d.exportname;
      if (d.exportbitmap !== undefined) disk.exportBitmap = d.exportbitmap;
      if (d.encryption !== undefined) disk.encryption = { format: 'luks', secret: d.encryption.secretUuid };
      return disk;
    });
  }
  return spec;
}

/** A running (or finished) job as a `<domainbackup>` document, with each disk's state, as libvirt shows it. */
export function formatJobXml(job: JobInfo): string {
  const s = job.server;
  const doc: BackupXml = { mode: job.mode };
  if (job.incremental !== undefined) doc.incremental = job.incremental;
  if (s !== undefined) {
    doc.server = s.transport === 'tcp' ? { transport: 'tcp', name: s.host, port: s.port, ...(s.tls ? { tls: true } : {}) } : { transport: 'unix', socket: s.socket };
  }
  doc.disks = job.disks.map((d): BackupDiskXml => {
    const disk: BackupDiskXml = { name: d.target, backup: true, backupmode: d.mode, state: d.state === 'completed' ? 'complete' : d.state, type: 'file', driverType: d.targetFormat };
    if (d.mode === 'incremental' && d.incremental !== undefined) disk.incremental = d.incremental;
    if (job.mode === 'push') {
      disk.target = d.targetFile;
    } else {
      disk.scratch = d.targetFile;
      disk.exportname = d.pull?.exportName ?? d.target;
      if (d.tmpBitmap !== undefined) disk.exportbitmap = d.tmpBitmap;
    }
    if (d.encryption !== undefined) disk.encryption = { format: 'luks', secretUuid: d.encryption.secret };
    return disk;
  });
  return formatBackupXml(doc);
}
