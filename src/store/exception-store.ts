/**
 * The exception-store seam, shaped after the kernel's dm_exception_store_type: the snapshot
 * layer allocates COW chunks (prepare), hands finished copies back (commit), and during a merge
 * walks the table backwards (prepareMerge/commitMerge). Implementations: PersistentStore (the
 * kernel's on-disk format, P/PO) and TransientStore (N, memory only).
 *
 * Ordering contract: commitException may be called in any order, but exceptions are recorded
 * and their promises settle in allocation order (the kernel's "avoid snapshot space leak on
 * crash" rule), so the durable table is always a prefix of the allocation order.
 */
import type { BlockDevice } from '../device/block-device.js'
import type { ExceptionList } from '../format/exception-list.js'

export interface StoreUsage {
  readonly allocatedSectors: number
  readonly totalSectors: number
  readonly metadataSectors: number
}

/**
 * An extent of `count` exceptions prepared together: origin chunks oldChunk..oldChunk+count-1
 * go to the consecutive COW chunks newChunk..newChunk+count-1. The COW still gets one 16-byte
 * entry per chunk; the extent is only the unit of bookkeeping (one object, one commit waiter).
 */
export interface PreparedException {
  readonly oldChunk: number
  readonly newChunk: number
  readonly count: number
  /** Allocation order within this store (of the extent as a whole). */
  readonly sequence: number
}

/** Entries at the end of the table that are consecutive in both the origin and the COW. */
export interface MergeRun {
  /** Number of consecutive entries in the run (>= 1). */
  readonly count: number
  /** Highest origin chunk of the run; the run covers lastOld-count+1 .. lastOld. */
  readonly lastOld: number
  /** Highest COW chunk of the run. */
  readonly lastNew: number
}

export interface ExceptionStore {
  readonly kind: 'persistent' | 'transient'
  readonly chunkBytes: number
  readonly cow: BlockDevice
  readonly supportsMerge: boolean
  /** False once invalidated or after a metadata/copy failure. */
  readonly valid: boolean
  /**
   * Loads the table, calling `visit` for every committed exception in table order. Resolves
   * `{ valid: false }` for a COW whose header says it was invalidated.
   */
  readMetadata(visit: (oldChunk: number, newChunk: number) => void): Promise<{ valid: boolean }>
  /**
   * Optional bulk form of readMetadata for opening big tables: appends every exception to
   * `into` in table order. When it throws, `into` holds the entries `visit` would have seen.
   */
  readMetadataInto?(into: ExceptionList): Promise<{ valid: boolean }>
  /** Allocates a COW chunk for `oldChunk`. Throws SNAP_NO_SPACE when the COW is full. */
  prepareException(oldChunk: number): PreparedException
  /**
   * Allocates COW chunks for up to `maxCount` origin chunks from `oldChunk`, as one extent of
   * consecutive COW chunks: fewer when the next chunk would be a metadata area or the COW is
   * full. Throws SNAP_NO_SPACE when not even one chunk fits.
   */
  prepareExceptions(oldChunk: number, maxCount: number): PreparedException
  /**
   * Resolves once any growth of the COW needed for `e`'s chunk has happened. Rejects with
   * SNAP_NO_SPACE when a grow-on-demand COW cannot get the space (the file system is full):
   * the caller then abandons `e`.
   */
  whenSpaceReady(e: PreparedException): Promise<void>
  /**
   * whenSpaceReady with a callback (null or the error) instead of a promise; called at once,
   * synchronously, when no growth has to be waited for.
   */
  whenSpaceReadyThen(e: PreparedException, done: (err: unknown) => void): void
  /**
   * Records every chunk of `e` (ok = its data copy succeeded). Resolves true when they are durable
   * (persistent) or recorded (transient); false when the store is or became invalid.
   */
  commitException(e: PreparedException, ok: boolean): Promise<boolean>
  /** commitException with a callback instead of a promise (same order, same result). */
  commitExceptionThen(e: PreparedException, ok: boolean, done: (ok: boolean) => void): void
  /**
   * Hands `e` back unrecorded, in place of commitException, when its copy could not get space:
   * no entry is written, the store stays valid, and its chunk is never referenced (a hole).
   */
  abandonException(e: PreparedException): Promise<void>
  /**
   * The next entries to merge: runs covering the K entries before table index `endIndex` (the
   * table's end when absent), possibly over several metadata areas (newest run first,
   * K <= maxEntries, the oldest run returned may be cut short to fit). Empty when there are
   * none. Nothing changes until commitMerge, so calling it again returns the same runs; a merge
   * may prepare the batch before a batch that is still committing by passing its first index.
   */
  prepareMerge(maxEntries?: number, endIndex?: number): Promise<MergeRun[]>
  /** Entries left in the table (the index one past the last). */
  mergeEntries(): number
  /**
   * Removes the last `count` entries durably (count <= the entries prepareMerge returned). The
   * table write follows a COW flush (the kernel's PREFLUSH); `cowFlushed`: the caller flushed
   * the COW after the batch's copies ended (a merge does it beside its origin flush), so the
   * store does not flush it again first.
   */
  commitMerge(count: number, options?: { readonly cowFlushed?: boolean }): Promise<void>
  /** Invalidates the store permanently (persistent: header valid=0, flushed). */
  dropSnapshot(): Promise<void>
  usage(): StoreUsage
  /**
   * Grows a fixed-size COW device to `sizeBytes` (autoextend); allocation may use the new room
   * once this resolves. Refused for a grow-on-demand COW (it needs no extending) and for a
   * device that cannot be resized.
   */
  growTo(sizeBytes: number): Promise<void>
  /** Flushes what is committed and releases the COW device. */
  close(): Promise<void>
}
