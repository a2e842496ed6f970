/**
 * The BlockDevice contract and its one checked boundary.
 *
 * Every device (file, memory, origin view, snapshot view, test wrappers) extends
 * BaseBlockDevice. The public methods validate range, capability and lifecycle exactly once and
 * then call the protected `_` hooks, so implementations and inner layers can assume well-formed
 * requests (the random-access-storage / nbdkit backend.c habit).
 *
 * Byte addressing: offsets and lengths are bytes and need not be sector aligned; views that
 * care about chunks split requests themselves.
 */
import { closed, notSupported, outOfRange, readOnly } from '../errors.js'

export interface DeviceCapabilities {
  /** Accepts writes. */
  readonly writable: boolean
  /** flush() makes earlier acknowledged writes durable (false: flush is a no-op, e.g. memory). */
  readonly flush: boolean
  /** write(..., { fua: true }) is durable when it resolves. */
  readonly fua: boolean
  /** discard() is supported; after it the range reads as zeros. */
  readonly discard: boolean
  /** resize() is supported (grow-on-demand COW files). */
  readonly resize: boolean
}

/**
 * Completion of a callback-form request (readIntoThen, writeThen): null, or the error. Called
 * exactly once and never synchronously; it must not throw.
 */
export type IoDone = (err: unknown) => void

export interface WriteOptions {
  /** Force unit access: the data is durable when the promise resolves. */
  readonly fua?: boolean
}

export interface BlockDevice {
  readonly sizeBytes: number
  /** Logical block size; 512 for everything blocksnap makes. */
  readonly blockSizeBytes: number
  readonly capabilities: DeviceCapabilities
  readonly closed: boolean
  /** Fills `target` with the bytes at [offset, offset + target.length). */
  readInto(target: Uint8Array, offset: number): Promise<void>
  read(offset: number, length: number): Promise<Uint8Array>
  /**
   * Writes `data` at `offset`. The device reads `data` only until the returned promise settles
   * and copies whatever it keeps longer, so the caller may reuse the buffer from then on.
   */
  write(data: Uint8Array, offset: number, options?: WriteOptions): Promise<void>
  /**
   * readInto and write with a completion callback instead of a promise, for the engine's hot
   * paths (a copy-out read, a write-back landing), which would otherwise allocate a promise and a
   * continuation per request. Same checks and semantics as the promise forms.
   */
  readIntoThen(target: Uint8Array, offset: number, done: IoDone): void
  /**
   * Fills `target` at once, blocking the thread, and returns true; or returns false, having read
   * nothing, when this device has no such read (only local files do). For short bursts of reads
   * the caller times and gives up on when they turn slow (the COW open's metadata areas).
   */
  readIntoNow(target: Uint8Array, offset: number): boolean
  writeThen(data: Uint8Array, offset: number, fua: boolean, done: IoDone): void
  flush(): Promise<void>
  discard(offset: number, length: number): Promise<void>
  resize(sizeBytes: number): Promise<void>
  close(): Promise<void>
}

/** A settled promise handed out where nothing is left to do (no new promise per call). */
export const RESOLVED: Promise<void> = Promise.resolve()

/** Calls `done` with `err` from a microtask: a callback is never called synchronously. */
function doneLater(done: IoDone, err: unknown): void {
  queueMicrotask(() => done(err))
}

/** Calls `done` with null or the error once `p` settles. */
function callbackOf(p: Promise<void>, done: IoDone): void {
  p.then(() => done(null), done)
}

export abstract class BaseBlockDevice implements BlockDevice {
  abstract readonly capabilities: DeviceCapabilities
  readonly blockSizeBytes: number = 512
  protected _sizeBytes: number
  private _closed = false
  private _closing: Promise<void> | null = null
  protected readonly name: string

  protected constructor(sizeBytes: number, name: string) {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0) throw outOfRange(`${name}: size ${sizeBytes} is not a safe integer`)
    this._sizeBytes = sizeBytes
    this.name = name
  }

  get sizeBytes(): number {
    return this._sizeBytes
  }

  get closed(): boolean {
    return this._closed
  }

  protected checkOpen(): void {
    if (this._closed) throw closed(this.name)
  }

  protected checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw outOfRange(`${this.name}: bad range offset=${offset} length=${length}`, { offset, length })
    }
    if (offset + length > this._sizeBytes) {
      throw outOfRange(`${this.name}: range ${offset}+${length} is beyond the end (${this._sizeBytes} bytes)`, {
        offset,
        length,
      })
    }
  }

  // The public methods are not async functions: each returns the hook's own promise (or a
  // rejection for a request that fails the checks), so a request costs no promise per layer.

  readInto(target: Uint8Array, offset: number): Promise<void> {
    try {
      this.checkOpen()
      this.checkRange(offset, target.length)
      if (target.length === 0) return RESOLVED
      return this._readInto(target, offset)
    } catch (err) {
      return Promise.reject(err)
    }
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    this.checkOpen()
    this.checkRange(offset, length)
    const target = new Uint8Array(length)
    if (length > 0) await this._readInto(target, offset)
    return target
  }

  write(data: Uint8Array, offset: number, options?: WriteOptions): Promise<void> {
    try {
      this.checkWrite(offset, data.length)
      if (data.length === 0) return options?.fua ? this._flush() : RESOLVED
      return this._write(data, offset, options?.fua === true)
    } catch (err) {
      return Promise.reject(err)
    }
  }

  // The callback forms make no closure on their way through (their slow paths are functions of
  // their own): a closure over `done` here would make a context on every request.

  readIntoThen(target: Uint8Array, offset: number, done: IoDone): void {
    try {
      this.checkOpen()
      this.checkRange(offset, target.length)
    } catch (err) {
      return doneLater(done, err)
    }
    if (target.length === 0) doneLater(done, null)
    else this._readIntoThen(target, offset, done)
  }

  readIntoNow(target: Uint8Array, offset: number): boolean {
    this.checkOpen()
    this.checkRange(offset, target.length)
    return target.length === 0 || this._readIntoNow(target, offset)
  }

  writeThen(data: Uint8Array, offset: number, fua: boolean, done: IoDone): void {
    try {
      this.checkWrite(offset, data.length)
    } catch (err) {
      return doneLater(done, err)
    }
    if (data.length === 0) callbackOf(this._flush(), done)
    else this._writeThen(data, offset, fua, done)
  }

  private checkWrite(offset: number, length: number): void {
    this.checkOpen()
    if (!this.capabilities.writable) throw readOnly(this.name)
    this.checkRange(offset, length)
  }

  flush(): Promise<void> {
    try {
      this.checkOpen()
      return this._flush()
    } catch (err) {
      return Promise.reject(err)
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    this.checkOpen()
    if (!this.capabilities.writable) throw readOnly(this.name)
    if (!this.capabilities.discard) throw notSupported(`${this.name}: discard is not supported`)
    this.checkRange(offset, length)
    if (length === 0) return
    await this._discard(offset, length)
  }

  async resize(sizeBytes: number): Promise<void> {
    this.checkOpen()
    if (!this.capabilities.resize) throw notSupported(`${this.name}: resize is not supported`)
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0) throw outOfRange(`${this.name}: bad size ${sizeBytes}`)
    await this._resize(sizeBytes)
    this._sizeBytes = sizeBytes
  }

  /** Idempotent; operations after close reject with SNAP_CLOSED. */
  close(): Promise<void> {
    if (this._closing) return this._closing
    this._closed = true
    this._closing = this._close()
    return this._closing
  }

  protected abstract _readInto(target: Uint8Array, offset: number): Promise<void>
  /** The blocking read, for devices that have one; false: none here. */
  protected _readIntoNow(_target: Uint8Array, _offset: number): boolean {
    return false
  }
  protected abstract _write(data: Uint8Array, offset: number, fua: boolean): Promise<void>
  protected abstract _flush(): Promise<void>
  /** Callback forms of the hooks; devices that can do without a promise override them. */
  protected _readIntoThen(target: Uint8Array, offset: number, done: IoDone): void {
    try {
      callbackOf(this._readInto(target, offset), done)
    } catch (err) {
      doneLater(done, err)
    }
  }
  protected _writeThen(data: Uint8Array, offset: number, fua: boolean, done: IoDone): void {
    try {
      callbackOf(this._write(data, offset, fua), done)
    } catch (err) {
      doneLater(done, err)
    }
  }
  protected _discard(_offset: number, _length: number): Promise<void> {
    return Promise.reject(notSupported(`${this.name}: discard is not supported`))
  }
  protected _resize(_sizeBytes: number): Promise<void> {
    return Promise.reject(notSupported(`${this.name}: resize is not supported`))
  }
  protected _close(): Promise<void> {
    return Promise.resolve()
  }
}
