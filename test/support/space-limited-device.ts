/**
 * A file on a small file system, for out-of-space tests without a real one: devices sharing a
 * FileSystemSpace draw 4 KiB blocks from one budget. Like a sparse file on tmpfs or ext4,
 * growing (ftruncate) costs nothing and a write allocates the blocks it touches for the first
 * time; a write that does not fit allocates and writes the leading blocks that do fit, then
 * fails with ENOSPC (a torn write), mapped the way FileDevice maps it. Overwriting allocated
 * blocks never fails. Decisions are taken when the operation is issued, so outcomes follow
 * issue order and do not depend on timing.
 */
import { BaseBlockDevice, type DeviceCapabilities } from '../../src/device/block-device.js'
import type { MemoryDevice } from '../../src/device/memory-device.js'
import { asSnapError } from '../../src/errors.js'

export const FS_BLOCK_BYTES = 4096

export class FileSystemSpace {
  limitBytes: number
  private usedBlocks = 0

  constructor(limitBytes = Infinity) {
    this.limitBytes = limitBytes
  }

  get usedBytes(): number {
    return this.usedBlocks * FS_BLOCK_BYTES
  }

  /** Leaves exactly `bytes` free (rounded down to blocks). */
  leaveFree(bytes: number): void {
    this.limitBytes = this.usedBytes + Math.floor(bytes / FS_BLOCK_BYTES) * FS_BLOCK_BYTES
  }

  /** Takes up to `blocks` blocks; returns how many it got. */
  take(blocks: number): number {
    const free = Math.max(0, Math.floor(this.limitBytes / FS_BLOCK_BYTES) - this.usedBlocks)
    const got = Math.min(blocks, free)
    this.usedBlocks += got
    return got
  }

  give(blocks: number): void {
    this.usedBlocks -= blocks
  }
}

export class SpaceLimitedDevice extends BaseBlockDevice {
  readonly next: MemoryDevice
  readonly space: FileSystemSpace
  readonly path: string
  private readonly blocks = new Set<number>()
  /** Writes that failed for want of space so far. */
  noSpaceWrites = 0

  constructor(next: MemoryDevice, space: FileSystemSpace, path: string) {
    super(next.sizeBytes, `file ${path}`)
    this.next = next
    this.space = space
    this.path = path
    // What the device already holds is already on the file system (and counted by the caller).
    for (let b = 0; b * FS_BLOCK_BYTES < next.sizeBytes; b++) {
      const length = Math.min(FS_BLOCK_BYTES, next.sizeBytes - b * FS_BLOCK_BYTES)
      if (next.readSync(b * FS_BLOCK_BYTES, length).some((x) => x !== 0)) this.blocks.add(b)
    }
    space.take(this.blocks.size)
  }

  get capabilities(): DeviceCapabilities {
    return this.next.capabilities
  }

  protected override async _readInto(target: Uint8Array, offset: number): Promise<void> {
    await this.next.readInto(target, offset)
  }

  protected override _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    const first = Math.floor(offset / FS_BLOCK_BYTES)
    const end = Math.ceil((offset + data.length) / FS_BLOCK_BYTES)
    let fits = end
    for (let b = first; b < end; b++) {
      if (this.blocks.has(b)) continue
      if (this.space.take(1) === 0) {
        fits = b
        break
      }
      this.blocks.add(b)
    }
    if (fits === end) return this.next.write(data, offset, fua ? { fua } : undefined)
    this.noSpaceWrites++
    const landed = Math.max(0, fits * FS_BLOCK_BYTES - offset)
    const fail = (): never => {
      const err = Object.assign(new Error(`ENOSPC: no space left on device, write`), { code: 'ENOSPC', errno: -28 })
      throw asSnapError(err, `${this.name}: write`, { path: this.path, offset, length: data.length })
    }
    if (landed === 0) return Promise.resolve().then(fail)
    return this.next.write(data.subarray(0, landed), offset).then(fail)
  }

  protected override async _flush(): Promise<void> {
    await this.next.flush()
  }

  protected override async _discard(offset: number, length: number): Promise<void> {
    await this.next.discard(offset, length)
  }

  protected override async _resize(sizeBytes: number): Promise<void> {
    const keep = Math.ceil(sizeBytes / FS_BLOCK_BYTES)
    let freed = 0
    for (const b of this.blocks) {
      if (b >= keep) {
        this.blocks.delete(b)
        freed++
      }
    }
    this.space.give(freed)
    await this.next.resize(sizeBytes)
  }

  protected override async _close(): Promise<void> {
    await this.next.close()
  }
}
