/**
 * The I/O ceiling of first-touch random writes with one persistent snapshot, as a block device an
 * NBD server can serve (rand4k-server.ts): the job's own I/O with the least bookkeeping that
 * still keeps dm-snapshot's ordering, done in the cheapest way measured here, so that it bounds
 * what an engine doing the same job in this runtime can reach.
 *
 * For every chunk written for the first time, the old bytes are read from the origin (a blocking
 * pread: the origin is in the page cache, and a hop to the thread pool measured slower) and
 * appended to the next free COW data chunk; the write itself is held (answered at once, as the
 * engine's write-back does) until the chunk's exception is durable. Commit rounds run back to
 * back, one flush each: a round writes the data chunks gathered since the last one and the
 * metadata areas of the batch whose data the previous round's flush made durable, flushes the
 * COW, and then puts that batch's held writes on the origin. So the old data is durable before
 * the area that names it, and the area before the origin chunk it protects is overwritten.
 *
 * Bookkeeping is one byte per origin chunk and a list per batch: no exception table, no pending
 * exceptions, no copy engine. Its COW is a valid kernel-format persistent COW (the test opens it
 * with the engine's own store and reads the snapshot back).
 */
import { closeSync, fdatasync, openSync, readSync, write as writeFd, writeSync } from 'node:fs'
import { BaseBlockDevice, type DeviceCapabilities, RESOLVED } from '../../src/device/block-device.js'
import { writeEntry } from '../../src/format/area.js'
import { encodeHeader } from '../../src/format/header.js'
import { FORMAT_VERSION, type Layout, areaChunk, dataChunkOfEntry, layoutFor } from '../../src/format/layout.js'
import { DEFAULT_WRITE_BACK_BYTES } from '../../src/snapshot/origin.js'

/** One origin chunk's state. */
const UNSAVED = 0
const COPYING = 1
const SAVED = 2

/** The copies and held writes of one commit round. */
class Batch {
  /** Exception index of the first copy; the rest follow in order. */
  firstIndex = -1
  /** Origin chunk of each copy, in exception order. */
  readonly chunks: number[] = []
  /** The old bytes of each copy, back to back (grown by doubling). */
  slab: Uint8Array
  /** Writes to land on the origin once this batch is committed, oldest first. */
  readonly held: Array<{ data: Uint8Array; offset: number; done: ((err: unknown) => void) | null }> = []

  constructor(chunkBytes: number) {
    this.slab = new Uint8Array(64 * chunkBytes)
  }

  get empty(): boolean {
    return this.chunks.length === 0 && this.held.length === 0
  }
}

function writeAt(fd: number, data: Uint8Array, position: number): Promise<void> {
  return new Promise((resolve, reject) => writeFd(fd, data, 0, data.length, position, (err) => (err ? reject(err) : resolve())))
}

function syncFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fdatasync(fd, (err) => (err ? reject(err) : resolve())))
}

export class FirstTouchCeilingDevice extends BaseBlockDevice {
  readonly capabilities: DeviceCapabilities = { writable: true, flush: true, fua: true, discard: false, resize: false }
  private readonly chunkBytes: number
  private readonly layout: Layout
  private readonly originFd: number
  private readonly cowFd: number
  private readonly state: Uint8Array
  private nextIndex = 0
  /** Area images by area number, holding only entries whose data is durable. */
  private readonly areas = new Map<number, Uint8Array>()
  private current: Batch
  /** The batch whose data the last round made durable: its areas go out in the next round. */
  private previous: Batch | null = null
  /** The batch whose data the running round writes. */
  private sealed: Batch | null = null
  private rounds = false
  private heldBytes = 0
  private readonly idleWaiters: Array<() => void> = []
  private failure: unknown = null

  /** Opens `originPath` (its size is the device's) and creates a fresh COW at `cowPath`. */
  constructor(originPath: string, cowPath: string, sizeBytes: number, chunkBytes = 4096) {
    super(sizeBytes, 'first-touch ceiling')
    this.chunkBytes = chunkBytes
    this.layout = layoutFor(chunkBytes)
    this.originFd = openSync(originPath, 'r+')
    this.cowFd = openSync(cowPath, 'wx+')
    this.state = new Uint8Array(Math.ceil(sizeBytes / chunkBytes))
    this.current = new Batch(chunkBytes)
    // A fresh COW as the kernel leaves it: the header, and area 0 empty.
    writeSync(this.cowFd, encodeHeader({ valid: true, version: FORMAT_VERSION, chunkSizeSectors: chunkBytes / 512 }, chunkBytes), 0, chunkBytes, 0)
    writeSync(this.cowFd, new Uint8Array(chunkBytes), 0, chunkBytes, areaChunk(this.layout, 0) * chunkBytes)
  }

  /** Chunks copied so far. */
  get copies(): number {
    return this.nextIndex
  }

  protected _readInto(target: Uint8Array, offset: number): Promise<void> {
    for (let got = 0; got < target.length; ) {
      const n = readSync(this.originFd, target, got, target.length - got, offset + got)
      if (n === 0) {
        target.fill(0, got)
        break
      }
      got += n
    }
    // Held writes on top, oldest first (only this device's own checks read; the job does not).
    const end = offset + target.length
    for (const batch of [this.previous, this.sealed, this.current]) {
      for (const w of batch?.held ?? []) {
        const from = Math.max(offset, w.offset)
        const to = Math.min(end, w.offset + w.data.length)
        if (from < to) target.set(w.data.subarray(from - w.offset, to - w.offset), from - offset)
      }
    }
    return RESOLVED
  }

  protected _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    if (this.failure !== null) return Promise.reject(this.failure)
    const size = this.chunkBytes
    let wait = false
    for (let chunk = Math.floor(offset / size), last = Math.floor((offset + data.length - 1) / size); chunk <= last; chunk++) {
      const s = this.state[chunk]
      if (s === SAVED) continue
      wait = true
      if (s === COPYING) continue
      this.state[chunk] = COPYING
      this.copyOut(chunk)
    }
    if (!wait && this.previous === null && this.sealed === null && this.current.held.length === 0) {
      writeSync(this.originFd, data, 0, data.length, offset)
      return fua ? syncFd(this.originFd) : RESOLVED
    }
    // Held behind every earlier held write (they may overlap), in the newest batch.
    const held = { data: new Uint8Array(data), offset, done: null as ((err: unknown) => void) | null }
    this.current.held.push(held)
    this.heldBytes += data.length
    this.startRounds()
    if (!fua && this.heldBytes <= DEFAULT_WRITE_BACK_BYTES) return RESOLVED
    const landed = new Promise<void>((resolve, reject) => (held.done = (err) => (err === null ? resolve() : reject(err))))
    return fua ? landed.then(() => syncFd(this.originFd)) : landed
  }

  /** Reads chunk `chunk`'s old bytes into the current batch, as the next exception. */
  private copyOut(chunk: number): void {
    const b = this.current
    const at = b.chunks.length * this.chunkBytes
    if (at + this.chunkBytes > b.slab.length) {
      const grown = new Uint8Array(b.slab.length * 2)
      grown.set(b.slab)
      b.slab = grown
    }
    readSync(this.originFd, b.slab, at, this.chunkBytes, chunk * this.chunkBytes)
    if (b.firstIndex < 0) b.firstIndex = this.nextIndex
    this.nextIndex++
    b.chunks.push(chunk)
  }

  private startRounds(): void {
    if (this.rounds) return
    this.rounds = true
    setImmediate(() => void this.round())
  }

  /** One commit round (see the header); schedules the next while anything is left. */
  private async round(): Promise<void> {
    const batch = this.current.empty ? null : this.current
    if (batch !== null) this.current = new Batch(this.chunkBytes)
    this.sealed = batch
    const committing = this.previous
    try {
      const writes: Array<Promise<void>> = []
      if (batch !== null) this.writeData(batch, writes)
      if (committing !== null) this.writeAreas(committing, writes)
      await Promise.all(writes)
      if (writes.length > 0) await syncFd(this.cowFd)
    } catch (err) {
      this.failure ??= err
    }
    if (committing !== null) this.land(committing)
    // This batch's data is durable now: its entries may go into the area images.
    if (batch !== null) this.recordEntries(batch)
    this.previous = batch
    this.sealed = null
    if (this.previous !== null || !this.current.empty) {
      setImmediate(() => void this.round())
      return
    }
    this.rounds = false
    for (const wake of this.idleWaiters.splice(0)) wake()
  }

  /** The batch's old bytes, one write per run of consecutive data chunks (runs end at areas). */
  private writeData(batch: Batch, writes: Array<Promise<void>>): void {
    const per = this.layout.exceptionsPerArea
    for (let k = 0; k < batch.chunks.length; ) {
      const index = batch.firstIndex + k
      let n = 1
      while (k + n < batch.chunks.length && (index + n) % per !== 0) n++
      const to = dataChunkOfEntry(this.layout, Math.floor(index / per), index % per)
      writes.push(writeAt(this.cowFd, batch.slab.subarray(k * this.chunkBytes, (k + n) * this.chunkBytes), to * this.chunkBytes))
      k += n
    }
  }

  private recordEntries(batch: Batch): void {
    const per = this.layout.exceptionsPerArea
    batch.chunks.forEach((chunk, k) => {
      const index = batch.firstIndex + k
      const area = Math.floor(index / per)
      let image = this.areas.get(area)
      if (image === undefined) this.areas.set(area, (image = new Uint8Array(this.chunkBytes)))
      writeEntry(image, index % per, chunk, dataChunkOfEntry(this.layout, area, index % per))
    })
  }

  /** The areas naming the batch's copies; a full area also writes the next one (empty), as the kernel does. */
  private writeAreas(batch: Batch, writes: Array<Promise<void>>): void {
    if (batch.chunks.length === 0) return
    const per = this.layout.exceptionsPerArea
    const first = Math.floor(batch.firstIndex / per)
    const lastIndex = batch.firstIndex + batch.chunks.length - 1
    const last = Math.floor(lastIndex / per)
    for (let area = first; area <= last; area++) {
      writes.push(writeAt(this.cowFd, this.areas.get(area) as Uint8Array, areaChunk(this.layout, area) * this.chunkBytes))
    }
    if ((lastIndex + 1) % per === 0) writes.push(writeAt(this.cowFd, new Uint8Array(this.chunkBytes), areaChunk(this.layout, last + 1) * this.chunkBytes))
  }

  /** The batch is committed: its chunks are saved and its held writes reach the origin. */
  private land(batch: Batch): void {
    for (const chunk of batch.chunks) this.state[chunk] = SAVED
    for (const w of batch.held) {
      if (this.failure === null) {
        try {
          writeSync(this.originFd, w.data, 0, w.data.length, w.offset)
        } catch (err) {
          this.failure = err
        }
      }
      this.heldBytes -= w.data.length
      w.done?.(this.failure)
    }
  }

  protected async _flush(): Promise<void> {
    if (this.rounds) await new Promise<void>((resolve) => this.idleWaiters.push(resolve))
    if (this.failure !== null) throw this.failure
    await syncFd(this.originFd)
  }

  protected override async _close(): Promise<void> {
    await this._flush()
    await syncFd(this.cowFd)
    closeSync(this.originFd)
    closeSync(this.cowFd)
  }
}
