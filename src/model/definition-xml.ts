// Reading and writing libvirt <domain> documents.
//
// Invariants:
// - Only the fields of DomainDefinition are interpreted; every other element,
//   attribute, comment and namespace of the source document is kept verbatim
//   by formatDomainXml, which edits a copy of def.sourceXml in place.
// - Interpreted disks are the <devices><disk> elements with type='file' and
//   device='disk' (both libvirt's defaults when absent). Other disks (cdrom,
//   block, network, …) are never interpreted or modified.
// - parseDomainXml(formatDomainXml(def)) equals def except for sourceXml.
// - A file disk without <driver type> is raw, as libvirt's QEMU driver reads
//   it; formatDomainXml always writes the type down.
// - A missing <memory> means 128 MiB (131072 KiB). libvirt itself requires the
//   element; qbackup is lenient so that hand-written minimal documents work.
// - <os><kernel>/<initrd>/<cmdline> (direct kernel boot) and the guest agent's
//   <channel type='unix'> (target virtio, name org.qemu.guest_agent.0) are
//   interpreted; other <os> children and other channels are kept, unread.
// - Malformed documents raise QbackupError('INVALID_XML'); invalid
//   DomainDefinition values handed to formatDomainXml raise 'INVALID_ARGUMENT'.

import { randomUUID } from 'node:crypto';
import type { Document, Element, Node } from '@xmldom/xmldom';
import { QbackupError } from '../errors.js';
import type { DiskBus, DiskDefinition, DiskFormat, DomainDefinition, GuestAgentChannel, KernelBoot, NbdBacking } from './definition.js';
import { appendElement, attr, childElements, docOf, firstChild, isNamed, newXmlDocument, parseUnsigned, parseXmlDocument, serializeIndented, textOf } from '../util/xml.js';
// ---------------------------------------------------------------------------
// <domain>
// ---------------------------------------------------------------------------

/** Default when <memory> is absent: 128 MiB. */
export const DEFAULT_MEMORY_KIB = 131072;

const UUID_CANONICAL = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
const UUID_COMPACT = /^[0-9a-fA-F]{32}$/;
const TARGET_DEV = /^[a-z][a-z0-9]*$/;

const DISK_FORMATS: readonly DiskFormat[] = ['qcow2', 'raw'];
const DISK_BUSES: readonly DiskBus[] = ['scsi', 'virtio'];

/** Bytes per unit for libvirt's scaled integers; `1024` is KiB. Case-insensitive. */
function unitBytes(unit: string): number | undefined {
  const u = unit.toLowerCase();
  if (u === 'b' || u === 'byte' || u === 'bytes') return 1;
  const powers: Record<string, number> = { k: 1, m: 2, g: 3, t: 4, p: 5, e: 6 };
  const first = u.charAt(0);
  const power = powers[first];
  if (power === undefined) return undefined;
  const rest = u.slice(1);
  if (rest === '' || rest === 'ib') return 1024 ** power;
  if (rest === 'b') return 1000 ** power;
  return undefined;
}

function normalizeUuid(raw: string): string | undefined {
  const t = raw.trim();
  let hex: string;
  if (UUID_CANONICAL.test(t)) hex = t.replace(/-/g, '');
  else if (UUID_COMPACT.test(t)) hex = t;
  else return undefined;
  hex = hex.toLowerCase();
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function isInterpretedDisk(disk: Element): boolean {
  return (attr(disk, 'type') ?? 'file') === 'file' && (attr(disk, 'device') ?? 'disk') === 'disk';
}

function busFromPrefix(dev: string): DiskBus | undefined {
  if (dev.startsWith('sd')) return 'scsi';
  if (dev.startsWith('vd')) return 'virtio';
  return undefined;
}

function diskTarget(disk: Element): string | undefined {
  const target = firstChild(disk, 'target');
  return target === undefined ? undefined : attr(target, 'dev');
}

function bad(message: string): QbackupError {
  return new QbackupError('INVALID_XML', message);
}

function parseMemoryKiB(root: Element, domain: string): number {
  const mem = firstChild(root, 'memory');
  if (mem === undefined) return DEFAULT_MEMORY_KIB;
  const unit = attr(mem, 'unit') ?? 'KiB';
  const scale = unitBytes(unit);
  if (scale === undefined) throw bad(`Domain ${domain} has an unknown <memory> unit '${unit}'.`);
  const value = parseUnsigned(textOf(mem));
  if (value === undefined || value === 0) {
    throw bad(`Domain ${domain} has an invalid <memory> value '${textOf(mem).trim()}': expected a positive integer.`);
  }
  const bytes = BigInt(value) * BigInt(scale);
  const kib = (bytes + 1023n) / 1024n; // libvirt rounds up to whole KiB
  if (kib > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(`Domain ${domain} has a <memory> size that is too large.`);
  return Number(kib);
}

function parseDisk(disk: Element, domain: string): DiskDefinition {
  const targetEl = firstChild(disk, 'target');
  const target = targetEl === undefined ? undefined : attr(targetEl, 'dev');
  if (targetEl === undefined || target === undefined || target === '') {
    throw bad(`A file disk of domain ${domain} has no <target dev=…>.`);
  }
  if (!TARGET_DEV.test(target)) throw bad(`Disk ${target} of domain ${domain} has an invalid target name.`);

  const busAttr = attr(targetEl, 'bus');
  let bus: DiskBus;
  if (busAttr === undefined) {
    const derived = busFromPrefix(target);
    if (derived === undefined) {
      throw bad(`Disk ${target} of domain ${domain} has no bus and its target name implies neither scsi (sd…) nor virtio (vd…).`);
    }
    bus = derived;
  } else if ((DISK_BUSES as readonly string[]).includes(busAttr)) {
    bus = busAttr as DiskBus;
  } else {
    throw bad(`Disk ${target} of domain ${domain} uses bus '${busAttr}', but only scsi and virtio are supported.`);
  }

  const driver = firstChild(disk, 'driver');
  const formatAttr = driver === undefined ? undefined : attr(driver, 'type');
  let format: DiskFormat = 'raw';
  if (formatAttr !== undefined) {
    if (!(DISK_FORMATS as readonly string[]).includes(formatAttr)) {
      throw bad(`Disk ${target} of domain ${domain} has format '${formatAttr}', but only qcow2 and raw are supported.`);
    }
    format = formatAttr as DiskFormat;
  }

  const sourceEl = firstChild(disk, 'source');
  const source = sourceEl === undefined ? undefined : attr(sourceEl, 'file');
  if (source === undefined || source === '') throw bad(`Disk ${target} of domain ${domain} has no <source file=…>.`);
  if (!source.startsWith('/')) {
    throw bad(`Disk ${target} of domain ${domain} has a relative source path '${source}'; it must be absolute.`);
  }

  const result: DiskDefinition = {
    target,
    source,
    format,
    bus,
    readonly: firstChild(disk, 'readonly') !== undefined,
  };
  const serialEl = firstChild(disk, 'serial');
  if (serialEl !== undefined) result.serial = textOf(serialEl);
  const encryption = firstChild(disk, 'encryption') ?? firstChild(sourceEl ?? disk, 'encryption');
  if (encryption !== undefined) result.encryption = attr(encryption, 'format') ?? '';
  parseBackingStore(disk, result, domain);
  return result;
}

/** A declared <backingStore>: an NBD export becomes `nbdBacking`, any other chain `backingStore` (refused later). */
function parseBackingStore(disk: Element, result: DiskDefinition, domain: string): void {
  const backing = firstChild(disk, 'backingStore');
  if (backing === undefined || (attr(backing, 'type') === undefined && childElements(backing).length === 0)) return;
  const nbd = parseNbdBacking(backing, result.target, domain);
  if (nbd !== undefined) {
    result.nbdBacking = nbd;
    return;
  }
  const backingSource = firstChild(backing, 'source');
  result.backingStore = (backingSource === undefined ? undefined : attr(backingSource, 'file')) ?? '';
}

/**
 * `<backingStore type='network'><format type='raw'/><source protocol='nbd'
 * name='EXPORT'><host transport='unix' socket='/PATH'/></source></backingStore>`,
 * the one backing qbackup opens; undefined for any other kind (refused later
 * by the domain service, with the other unsupported chains).
 */
function parseNbdBacking(backing: Element, target: string, domain: string): NbdBacking | undefined {
  const source = firstChild(backing, 'source');
  if (attr(backing, 'type') !== 'network' || source === undefined || attr(source, 'protocol') !== 'nbd') return undefined;
  if (childElements(backing, 'backingStore').some((b) => attr(b, 'type') !== undefined || childElements(b).length > 0)) return undefined;
  const host = firstChild(source, 'host');
  const format = firstChild(backing, 'format');
  const socket = host === undefined ? undefined : attr(host, 'socket');
  const exportName = attr(source, 'name') ?? '';
  if (host === undefined || attr(host, 'transport') !== 'unix' || socket === undefined || !socket.startsWith('/')) {
    throw bad(`Disk ${target} of domain ${domain} has an NBD backing that is not on a unix socket with an absolute path; only that kind is supported.`);
  }
  if (format !== undefined && attr(format, 'type') !== 'raw') {
    throw bad(`Disk ${target} of domain ${domain} has an NBD backing of format '${attr(format, 'type') ?? ''}'; only raw is supported.`);
  }
  if (exportName === '' || Buffer.byteLength(exportName) > 4096) throw bad(`Disk ${target} of domain ${domain} has an NBD backing without a valid export name.`);
  return { socket, exportName };
}

/** The guest agent's name on its virtio-serial port (libvirt's and QEMU's convention). */
export const GUEST_AGENT_CHANNEL = 'org.qemu.guest_agent.0';

function absolutePath(value: string | undefined, what: string, domain: string): string | undefined {
  if (value === undefined) return undefined;
  const trimmed = value.trim();
  if (!trimmed.startsWith('/')) throw bad(`Domain ${domain} has a relative ${what} path '${trimmed}'; it must be absolute.`);
  if (trimmed.includes(',')) throw bad(`Domain ${domain} has a ${what} path '${trimmed}' with a comma, which QEMU's options cannot carry.`);
  return trimmed;
}

/** <os><kernel>…: undefined when the domain does not boot a kernel directly. */
function parseKernelBoot(root: Element, domain: string): KernelBoot | undefined {
  const os = firstChild(root, 'os');
  const kernelEl = os === undefined ? undefined : firstChild(os, 'kernel');
  if (os === undefined || kernelEl === undefined) return undefined;
  const kernel = absolutePath(textOf(kernelEl), 'kernel', domain);
  if (kernel === undefined) throw bad(`Domain ${domain} has an empty <kernel>.`);
  const result: KernelBoot = { kernel };
  const initrdEl = firstChild(os, 'initrd');
  const initrd = initrdEl === undefined ? undefined : absolutePath(textOf(initrdEl), 'initrd', domain);
  if (initrd !== undefined) result.initrd = initrd;
  const cmdlineEl = firstChild(os, 'cmdline');
  if (cmdlineEl !== undefined) result.cmdline = textOf(cmdlineEl).trim();
  return result;
}

function isAgentChannel(channel: Element): boolean {
  const target = firstChild(channel, 'target');
  return target !== undefined && attr(target, 'type') === 'virtio' && attr(target, 'name') === GUEST_AGENT_CHANNEL;
}

/** The guest agent's <channel>, when the domain has one. Only type='unix' with mode='bind' (QEMU listens) is supported. */
function parseGuestAgent(root: Element, domain: string): GuestAgentChannel | undefined {
  const devices = firstChild(root, 'devices');
  const channels = devices === undefined ? [] : childElements(devices, 'channel').filter(isAgentChannel);
  const [channel, extra] = channels;
  if (channel === undefined) return undefined;
  if (extra !== undefined) throw bad(`Domain ${domain} has more than one ${GUEST_AGENT_CHANNEL} channel.`);
  if (attr(channel, 'type') !== 'unix') {
    throw new QbackupError('NOT_SUPPORTED', `Domain ${domain} has a guest agent channel of type '${attr(channel, 'type') ?? ''}'; only type='unix' is supported.`);
  }
  const source = firstChild(channel, 'source');
  const mode = source === undefined ? 'bind' : attr(source, 'mode') ?? 'bind';
  if (mode !== 'bind') {
    throw new QbackupError('NOT_SUPPORTED', `Domain ${domain} has a guest agent channel with source mode '${mode}'; only mode='bind' is supported.`);
  }
  const path = absolutePath(source === undefined ? undefined : attr(source, 'path'), 'guest agent socket', domain);
  return path === undefined ? {} : { path };
}

/**
 * Parses a libvirt `<domain>` document into the fields qbackup interprets.
 * The input is kept verbatim as `sourceXml`.
 */
export function parseDomainXml(xml: string): DomainDefinition {
  const root = parseXmlDocument(xml, 'domain XML', 'domain');

  const nameEl = firstChild(root, 'name');
  if (nameEl === undefined) throw bad('Domain XML has no <name> element.');
  const name = textOf(nameEl).trim();
  if (name === '') throw bad('Domain XML has an empty <name> element.');
  if (name.includes('/')) throw new QbackupError('INVALID_NAME', `Domain name '${name}' must not contain '/'.`);

  const uuidEl = firstChild(root, 'uuid');
  let uuid: string;
  if (uuidEl === undefined) {
    uuid = randomUUID();
  } else {
    const normalized = normalizeUuid(textOf(uuidEl));
    if (normalized === undefined) throw bad(`Domain ${name} has a malformed <uuid> '${textOf(uuidEl).trim()}'.`);
    uuid = normalized;
  }

  const memoryKiB = parseMemoryKiB(root, name);

  let vcpus = 1;
  const vcpuEl = firstChild(root, 'vcpu');
  if (vcpuEl !== undefined) {
    const v = parseUnsigned(textOf(vcpuEl));
    if (v === undefined || v === 0) {
      throw bad(`Domain ${name} has an invalid <vcpu> count '${textOf(vcpuEl).trim()}': expected a positive integer.`);
    }
    vcpus = v;
  }

  const disks: DiskDefinition[] = [];
  const devices = firstChild(root, 'devices');
  if (devices !== undefined) {
    const seen = new Set<string>();
    for (const disk of childElements(devices, 'disk')) {
      const dev = diskTarget(disk);
      if (dev !== undefined && dev !== '') {
        if (seen.has(dev)) throw bad(`Domain ${name} has more than one disk with target ${dev}.`);
        seen.add(dev);
      }
      if (isInterpretedDisk(disk)) disks.push(parseDisk(disk, name));
    }
  }

  const def: DomainDefinition = { name, uuid, memoryKiB, vcpus, disks, sourceXml: xml };
  const kernelBoot = parseKernelBoot(root, name);
  if (kernelBoot !== undefined) def.kernelBoot = kernelBoot;
  const guestAgent = parseGuestAgent(root, name);
  if (guestAgent !== undefined) def.guestAgent = guestAgent;
  return def;
}

// --- formatting -------------------------------------------------------------

function invalidDef(message: string): QbackupError {
  return new QbackupError('INVALID_ARGUMENT', message);
}

function validateDefinition(def: DomainDefinition): void {
  if (def.name.trim() === '' || def.name !== def.name.trim()) {
    throw invalidDef(`Domain name '${def.name}' is empty or has surrounding whitespace.`);
  }
  if (def.name.includes('/')) throw new QbackupError('INVALID_NAME', `Domain name '${def.name}' must not contain '/'.`);
  if (normalizeUuid(def.uuid) === undefined) throw invalidDef(`Domain ${def.name} has a malformed UUID '${def.uuid}'.`);
  if (!Number.isSafeInteger(def.memoryKiB) || def.memoryKiB <= 0) {
    throw invalidDef(`Domain ${def.name} has an invalid memory size ${def.memoryKiB} KiB.`);
  }
  if (!Number.isSafeInteger(def.vcpus) || def.vcpus <= 0) {
    throw invalidDef(`Domain ${def.name} has an invalid vCPU count ${def.vcpus}.`);
  }
  const paths = [def.kernelBoot?.kernel, def.kernelBoot?.initrd, def.guestAgent?.path];
  for (const p of paths) {
    if (p !== undefined && !p.startsWith('/')) throw invalidDef(`Domain ${def.name} has a relative path '${p}'; it must be absolute.`);
  }
  const seen = new Set<string>();
  for (const d of def.disks) {
    if (!TARGET_DEV.test(d.target)) throw invalidDef(`Disk target '${d.target}' of domain ${def.name} is invalid.`);
    if (seen.has(d.target)) throw invalidDef(`Domain ${def.name} lists disk ${d.target} more than once.`);
    seen.add(d.target);
    if (!d.source.startsWith('/')) {
      throw invalidDef(`Disk ${d.target} of domain ${def.name} has a relative source path '${d.source}'; it must be absolute.`);
    }
    if (!DISK_FORMATS.includes(d.format)) throw invalidDef(`Disk ${d.target} of domain ${def.name} has an unsupported format.`);
    if (!DISK_BUSES.includes(d.bus)) throw invalidDef(`Disk ${d.target} of domain ${def.name} has an unsupported bus.`);
  }
}

/** Sets the text of the first `<name>` child, creating it after the last of `after` (or first) when missing. */
function setChildText(parent: Element, name: string, text: string, after: readonly string[]): Element {
  let el = firstChild(parent, name);
  if (el === undefined) {
    el = docOf(parent).createElement(name);
    insertAfterAny(parent, el, after);
  }
  while (el.firstChild !== null) el.removeChild(el.firstChild);
  el.appendChild(docOf(parent).createTextNode(text));
  return el;
}

/**
 * Inserts `el` into `parent` right after the last child element whose name is
 * in `after`; when none exists, as the first child element.
 */
function insertAfterAny(parent: Element, el: Element, after: readonly string[]): void {
  let anchor: Element | undefined;
  for (const c of childElements(parent)) {
    if (after.some((n) => isNamed(c, n))) anchor = c;
  }
  if (anchor !== undefined) {
    parent.insertBefore(el, anchor.nextSibling);
  } else {
    const first = childElements(parent)[0];
    parent.insertBefore(el, first ?? null);
  }
}

/** Ensures a child element `name` exists (created via insertAfterAny) and returns it. */
function ensureChild(parent: Element, name: string, after: readonly string[]): Element {
  const existing = firstChild(parent, name);
  if (existing !== undefined) return existing;
  const el = docOf(parent).createElement(name);
  insertAfterAny(parent, el, after);
  return el;
}

function removeChildren(parent: Element, name: string): void {
  for (const c of childElements(parent, name)) parent.removeChild(c);
}

/**
 * Makes an existing interpreted `<disk>` element describe `d`, touching only
 * what differs from what parseDomainXml would read, so that unknown attributes
 * and children (cache modes, <address>, <boot>, <seclabel>, …) survive.
 */
function updateDiskElement(disk: Element, d: DiskDefinition): void {
  // <driver type=…>: always written, so a stored definition never depends on
  // the default (raw; qbackup once read an absent type as qcow2).
  const driver = firstChild(disk, 'driver');
  const currentFormat = driver === undefined ? undefined : attr(driver, 'type');
  if (currentFormat !== d.format) {
    const drv = ensureChild(disk, 'driver', []);
    if (!drv.hasAttribute('name')) drv.setAttribute('name', 'qemu');
    drv.setAttribute('type', d.format);
  }

  const source = ensureChild(disk, 'source', ['driver']);
  if (attr(source, 'file') !== d.source) source.setAttribute('file', d.source);

  const target = ensureChild(disk, 'target', ['driver', 'source']);
  if (attr(target, 'dev') !== d.target) target.setAttribute('dev', d.target);
  const busAttr = attr(target, 'bus');
  if ((busAttr ?? busFromPrefix(d.target)) !== d.bus) target.setAttribute('bus', d.bus);

  const hasReadonly = firstChild(disk, 'readonly') !== undefined;
  if (d.readonly && !hasReadonly) ensureChild(disk, 'readonly', ['driver', 'source', 'target']);
  if (!d.readonly && hasReadonly) removeChildren(disk, 'readonly');

  if (d.serial === undefined) {
    removeChildren(disk, 'serial');
  } else {
    const serial = firstChild(disk, 'serial');
    if (serial === undefined || textOf(serial) !== d.serial) {
      setChildText(disk, 'serial', d.serial, ['driver', 'source', 'target', 'readonly']);
    }
  }
  syncNbdBacking(disk, d.nbdBacking);
}

/** Writes the disk's NBD backing, or removes a network backing the definition no longer has. */
function syncNbdBacking(disk: Element, nbd: NbdBacking | undefined): void {
  const current = firstChild(disk, 'backingStore');
  if (nbd === undefined) {
    if (current !== undefined && attr(current, 'type') === 'network') removeChildren(disk, 'backingStore');
    return;
  }
  const existing = current === undefined ? undefined : parseNbdBacking(current, '', '');
  if (existing !== undefined && existing.socket === nbd.socket && existing.exportName === nbd.exportName) return;
  removeChildren(disk, 'backingStore');
  const backing = docOf(disk).createElement('backingStore');
  backing.setAttribute('type', 'network');
  appendElement(backing, 'format').setAttribute('type', 'raw');
  const source = appendElement(backing, 'source');
  source.setAttribute('protocol', 'nbd');
  source.setAttribute('name', nbd.exportName);
  const host = appendElement(source, 'host');
  host.setAttribute('transport', 'unix');
  host.setAttribute('socket', nbd.socket);
  insertAfterAny(disk, backing, ['driver', 'source']);
}

function newDiskElement(doc: Document, d: DiskDefinition): Element {
  const disk = doc.createElement('disk');
  disk.setAttribute('type', 'file');
  disk.setAttribute('device', 'disk');
  const driver = appendElement(disk, 'driver');
  driver.setAttribute('name', 'qemu');
  driver.setAttribute('type', d.format);
  appendElement(disk, 'source').setAttribute('file', d.source);
  const target = appendElement(disk, 'target');
  target.setAttribute('dev', d.target);
  target.setAttribute('bus', d.bus);
  if (d.readonly) appendElement(disk, 'readonly');
  if (d.serial !== undefined) appendElement(disk, 'serial', d.serial);
  syncNbdBacking(disk, d.nbdBacking);
  return disk;
}

function indexInParent(node: Node): number {
  let i = 0;
  for (let n = node.previousSibling; n !== null; n = n.previousSibling) i++;
  return i;
}

/** Makes the interpreted disks of `devices` equal `disks`, in that relative order. */
function syncDisks(devices: Element, disks: readonly DiskDefinition[], domain: string): void {
  const doc = docOf(devices);
  const existing = new Map<string, Element>();
  const foreignTargets = new Set<string>();
  for (const el of childElements(devices, 'disk')) {
    const dev = diskTarget(el);
    if (isInterpretedDisk(el) && dev !== undefined && dev !== '') {
      if (!existing.has(dev)) existing.set(dev, el);
    } else if (dev !== undefined) {
      foreignTargets.add(dev);
    }
  }

  const wanted = new Set(disks.map((d) => d.target));
  for (const d of disks) {
    if (foreignTargets.has(d.target)) {
      throw new QbackupError(
        'DISK_EXISTS',
        `Disk target ${d.target} of domain ${domain} is already used by a device that qbackup does not manage.`,
      );
    }
  }
  // Drop interpreted disks that are no longer wanted (and duplicates, if any).
  for (const el of childElements(devices, 'disk')) {
    if (!isInterpretedDisk(el)) continue;
    const dev = diskTarget(el);
    if (dev === undefined || !wanted.has(dev) || existing.get(dev) !== el) devices.removeChild(el);
  }

  let prev: Element | undefined;
  for (const d of disks) {
    const current = existing.get(d.target);
    let el: Element;
    if (current !== undefined) {
      updateDiskElement(current, d);
      el = current;
      if (prev !== undefined && indexInParent(el) < indexInParent(prev)) {
        devices.insertBefore(el, prev.nextSibling);
      }
    } else {
      el = newDiskElement(doc, d);
      if (prev !== undefined) {
        devices.insertBefore(el, prev.nextSibling);
      } else {
        // First wanted disk is new: put it before the first kept disk, or
        // after the last disk of any kind, or after <emulator>, or at the end.
        const firstKept = disks.map((x) => existing.get(x.target)).find((x) => x !== undefined);
        const allDisks = childElements(devices, 'disk');
        const lastDisk = allDisks[allDisks.length - 1];
        const emulator = firstChild(devices, 'emulator');
        if (firstKept !== undefined) devices.insertBefore(el, firstKept);
        else if (lastDisk !== undefined) devices.insertBefore(el, lastDisk.nextSibling);
        else if (emulator !== undefined) devices.insertBefore(el, emulator.nextSibling);
        else devices.appendChild(el);
      }
    }
    prev = el;
  }
}

/** Sets a child's text when it differs (so formatting survives), or removes it when `text` is undefined. */
function syncText(parent: Element, name: string, text: string | undefined, after: readonly string[]): void {
  const el = firstChild(parent, name);
  if (text === undefined) removeChildren(parent, name);
  else if (el === undefined || textOf(el).trim() !== text) setChildText(parent, name, text, after);
}

/** Makes <os>'s kernel, initrd and cmdline say what `boot` says; other <os> children are left alone. */
function syncKernelBoot(root: Element, boot: DomainDefinition['kernelBoot']): void {
  let os = firstChild(root, 'os');
  if (os === undefined) {
    if (boot === undefined) return;
    os = ensureChild(root, 'os', ['name', 'uuid', 'genid', 'title', 'description', 'metadata', 'maxMemory', 'memory', 'currentMemory', 'blkiotune', 'memtune', 'memoryBacking', 'vcpu', 'vcpus', 'iothreads', 'cputune', 'numatune', 'resource', 'sysinfo', 'bootloader']);
  }
  syncText(os, 'kernel', boot?.kernel, ['type', 'firmware', 'loader', 'nvram']);
  syncText(os, 'initrd', boot?.initrd, ['type', 'firmware', 'loader', 'nvram', 'kernel']);
  syncText(os, 'cmdline', boot?.cmdline, ['type', 'firmware', 'loader', 'nvram', 'kernel', 'initrd']);
}

/** Makes the guest agent's <channel> say what `agent` says (added, its path changed, or removed). */
function syncGuestAgent(devices: Element, agent: GuestAgentChannel | undefined): void {
  const existing = childElements(devices, 'channel').filter(isAgentChannel);
  if (agent === undefined) {
    for (const c of existing) devices.removeChild(c);
    return;
  }
  let channel = existing[0];
  if (channel === undefined) {
    channel = appendElement(devices, 'channel');
    channel.setAttribute('type', 'unix');
    appendElement(channel, 'source').setAttribute('mode', 'bind');
    const target = appendElement(channel, 'target');
    target.setAttribute('type', 'virtio');
    target.setAttribute('name', GUEST_AGENT_CHANNEL);
  }
  const source = ensureChild(channel, 'source', []);
  if (agent.path === undefined) source.removeAttribute('path');
  else if (attr(source, 'path') !== agent.path) source.setAttribute('path', agent.path);
}

/**
 * Writes `def` as a libvirt `<domain>` document. `def.sourceXml` is the
 * template: name, uuid, memory (in KiB, unit='KiB'), vcpu, the set of
 * interpreted file disks, <os>'s kernel/initrd/cmdline and the guest agent's
 * channel are updated; everything else is preserved. With an
 * empty sourceXml a fresh `<domain type='kvm'>` document is built. The result
 * is indented with two spaces and ends with a newline.
 */
export function formatDomainXml(def: DomainDefinition): string {
  validateDefinition(def);
  const root = def.sourceXml.trim() === ''
    ? newXmlDocument('domain')
    : parseXmlDocument(def.sourceXml, `the source XML of domain ${def.name}`, 'domain');
  if (def.sourceXml.trim() === '') root.setAttribute('type', 'kvm');

  setChildText(root, 'name', def.name, []);
  setChildText(root, 'uuid', normalizeUuid(def.uuid) ?? def.uuid, ['name']);
  const memory = setChildText(root, 'memory', String(def.memoryKiB), ['name', 'uuid', 'genid', 'title', 'description', 'metadata', 'maxMemory']);
  memory.setAttribute('unit', 'KiB');
  setChildText(root, 'vcpu', String(def.vcpus), ['name', 'uuid', 'genid', 'title', 'description', 'metadata', 'maxMemory', 'memory', 'currentMemory', 'blkiotune', 'memtune', 'memoryBacking']);

  syncKernelBoot(root, def.kernelBoot);
  let devices = firstChild(root, 'devices');
  if (devices === undefined) {
    if (def.disks.length === 0 && def.guestAgent === undefined) return serializeIndented(root);
    devices = appendElement(root, 'devices');
  }
  syncDisks(devices, def.disks, def.name);
  syncGuestAgent(devices, def.guestAgent);
  return serializeIndented(root);
}
