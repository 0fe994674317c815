// The definition of a new domain made from a backup's saved domain XML
// (`restore --define NEW`): the same machine under a new name, with no UUID
// (the hypervisor makes one), no MAC addresses (new ones, so it can run
// beside the original), and its disks reading the restored images.
//
// An instant restore through libvirt makes its new domain here too: each
// disk is then a local overlay whose declared backing is an NBD export of
// the backup (`<backingStore type='network'>`).
//
// Invariants: a disk of the original that was not restored is dropped, so
// the new domain never opens the original's images; a restored disk keeps
// no <encryption> (the restored image is plain); CD-ROMs and other
// read-only media are kept as they were.

import { QbackupError } from '../errors.js';
import type { Document, Element } from '@xmldom/xmldom';
import { attr, childElements, docOf, firstChild, parseXmlDocument, serializeIndented } from '../util/xml.js';

export interface RestoredImage {
  target: string;
  file: string;
  format: 'qcow2' | 'raw';
  /** The image's declared backing: a raw NBD export on a unix socket (instant restore). */
  nbdBacking?: { socket: string; exportName: string } | undefined;
}

export function definitionForRestore(savedXml: string, name: string, images: readonly RestoredImage[]): string {
  const root = parseXmlDocument(savedXml, 'the saved definition of the backup', 'domain');
  const doc = docOf(root);
  const nameEl = firstChild(root, 'name');
  if (nameEl === undefined) throw new QbackupError('INVALID_XML', 'The saved definition of the backup has no <name>');
  while (nameEl.firstChild !== null) nameEl.removeChild(nameEl.firstChild);
  nameEl.appendChild(doc.createTextNode(name));
  for (const uuid of childElements(root, 'uuid')) root.removeChild(uuid);
  const devices = firstChild(root, 'devices');
  for (const iface of devices === undefined ? [] : childElements(devices, 'interface')) {
    for (const mac of childElements(iface, 'mac')) iface.removeChild(mac);
  }
  for (const disk of devices === undefined ? [] : childElements(devices, 'disk')) {
    const target = firstChild(disk, 'target');
    const dev = target === undefined ? undefined : attr(target, 'dev');
    const image = images.find((i) => i.target === dev);
    if (image === undefined) {
      if ((attr(disk, 'device') ?? 'disk') === 'disk') devices?.removeChild(disk);
      continue;
    }
    disk.setAttribute('type', 'file');
    for (const old of [...childElements(disk, 'source'), ...childElements(disk, 'backingStore'), ...childElements(disk, 'encryption')]) disk.removeChild(old);
    const source = doc.createElement('source');
    source.setAttribute('file', image.file);
    disk.insertBefore(source, disk.firstChild);
    if (image.nbdBacking !== undefined) disk.insertBefore(nbdBackingStore(doc, image.nbdBacking), source.nextSibling);
    let driver = firstChild(disk, 'driver');
    if (driver === undefined) {
      driver = doc.createElement('driver');
      driver.setAttribute('name', 'qemu');
      disk.insertBefore(driver, disk.firstChild);
    }
    driver.setAttribute('type', image.format);
  }
  return serializeIndented(root);
}

/** `<backingStore type='network'><format type='raw'/><source protocol='nbd' name=EXPORT><host transport='unix' socket=PATH/></source></backingStore>` */
function nbdBackingStore(doc: Document, backing: { socket: string; exportName: string }): Element {
  const store = doc.createElement('backingStore');
  store.setAttribute('type', 'network');
  const format = doc.createElement('format');
  format.setAttribute('type', 'raw');
  store.appendChild(format);
  const source = doc.createElement('source');
  source.setAttribute('protocol', 'nbd');
  source.setAttribute('name', backing.exportName);
  const host = doc.createElement('host');
  host.setAttribute('transport', 'unix');
  host.setAttribute('socket', backing.socket);
  source.appendChild(host);
  store.appendChild(source);
  return store;
}
