/**
 * One way to open "a disk" by its address: an NBD URI (nbd://, nbds://, nbd+unix://,
 * nbds+unix://) opens an NbdClientDevice, anything else is a file path. Volumes record device
 * addresses and reopen them through here, so an origin or COW may live on any NBD server.
 */
import type { BlockDevice } from './block-device.js'
import { FileDevice } from './file-device.js'
import { NbdClientDevice, type NbdClientOptions } from './nbd-client-device.js'
import { isNbdUri } from './nbd/nbd-uri.js'
import { RbdDevice, isRbdAddress } from './rbd-device.js'

export interface OpenDeviceOptions {
  readonly readOnly?: boolean
  /** Passed on when the address is an NBD URI. */
  readonly nbd?: Omit<NbdClientOptions, 'readOnly'>
}

export { isNbdUri }

export async function openDevice(address: string, options: OpenDeviceOptions = {}): Promise<BlockDevice> {
  const readOnly = options.readOnly === true
  if (isNbdUri(address)) return NbdClientDevice.open(address, { ...options.nbd, readOnly })
  if (isRbdAddress(address)) return RbdDevice.open(address, { readOnly })
  return FileDevice.open(address, { readOnly })
}
