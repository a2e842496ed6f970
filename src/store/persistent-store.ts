/**
 * PersistentStore: the kernel's persistent exception store (table types P and PO), reading and
 * writing the exact on-disk format of format/.
 *
 * Design notes
 * - Allocation hands out data chunks from 2 upwards, skipping metadata areas; `nextFree` is one
 *   past the highest chunk ever referenced, so holes are never reused (as in the kernel).
 * - Commits arrive in allocation order (InOrderCommitter). Entries are appended to the in-memory
 *   image of the current area; the area is queued for writing when no allocated exception is
 *   still outstanding, or when the area fills (the kernel's batching rule: one metadata write
 *   for a whole batch).
 * - A single writer loop runs rounds, and each round ends with ONE flush that serves two
 *   batches: the areas whose data the previous round's flush made durable are written, the
 *   areas queued since then (their data already written) wait in the same flush, and after it
 *   the first batch is committed while the second's data is durable and its areas go out in the
 *   next round. Each entry still follows its data to disk by a flush (the kernel's
 *   PREFLUSH + FUA order), and a batch is answered only after the flush that follows its area
 *   write; a stream of commits pays one flush per batch instead of two. Rounds flush instead of
 *   writing the last area with FUA: FUA makes durable only the write that carries it (NBD's and
 *   RBD's FUA are per request), and a round writes several areas.
 * - While a round is in flight, later commits keep appending to the in-memory area; queued jobs
 *   carry their own image (a full area's buffer is never written to again, a partial area is
 *   copied), so every write carries a consistent copy.
 * - When an area fills, the next area is zeroed in the round that flushes the full area's data,
 *   so the zeros are durable before the full area is written (next round): after a crash the
 *   reader always finds a terminator.
 * - New COW: area 0 is zeroed first, then the header is written, then flushed (the kernel writes
 *   the header first; the reverse order cannot leave a valid header over a garbage area).
 * - Invalidation rewrites the header with valid = 0 and flushes it: a crash must not bring an
 *   invalidated snapshot back as valid after the origin moved on.
 * - Growable COWs (grow-on-demand files) never fail allocation for space; they extend the device
 *   in steps before the data chunk or the next area is written, and write zeros to each future
 *   metadata area as the growth reaches it. When the file system is full, a step fails and so
 *   does every copy that needed it (whenSpaceReady throws SNAP_NO_SPACE); the snapshot layer
 *   then abandons those exceptions: no entry is written, the chunk is left as an unreferenced
 *   hole (the kernel leaves the same holes after a crash; a reopen reuses them). Since every
 *   area is physically written before an entry that needs it is committed, committing
 *   overwrites blocks the file system already holds and does not need new space (on file
 *   systems that overwrite in place; a copy-on-write file system can still fail it, and that
 *   is an I/O error like any other).
 */
import type { BlockDevice } from '../device/block-device.js'
import { SnapError, asSnapError, corrupt, noSpace } from '../errors.js'
import { clearEntries, decodeAreaInto, readEntry, writeEntry } from '../format/area.js'
import { ExceptionList } from '../format/exception-list.js'
import { checkVersion, decodeHeader, encodeHeader } from '../format/header.js'
import { FIRST_DATA_CHUNK, FORMAT_VERSION, type Layout, areaChunk, isMetadataChunk, layoutFor, nextDataChunk } from '../format/layout.js'
import { MAX_SAFE, SECTOR_BYTES, checkChunkSizeBytes } from '../units.js'
import type { ExceptionStore, MergeRun, PreparedException, StoreUsage } from './exception-store.js'
import { CowGrowth, growFixedCow, whenSpaceCovered } from './cow-growth.js'
import { type CommitDone, type CommitKind, InOrderCommitter } from './in-order-committer.js'
import { AreaReader } from './area-reader.js'

export interface PersistentStoreOptions {
  /** Chunk size for a new COW; 0 or absent: take it from the header, or 16 KiB (kernel default). */
  readonly chunkBytes?: number
  /** Grow the COW device on demand instead of failing allocation when it is full. */
  readonly growable?: boolean
  /**
   * The COW file is ours to shrink (a grow-on-demand file inside a volume): a merge step that
   * has committed truncates away the COW chunks no entry left in the table refers to, in the
   * background. Deleting a merged COW then frees almost nothing at the end of the merge (on a
   * file system mounted with `discard`, unlinking 280 MiB took 60-120 ms here).
   */
  readonly releaseMergedSpace?: boolean
}

const KERNEL_DEFAULT_CHUNK_BYTES = 32 * SECTOR_BYTES
/** The most entries an open reserves room for before reading the areas (2 x 64 MiB of arrays, mostly untouched). */
const PRESIZE_MAX_ENTRIES = 1 << 24
/** Merged COW space is truncated away once this much is free, or an eighth of a smaller COW (see releaseMerged). */
const RELEASE_MIN_BYTES = 1024 * 1024

interface AreaJob {
  readonly area: number
  readonly image: Uint8Array
  readonly sealed: boolean
  readonly waiters: Array<(ok: boolean) => void>
}

export class PersistentStore implements ExceptionStore {
  readonly kind = 'persistent'
  readonly supportsMerge = true
  readonly cow: BlockDevice
  private readonly growable: boolean
  private readonly releaseMergedSpace: boolean
  private layout: Layout
  private chunkSizeSupplied: boolean

  private _valid = true
  private loaded = false
  private nextFree = FIRST_DATA_CHUNK
  private recordedEnd = FIRST_DATA_CHUNK // nextFree as if only recorded exceptions had been allocated
  private currentArea = 0
  private currentCommitted = 0 // entries already placed in `area`
  private area: Uint8Array
  private pendingCount = 0 // prepared but not yet handed to commit
  private waiters: Array<(ok: boolean) => void> = [] // committed entries not yet written
  /** Areas queued since the last round started: their data is written, not yet flushed. */
  private readonly jobs: AreaJob[] = []
  /** Areas whose data the last round's flush made durable: written by the next round. */
  private durableJobs: AreaJob[] = []
  private writing = false
  private readonly growth: CowGrowth
  private readonly committer: InOrderCommitter
  private readonly mergeAreas = new Map<number, Uint8Array>() // images of areas before the last, read by prepareMerge
  private mergeTurn: Promise<void> = Promise.resolve()
  /**
   * Whether the table's COW chunks strictly increase in table order (what this store and the
   * kernel write, unless a chunk was abandoned and handed out again): then the highest chunk
   * the first n entries use is the n-th entry's.
   */
  private newChunksAscend = true
  private lastRecordedNew = -1
  /** Truncations of merged COW space, chained; never rejects. close() waits for them. */
  private releasing: Promise<void> = Promise.resolve()

  constructor(cow: BlockDevice, options: PersistentStoreOptions = {}) {
    this.cow = cow
    this.growable = options.growable === true
    this.releaseMergedSpace = options.releaseMergedSpace === true && this.growable
    this.chunkSizeSupplied = options.chunkBytes !== undefined && options.chunkBytes !== 0
    const chunkBytes = this.chunkSizeSupplied
      ? (options.chunkBytes as number)
      : Math.max(KERNEL_DEFAULT_CHUNK_BYTES, cow.blockSizeBytes)
    checkChunkSizeBytes(chunkBytes)
    this.layout = layoutFor(chunkBytes)
    this.area = new Uint8Array(chunkBytes)
    this.committer = new InOrderCommitter((e, kind, done) => this.record(e, kind, done))
    this.growth = new CowGrowth(cow, () => this.layout.chunkBytes, { prepare: (from, to) => this.zeroFutureAreas(from, to) })
  }

  get chunkBytes(): number {
    return this.layout.chunkBytes
  }

  get valid(): boolean {
    return this._valid
  }

  async readMetadata(visit: (oldChunk: number, newChunk: number) => void): Promise<{ valid: boolean }> {
    return this.readMetadataWith(new ExceptionList(), visit)
  }

  /**
   * readMetadata for opening a big COW: appends every committed exception to `into`, in table
   * order, instead of a call per entry. When it throws, `into` holds exactly the entries a
   * visitor would have seen before the error.
   */
  async readMetadataInto(into: ExceptionList): Promise<{ valid: boolean }> {
    return this.readMetadataWith(into, null)
  }

  private async readMetadataWith(list: ExceptionList, visit: ((oldChunk: number, newChunk: number) => void) | null): Promise<{ valid: boolean }> {
    if (this.loaded) throw new SnapError('SNAP_BAD_ARGUMENT', 'metadata already read')
    this.loaded = true
    if (this.cow.sizeBytes < 512) {
      // An empty grow-on-demand file is a brand-new COW; anything else this small is not a COW.
      if (!this.growable || this.cow.sizeBytes !== 0) throw corrupt('COW device is too small to hold a header')
      await this.initialise()
      this.growth.setCovered(this.nextFree * this.layout.chunkBytes)
      return { valid: true }
    }
    const decoded = decodeHeader(await this.readCow(0, 512))
    if (decoded.kind === 'new') {
      await this.initialise()
      this.growth.setCovered(this.nextFree * this.layout.chunkBytes)
      return { valid: true }
    }
    const headerChunkBytes = decoded.chunkSizeSectors * SECTOR_BYTES
    if (headerChunkBytes !== this.layout.chunkBytes) {
      // The header wins over the caller's chunk size, as in the kernel.
      checkChunkSizeBytes(headerChunkBytes)
      this.layout = layoutFor(headerChunkBytes)
      this.area = new Uint8Array(headerChunkBytes)
    }
    checkVersion(decoded)
    if (!decoded.valid) {
      this._valid = false
      return { valid: false }
    }
    await this.readExceptions(list, visit)
    // Areas after the current one may lie in blocks the file system never allocated (a sparse
    // file): they are written again as allocation reaches them.
    this.growth.setCovered(Math.min(this.cow.sizeBytes, (areaChunk(this.layout, this.currentArea) + 1) * this.layout.chunkBytes))
    return { valid: true }
  }

  private async initialise(): Promise<void> {
    const { chunkBytes } = this.layout
    if (this.cow.sizeBytes < 2 * chunkBytes) {
      if (!this.growable) throw noSpace(`COW device (${this.cow.sizeBytes} bytes) cannot hold a header and one metadata area`)
      await this.cow.resize(2 * chunkBytes)
    }
    await this.writeCow(new Uint8Array(chunkBytes), chunkBytes)
    await this.cow.flush()
    await this.writeCow(encodeHeader({ valid: true, version: FORMAT_VERSION, chunkSizeSectors: chunkBytes / SECTOR_BYTES }, chunkBytes), 0)
    await this.cow.flush()
  }

  /**
   * Reads the areas into `list` (visit set: per area, then the list is emptied again), through an
   * AreaReader (blocking reads while they are fast, else several asynchronous ones ahead).
   */
  private async readExceptions(list: ExceptionList, visit: ((oldChunk: number, newChunk: number) => void) | null): Promise<void> {
    const layout = this.layout
    const { chunkBytes, exceptionsPerArea, stride } = layout
    const cowChunks = Math.floor(this.cow.sizeBytes / chunkBytes)
    // No COW holds more entries than it has chunks. Growing the list as areas come costs about
    // three times its final size in fresh pages, and page faults are dear on these guests (a
    // dense 65,536-entry COW spent ~6 ms of an open of ~35 ms growing it); pages of the reserve
    // that no entry reaches are never touched.
    if (visit === null) list.reserve(Math.min(cowChunks, PRESIZE_MAX_ENTRIES) - list.count)
    const reader = this.areaReader()
    let nextFree = FIRST_DATA_CHUNK
    try {
      for (let k = 0; ; k++) {
        const at = areaChunk(layout, k)
        if (at >= cowChunks) {
          throw corrupt(`metadata area ${k} (chunk ${at}) is beyond the end of the COW device`, { chunk: at })
        }
        const image = await reader.next(k)
        const start = list.count
        let failure: unknown = null
        let used = 0
        try {
          used = decodeAreaInto(image, list)
        } catch (err) {
          failure = err
        }
        // Entries must point at data chunks of this device; the first bad one ends the table
        // (entries before it stay, as if each had been visited).
        for (let i = start; i < list.count; i++) {
          const newChunk = list.newAt(i)
          if (newChunk >= cowChunks || isMetadataChunk(layout, newChunk)) {
            failure = corrupt(`exception ${list.oldAt(i)} -> ${newChunk} points outside the COW data chunks`, { chunk: newChunk })
            list.count = i
            break
          }
          // No origin reaches 2^53 bytes: such an entry is damage, not a chunk the table can hold.
          const oldChunk = list.oldAt(i)
          if (oldChunk * chunkBytes >= MAX_SAFE + 1) {
            failure = corrupt(`exception ${oldChunk} -> ${newChunk} names an origin chunk beyond 2^53 bytes`, { chunk: oldChunk })
            list.count = i
            break
          }
          if (newChunk >= nextFree) nextFree = newChunk + 1
          this.noteRecorded(newChunk)
        }
        if (visit) {
          for (let i = start; i < list.count; i++) visit(list.oldAt(i), list.newAt(i))
          list.count = start
        }
        if (failure !== null) throw failure
        if (used < exceptionsPerArea) {
          // Entries after the terminator are ignored by the kernel; drop them from our image so a
          // later area write cannot resurrect them.
          clearEntries(image, used, exceptionsPerArea)
          this.area = image
          this.currentArea = k
          this.currentCommitted = used
          break
        }
      }
    } finally {
      // Nothing may touch the device behind the caller's back once the table is read (the
      // read-aheads past the last area are few and already in flight).
      await reader.settle()
    }
    if (nextFree % stride === 1) nextFree++
    this.nextFree = nextFree
    this.recordedEnd = nextFree
  }

  prepareException(oldChunk: number): PreparedException {
    return this.prepareExceptions(oldChunk, 1)
  }

  prepareExceptions(oldChunk: number, maxCount: number): PreparedException {
    const { chunkBytes } = this.layout
    const newChunk = this.nextFree
    let count = 0
    let next = newChunk
    while (count < maxCount) {
      if (!this.growable && (next + 1) * chunkBytes > this.cow.sizeBytes) break
      count++
      const after = nextDataChunk(this.layout, next)
      next = after
      // A metadata area follows: the COW chunks would no longer be consecutive.
      if (after !== newChunk + count) break
    }
    if (count === 0) throw noSpace(`COW device is full (${this.cow.sizeBytes} bytes)`)
    this.nextFree = next
    this.pendingCount += count
    const e = { oldChunk, newChunk, count, sequence: this.committer.allocateSequence() }
    if (this.growable) this.growth.request(this.spaceNeededBytes(e))
    return e
  }

  /**
   * Bytes that must exist, and areas that must be written, before `e` may commit: its chunks,
   * and the area right after the last when that is the last of its area (that area is zeroed
   * when the current one fills, and an entry of any chunk up to here may be the one that fills it).
   */
  private spaceNeededBytes(e: PreparedException): number {
    const { chunkBytes } = this.layout
    const last = e.newChunk + e.count - 1
    return (isMetadataChunk(this.layout, last + 1) ? last + 2 : last + 1) * chunkBytes
  }

  whenSpaceReady(e: PreparedException): Promise<void> {
    return new Promise((resolve, reject) => this.whenSpaceReadyThen(e, (err) => (err === null ? resolve() : reject(err))))
  }

  whenSpaceReadyThen(e: PreparedException, done: (err: unknown) => void): void {
    if (!this.growable) return done(null)
    const needed = this.spaceNeededBytes(e)
    this.growth.request(needed)
    // Covered already (the usual case): no closure for whenCovers.
    if (this.growth.covers(needed)) return done(null)
    whenSpaceCovered(this.growth, needed, done)
  }

  /** Writes zeros to the metadata areas after the current one that lie in [fromBytes, toBytes). */
  private async zeroFutureAreas(fromBytes: number, toBytes: number): Promise<void> {
    const { chunkBytes, stride } = this.layout
    let area = Math.max(this.currentArea + 1, Math.ceil((fromBytes / chunkBytes - 1) / stride))
    const zeros = new Uint8Array(chunkBytes)
    for (; (areaChunk(this.layout, area) + 1) * chunkBytes <= toBytes; area++) {
      try {
        await this.writeCow(zeros, areaChunk(this.layout, area) * chunkBytes)
      } catch (err) {
        throw asSnapError(err, `writing COW metadata area ${area}`)
      }
    }
  }

  commitException(e: PreparedException, ok: boolean): Promise<boolean> {
    return this.committer.commit(e, ok ? 'copied' : 'failed')
  }

  commitExceptionThen(e: PreparedException, ok: boolean, done: CommitDone): void {
    this.committer.commitThen(e, ok ? 'copied' : 'failed', done)
  }

  async abandonException(e: PreparedException): Promise<void> {
    await this.committer.commit(e, 'abandoned')
  }

  /** Called in allocation order, once per extent; writes one entry per chunk. */
  private record(e: PreparedException, kind: CommitKind, done: CommitDone): void {
    if (kind === 'abandoned') {
      // No entry: the chunks stay an unreferenced hole, handed out again when nothing allocated
      // after them is still outstanding (so a full file system does not leak chunks on every
      // retry). The batch may now be complete.
      this.pendingCount -= e.count
      if (this.pendingCount === 0) this.nextFree = this.recordedEnd
      this.kick()
      done(false)
      return
    }
    if (kind === 'failed') this._valid = false
    this.recordedEnd = Math.max(this.recordedEnd, nextDataChunk(this.layout, e.newChunk + e.count - 1))
    this.pendingCount -= e.count
    for (let k = 0; k < e.count; k++) {
      writeEntry(this.area, this.currentCommitted, e.oldChunk + k, e.newChunk + k)
      this.noteRecorded(e.newChunk + k)
      this.currentCommitted++
      // The extent's one waiter goes with the area write that carries its last entry.
      if (k === e.count - 1) this.waiters.push(done)
      if (this.currentCommitted === this.layout.exceptionsPerArea) {
        this.jobs.push({ area: this.currentArea, image: this.area, sealed: true, waiters: this.waiters })
        this.waiters = []
        this.currentArea++
        this.currentCommitted = 0
        this.area = new Uint8Array(this.layout.chunkBytes)
      }
    }
    this.kick()
  }

  /** Keeps newChunksAscend up to date as an entry joins the end of the table. */
  private noteRecorded(newChunk: number): void {
    if (newChunk <= this.lastRecordedNew) this.newChunksAscend = false
    this.lastRecordedNew = newChunk
  }

  private kick(): void {
    if (this.writing) return
    if (this.waiters.length > 0 && this.pendingCount === 0) {
      this.jobs.push({ area: this.currentArea, image: this.area.slice(), sealed: false, waiters: this.waiters })
      this.waiters = []
    }
    if (this.jobs.length === 0 && this.durableJobs.length === 0) return
    this.writing = true
    // Every area queued by now shares the round's flush (a 1 MiB write over 4 KiB chunks fills
    // a whole area, so a QD8 stream seals several areas at once).
    const ready = this.durableJobs
    this.durableJobs = []
    this.writeRound(ready, this.jobs.splice(0, this.jobs.length))
  }

  /** kick()'s round, in a method of its own: kick runs per commit, mostly finding nothing to do. */
  private writeRound(ready: readonly AreaJob[], fresh: AreaJob[]): void {
    void this.writeJobs(ready, fresh).then((ok) => {
      this.writing = false
      for (const job of ready) for (const w of job.waiters) w(ok)
      if (ok) this.durableJobs = fresh
      else for (const job of fresh) for (const w of job.waiters) w(false)
      this.kick()
    })
  }

  /**
   * One round: the areas of `ready` (data durable) are written, the areas after the full ones of
   * `fresh` are zeroed, then one flush makes both durable, along with `fresh`'s data.
   */
  private async writeJobs(ready: readonly AreaJob[], fresh: readonly AreaJob[]): Promise<boolean> {
    const { chunkBytes } = this.layout
    try {
      if (!this._valid) return false
      // Every entry's copy waited for the space it needed; a failed growth step since then
      // belongs to copies that were abandoned.
      await this.growth.ready.catch(() => {})
      for (const job of ready) await this.writeCow(job.image, areaChunk(this.layout, job.area) * chunkBytes)
      // The area after each full one is zeroed before the full one is written (next round),
      // even when a later round rewrites it: a reader that finds a full area must meet either
      // zeros or our entries after it, never stale bytes.
      for (const job of fresh) {
        if (job.sealed) await this.writeCow(new Uint8Array(chunkBytes), areaChunk(this.layout, job.area + 1) * chunkBytes)
      }
      await this.cow.flush()
      return this._valid
    } catch {
      this._valid = false
      return false
    }
  }

  mergeEntries(): number {
    return this.currentArea * this.layout.exceptionsPerArea + this.currentCommitted
  }

  /**
   * The runs of up to `maxEntries` entries ending at table index `endIndex` (the table's end by
   * default), newest first. A batch may reach back over several areas; the images of earlier
   * areas are read once and kept for commitMerge.
   */
  prepareMerge(maxEntries = Infinity, endIndex?: number): Promise<MergeRun[]> {
    return this.mergeExclusive(() => this.prepareMergeNow(maxEntries, endIndex))
  }

  /** Removes the last `count` entries durably (see commitMergeNow). */
  commitMerge(count: number, options: { readonly cowFlushed?: boolean } = {}): Promise<void> {
    return this.mergeExclusive(() => this.commitMergeNow(count, options.cowFlushed === true))
  }

  /**
   * A merge may prepare its next batch while the previous one commits; both walk and change the
   * same area images, so they take turns.
   */
  private mergeExclusive<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.mergeTurn.then(fn)
    this.mergeTurn = result.then(
      () => undefined,
      () => undefined,
    )
    return result
  }

  private async prepareMergeNow(maxEntries: number, endIndex: number | undefined): Promise<MergeRun[]> {
    const { exceptionsPerArea } = this.layout
    if (!(maxEntries >= 1)) throw new SnapError('SNAP_BAD_ARGUMENT', `cannot merge ${maxEntries} entries`)
    if (endIndex !== undefined && !(Number.isSafeInteger(endIndex) && endIndex >= 0 && endIndex <= this.mergeEntries())) {
      throw new SnapError('SNAP_BAD_ARGUMENT', `no table index ${endIndex} to merge from`)
    }
    if (endIndex === 0) return []
    if (this.currentCommitted === 0) {
      if (this.currentArea === 0) return []
      this.currentArea--
      this.area = await this.mergeAreaImage(this.currentArea)
      this.currentCommitted = exceptionsPerArea // areas before the last are always full
    }
    const total = endIndex ?? this.mergeEntries()
    const limit = Math.min(maxEntries, total)
    const firstArea = Math.floor((total - limit) / exceptionsPerArea)
    const lastArea = Math.floor((total - 1) / exceptionsPerArea)
    // Through an AreaReader: one awaited read per area put 32 reads in a row in front of every
    // 32 MiB merge step with 4 KiB chunks.
    const reader = this.areaReader(lastArea + 1)
    const images: Uint8Array[] = []
    try {
      for (let a = firstArea; a <= lastArea; a++) images.push(await this.mergeAreaImage(a, reader))
    } finally {
      await reader.settle()
    }
    const runs: Array<{ count: number; lastOld: number; lastNew: number }> = []
    let prevOld = -1
    let prevNew = -1
    for (let i = total - 1; i >= total - limit; i--) {
      const a = Math.floor(i / exceptionsPerArea)
      const { oldChunk, newChunk } = readEntry(images[a - firstArea] as Uint8Array, i - a * exceptionsPerArea)
      const run = runs[runs.length - 1]
      if (run && oldChunk === prevOld - 1 && newChunk === prevNew - 1) run.count++
      else runs.push({ count: 1, lastOld: oldChunk, lastNew: newChunk })
      prevOld = oldChunk
      prevNew = newChunk
    }
    return runs
  }

  /**
   * Drops the last `count` entries. Any suffix of the table may vanish in a crash without harm
   * (the merge flushed the origin first), so the areas the batch empties are zeroed with plain
   * writes, and one write with FUA makes the new end durable: the partial last area, or, when
   * the batch ends on an area boundary, the empty area that terminates the table. The COW ends
   * up byte-identical to merging the same entries one area at a time.
   */
  private async commitMergeNow(count: number, cowFlushed: boolean): Promise<void> {
    const { exceptionsPerArea, chunkBytes } = this.layout
    const total = this.mergeEntries()
    if (!Number.isSafeInteger(count) || count < 1 || count > total) throw new SnapError('SNAP_BAD_ARGUMENT', `cannot merge ${count} entries`)
    const remaining = total - count
    // The area holding the last entry left (area 0 when none is), and how many entries it keeps.
    const lastArea = remaining === 0 ? 0 : Math.floor((remaining - 1) / exceptionsPerArea)
    const kept = remaining - lastArea * exceptionsPerArea
    const endArea = kept === exceptionsPerArea ? lastArea + 1 : lastArea
    // Read before the images go: the last entry left names the highest COW chunk still in use.
    const lastKeptNew = remaining === 0 ? -1 : readEntry(await this.mergeAreaImage(lastArea), kept - 1).newChunk
    const image = kept === exceptionsPerArea ? new Uint8Array(chunkBytes) : (await this.mergeAreaImage(lastArea)).slice()
    if (kept < exceptionsPerArea) clearEntries(image, kept, exceptionsPerArea)
    if (!cowFlushed) await this.cow.flush()
    const emptied: Array<Promise<void>> = []
    for (let a = endArea + 1; a <= this.currentArea; a++) emptied.push(this.writeCow(new Uint8Array(chunkBytes), areaChunk(this.layout, a) * chunkBytes))
    await Promise.all(emptied)
    await this.writeCow(image, areaChunk(this.layout, endArea) * chunkBytes, true)
    for (const a of [...this.mergeAreas.keys()]) if (a >= lastArea) this.mergeAreas.delete(a)
    this.currentArea = endArea
    this.currentCommitted = kept === exceptionsPerArea ? 0 : kept
    this.area = image
    // Only status uses this after a merge step (the kernel's approximation).
    this.nextFree = areaChunk(this.layout, this.currentArea) + this.currentCommitted + 1
    this.releaseMerged(lastKeptNew)
  }

  /**
   * After a durable commitMerge: truncates the COW after the area that now ends the table and
   * the highest data chunk an entry left in it uses (`lastKeptNew`, -1: none left), in the
   * background. Only chunks no durable entry refers to go, so a crash at any point leaves a
   * table that reads as before (the kernel reads areas up to the terminator, which stays); a
   * merging snapshot never allocates again. A failed truncation only leaves the file longer.
   * The steps' truncations overlap the next steps' copies and flushes; together they cost what
   * deleting the full file would have (the freed blocks are discarded either way).
   */
  private releaseMerged(lastKeptNew: number): void {
    // An emptied table: its owner deletes the whole file next, which frees the space as cheaply.
    if (lastKeptNew < 0 || !this.releaseMergedSpace || !this.newChunksAscend || !this.cow.capabilities.resize) return
    const { chunkBytes } = this.layout
    const keepBytes = Math.max(areaChunk(this.layout, this.currentArea) + 1, lastKeptNew + 1) * chunkBytes
    // Many tiny truncations (a rate-limited merge takes small steps) would cost more than they free.
    if (this.cow.sizeBytes - keepBytes < Math.min(RELEASE_MIN_BYTES, this.cow.sizeBytes / 8)) return
    this.growth.setCovered(keepBytes)
    this.releasing = this.releasing.then(async () => {
      if (this.cow.closed || this.cow.sizeBytes <= keepBytes) return
      await this.cow.resize(keepBytes).catch(() => {})
    })
  }

  /** The image of area `a` while merging: the in-memory one for the last area, else read once. */
  private async mergeAreaImage(a: number, reader: AreaReader = this.areaReader(a + 1)): Promise<Uint8Array> {
    if (a === this.currentArea && this.currentCommitted > 0) return this.area
    let image = this.mergeAreas.get(a)
    if (!image) {
      image = await reader.next(a)
      this.mergeAreas.set(a, image)
    }
    return image
  }

  /** Reads metadata areas in ascending order, reading ahead to area `endArea` at most. */
  private areaReader(endArea?: number): AreaReader {
    const cowChunks = Math.floor(this.cow.sizeBytes / this.layout.chunkBytes)
    const describe = (err: unknown, offset: number, length: number) => asSnapError(err, 'reading COW metadata', { offset, length })
    return new AreaReader({
      cow: this.cow,
      layout: this.layout,
      cowChunks,
      read: (offset, length) => this.readCow(offset, length),
      describeError: describe,
      ...(endArea === undefined ? {} : { endArea }),
    })
  }

  async dropSnapshot(): Promise<void> {
    this._valid = false
    const { chunkBytes } = this.layout
    try {
      await this.writeCow(encodeHeader({ valid: false, version: FORMAT_VERSION, chunkSizeSectors: chunkBytes / SECTOR_BYTES }, chunkBytes), 0)
      await this.cow.flush()
    } catch {
      // Nothing else can be done: the in-memory state is already invalid.
    }
  }

  usage(): StoreUsage {
    const chunkSectors = this.layout.chunkBytes / SECTOR_BYTES
    return {
      allocatedSectors: this.nextFree * chunkSectors,
      totalSectors: Math.floor(this.cow.sizeBytes / SECTOR_BYTES),
      metadataSectors: (this.currentArea + 2) * chunkSectors,
    }
  }

  async growTo(sizeBytes: number): Promise<void> {
    await growFixedCow(this.cow, this.growable, sizeBytes, this.layout.chunkBytes)
  }

  async close(): Promise<void> {
    await this.releasing
    if (this.cow.closed) return
    try {
      await this.cow.flush()
    } finally {
      await this.cow.close()
    }
  }

  private async readCow(offset: number, length: number): Promise<Uint8Array> {
    try {
      return await this.cow.read(offset, length)
    } catch (err) {
      throw asSnapError(err, 'reading COW metadata', { offset, length })
    }
  }

  private async writeCow(data: Uint8Array, offset: number, fua = false): Promise<void> {
    await this.cow.write(data, offset, { fua })
  }
}
