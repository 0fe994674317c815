// What qbackup models only in part survives a round trip: parsing a domain
// and writing the definition back keeps every attribute and child it does
// not model, the guest agent <channel> first (its <target state>, <alias>,
// <address>, a <source> it leaves absent). Checked over libvirt's own test
// domains (test/fixtures/libvirt, see its README) and a few of our own.

import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { DOMParser, XMLSerializer, type Node } from '@xmldom/xmldom';
import { formatDomainXml, parseDomainXml } from '../../src/model/definition-xml.js';
import { repoRoot } from '../helpers/env.js';

const fixtures = join(repoRoot, 'test', 'fixtures', 'libvirt');

/** The document without whitespace-only text (indentation), serialized: equal when equal element for element, attribute for attribute. */
function canonical(xml: string): string {
  const doc = new DOMParser().parseFromString(xml, 'text/xml');
  const strip = (n: Node): void => {
    for (let c = n.firstChild; c !== null; ) {
      const next = c.nextSibling;
      if (c.nodeType === 3 && (c.nodeValue ?? '').trim() === '') n.removeChild(c);
      else strip(c);
      c = next;
    }
  };
  strip(doc);
  return new XMLSerializer().serializeToString(doc).replace(/"/g, "'");
}

function agentChannel(xml: string): string | undefined {
  const c = canonical(xml);
  return /<channel[^>]*>(?:(?!<\/channel>).)*org\.qemu\.guest_agent\.0(?:(?!<\/channel>).)*<\/channel>/.exec(c)?.[0];
}

describe('domain XML fidelity', () => {
  const files = readdirSync(fixtures).filter((f) => f.endsWith('.xml')).sort();
  it('has libvirt test domains to check', () => assert.ok(files.length >= 4));
  for (const f of files) {
    it(`${f}: written back unchanged`, () => {
      const xml = readFileSync(join(fixtures, f), 'utf8');
      const out = formatDomainXml(parseDomainXml(xml));
      assert.equal(canonical(out), canonical(xml));
    });
  }

  const AGENT = `<channel type='unix'>
      <source mode='bind' path='/run/agent.sock' seclabel-test='x'><seclabel model='dac' relabel='no'/></source>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
      <alias name='channel0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>`;
  const doc = (channel: string): string => `<domain type='qemu'>
  <name>ga</name>
  <uuid>6f1f3c3e-8d1e-4c55-9a8e-1b2c3d4e5f60</uuid>
  <memory unit='KiB'>65536</memory>
  <vcpu>1</vcpu>
  <devices>
    ${channel}
  </devices>
</domain>
`;

  it('a guest agent channel keeps its state, alias, address and source children when written back', () => {
    const xml = doc(AGENT);
    assert.equal(agentChannel(formatDomainXml(parseDomainXml(xml))), agentChannel(xml));
  });

  it('a guest agent channel without <source> (libvirt picks the path) stays without one', () => {
    const xml = doc(`<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/><address type='virtio-serial' controller='0' bus='0' port='2'/></channel>`);
    assert.equal(agentChannel(formatDomainXml(parseDomainXml(xml))), agentChannel(xml));
  });

  it('changing the agent socket path changes only that attribute', () => {
    const xml = doc(AGENT);
    const def = parseDomainXml(xml);
    const out = formatDomainXml({ ...def, guestAgent: { path: '/run/other.sock' } });
    assert.equal(agentChannel(out), agentChannel(xml)?.replace('/run/agent.sock', '/run/other.sock'));
  });
});
