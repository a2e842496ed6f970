/**
 * Crash simulation across several devices on one global timeline.
 *
 * Each RecordingDevice applies its mutations to a MemoryDevice at once and logs them in the order
 * they were applied. imagesAt(cut) rebuilds what each disk could hold if power failed after event
 * `cut - 1`: everything before a device's last flush in the prefix is durable; what follows is
 * volatile cache that may be lost, partly kept, or torn at a 512-byte sector boundary.
 */
import { BaseBlockDevice, type DeviceCapabilities } from '../../src/device/block-device.js'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { badArgument, outOfRange } from '../../src/errors.js'
import { SECTOR_BYTES } from '../../src/units.js'
import { Random } from './random.js'

export interface CrashEvent {
  readonly kind: 'write' | 'flush' | 'discard' | 'resize'
  readonly device: string
  readonly offset?: number
  /** A copy taken when the write was applied. */
  readonly data?: Uint8Array
  readonly length?: number
  readonly sizeBytes?: number
}

export interface ImagesAtOptions {
  /** What happens to writes after a device's last flush: lost (default), all kept, or a random subset. */
  readonly unflushed?: 'drop' | 'keep' | 'random'
  readonly seed?: number
  /** Apply only a random strict prefix of the sectors of each device's last applied unflushed write. */
  readonly tear?: boolean
}

const ALL_CAPABILITIES: DeviceCapabilities = { writable: true, flush: true, fua: true, discard: true, resize: true }

export class RecordingDevice extends BaseBlockDevice {
  readonly capabilities = ALL_CAPABILITIES
  readonly base: MemoryDevice
  private readonly record: (event: CrashEvent) => void
  private readonly deviceName: string

  constructor(deviceName: string, base: MemoryDevice, record: (event: CrashEvent) => void) {
    super(base.sizeBytes, `recording device ${deviceName}`)
    this.deviceName = deviceName
    this.base = base
    this.record = record
  }

  protected override async _readInto(target: Uint8Array, offset: number): Promise<void> {
    target.set(this.base.readSync(offset, target.length))
  }

  // Apply first, then record: if the base refuses, nothing is logged.
  protected override async _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    this.base.writeSync(data, offset)
    this.record({ kind: 'write', device: this.deviceName, offset, data: data.slice(), length: data.length })
    if (fua) this.record({ kind: 'flush', device: this.deviceName })
  }

  protected override async _flush(): Promise<void> {
    this.record({ kind: 'flush', device: this.deviceName })
  }

  protected override async _discard(offset: number, length: number): Promise<void> {
    this.base.discardSync(offset, length)
    this.record({ kind: 'discard', device: this.deviceName, offset, length })
  }

  protected override async _resize(sizeBytes: number): Promise<void> {
    this.base.resizeSync(sizeBytes)
    this.record({ kind: 'resize', device: this.deviceName, sizeBytes })
  }
}

export class CrashRecorder {
  private readonly log: CrashEvent[] = []
  private readonly initial = new Map<string, MemoryDevice>()

  /** Starts recording `base`; its current contents are the image every replay starts from. */
  device(name: string, base: MemoryDevice): RecordingDevice {
    if (this.initial.has(name)) throw badArgument(`crash recorder: device ${name} is already recorded`)
    this.initial.set(name, base.clone({ name }))
    return new RecordingDevice(name, base, (event) => this.log.push(event))
  }

  get length(): number {
    return this.log.length
  }

  events(): readonly CrashEvent[] {
    return this.log.slice()
  }

  flushIndices(): number[] {
    const indices: number[] = []
    this.log.forEach((event, i) => {
      if (event.kind === 'flush') indices.push(i)
    })
    return indices
  }

  /** Images of every recorded device after a crash just before event `cut`. */
  imagesAt(cut: number, options: ImagesAtOptions = {}): Map<string, MemoryDevice> {
    if (!Number.isSafeInteger(cut) || cut < 0 || cut > this.log.length) {
      throw outOfRange(`crash recorder: cut ${cut} is outside 0..${this.log.length}`)
    }
    const mode = options.unflushed ?? 'drop'
    const random = new Random(options.seed ?? 0)
    const prefix = this.log.slice(0, cut)
    const images = new Map<string, MemoryDevice>()
    // Registration order keeps the random draws, and so the result, deterministic for a seed.
    for (const [name, start] of this.initial) {
      const image = start.clone({ name, readOnly: false })
      const mine = prefix.filter((event) => event.device === name)
      let lastFlush = -1
      mine.forEach((event, i) => {
        if (event.kind === 'flush') lastFlush = i
      })
      const durable = mine.slice(0, lastFlush + 1)
      const volatile = mine.slice(lastFlush + 1)
      const kept = volatile.filter(() => mode === 'keep' || (mode === 'random' && random.chance(0.5)))
      let torn: CrashEvent | undefined
      if (options.tear) {
        for (const event of kept) if (event.kind === 'write') torn = event
      }
      for (const event of durable) apply(image, event)
      for (const event of kept) {
        if (event === torn) applyTorn(image, event, random)
        else apply(image, event)
      }
      images.set(name, image)
    }
    return images
  }
}

function apply(image: MemoryDevice, event: CrashEvent): void {
  switch (event.kind) {
    case 'write': {
      const data = event.data as Uint8Array
      writeClipped(image, data, event.offset as number)
      break
    }
    case 'discard': {
      // A dropped grow can leave a kept discard partly beyond the image; the lost part is moot.
      const offset = event.offset as number
      const end = Math.min(offset + (event.length as number), image.sizeBytes)
      if (end > offset) image.discardSync(offset, end - offset)
      break
    }
    case 'resize':
      image.resizeSync(event.sizeBytes as number)
      break
    case 'flush':
      break
  }
}

function writeClipped(image: MemoryDevice, data: Uint8Array, offset: number): void {
  const end = Math.min(offset + data.length, image.sizeBytes)
  if (end > offset) image.writeSync(data.subarray(0, end - offset), offset)
}

// Disks tear at sector boundaries of the device, not of the request, so split on absolute offsets.
function applyTorn(image: MemoryDevice, event: CrashEvent, random: Random): void {
  const data = event.data as Uint8Array
  const offset = event.offset as number
  const pieces: number[] = []
  for (let pos = offset; pos < offset + data.length; ) {
    const next = Math.min((Math.floor(pos / SECTOR_BYTES) + 1) * SECTOR_BYTES, offset + data.length)
    pieces.push(next - offset)
    pos = next
  }
  const keep = random.int(pieces.length)
  if (keep === 0) return
  writeClipped(image, data.subarray(0, pieces[keep - 1] as number), offset)
}
