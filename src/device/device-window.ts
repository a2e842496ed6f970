/**
 * The first `sizeBytes` of another device, as a device of its own: a COW given a fixed size
 * (`snapshot --cow DEV --cow-size SIZE`) on a device larger than that. The store then sees
 * exactly the size the user chose, as the kernel sees an LV of that size.
 *
 * Closing the window closes the device under it: the window is its only user.
 */
import { BaseBlockDevice, type BlockDevice, type DeviceCapabilities } from './block-device.js'
import { outOfRange } from '../errors.js'

export class DeviceWindow extends BaseBlockDevice {
  readonly capabilities: DeviceCapabilities
  private readonly inner: BlockDevice

  /** `name` names the device in errors (its address). */
  constructor(inner: BlockDevice, sizeBytes: number, name: string) {
    if (sizeBytes > inner.sizeBytes) throw outOfRange(`${name}: ${sizeBytes} bytes do not fit a device of ${inner.sizeBytes} bytes`)
    super(sizeBytes, name)
    this.inner = inner
    this.capabilities = { ...inner.capabilities, resize: false }
  }

  protected _readInto(target: Uint8Array, offset: number): Promise<void> {
    return this.inner.readInto(target, offset)
  }

  protected _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    return this.inner.write(data, offset, { fua })
  }

  protected _flush(): Promise<void> {
    return this.inner.flush()
  }

  protected override _discard(offset: number, length: number): Promise<void> {
    return this.inner.discard(offset, length)
  }

  protected override _close(): Promise<void> {
    return this.inner.close()
  }
}
