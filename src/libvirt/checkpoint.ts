// Reading and writing libvirt <domaincheckpoint> documents
// (https://libvirt.org/formatcheckpoint.html).
//
// Parses into and formats from CheckpointSpec (src/checkpoint/spec.ts).
//
// Invariants:
// - Checkpoint names (own and parent) are checked with assertCheckpointName.
// - `disks` undefined means the document had no <disks> element (all disks
//   participate); an empty array means an explicit empty <disks/>.
// - A disk without a checkpoint attribute is 'bitmap' (libvirt's default);
//   `bitmap` is only allowed with checkpoint='bitmap'; disk names are unique.
// - `domainXml` is the <domain> child serialized verbatim; it is not
//   interpreted here (see ./domain.ts for that).
// - formatCheckpointXml writes libvirt's element order: name, description,
//   parent/name, creationTime, disks, domain; two-space indentation; the
//   embedded <domain> is re-indented to fit. Its output parses back to an
//   equal CheckpointSpec (minus domain/size when the options leave them out).
// - Malformed documents raise INVALID_XML; invalid values handed to
//   formatCheckpointXml raise INVALID_ARGUMENT (INVALID_NAME for names).

import { XMLSerializer } from '@xmldom/xmldom';
import type { Element } from '@xmldom/xmldom';
import { QbackupError } from '../errors.js';
import {
  appendElement,
  attr,
  childElements,
  docOf,
  firstChild,
  newXmlDocument,
  parseUnsigned,
  parseXmlDocument,
  XML_LIMITS,
  type XmlLimits,
  serializeIndented,
  textOf,
} from '../util/xml.js';
import { assertCheckpointName, type CheckpointDiskSpec, type CheckpointSpec } from '../checkpoint/spec.js';

export interface FormatCheckpointOptions {
  /** Leave out <domain> (libvirt's VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN). */
  noDomain?: boolean;
  /** Write the disks' size attribute (libvirt's VIR_DOMAIN_CHECKPOINT_XML_SIZE). */
  includeSize?: boolean;
}

function label(name: string | undefined): string {
  return name === undefined ? 'Checkpoint XML' : `Checkpoint ${name}`;
}

function parseDisk(el: Element, cp: string): CheckpointDiskSpec {
  const code = 'INVALID_XML';
  const name = attr(el, 'name');
  if (name === undefined || name === '') throw new QbackupError(code, `${cp} has a <disk> without a name.`);
  const type = attr(el, 'checkpoint') ?? 'bitmap';
  if (type !== 'bitmap' && type !== 'no') {
    throw new QbackupError(code, `Disk ${name} of ${lower(cp)} has checkpoint='${type}', but only 'bitmap' and 'no' are valid.`);
  }
  const disk: CheckpointDiskSpec = { name, checkpoint: type };
  const bitmap = attr(el, 'bitmap');
  if (bitmap !== undefined) {
    if (type !== 'bitmap') {
      throw new QbackupError(code, `Disk ${name} of ${lower(cp)} names a bitmap but has checkpoint='no'.`);
    }
    if (bitmap === '') throw new QbackupError(code, `Disk ${name} of ${lower(cp)} has an empty bitmap name.`);
    disk.bitmap = bitmap;
  }
  const size = attr(el, 'size');
  if (size !== undefined) {
    const n = parseUnsigned(size);
    if (n === undefined) {
      throw new QbackupError(code, `Disk ${name} of ${lower(cp)} has an invalid size '${size}': expected a non-negative integer.`);
    }
    disk.size = n;
  }
  return disk;
}

function lower(text: string): string {
  return text.charAt(0).toLowerCase() + text.slice(1);
}

/** A checkpoint embeds its domain's definition, which may use the domain limits in full. */
const CHECKPOINT_XML_LIMITS: XmlLimits = { maxBytes: 2 * XML_LIMITS.maxBytes, maxDepth: XML_LIMITS.maxDepth + 1 };

/** Parses a libvirt `<domaincheckpoint>` document. */
export function parseCheckpointXml(xml: string): CheckpointSpec {
  const root = parseXmlDocument(xml, 'checkpoint XML', 'domaincheckpoint', CHECKPOINT_XML_LIMITS);
  const cp: CheckpointSpec = {};

  const nameEl = firstChild(root, 'name');
  if (nameEl !== undefined) {
    const name = textOf(nameEl);
    assertCheckpointName(name);
    cp.name = name;
  }
  const what = label(cp.name);

  const descEl = firstChild(root, 'description');
  if (descEl !== undefined) cp.description = textOf(descEl);

  const parentEl = firstChild(root, 'parent');
  if (parentEl !== undefined) {
    const parentName = firstChild(parentEl, 'name');
    if (parentName === undefined) throw new QbackupError('INVALID_XML', `${what} has a <parent> without a <name>.`);
    const parent = textOf(parentName);
    assertCheckpointName(parent, `Parent checkpoint name of ${lower(what)}`);
    cp.parent = parent;
  }

  const timeEl = firstChild(root, 'creationTime');
  if (timeEl !== undefined) {
    const t = parseUnsigned(textOf(timeEl));
    if (t === undefined) {
      throw new QbackupError(
        'INVALID_XML',
        `${what} has an invalid <creationTime> '${textOf(timeEl).trim()}': expected a non-negative integer.`,
      );
    }
    cp.creationTime = t;
  }

  const disksEl = firstChild(root, 'disks');
  if (disksEl !== undefined) {
    const disks: CheckpointDiskSpec[] = [];
    const seen = new Set<string>();
    for (const el of childElements(disksEl, 'disk')) {
      const disk = parseDisk(el, what);
      if (seen.has(disk.name)) throw new QbackupError('INVALID_XML', `${what} lists disk ${disk.name} more than once.`);
      seen.add(disk.name);
      disks.push(disk);
    }
    cp.disks = disks;
  }

  const domainEl = firstChild(root, 'domain');
  if (domainEl !== undefined) cp.domainXml = new XMLSerializer().serializeToString(domainEl);

  return cp;
}

function validateForFormat(cp: CheckpointSpec): void {
  if (cp.name !== undefined) assertCheckpointName(cp.name);
  const what = label(cp.name);
  if (cp.parent !== undefined) assertCheckpointName(cp.parent, `Parent checkpoint name of ${lower(what)}`);
  if (cp.creationTime !== undefined && (!Number.isSafeInteger(cp.creationTime) || cp.creationTime < 0)) {
    throw new QbackupError('INVALID_ARGUMENT', `${what} has an invalid creation time ${cp.creationTime}.`);
  }
  const seen = new Set<string>();
  for (const d of cp.disks ?? []) {
    if (d.name === '') throw new QbackupError('INVALID_ARGUMENT', `${what} has a disk without a name.`);
    if (seen.has(d.name)) throw new QbackupError('INVALID_ARGUMENT', `${what} lists disk ${d.name} more than once.`);
    seen.add(d.name);
    if (d.checkpoint !== 'bitmap' && d.checkpoint !== 'no') {
      throw new QbackupError('INVALID_ARGUMENT', `Disk ${d.name} of ${lower(what)} has an invalid checkpoint type.`);
    }
    if (d.bitmap !== undefined && (d.checkpoint !== 'bitmap' || d.bitmap === '')) {
      throw new QbackupError('INVALID_ARGUMENT', `Disk ${d.name} of ${lower(what)} has a bitmap name but no bitmap checkpoint.`);
    }
    if (d.size !== undefined && (!Number.isSafeInteger(d.size) || d.size < 0)) {
      throw new QbackupError('INVALID_ARGUMENT', `Disk ${d.name} of ${lower(what)} has an invalid size ${d.size}.`);
    }
  }
}

/**
 * Writes `cp` as a `<domaincheckpoint>` document in libvirt's element order.
 * `noDomain` leaves out the embedded `<domain>`; disk sizes are only written
 * with `includeSize`.
 */
export function formatCheckpointXml(cp: CheckpointSpec, options: FormatCheckpointOptions = {}): string {
  validateForFormat(cp);
  const root = newXmlDocument('domaincheckpoint');

  if (cp.name !== undefined) appendElement(root, 'name', cp.name);
  if (cp.description !== undefined) appendElement(root, 'description', cp.description);
  if (cp.parent !== undefined) appendElement(appendElement(root, 'parent'), 'name', cp.parent);
  if (cp.creationTime !== undefined) appendElement(root, 'creationTime', String(cp.creationTime));
  if (cp.disks !== undefined) {
    const disks = appendElement(root, 'disks');
    for (const d of cp.disks) {
      const el = appendElement(disks, 'disk');
      el.setAttribute('name', d.name);
      el.setAttribute('checkpoint', d.checkpoint);
      if (d.bitmap !== undefined) el.setAttribute('bitmap', d.bitmap);
      if (options.includeSize === true && d.size !== undefined) el.setAttribute('size', String(d.size));
    }
  }
  if (cp.domainXml !== undefined && options.noDomain !== true) {
    const domain = parseXmlDocument(cp.domainXml, `the domain XML of ${lower(label(cp.name))}`, 'domain');
    root.appendChild(docOf(root).importNode(domain, true));
  }
  return serializeIndented(root);
}
