// File-level restore: browse the filesystems of a backup and copy single
// files out, through a libguestfs appliance that opens the backup's disks
// read-only from qbackup's own NBD server (docs/design.md, "File-level restore").

export { GuestfsAppliance, type ApplianceSettings } from './appliance.js';
export { escapeName, modeString, normalizeGuestPath, type FileEntry, type FileType } from './entries.js';
export { safeName } from './get.js';
export { CHUNK_BYTES, checkGuestDir, copyIntoGuest, putIntoGuest, type GuestPutReport } from './guest-put.js';
export { FileSession, globRegExp, pickManifest, reapStaleSessions, type FileLimits, type FileSessionOptions, type FilesystemInfo, type GetReport, type OperatingSystem } from './session.js';
export { WarmSessions } from './warm.js';
