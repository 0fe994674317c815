// The small XML toolkit the libvirt document modules share: a hardened
// parse (no external entities; a size cap and a nesting-depth cap checked on
// the text before any DOM is built, so a huge or deeply nested document is one
// INVALID_XML sentence, never a RangeError or a 370 MB parse), element lookup,
// and a re-indenting serializer.

import { DOMParser, XMLSerializer } from '@xmldom/xmldom';
import type { Document, Element, Node } from '@xmldom/xmldom';
import { QbackupError } from '../errors.js';

const ELEMENT_NODE = 1;
const TEXT_NODE = 3;
const CDATA_SECTION_NODE = 4;
const PROCESSING_INSTRUCTION_NODE = 7;
const COMMENT_NODE = 8;

const INDENT = '  ';

export function isElement(node: Node | null | undefined): node is Element {
  return node !== null && node !== undefined && node.nodeType === ELEMENT_NODE;
}

/** The document owning `el` (always present for nodes created by a parser or document). */
export function docOf(el: Element): Document {
  const doc = el.ownerDocument;
  if (doc === null) throw new Error('XML element has no owner document');
  return doc;
}

function capitalize(text: string): string {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

export interface XmlLimits {
  maxBytes: number;
  maxDepth: number;
}

/** Limits of a libvirt document: 1 MiB and 64 levels of elements (real documents use well under 10). */
export const XML_LIMITS: XmlLimits = { maxBytes: 1 << 20, maxDepth: 64 };

/**
 * Refuses a document over the size limit or with elements nested deeper than
 * the depth limit. A linear scan of the text: comments, CDATA, processing
 * instructions, the DOCTYPE and quoted attribute values are skipped; anything
 * malformed is left for the parser to name.
 */
export function checkXmlLimits(xml: string, what: string, limits: XmlLimits): void {
  const bytes = Buffer.byteLength(xml);
  if (bytes > limits.maxBytes) {
    throw new QbackupError('INVALID_XML', `${capitalize(what)} is larger than ${limits.maxBytes / (1 << 20)} MiB (${bytes} bytes).`);
  }
  let depth = 0;
  let i = xml.indexOf('<');
  while (i >= 0 && i < xml.length) {
    const next = xml.charAt(i + 1);
    if (xml.startsWith('<!--', i)) i = skipPast(xml, '-->', i + 4);
    else if (xml.startsWith('<![CDATA[', i)) i = skipPast(xml, ']]>', i + 9);
    else if (next === '?') i = skipPast(xml, '?>', i + 2);
    else if (next === '!') i = skipDeclaration(xml, i + 2);
    else if (next === '/') {
      depth--;
      i = skipPast(xml, '>', i + 2);
    } else {
      const end = tagEnd(xml, i + 1);
      if (xml.charAt(end - 1) !== '/') depth++;
      if (depth > limits.maxDepth) {
        throw new QbackupError('INVALID_XML', `${capitalize(what)} is nested deeper than ${limits.maxDepth} elements.`);
      }
      i = end + 1;
    }
    i = i < 0 ? -1 : xml.indexOf('<', i);
  }
}

function skipPast(xml: string, marker: string, from: number): number {
  const at = xml.indexOf(marker, from);
  return at < 0 ? -1 : at + marker.length;
}

/** Index of the '>' closing a start tag that begins at `from`, skipping quoted attribute values. */
function tagEnd(xml: string, from: number): number {
  let quote = '';
  for (let i = from; i < xml.length; i++) {
    const c = xml.charAt(i);
    if (quote !== '') {
      if (c === quote) quote = '';
    } else if (c === '"' || c === "'") quote = c;
    else if (c === '>') return i;
  }
  return xml.length;
}

/** Skips a <!DOCTYPE …> (with an internal subset in brackets) or another <!…> declaration. */
function skipDeclaration(xml: string, from: number): number {
  let brackets = 0;
  for (let i = from; i < xml.length; i++) {
    const c = xml.charAt(i);
    if (c === '[') brackets++;
    else if (c === ']') brackets--;
    else if (c === '>' && brackets <= 0) return i + 1;
  }
  return -1;
}

/**
 * Parses `xml` and returns its root element, which must be an un-namespaced
 * `<rootName>`. `what` names the document in error messages ("domain XML").
 * A document over `limits` or any parser error or fatal error (not warnings)
 * raises INVALID_XML.
 */
export function parseXmlDocument(xml: string, what: string, rootName: string, limits: XmlLimits = XML_LIMITS): Element {
  checkXmlLimits(xml, what, limits);
  let problem: string | undefined;
  let doc: Document | undefined;
  try {
    const parser = new DOMParser({
      onError: (level: 'warning' | 'error' | 'fatalError', msg: string): void => {
        if (level === 'warning') return;
        problem ??= msg;
        throw new Error(msg);
      },
    });
    doc = parser.parseFromString(xml, 'application/xml');
  } catch (err) {
    problem ??= err instanceof Error ? err.message : String(err);
  }
  if (problem !== undefined || doc === undefined) {
    const cause = (problem ?? 'unknown parser error').split('\n')[0]?.trim().replace(/[.:]+$/, '') ?? '';
    throw new QbackupError('INVALID_XML', `${capitalize(what)} is not well-formed XML: ${cause}.`);
  }
  const root = doc.documentElement;
  if (!isElement(root)) {
    throw new QbackupError('INVALID_XML', `${capitalize(what)} has no root element.`);
  }
  if (!isNamed(root, rootName)) {
    throw new QbackupError(
      'INVALID_XML',
      `${capitalize(what)} is not a <${rootName}> document: its root element is <${root.tagName}>.`,
    );
  }
  return root;
}

/** True for an element with local name `name` in no namespace (libvirt's vocabulary). */
export function isNamed(el: Element, name: string): boolean {
  return el.localName === name && (el.namespaceURI === null || el.namespaceURI === '');
}

/** Child elements of `parent`, optionally only those named `name` (un-namespaced). */
export function childElements(parent: Element, name?: string): Element[] {
  const out: Element[] = [];
  for (let n = parent.firstChild; n !== null; n = n.nextSibling) {
    if (isElement(n) && (name === undefined || isNamed(n, name))) out.push(n);
  }
  return out;
}

/** The first child element named `name`, as libvirt's "./name" XPath lookups do. */
export function firstChild(parent: Element, name: string): Element | undefined {
  for (let n = parent.firstChild; n !== null; n = n.nextSibling) {
    if (isElement(n) && isNamed(n, name)) return n;
  }
  return undefined;
}

/** Attribute value, or undefined when the attribute is absent. */
export function attr(el: Element, name: string): string | undefined {
  return el.hasAttribute(name) ? el.getAttribute(name) ?? '' : undefined;
}

/** Text content of an element (all descendant text, untrimmed). */
export function textOf(el: Element): string {
  return el.textContent ?? '';
}

/**
 * Re-indents `root` (in place) with two spaces per level and serializes it,
 * ending with a newline. Whitespace-only text between child nodes is treated
 * as formatting and replaced; elements with significant text (text-only or
 * mixed content) keep their content exactly.
 */
export function serializeIndented(root: Element): string {
  reindent(root, 0);
  return new XMLSerializer().serializeToString(root) + '\n';
}

function reindent(el: Element, depth: number): void {
  const doc = docOf(el);
  const children: Node[] = [];
  for (let n = el.firstChild; n !== null; n = n.nextSibling) children.push(n);

  let structural = false;
  let significantText = false;
  for (const c of children) {
    const t = c.nodeType;
    if (t === ELEMENT_NODE || t === COMMENT_NODE || t === PROCESSING_INSTRUCTION_NODE) structural = true;
    else if (t === CDATA_SECTION_NODE) significantText = true;
    else if (t === TEXT_NODE && (c.nodeValue ?? '').trim() !== '') significantText = true;
  }
  if (significantText) return;
  if (!structural) {
    // Only whitespace: collapse it when it is line-breaking formatting left
    // behind by removed children (e.g. an emptied <devices>).
    if (children.length > 0 && children.every((c) => (c.nodeValue ?? '').includes('\n'))) {
      for (const c of children) el.removeChild(c);
    }
    return;
  }
  for (const c of children) {
    if (c.nodeType === TEXT_NODE) el.removeChild(c);
  }
  const inner = '\n' + INDENT.repeat(depth + 1);
  for (const c of children) {
    if (c.nodeType === TEXT_NODE) continue;
    el.insertBefore(doc.createTextNode(inner), c);
    if (isElement(c)) reindent(c, depth + 1);
  }
  el.appendChild(doc.createTextNode('\n' + INDENT.repeat(depth)));
}

/** Creates a detached document whose root is an empty `<rootName>`. */
export function newXmlDocument(rootName: string): Element {
  return parseXmlDocument(`<${rootName}/>`, 'new document', rootName);
}

/** Appends a new child element `name` to `parent`, with optional text content. */
export function appendElement(parent: Element, name: string, text?: string): Element {
  const el = docOf(parent).createElement(name);
  if (text !== undefined && text !== '') el.appendChild(docOf(parent).createTextNode(text));
  parent.appendChild(el);
  return el;
}

/** Parses a non-negative decimal integer (surrounding whitespace allowed); undefined if not one. */
export function parseUnsigned(text: string): number | undefined {
  const t = text.trim();
  if (!/^[0-9]+$/.test(t)) return undefined;
  const n = Number(t);
  return Number.isSafeInteger(n) ? n : undefined;
}
