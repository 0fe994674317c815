// The subset of libvirt's <domain> that qbackup interprets. Everything else in
// a definition is kept verbatim (see xml.ts) so that a round trip through
// qbackup never drops what a management application put there.

export type DiskFormat = 'qcow2' | 'raw';
export type DiskBus = 'scsi' | 'virtio';

export interface DiskDefinition {
  /** Guest-visible target name, <target dev=…>: "sda", "vdb". Unique within a domain. */
  target: string;
  /** Absolute path of the image file, <source file=…>. */
  source: string;
  /** <driver type=…>; raw when absent, as libvirt's QEMU driver reads it (a format is never probed). */
  format: DiskFormat;
  /** <target bus=…>; derived from the target prefix when absent (sd → scsi, vd → virtio). */
  bus: DiskBus;
  /** <serial>, when present. */
  serial?: string;
  /** <readonly/> present. */
  readonly: boolean;
  /**
   * The <encryption format=…> the definition asks for (under <disk> or its
   * <source>). qbackup cannot pass secrets to QEMU yet, so the domain service
   * refuses such a disk rather than showing the guest ciphertext.
   */
  encryption?: string;
  /**
   * The source of a declared <backingStore> chain ("" when it names none). An
   * empty <backingStore/> means "no backing file" and is not recorded. Refused
   * by the domain service until chains are supported.
   */
  backingStore?: string;
  /**
   * A declared backing of the qcow2 image that is an NBD export on a unix
   * socket (libvirt's `<backingStore type='network'>` with `<source
   * protocol='nbd'>`): how an instant restore runs a disk over a backup
   * while QEMU copies it into the image. The image's own header names no
   * backing file; QEMU gets the backing as an explicit node.
   */
  nbdBacking?: NbdBacking;
}

/** A raw NBD export on a unix socket, as a disk's backing. */
export interface NbdBacking {
  /** Absolute path of the unix socket. */
  socket: string;
  /** The export name. */
  exportName: string;
}

/** Direct kernel boot, libvirt's <os><kernel>/<initrd>/<cmdline>. */
export interface KernelBoot {
  /** Absolute path of the kernel image. */
  kernel: string;
  /** Absolute path of the initramfs, when there is one. */
  initrd?: string;
  /** The kernel command line, when there is one. */
  cmdline?: string;
}

/** The QEMU guest agent's channel: <channel type='unix'> with target org.qemu.guest_agent.0. */
export interface GuestAgentChannel {
  /** <source mode='bind' path=…>; absent: agent.sock in the domain's state directory. */
  path?: string;
}

export interface DomainDefinition {
  name: string;
  /** Lower-case canonical UUID; generated when the document has none. */
  uuid: string;
  /** <memory> converted to KiB (libvirt's default unit). */
  memoryKiB: number;
  /** <vcpu> count; 1 when absent. */
  vcpus: number;
  /** File-backed disks with device='disk', in document order. */
  disks: DiskDefinition[];
  /** <os><kernel> present: QEMU boots this kernel (-kernel, -initrd, -append). */
  kernelBoot?: KernelBoot;
  /** A guest agent channel is configured (the only <channel> qbackup interprets). */
  guestAgent?: GuestAgentChannel;
  /**
   * The document this definition came from, serialized. formatDomainXml uses it
   * as the template so that unknown elements and attributes survive; it is never
   * interpreted beyond the fields above.
   */
  sourceXml: string;
}
