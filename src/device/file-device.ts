/**
 * A regular file (or disk image) or a block device as a BlockDevice, using positional I/O on one
 * FileHandle.
 *
 * Node cannot punch holes portably, so discard writes zeros, except that a discard reaching the
 * end of a regular file truncates and re-extends it, which leaves the tail sparse on every
 * filesystem. A block device has a fixed size (from the kernel, see block-device-size.ts) and no resize.
 */
import { type BigIntStats, constants, read as readFd, readSync, write as writeFd, writeSync } from 'node:fs'
import { open as openFile, realpath, unlink, type FileHandle } from 'node:fs/promises'
import { BaseBlockDevice, RESOLVED, type DeviceCapabilities, type IoDone } from './block-device.js'
import { InlineIo } from './inline-io.js'
import { SnapError, asSnapError, badArgument, ioError, outOfRange } from '../errors.js'
import { blockDeviceSizeBytes } from './block-device-size.js'
import { FileAllocation } from './file-allocation.js'
import { fdatasyncOffPool } from './flush-thread.js'

export interface FileDeviceOptions {
  readonly readOnly?: boolean
  /**
   * Create the file exclusively with this size (sparse); fails with SNAP_EXISTS if it exists.
   * The new file is 0600: it holds a disk's data, which is no business of other local users.
   */
  readonly create?: number
  /** Allow resize() (grow-on-demand COW files). */
  readonly resizable?: boolean
  /** Refuse a symbolic link as the last path component (ELOOP) instead of opening its target. */
  readonly noFollow?: boolean
  /**
   * For a block device: open it O_EXCL, the kernel's exclusive claim. The kernel then refuses a
   * device that is mounted or held (device-mapper, md, another exclusive opener) with
   * SNAP_BUSY, and refuses those claims while this device is open. Never for a regular file
   * (O_EXCL without O_CREAT means nothing there).
   */
  readonly exclusive?: boolean
  /** The policy that decides which reads block (default: InlineIo.reads(); tests pass their own). */
  readonly inlineReads?: InlineIo
  /**
   * The policy that decides which writes block (default: InlineIo.writes(); tests pass their
   * own). A COW passes InlineIo.poolOnly(): its writes are merged by the copy engine's
   * WriteCombiner only while one is in flight.
   */
  readonly inlineWrites?: InlineIo
}

const ZERO_PIECE_BYTES = 1024 * 1024
/** Mode of files created by open({create}); the umask can only narrow it. */
const CREATED_FILE_MODE = 0o600

export class FileDevice extends BaseBlockDevice {
  readonly capabilities: DeviceCapabilities
  readonly path: string
  private readonly handle: FileHandle
  /** A block device cannot be truncated: discard always writes zeros. */
  private readonly truncatable: boolean
  /** Where the file holds data; only regular files can say (see file-allocation.ts). */
  private readonly allocation: FileAllocation | null
  /** Reads and writes under way on the descriptor; close waits for them (FileHandle would). */
  private ioInFlight = 0
  private idle: (() => void) | null = null
  /** When reads and writes skip the thread pool (inline-io.ts). */
  private readonly inlineReads: InlineIo
  private readonly inlineWrites: InlineIo

  private constructor(handle: FileHandle, path: string, sizeBytes: number, capabilities: DeviceCapabilities, truncatable: boolean, inline: { reads: InlineIo; writes: InlineIo }) {
    super(sizeBytes, `file ${path}`)
    this.inlineReads = inline.reads
    this.inlineWrites = inline.writes
    this.handle = handle
    this.path = path
    this.capabilities = capabilities
    this.truncatable = truncatable
    this.allocation = truncatable ? new FileAllocation(path) : null
  }

  /**
   * The byte ranges within [offset, offset + length) that hold data, sorted and merged; the
   * rest reads as zeros. Never leaves out data written through this device; when the file
   * system cannot tell (or for a block device), the whole range is data.
   */
  async dataRanges(offset: number, length: number): Promise<Array<[number, number]>> {
    this.checkOpen()
    this.checkRange(offset, length)
    if (this.allocation === null) return length > 0 ? [[offset, offset + length]] : []
    return this.allocation.dataRanges(offset, offset + length, this._sizeBytes)
  }

  static async open(path: string, options: FileDeviceOptions = {}): Promise<FileDevice> {
    const readOnly = options.readOnly === true
    const create = options.create
    if (create !== undefined) {
      if (!Number.isSafeInteger(create) || create < 0) throw outOfRange(`file ${path}: bad size ${create}`)
      if (readOnly) throw badArgument(`file ${path}: cannot create a read-only file`)
    }
    let handle: FileHandle
    try {
      const flags = create !== undefined ? 'wx+' : readOnly ? 'r' : 'r+'
      const extra = (options.noFollow ? constants.O_NOFOLLOW : 0) | (options.exclusive && create === undefined ? constants.O_EXCL : 0)
      handle = await openFile(path, extra === 0 ? flags : openFlags(flags) | extra, CREATED_FILE_MODE)
    } catch (err) {
      throw openError(err, path)
    }
    try {
      let sizeBytes: number
      let block = false
      if (create !== undefined) {
        await handle.truncate(create)
        sizeBytes = create
      } else {
        const st = await handle.stat({ bigint: true })
        block = st.isBlockDevice()
        if (!st.isFile() && !block) throw badArgument(`${path} is not a regular file or block device`)
        if (options.exclusive && !block) throw badArgument(`${path} is not a block device: only block devices are opened exclusively`)
        sizeBytes = block ? await blockDeviceSizeBytes(st.rdev, path) : Number(st.size)
      }
      const capabilities: DeviceCapabilities = {
        writable: !readOnly,
        flush: true,
        fua: true,
        discard: true,
        // A read-only handle cannot be truncated, so resize needs write access too.
        resize: options.resizable === true && !readOnly && !block,
      }
      return new FileDevice(handle, path, sizeBytes, capabilities, !block, {
        reads: options.inlineReads ?? InlineIo.reads(),
        writes: options.inlineWrites ?? InlineIo.writes(),
      })
    } catch (err) {
      await handle.close().catch(() => {})
      // Do not leave a half-made file behind after an exclusive create we own.
      if (create !== undefined) await unlink(path).catch(() => {})
      throw asSnapError(err, `file ${path}: open`, { path })
    }
  }

  /** stat(2) of the open descriptor: what this device is, whatever the path names now. */
  async stat(): Promise<BigIntStats> {
    return this.handle.stat({ bigint: true })
  }

  /**
   * The path of the file this device has open, resolved through the open descriptor (Linux
   * /proc), so it names the file actually opened even if links changed after open().
   */
  async openedPath(): Promise<string> {
    return realpath(`/proc/self/fd/${this.handle.fd}`).catch(() => realpath(this.path))
  }

  // Reads and writes use the descriptor with callbacks, not the FileHandle's promise methods:
  // those cost several promises and an async frame per request, which at 4 KiB requests was
  // most of the write path's JavaScript work. The promise forms wrap the callback forms.

  protected override _readInto(target: Uint8Array, offset: number): Promise<void> {
    if (this.inlineReads.mayInline(target.length)) {
      const err = this.readInline(target, offset)
      return err === null ? RESOLVED : Promise.reject(err)
    }
    return new Promise((resolve, reject) => this.readOnPool(target, offset, (err) => (err === null ? resolve() : reject(err))))
  }

  protected override _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    return new Promise((resolve, reject) => this._writeThen(data, offset, fua, (err) => (err === null ? resolve() : reject(err))))
  }

  protected override _readIntoThen(target: Uint8Array, offset: number, done: IoDone): void {
    if (this.inlineReads.mayInline(target.length)) process.nextTick(done, this.readInline(target, offset))
    else this.readOnPool(target, offset, done)
  }

  /** The asynchronous read, on libuv's pool; the inline policy has already said no. */
  private readOnPool(target: Uint8Array, offset: number, done: IoDone): void {
    const fd = this.handle.fd
    let got = 0
    const step = (err: NodeJS.ErrnoException | null, bytesRead: number): void => {
      if (err) return this.ioEnded(done, asSnapError(err, `${this.name}: read`, { path: this.path, offset, length: target.length }))
      got += bytesRead
      // Past EOF (file shrunk behind our back, or a sparse tail) the device reads as zeros.
      if (bytesRead === 0) target.fill(0, got)
      else if (got < target.length) return readFd(fd, target, got, target.length - got, offset + got, step)
      this.ioEnded(done, null)
    }
    this.ioInFlight++
    readFd(fd, target, 0, target.length, offset, step)
  }

  protected override _readIntoNow(target: Uint8Array, offset: number): boolean {
    const fd = this.handle.fd
    try {
      for (let got = 0; got < target.length; ) {
        const bytesRead = readSync(fd, target, got, target.length - got, offset + got)
        // Past EOF the device reads as zeros, as in the asynchronous read.
        if (bytesRead === 0) {
          target.fill(0, got)
          break
        }
        got += bytesRead
      }
    } catch (err) {
      throw asSnapError(err, `${this.name}: read`, { path: this.path, offset, length: target.length })
    }
    return true
  }

  /** A blocking read, timed for the inline policy: null, or the error. */
  private readInline(target: Uint8Array, offset: number): unknown {
    const inline = this.inlineReads
    const startedMs = inline.now()
    try {
      this._readIntoNow(target, offset)
      return null
    } catch (err) {
      return err
    } finally {
      inline.ended(inline.now() - startedMs)
    }
  }

  protected override _writeThen(data: Uint8Array, offset: number, fua: boolean, done: IoDone): void {
    const token = this.allocation === null ? -1 : this.allocation.startWrite(offset, data.length)
    const fd = this.handle.fd
    if (this.inlineWrites.mayInline(data.length)) {
      const err = this.writeInline(data, offset)
      this.ioInFlight++
      if (err === null && fua) fdatasyncOffPool(fd, (syncErr) => this.writeEnded(done, token, syncErr, offset, data.length))
      else process.nextTick(FileDevice.endInlineWrite, this, done, token, err, offset, data.length)
      return
    }
    let put = 0
    // One closure per write (the completion of each step); the rest are methods.
    const step = (err: NodeJS.ErrnoException | null, bytesWritten: number): void => {
      if (err) return this.writeEnded(done, token, err, offset, data.length)
      if (bytesWritten === 0) return this.writeEnded(done, token, this.noProgress(offset + put), offset, data.length)
      put += bytesWritten
      if (put < data.length) writeFd(fd, data, put, data.length - put, offset + put, step)
      else if (fua) fdatasyncOffPool(fd, (syncErr) => this.writeEnded(done, token, syncErr, offset, data.length))
      else this.writeEnded(done, token, null, offset, data.length)
    }
    this.ioInFlight++
    writeFd(fd, data, 0, data.length, offset, step)
  }

  /** A blocking write, timed for the inline policy: null, or the error (errno's, unmapped). */
  private writeInline(data: Uint8Array, offset: number): unknown {
    const inline = this.inlineWrites
    const startedMs = inline.now()
    try {
      for (let put = 0; put < data.length; ) {
        const bytesWritten = writeSync(this.handle.fd, data, put, data.length - put, offset + put)
        if (bytesWritten === 0) return this.noProgress(offset + put)
        put += bytesWritten
      }
      return null
    } catch (err) {
      return err
    } finally {
      inline.ended(inline.now() - startedMs)
    }
  }

  /** An inline write's completion, on the next tick: callers never see a callback from inside writeThen. */
  private static endInlineWrite(this: void, device: FileDevice, done: IoDone, token: number, err: unknown, offset: number, length: number): void {
    device.writeEnded(done, token, err, offset, length)
  }

  /**
   * The error of a write that wrote nothing at `offsetBytes`: every write loop stops on it, since
   * retrying would loop forever (the kernel only does this on a broken device).
   */
  private noProgress(offsetBytes: number): SnapError {
    return ioError(`${this.name}: write made no progress`, undefined, { offset: offsetBytes })
  }

  /** A write (`token` from the allocation map) has ended: on the file (err null), or failed. */
  private writeEnded(done: IoDone, token: number, err: unknown, offset: number, length: number): void {
    if (this.allocation !== null) this.allocation.endWrite(token)
    if (err === null) this.ioEnded(done, null)
    else this.ioEnded(done, asSnapError(err, `${this.name}: write`, { path: this.path, offset, length }))
  }

  private ioEnded(done: IoDone, err: unknown): void {
    if (--this.ioInFlight === 0 && this.idle) this.idle()
    done(err)
  }

  protected override async _flush(): Promise<void> {
    // Off libuv's pool (flush-thread.ts), counted as I/O in flight so close() keeps the
    // descriptor open until the flush thread is done with it.
    this.ioInFlight++
    const err = await new Promise<unknown>((resolve) => fdatasyncOffPool(this.handle.fd, (e) => this.ioEnded(resolve, e)))
    if (err !== null) throw asSnapError(err, `${this.name}: flush`, { path: this.path })
  }

  protected override async _discard(offset: number, length: number): Promise<void> {
    // Counted as a write: the zeros written are data, and a truncated tail reported as data is
    // merely slower to copy.
    const ended = this.allocation?.writeStarted(offset, length)
    try {
      if (this.truncatable && offset + length >= this._sizeBytes) {
        await this.handle.truncate(offset)
        await this.handle.truncate(this._sizeBytes)
        return
      }
      const zeros = new Uint8Array(Math.min(ZERO_PIECE_BYTES, length))
      for (let done = 0; done < length; done += zeros.length) {
        const n = Math.min(zeros.length, length - done)
        await this.writeAll(n === zeros.length ? zeros : zeros.subarray(0, n), offset + done)
      }
    } catch (err) {
      throw asSnapError(err, `${this.name}: discard`, { path: this.path, offset, length })
    } finally {
      ended?.()
    }
  }

  protected override async _resize(sizeBytes: number): Promise<void> {
    this.allocation?.forget()
    try {
      await this.handle.truncate(sizeBytes)
    } catch (err) {
      throw asSnapError(err, `${this.name}: resize to ${sizeBytes}`, { path: this.path })
    }
  }

  protected override async _close(): Promise<void> {
    while (this.ioInFlight > 0) await new Promise<void>((resolve) => (this.idle = resolve))
    this.idle = null
    try {
      await this.handle.close()
    } catch (err) {
      throw asSnapError(err, `${this.name}: close`, { path: this.path })
    }
  }

  private async writeAll(data: Uint8Array, offset: number): Promise<void> {
    let done = 0
    while (done < data.length) {
      const { bytesWritten } = await this.handle.write(data, done, data.length - done, offset + done)
      if (bytesWritten === 0) throw this.noProgress(offset + done)
      done += bytesWritten
    }
  }
}

function openFlags(flags: 'wx+' | 'r' | 'r+'): number {
  if (flags === 'wx+') return constants.O_RDWR | constants.O_CREAT | constants.O_EXCL
  return flags === 'r' ? constants.O_RDONLY : constants.O_RDWR
}

function openError(err: unknown, path: string): SnapError {
  const errno = (err as NodeJS.ErrnoException | undefined)?.code
  if (errno === 'ENOENT') return new SnapError('SNAP_NOT_FOUND', `file ${path} does not exist`, { cause: err, details: { path } })
  if (errno === 'EEXIST') return new SnapError('SNAP_EXISTS', `file ${path} already exists`, { cause: err, details: { path } })
  // Only an exclusive open of a block device meets EBUSY: the kernel's claim is someone else's.
  if (errno === 'EBUSY') {
    return new SnapError('SNAP_BUSY', `block device ${path} is in use (mounted, or held by device-mapper, md or another exclusive opener)`, { cause: err, details: { path } })
  }
  return asSnapError(err, `file ${path}: open`, { path })
}
