/**
 * A BlockDevice on a Ceph RBD image, addressed `rbd:POOL/IMAGE?conf=/abs/ceph.conf&id=NAME`.
 *
 * Design notes:
 * - The image is reached through a private qemu-nbd gateway (rbd/rbd-gateway.ts) and an
 *   NbdClientDevice on its unix socket; this class only ties their lifetimes together, so the
 *   NBD mapping (FUA, WRITE_ZEROES for discard, pipelining) is the client's.
 * - The gateway is local and private: a lost connection means the gateway died, and it is not
 *   coming back, so the client gives up after a short retry instead of backing off for seconds.
 * - The image's size is fixed: `rbd resize` is an administrator's act, not a COW's growth.
 */
import { ioError } from '../errors.js'
import { BaseBlockDevice, type DeviceCapabilities } from './block-device.js'
import { NbdClientDevice } from './nbd-client-device.js'
import { type RbdAddress, parseRbdAddress } from './rbd/rbd-address.js'
import { RbdGateway, type RbdGatewayOptions } from './rbd/rbd-gateway.js'

export { isRbdAddress } from './rbd/rbd-address.js'

export interface RbdDeviceOptions extends Omit<RbdGatewayOptions, 'sharedConnections'> {
  /** NBD connections to the gateway (it allows up to 4; default 1). */
  readonly connections?: number
}

const MAX_CONNECTIONS = 4

export class RbdDevice extends BaseBlockDevice {
  readonly capabilities: DeviceCapabilities
  readonly address: RbdAddress
  private readonly gateway: RbdGateway
  private readonly client: NbdClientDevice

  private constructor(address: RbdAddress, gateway: RbdGateway, client: NbdClientDevice) {
    super(client.sizeBytes, address.text)
    this.address = address
    this.gateway = gateway
    this.client = client
    this.capabilities = { ...client.capabilities, resize: false }
  }

  /** Starts a gateway for the image at `address` and connects to it. */
  static async open(address: string, options: RbdDeviceOptions = {}): Promise<RbdDevice> {
    const parsed = parseRbdAddress(address)
    const connections = Math.min(MAX_CONNECTIONS, Math.max(1, Math.floor(options.connections ?? 1)))
    const gateway = await RbdGateway.start(parsed, { ...options, sharedConnections: MAX_CONNECTIONS })
    try {
      const client = await NbdClientDevice.open(gateway.uri, {
        readOnly: options.readOnly === true,
        connections,
        reconnect: { attempts: 2, initialDelayMs: 50, maxDelayMs: 200 },
      })
      return new RbdDevice(parsed, gateway, client)
    } catch (err) {
      await gateway.stop()
      throw err
    }
  }

  /** PID of the qemu-nbd gateway: this device's RADOS client (what a lease or a fence names). */
  get gatewayPid(): number {
    return this.gateway.pid
  }

  protected _readInto(target: Uint8Array, offset: number): Promise<void> {
    return this.guard(this.client.readInto(target, offset))
  }

  protected _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    return this.guard(this.client.write(data, offset, { fua }))
  }

  protected _flush(): Promise<void> {
    return this.guard(this.client.flush())
  }

  protected override _discard(offset: number, length: number): Promise<void> {
    return this.guard(this.client.discard(offset, length))
  }

  /** A request that failed because the gateway died says so, not "socket unreachable". */
  private async guard(request: Promise<void>): Promise<void> {
    try {
      await request
    } catch (err) {
      if (this.gateway.alive) throw err
      throw ioError(`${this.address.text}: the qemu-nbd gateway (PID ${this.gateway.pid}) ${this.gateway.exitDescription()}`, err)
    }
  }

  protected override async _close(): Promise<void> {
    try {
      await this.client.close()
    } finally {
      await this.gateway.stop()
    }
  }
}
