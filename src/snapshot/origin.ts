/**
 * Origin: the writable view of an origin device with any number of snapshots (the kernel's
 * `snapshot-origin` target plus its origin registry).
 *
 * Design notes
 * - Before a write reaches the origin device, every active, valid, non-merging snapshot that has
 *   not saved the chunks gets a copy of the old data. Each snapshot is walked in its own chunk
 *   size with range queries (saved runs skipped, unsaved runs made into pending extents), and
 *   the pass is repeated after every wait until it finds nothing left to do. Then the whole
 *   write goes to the device at once.
 * - Copies go through the copy engine (copy-engine.ts): one origin read serves every snapshot
 *   that needs the same old data.
 * - Snapshots are kept sorted by chunk size, largest first, as in the kernel.
 * - Live snapshot creation and removal hold new origin mutations and drain the ones in flight
 *   (the kernel's "suspend the origin"), so a new snapshot is an exact point in time: every write
 *   completed before it is in, no write that starts after it is.
 * - While a merge runs, an interceptor installed by merge/ takes over reads, writes, flushes
 *   and discards; it calls back into writeThroughCow() for chunks already merged.
 * - Write-back (held-writes.ts): a write that has to wait for copies is answered once they are
 *   started, and its bytes land on the device after they commit. The device keeps the old data
 *   until then, so snapshots and their copies cannot tell; origin reads overlay the held bytes,
 *   flushes wait for them, and a held write counts as a mutation until it lands, so creating a
 *   snapshot or starting a merge still sees every acknowledged write on the device.
 * - Out of space: when a snapshot's copy cannot get space (its pending exception settles with
 *   SNAP_NO_SPACE), the origin write that needed it fails with SNAP_NO_SPACE and does not reach
 *   the device at all, even when other copies it needed succeeded (those chunks are saved with
 *   data equal to the origin's, which the write left as it was). Nothing is invalidated. A
 *   held write in that case is dropped: its bytes never land, and the next flush fails.
 */
import { EventEmitter } from 'node:events'
import { BaseBlockDevice, type BlockDevice, type DeviceCapabilities, type IoDone, RESOLVED } from '../device/block-device.js'
import { SnapError, asSnapError } from '../errors.js'
import { type Deferred, deferred } from '../util/deferred.js'
import { type ExceptionEvents, defaultExceptionEvents } from './exception-events.js'
import { type HeldWrite, HeldWrites, unpin, whenAllLanded } from './held-writes.js'
import { CopyEngine, type CopyTarget } from './copy-engine.js'
import type { PendingException } from './pending-exception.js'
import { ProtectPass } from './protect-pass.js'
import type { OriginBacking, Snapshot } from './snapshot.js'
import { settleAll } from './snapshot.js'

/** Takes over the origin's I/O while a merge runs. */
export interface OriginInterceptor {
  readInto(target: Uint8Array, offset: number): Promise<void>
  write(data: Uint8Array, offset: number, fua: boolean): Promise<void>
  flush(): Promise<void>
  discard(offset: number, length: number): Promise<void>
}

export interface OriginOptions {
  readonly name?: string
  readonly events?: ExceptionEvents
  /** Most bytes of origin writes answered before their copies commit; 0 turns write-back off. */
  readonly writeBackBytes?: number
}

/** Several commits' worth of writes: more only queues more copies at once (measured: slower). */
export const DEFAULT_WRITE_BACK_BYTES = 16 * 1024 * 1024

/** Most origin bytes one shared copy-out read spans (copies further apart get their own read). */
const SHARED_READ_BYTES = 2 * 1024 * 1024

/** Largest power of two below 2^32 sectors, in bytes: the kernel's "no snapshots" boundary. */
const NO_SNAPSHOT_BOUNDARY = 2 ** 31 * 512

export class Origin extends BaseBlockDevice implements OriginBacking {
  readonly capabilities: DeviceCapabilities
  readonly device: BlockDevice
  readonly events: ExceptionEvents
  /** Every copy between this origin and its snapshots' COWs (copy-outs, merge copies). */
  readonly copies = new CopyEngine()
  private list: Snapshot[] = []
  private mutations = 0 // origin writes/discards/merge steps in flight
  private drainWaiters: Array<() => void> = []
  private gate: Deferred<void> | null = null // set while origin mutations are held
  private readonly held: HeldWrites
  private writeBackError: unknown = null // first failure of a held write, reported by the next flush
  private writeRefusal: string | null = null // why writes and discards are refused, if they are
  private readRefusal: string | null = null // why reads are refused, if they are
  private readonly unforward = new Map<Snapshot, () => void>()
  private interceptorNow: OriginInterceptor | null = null
  private sparePass: ProtectPass | null = null
  /**
   * What happens to the attached snapshots, for whoever owns the origin (serve logs it):
   * 'invalidated' (snapshot, reason), 'no-space' (snapshot, error), 'space-restored' (snapshot);
   * and 'write-back-failed' ({ offsetBytes, lengthBytes, error }), the first failure of a held
   * write since the last flush.
   */
  readonly notices = new EventEmitter()

  constructor(device: BlockDevice, options: OriginOptions = {}) {
    super(device.sizeBytes, options.name ?? 'origin')
    this.device = device
    this.events = options.events ?? defaultExceptionEvents
    const writeBackBytes = options.writeBackBytes ?? DEFAULT_WRITE_BACK_BYTES
    if (!Number.isSafeInteger(writeBackBytes) || writeBackBytes < 0) {
      throw new SnapError('SNAP_BAD_ARGUMENT', `write-back limit ${writeBackBytes} is not a byte count`)
    }
    this.held = new HeldWrites(writeBackBytes)
    const caps = device.capabilities
    this.capabilities = { writable: caps.writable, flush: true, fua: caps.fua, discard: caps.discard, resize: false }
  }

  get snapshots(): readonly Snapshot[] {
    return this.list
  }

  /** @internal What takes over the origin's I/O while a merge runs, if anything does. */
  get interceptor(): OriginInterceptor | null {
    return this.interceptorNow
  }

  /**
   * Installs the merge's interceptor. The caller holds origin mutations (hold()), so no write
   * is half way through the plain path when the routing changes.
   */
  installInterceptor(interceptor: OriginInterceptor): void {
    if (this.interceptorNow !== null) throw new SnapError('SNAP_BUSY', `${this.name} already has a merge installed`)
    this.interceptorNow = interceptor
  }

  /** Removes `interceptor` if it is the one installed (a merge that completed). */
  removeInterceptor(interceptor: OriginInterceptor): void {
    if (this.interceptorNow === interceptor) this.interceptorNow = null
  }

  /** Smallest chunk size of all snapshots (writes are protected in pieces of this size). */
  minChunkBytes(): number {
    let min = NO_SNAPSHOT_BOUNDARY
    for (const s of this.list) if (s.chunkBytes < min) min = s.chunkBytes
    return min
  }

  statusText(): string {
    return ''
  }

  // ---- refusing I/O ------------------------------------------------------------------------

  /**
   * Refuses writes and discards (SNAP_READ_ONLY, whose message is `reason`) until allowIo().
   * The owner uses it when a write would change data some view it cannot update still needs,
   * e.g. a snapshot whose COW could not be attached. The capabilities stay writable: the
   * refusal is a state that ends, not a property of the device.
   */
  refuseWrites(reason: string): void {
    this.writeRefusal = reason
  }

  /** Refuses reads as well as writes (SNAP_IO, `reason`): the device does not hold what the origin presents. */
  refuseIo(reason: string): void {
    this.writeRefusal = reason
    this.readRefusal = reason
  }

  allowIo(): void {
    this.writeRefusal = null
    this.readRefusal = null
  }

  private checkWritable(): void {
    if (this.writeRefusal !== null) throw new SnapError('SNAP_READ_ONLY', this.writeRefusal)
  }

  // ---- snapshot life cycle ---------------------------------------------------------------

  /**
   * Loads `snapshot`'s metadata and makes it active, with origin writes held and drained, so
   * the snapshot's point in time is exact. On failure nothing is registered.
   */
  async addSnapshot(snapshot: Snapshot): Promise<void> {
    this.checkOpen()
    if (this.list.includes(snapshot)) throw new SnapError('SNAP_EXISTS', `${snapshot.snapshotName} is already attached`)
    await this.hold(async () => {
      // A new snapshot reads unsaved chunks from the origin device, which during a merge is not
      // what the origin presents (LVM refuses this too).
      if (this.interceptorNow) throw new SnapError('SNAP_BUSY', 'cannot add a snapshot while a merge is in progress')
      await snapshot.load(this)
      // Stable insert after every snapshot with a chunk size >= this one.
      let at = 0
      while (at < this.list.length && (this.list[at] as Snapshot).chunkBytes >= snapshot.chunkBytes) at++
      this.list.splice(at, 0, snapshot)
      snapshot.activate()
      this.forwardNotices(snapshot)
    })
  }

  private forwardNotices(snapshot: Snapshot): void {
    const events = ['invalidated', 'no-space', 'space-restored'] as const
    const handlers = events.map((event) => {
      const handler = (detail?: unknown) => this.notices.emit(event, snapshot, detail)
      snapshot.emitter.on(event, handler)
      return [event, handler] as const
    })
    this.unforward.set(snapshot, () => {
      for (const [event, handler] of handlers) snapshot.emitter.off(event, handler)
    })
  }

  private stopNotices(snapshot: Snapshot): void {
    this.unforward.get(snapshot)?.()
    this.unforward.delete(snapshot)
  }

  /** Detaches `snapshot` (after its copies in flight finish) and closes it. */
  async removeSnapshot(snapshot: Snapshot): Promise<void> {
    await this.hold(async () => {
      const at = this.list.indexOf(snapshot)
      if (at === -1) throw new SnapError('SNAP_NOT_FOUND', `${snapshot.snapshotName} is not attached`)
      this.list.splice(at, 1)
      snapshot.deactivate()
      await snapshot.drainPending()
      this.stopNotices(snapshot)
    })
    await snapshot.close()
  }

  /**
   * Runs `fn` with origin mutations held: new ones wait, those in flight are drained first.
   * `fn` must not itself mutate the origin through this object.
   */
  async hold<T>(fn: () => Promise<T>): Promise<T> {
    while (this.gate) await this.gate.promise
    const gate = deferred<void>()
    this.gate = gate
    try {
      while (this.mutations > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve))
      return await fn()
    } finally {
      this.gate = null
      gate.resolve()
    }
  }

  /** Counts `fn` as an origin mutation, so hold() drains it. */
  async runMutation<T>(fn: () => Promise<T>): Promise<T> {
    while (this.gate) await this.gate.promise
    this.mutations++
    try {
      return await fn()
    } finally {
      this.endMutation()
    }
  }

  /**
   * From inside a running mutation, counts one more that outlives it (hold() keeps waiting for
   * it); returns its end, which is safe to call more than once.
   */
  enterMutation(): () => void {
    this.mutations++
    let ended = false
    return () => {
      if (ended) return
      ended = true
      this.endMutation()
    }
  }

  /** endMutation as a function made once, for promise callbacks. */
  private readonly endOneMutation = (): void => this.endMutation()

  private endMutation(): void {
    if (--this.mutations === 0 && this.drainWaiters.length > 0) {
      const waiters = this.drainWaiters
      this.drainWaiters = []
      for (const wake of waiters) wake()
    }
  }

  // ---- copy-on-write triggering ------------------------------------------------------------

  /**
   * One pass of the kernel's origin_write without a bio over [offset, offset+length): creates
   * and starts pending extents where needed, each snapshot walked in its own chunk size.
   * Returns what to wait for (empty: all saved).
   */
  triggerExceptions(offset: number, length: number): { waits: Array<PendingException['done']>; invalidations: Array<Promise<void>> } {
    const pass = this.protectPass(offset, length)
    if (pass === null) return { waits: [], invalidations: [] }
    return { waits: pass.waits().map((w) => w.done), invalidations: [...(pass.invalidations ?? [])] }
  }

  /**
   * triggerExceptions with the pending extents themselves to wait for (no promise per extent);
   * null when there is nothing to wait for.
   */
  private protectPass(offset: number, length: number): ProtectPass | null {
    if (this.list.length === 0) return null
    const end = offset + length
    // A pass that finds nothing (every write's second look) leaves its object for the next one.
    const pass = this.sparePass ?? new ProtectPass()
    this.sparePass = null
    try {
      for (const s of this.list) s.protectOrigin(offset, end, pass)
    } finally {
      // Whatever was made pending must be copied, even if a later snapshot threw.
      this.startCopies(pass)
    }
    if (!pass.clear) return pass
    // Nothing to wait for means nothing was made pending either: the object is still empty.
    this.sparePass = pass
    return null
  }

  /**
   * Starts the copies, reading the old data once for all snapshots that need it: targets close
   * together on the origin share one read of their span. Bytes in between are read but unused,
   * and the bytes inside cannot change meanwhile, because writes to them wait for these copies.
   */
  private startCopies(pass: ProtectPass): void {
    const first = pass.copyFirst
    if (first === null) return
    const rest = pass.copyRest
    if (rest === null) return this.copies.copyOut(this.device, [first])
    const targets = [first, ...rest]
    targets.sort((a, b) => a.from - b.from)
    let from = 0
    let spanStart = (targets[0] as CopyTarget).from
    for (let i = 1; i <= targets.length; i++) {
      const t = targets[i]
      if (t && t.from + t.length - spanStart <= SHARED_READ_BYTES) continue
      this.copies.copyOut(this.device, from === 0 && i === targets.length ? targets : targets.slice(from, i))
      from = i
      if (t) spanStart = t.from
    }
  }

  /**
   * Returns once every snapshot holds the old data of [offset, offset+length). Throws
   * SNAP_NO_SPACE, once every copy it started has settled, when one could not get space.
   */
  async protect(offset: number, length: number): Promise<void> {
    for (;;) {
      const pass = this.protectPass(offset, length)
      if (pass === null) return
      if (pass.invalidations !== null) await Promise.all(pass.invalidations)
      if (!pass.hasWaits) return
      const noSpace = await new Promise<SnapError | null>((resolve) => pass.whenSettled(resolve))
      if (noSpace) throw this.noSpaceRefusal(noSpace, offset, length)
    }
  }

  /** The error of a write at [offset, offset+length) that waited for a copy that ran out of space. */
  private noSpaceRefusal(cause: SnapError, offset: number, length: number): SnapError {
    return new SnapError('SNAP_NO_SPACE', `${this.name}: write of ${length} bytes at ${offset} refused, nothing written: ${cause.message}`, {
      cause,
      details: { ...cause.details, offset, length },
    })
  }

  /**
   * Null when no snapshot has more than COW_THRESHOLD copies in flight. Checked synchronously
   * right before the copies are started, so a burst of writes cannot all slip past it.
   */
  private throttleWait(): Promise<void> | null {
    for (const s of this.list) {
      const wait = s.belowThresholdWait()
      if (wait) return wait
    }
    return null
  }

  /** The plain origin write path: copy-on-write into every snapshot, then write the device. */
  async writeThroughCow(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    await this.protect(offset, data.length)
    await this.device.write(data, offset, { fua })
  }

  async discardThroughCow(offset: number, length: number): Promise<void> {
    await this.protect(offset, length)
    await this.device.discard(offset, length)
  }

  private async discardAfterHeld(offset: number, length: number): Promise<void> {
    for (const w of this.held.overlapping(offset, length)) await w.landed
    await this.discardThroughCow(offset, length)
  }

  // ---- write-back ----------------------------------------------------------------------------

  /** Bytes of acknowledged origin writes not yet on the device. */
  get heldBytes(): number {
    return this.held.bytes
  }

  /**
   * Byte ranges [start, end) of answered writes not yet on the device: an allocation map of the
   * device alone would miss them.
   */
  unlandedRanges(): Array<[number, number]> {
    return this.held.ranges()
  }

  /**
   * An origin write outside a merge. Runs synchronously up to the point of answering, so writes
   * are ordered as they arrive: a write that overlaps held bytes lands after them. `counted`:
   * the write is one origin mutation, which this ends (else the caller counts it).
   */
  private writeOrigin(data: Uint8Array, offset: number, fua: boolean, counted: boolean): Promise<void> {
    const earlier = this.held.overlapping(offset, data.length)
    const pass = this.protectPass(offset, data.length)
    if (earlier.length === 0 && pass === null) return this.writeDirect(data, offset, fua, counted)
    if (!fua && this.held.hasRoomFor(data.length)) {
      const write = this.held.add(offset, data)
      // The landing is a mutation of its own, so hold() drains it like a write in flight; it
      // ends when the write leaves the held set (landed()).
      this.mutations++
      this.land(write, earlier, pass)
      if (counted) this.endMutation()
      return RESOLVED
    }
    const after = this.writeThrough(data, offset, fua, earlier, pass)
    if (counted) after.then(this.endOneMutation, this.endOneMutation)
    return after
  }

  /**
   * Nothing to wait for: straight to the device, one promise, the mutation ended by its callback.
   * A method of its own, so that writeOrigin's other paths make no context for these closures.
   */
  private writeDirect(data: Uint8Array, offset: number, fua: boolean, counted: boolean): Promise<void> {
    return new Promise((resolve, reject) =>
      this.device.writeThen(data, offset, fua, (err) => {
        if (counted) this.endMutation()
        if (err === null) resolve()
        else reject(err)
      }),
    )
  }

  /**
   * Write-through (FUA, or no room to hold the write): answered once the write is on the
   * device. Driven by callbacks like a landing (`pass`: the first look's findings), with one
   * promise for the answer rather than an async frame and a promise per step: in process, 32
   * writers fill the write-back limit and then write through.
   */
  private writeThrough(data: Uint8Array, offset: number, fua: boolean, earlier: readonly HeldWrite[], pass: ProtectPass | null): Promise<void> {
    return new Promise((resolve, reject) => this.throughStep(data, offset, fua, earlier, pass, (err) => (err === null ? resolve() : reject(err))))
  }

  /** One step of writeThrough: wait for `pass`, look again, and once a look finds nothing, write. */
  private throughStep(data: Uint8Array, offset: number, fua: boolean, earlier: readonly HeldWrite[], pass: ProtectPass | null, done: IoDone): void {
    if (pass === null) {
      // Every snapshot holds the range: after the earlier held writes, the device write.
      if (earlier.length === 0) this.device.writeThen(data, offset, fua, done)
      else this.writeAfterEarlier(data, offset, fua, earlier, done)
      return
    }
    if (pass.invalidations !== null) {
      this.throughSlowly(data, offset, fua, earlier, pass).then(() => done(null), done)
      return
    }
    this.throughWhenSettled(data, offset, fua, earlier, pass, done)
  }

  private writeAfterEarlier(data: Uint8Array, offset: number, fua: boolean, earlier: readonly HeldWrite[], done: IoDone): void {
    whenAllLanded(earlier, () => this.device.writeThen(data, offset, fua, done))
  }

  private throughWhenSettled(data: Uint8Array, offset: number, fua: boolean, earlier: readonly HeldWrite[], pass: ProtectPass, done: IoDone): void {
    pass.whenSettled((noSpace) => {
      if (noSpace) return done(this.noSpaceRefusal(noSpace, offset, data.length))
      let again: ProtectPass | null
      try {
        again = this.protectPass(offset, data.length)
      } catch (err) {
        return done(err)
      }
      this.throughStep(data, offset, fua, earlier, again, done)
    })
  }

  /** writeThrough with invalidations to wait for first: the rare path, as async code. */
  private async throughSlowly(data: Uint8Array, offset: number, fua: boolean, earlier: readonly HeldWrite[], pass: ProtectPass): Promise<void> {
    await Promise.all(pass.invalidations ?? [])
    const noSpace = await new Promise<SnapError | null>((resolve) => pass.whenSettled(resolve))
    if (noSpace) throw this.noSpaceRefusal(noSpace, offset, data.length)
    for (const w of earlier) await w.landed
    await this.writeThroughCow(data, offset, fua)
  }

  /**
   * Puts a held write on the device once every copy it needs is committed (`pass`: the first
   * look's findings, null if it found nothing). Driven by callbacks (pending extents settling,
   * earlier held writes landing, the device write completing), so a landing allocates no
   * promise; a pass that meets an invalidation goes the async way.
   */
  private land(write: HeldWrite, earlier: readonly HeldWrite[], pass: ProtectPass | null): void {
    if (pass === null) return this.landAfter(write, earlier)
    if (pass.invalidations !== null) {
      void this.landSlowly(write, earlier, pass)
      return
    }
    this.landWhenSettled(write, earlier, pass)
  }

  /** land() once `pass`'s waits have settled (a function of its own: land() runs without them too). */
  private landWhenSettled(write: HeldWrite, earlier: readonly HeldWrite[], pass: ProtectPass): void {
    // One wait (the usual case): its outcome straight to settledFor, one closure per step.
    const only = pass.onlyWait
    if (only !== null) only.whenSettled((outcome) => this.settledFor(write, earlier, typeof outcome === 'boolean' ? null : outcome))
    else pass.whenSettled((noSpace) => this.settledFor(write, earlier, noSpace))
  }

  /** land(): what the write waited for has settled (`noSpace`: a copy it needed got no space). */
  private settledFor(write: HeldWrite, earlier: readonly HeldWrite[], noSpace: SnapError | null): void {
    try {
      // A copy without space drops the write: its bytes never land, the next flush fails.
      if (noSpace) return this.landed(write, this.noSpaceRefusal(noSpace, write.offset, write.data.length))
      // Once more, as protect() does: a range query that finds nothing once every snapshot holds the range.
      this.land(write, earlier, this.protectPass(write.offset, write.data.length))
    } catch (err) {
      this.landed(write, err)
    }
  }

  /** The last step of a landing: after the earlier held writes, the device write. */
  private landAfter(write: HeldWrite, earlier: readonly HeldWrite[]): void {
    if (earlier.length === 0) this.put(write)
    else this.putAfter(write, earlier)
  }

  private putAfter(write: HeldWrite, earlier: readonly HeldWrite[]): void {
    whenAllLanded(earlier, () => this.put(write))
  }

  private put(write: HeldWrite): void {
    this.device.writeThen(write.data, write.offset, false, (err) => this.landed(write, err))
  }

  /** land() with invalidations to wait for first: the rare path, as async code. */
  private async landSlowly(write: HeldWrite, earlier: readonly HeldWrite[], pass: ProtectPass): Promise<void> {
    let failure: unknown = null
    try {
      await Promise.all(pass.invalidations ?? [])
      const noSpace = await new Promise<SnapError | null>((resolve) => pass.whenSettled(resolve))
      if (noSpace) throw this.noSpaceRefusal(noSpace, write.offset, write.data.length)
      await this.protect(write.offset, write.data.length)
      for (const w of earlier) await w.landed
      await this.device.write(write.data, write.offset)
    } catch (err) {
      failure = err
    }
    this.landed(write, failure)
  }

  /** A held write is done: on the device (`err` null) or dropped, its failure kept for the next flush. */
  private landed(write: HeldWrite, err: unknown): void {
    // Already answered: like a disk's write cache, the failure surfaces at the next flush.
    if (err !== null && this.writeBackError === null) {
      const failure = asSnapError(err, 'device write')
      const where = `${write.data.length} bytes at ${write.offset}`
      this.writeBackError = new SnapError(failure.code, `${this.name}: write-back of ${where} failed: ${failure.message}`, { cause: err })
      // Once per flush interval, like the error itself: a dying device must not flood the owner.
      this.notices.emit('write-back-failed', { offsetBytes: write.offset, lengthBytes: write.data.length, error: failure })
    }
    // Once per write, whoever calls: its landing mutation ends as it leaves the set.
    if (this.held.release(write)) this.endMutation()
  }

  /** Throws (once) the first failure of a held write since the last flush. */
  private reportWriteBack(): void {
    const err = this.writeBackError
    if (err === null) return
    this.writeBackError = null
    throw err
  }

  // ---- BlockDevice hooks -------------------------------------------------------------------

  protected async _readInto(target: Uint8Array, offset: number): Promise<void> {
    if (this.readRefusal !== null) throw new SnapError('SNAP_IO', this.readRefusal)
    const interceptor = this.interceptorNow
    if (interceptor) return interceptor.readInto(target, offset)
    if (this.held.size === 0) return this.device.readInto(target, offset)
    const held = this.held.pinForRead(offset, target.length)
    try {
      await this.device.readInto(target, offset)
    } catch (err) {
      unpin(held)
      throw err
    }
    this.held.overlayAndUnpin(target, offset, held)
  }

  /**
   * Not an async function: with no hold and no throttling, the write is routed synchronously
   * and counted as a mutation without a promise of its own (a write-back answer ends it at once,
   * its landing being a mutation of its own).
   */
  protected _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    this.checkWritable()
    const wait = this.throttleWait()
    if (wait !== null || this.gate !== null) return this.writeWhenAllowed(data, offset, fua, wait)
    const interceptor = this.interceptorNow
    // Counted without a closure per write: writeOrigin ends it exactly once (every path ends it
    // after the last thing that can throw), the interceptor's answer here.
    this.mutations++
    let answer: Promise<void>
    try {
      answer = interceptor ? interceptor.write(data, offset, fua) : this.writeOrigin(data, offset, fua, true)
    } catch (err) {
      this.endMutation()
      throw err
    }
    if (interceptor) answer.then(this.endOneMutation, this.endOneMutation)
    return answer
  }

  /** _write once throttling and a hold let it go. */
  private async writeWhenAllowed(data: Uint8Array, offset: number, fua: boolean, wait: Promise<void> | null): Promise<void> {
    for (; wait; wait = this.throttleWait()) await wait
    await this.runMutation(() => {
      const interceptor = this.interceptorNow
      if (interceptor) return interceptor.write(data, offset, fua)
      return this.writeOrigin(data, offset, fua, false)
    })
  }

  protected async _flush(): Promise<void> {
    await this.held.drain()
    const interceptor = this.interceptorNow
    if (interceptor) await interceptor.flush()
    else await this.device.flush()
    this.reportWriteBack()
  }

  protected override async _discard(offset: number, length: number): Promise<void> {
    this.checkWritable()
    for (let wait = this.throttleWait(); wait; wait = this.throttleWait()) await wait
    await this.runMutation(() => {
      const interceptor = this.interceptorNow
      if (interceptor) return interceptor.discard(offset, length)
      return this.discardAfterHeld(offset, length)
    })
  }

  protected override async _close(): Promise<void> {
    await this.hold(async () => {
      const snapshots = this.list
      this.list = []
      await settleAll(snapshots.map((s) => s.close()))
      for (const s of snapshots) this.stopNotices(s)
    })
    await this.device.flush().catch(() => {})
    await this.device.close()
    this.reportWriteBack()
  }
}
