/**
 * A sparse in-memory device for tests and scratch stores. Pages are allocated on first write so
 * a multi-gigabyte device costs only what is written; unwritten ranges read as zeros.
 *
 * The `*Sync` methods exist for the crash recorder, which must apply an operation at the exact
 * moment it records it; they go through the same checks as the async API.
 */
import { BaseBlockDevice, type DeviceCapabilities, type IoDone } from './block-device.js'
import { notSupported, outOfRange, readOnly as readOnlyError } from '../errors.js'

export const MEMORY_PAGE_BYTES = 64 * 1024

export interface MemoryDeviceOptions {
  readonly name?: string
  readonly readOnly?: boolean
}

export class MemoryDevice extends BaseBlockDevice {
  readonly capabilities: DeviceCapabilities
  private readonly pages = new Map<number, Uint8Array>()

  constructor(sizeBytes: number, options: MemoryDeviceOptions = {}) {
    super(sizeBytes, options.name ?? 'memory device')
    // flush/fua are trivially satisfied: memory is as durable as this process, and the engine
    // treats flush: false as "cannot order writes", which is wrong here.
    const writable = options.readOnly !== true
    this.capabilities = { writable, flush: true, fua: true, discard: true, resize: writable }
  }

  /** A device holding a copy of `bytes`; all-zero pages stay unallocated. */
  static fromBytes(bytes: Uint8Array, options: MemoryDeviceOptions = {}): MemoryDevice {
    const device = new MemoryDevice(bytes.length, options)
    for (let start = 0; start < bytes.length; start += MEMORY_PAGE_BYTES) {
      const piece = bytes.subarray(start, Math.min(start + MEMORY_PAGE_BYTES, bytes.length))
      if (piece.some((b) => b !== 0)) device.pageFor(start / MEMORY_PAGE_BYTES).set(piece)
    }
    return device
  }

  /** Deep copy: later writes to either device are invisible to the other. */
  clone(options: MemoryDeviceOptions = {}): MemoryDevice {
    const copy = new MemoryDevice(this._sizeBytes, { name: options.name ?? this.name, readOnly: options.readOnly ?? !this.capabilities.writable })
    for (const [index, page] of this.pages) copy.pages.set(index, page.slice())
    return copy
  }

  /** Bytes held by allocated pages; lets tests check sparseness and discard. */
  get allocatedBytes(): number {
    return this.pages.size * MEMORY_PAGE_BYTES
  }

  readSync(offset: number, length: number): Uint8Array {
    this.checkOpen()
    this.checkRange(offset, length)
    const target = new Uint8Array(length)
    this.copyOut(target, offset)
    return target
  }

  writeSync(data: Uint8Array, offset: number): void {
    this.checkOpen()
    if (!this.capabilities.writable) throw readOnlyError(this.name)
    this.checkRange(offset, data.length)
    this.copyIn(data, offset)
  }

  discardSync(offset: number, length: number): void {
    this.checkOpen()
    if (!this.capabilities.writable) throw readOnlyError(this.name)
    this.checkRange(offset, length)
    this.zeroRange(offset, length)
  }

  resizeSync(sizeBytes: number): void {
    this.checkOpen()
    if (!this.capabilities.resize) throw notSupported(`${this.name}: resize is not supported`)
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0) throw outOfRange(`${this.name}: bad size ${sizeBytes}`)
    this.applyResize(sizeBytes)
    this._sizeBytes = sizeBytes
  }

  protected override async _readInto(target: Uint8Array, offset: number): Promise<void> {
    this.copyOut(target, offset)
  }

  protected override async _write(data: Uint8Array, offset: number, _fua: boolean): Promise<void> {
    this.copyIn(data, offset)
  }

  protected override _readIntoThen(target: Uint8Array, offset: number, done: IoDone): void {
    this.copyOut(target, offset)
    queueMicrotask(() => done(null))
  }

  protected override _writeThen(data: Uint8Array, offset: number, _fua: boolean, done: IoDone): void {
    this.copyIn(data, offset)
    queueMicrotask(() => done(null))
  }

  protected override async _flush(): Promise<void> {}

  protected override async _discard(offset: number, length: number): Promise<void> {
    this.zeroRange(offset, length)
  }

  protected override async _resize(sizeBytes: number): Promise<void> {
    this.applyResize(sizeBytes)
  }

  protected override async _close(): Promise<void> {
    this.pages.clear()
  }

  private pageFor(index: number): Uint8Array {
    let page = this.pages.get(index)
    if (!page) {
      page = new Uint8Array(MEMORY_PAGE_BYTES)
      this.pages.set(index, page)
    }
    return page
  }

  private copyOut(target: Uint8Array, offset: number): void {
    let done = 0
    while (done < target.length) {
      const pos = offset + done
      const index = Math.floor(pos / MEMORY_PAGE_BYTES)
      const inPage = pos - index * MEMORY_PAGE_BYTES
      const n = Math.min(MEMORY_PAGE_BYTES - inPage, target.length - done)
      const page = this.pages.get(index)
      if (page) target.set(page.subarray(inPage, inPage + n), done)
      else target.fill(0, done, done + n)
      done += n
    }
  }

  private copyIn(data: Uint8Array, offset: number): void {
    let done = 0
    while (done < data.length) {
      const pos = offset + done
      const index = Math.floor(pos / MEMORY_PAGE_BYTES)
      const inPage = pos - index * MEMORY_PAGE_BYTES
      const n = Math.min(MEMORY_PAGE_BYTES - inPage, data.length - done)
      this.pageFor(index).set(data.subarray(done, done + n), inPage)
      done += n
    }
  }

  private zeroRange(offset: number, length: number): void {
    let done = 0
    while (done < length) {
      const pos = offset + done
      const index = Math.floor(pos / MEMORY_PAGE_BYTES)
      const inPage = pos - index * MEMORY_PAGE_BYTES
      const n = Math.min(MEMORY_PAGE_BYTES - inPage, length - done)
      if (n === MEMORY_PAGE_BYTES) this.pages.delete(index)
      else this.pages.get(index)?.fill(0, inPage, inPage + n)
      done += n
    }
  }

  private applyResize(sizeBytes: number): void {
    if (sizeBytes >= this._sizeBytes) return
    // Zero what lies beyond the new end so a later grow cannot resurrect it.
    for (const index of [...this.pages.keys()]) {
      const start = index * MEMORY_PAGE_BYTES
      if (start >= sizeBytes) this.pages.delete(index)
      else if (start + MEMORY_PAGE_BYTES > sizeBytes) this.pages.get(index)?.fill(0, sizeBytes - start)
    }
  }
}
