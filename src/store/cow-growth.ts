/**
 * Grow-on-demand COW devices: allocation happens synchronously, so the device is extended in
 * the background, in steps (at least 1 MiB or an eighth of the current size) so that a stream of
 * allocations costs few resizes. Resizes are chained; `ready` resolves once every growth asked
 * for so far has happened.
 */
import type { BlockDevice } from '../device/block-device.js'

export class CowGrowth {
  private readonly cow: BlockDevice
  private readonly alignBytes: () => number
  private targetBytes = 0
  private pending: Promise<void> = Promise.resolve()

  /** `alignBytes` is read at each request: a persistent store may adopt its header's chunk size. */
  constructor(cow: BlockDevice, alignBytes: () => number) {
    this.cow = cow
    this.alignBytes = alignBytes
  }

  /** Makes sure the device will be at least `minBytes` long. */
  request(minBytes: number): void {
    if (minBytes <= this.targetBytes) return
    const step = Math.max(1024 * 1024, Math.floor(this.cow.sizeBytes / 8))
    const align = this.alignBytes()
    const target = Math.ceil((minBytes + step) / align) * align
    this.targetBytes = target
    this.pending = this.pending.then(async () => {
      if (this.cow.sizeBytes < target) await this.cow.resize(target)
    })
  }

  get ready(): Promise<void> {
    return this.pending
  }
}
