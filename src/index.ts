/**
 * The public API of the `blocksnap` package: what `import … from 'blocksnap'` gives. Everything
 * else under src/ is internal and may change without notice; test/package/api-surface.test.ts
 * fails when this list changes, so a change here is a deliberate one.
 */

// Errors: callers branch on `code`, never on the message.
export { SnapError, isSnapError, type SnapErrorCode, type SnapErrorDetails } from './errors.js'

// Devices.
export type { BlockDevice, DeviceCapabilities, WriteOptions } from './device/block-device.js'
export { FileDevice, type FileDeviceOptions } from './device/file-device.js'
export { MemoryDevice, type MemoryDeviceOptions } from './device/memory-device.js'
export { NbdClientDevice, type NbdClientOptions, type NbdClientStats, type NbdReconnectPolicy } from './device/nbd-client-device.js'
export { RbdDevice, type RbdDeviceOptions } from './device/rbd-device.js'
export { openDevice, type OpenDeviceOptions } from './device/open-device.js'

// Exception stores (the COW formats).
export type { ExceptionStore, StoreUsage } from './store/exception-store.js'
export { PersistentStore, type PersistentStoreOptions } from './store/persistent-store.js'
export { TransientStore, type TransientStoreOptions } from './store/transient-store.js'

// Origin and snapshots.
export { Origin, type OriginOptions } from './snapshot/origin.js'
export { Snapshot, type SnapshotOptions, type SnapshotState } from './snapshot/snapshot.js'

// Merge.
export { Merge, startMerge, type MergeEvents, type MergeOptions, type MergeProgress, type MergeState, type MergeStats } from './merge/merge.js'

// Volumes: an origin and its snapshots in one directory, as the CLI keeps them.
export {
  Volume,
  type CreateVolumeOptions,
  type SnapshotCreateOptions,
  type SnapshotInfo,
  type VolumeInfo,
  type VolumeOpenOptions,
} from './volume/volume.js'
export type { VolumeEvent } from './volume/volume-events.js'

// NBD server.
export { NbdServer, type NbdAddress, type NbdListenOptions, type NbdServerOptions } from './nbd/server.js'
export { staticExports, type BlockStatusExtent, type ExportProvider, type NbdExport, type RefusedExport } from './nbd/export.js'
export type { ConnectionLimits } from './nbd/connection.js'
export type { NbdLogger } from './nbd/logger.js'
export type { NbdClientFault } from './nbd/client-fault.js'
export type { NbdTlsFiles, NbdTlsOptions, TlsMode } from './nbd/tls.js'

// Process tuning for hosts that serve I/O (the CLI calls it at start; see src/util/heap-trim.ts).
export { keepFreedHeapMapped } from './util/heap-trim.js'
