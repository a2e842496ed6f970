/**
 * One way to open "a disk" by its address: an NBD URI (nbd://, nbds://, nbd+unix://,
 * nbds+unix://) opens an NbdClientDevice, anything else is a file path. Volumes record device
 * addresses and reopen them through here, so an origin or COW may live on any NBD server.
 *
 * Design notes:
 * - Every kind of address that is not a file path is one entry of URI_KINDS: how to recognise
 *   it, how to check it (and say which storage it names), how to open it. Nothing else in
 *   blocksnap tests an address's scheme, so a new kind works everywhere once it is added here.
 * - A URI's identity is what two addresses of the same storage share (the server and the
 *   export, not how TLS is set up), hashed so it is a safe file name for the origin registry.
 */
import { createHash } from 'node:crypto'
import { normalize } from 'node:path'
import type { BlockDevice } from './block-device.js'
import { FileDevice } from './file-device.js'
import { NbdClientDevice, type NbdClientOptions } from './nbd-client-device.js'
import { isNbdUri, parseNbdUri } from './nbd/nbd-uri.js'
import { RbdDevice } from './rbd-device.js'
import { cephConfOf, isRbdAddress, parseRbdAddress } from './rbd/rbd-address.js'
import { badArgument } from '../errors.js'

export interface OpenDeviceOptions {
  readonly readOnly?: boolean
  /** Passed on when the address is an NBD URI. */
  readonly nbd?: Omit<NbdClientOptions, 'readOnly'>
}

interface UriKind {
  /** True when `address` is meant as this kind of URI (checked or not). */
  matches(address: string): boolean
  /** Checks `address` (SNAP_BAD_ARGUMENT when malformed); returns what names its storage. */
  storage(address: string): string
  open(address: string, options: OpenDeviceOptions): Promise<BlockDevice>
}

const NBD_KIND: UriKind = {
  matches: isNbdUri,
  storage(address) {
    const uri = parseNbdUri(address)
    const where = uri.transport.kind === 'unix' ? `unix:${normalize(uri.transport.path)}` : `tcp:${uri.transport.host.toLowerCase()}:${uri.transport.port}`
    return `nbd ${where} ${JSON.stringify(uri.exportName)}`
  },
  open: (address, options) => NbdClientDevice.open(address, { ...options.nbd, readOnly: options.readOnly === true }),
}

/** An image is its pool and name in the cluster its ceph.conf names (not the client id). */
const RBD_KIND: UriKind = {
  matches: isRbdAddress,
  storage(address) {
    const rbd = parseRbdAddress(address)
    return `rbd ${normalize(cephConfOf(rbd))} ${rbd.pool}/${rbd.image}`
  },
  open: (address, options) => RbdDevice.open(address, { readOnly: options.readOnly === true }),
}

const URI_KINDS: readonly UriKind[] = [NBD_KIND, RBD_KIND]

export { isNbdUri }

/** True when `address` names a device by URI rather than by file path. */
export function isDeviceUri(address: string): boolean {
  return URI_KINDS.some((kind) => kind.matches(address))
}

/**
 * Refuses (SNAP_BAD_ARGUMENT) an address written as a URI (`scheme://…`) of no kind blocksnap
 * knows, which would otherwise be taken for a relative file path (`nbd+unx://…` made a file).
 */
export function checkNotUnknownUri(address: string): void {
  const scheme = /^([A-Za-z][A-Za-z0-9+.-]*):\/\//.exec(address)?.[1]
  if (scheme !== undefined && !isDeviceUri(address)) {
    throw badArgument(`'${address}' is not a device address: unknown URI scheme '${scheme}:' (known: nbd://, nbds://, nbd+unix://, nbds+unix://)`)
  }
}

/**
 * Checks device URI `address` (SNAP_BAD_ARGUMENT, one line, when it is malformed or carries a
 * secret inline) and returns its identity: equal for two addresses of the same storage.
 */
export function deviceUriIdentity(address: string): string {
  const kind = URI_KINDS.find((k) => k.matches(address))
  if (kind === undefined) throw new TypeError(`${address} is not a device URI`)
  return `uri ${createHash('sha256').update(kind.storage(address)).digest('hex').slice(0, 32)}`
}

export async function openDevice(address: string, options: OpenDeviceOptions = {}): Promise<BlockDevice> {
  const kind = URI_KINDS.find((k) => k.matches(address))
  if (kind !== undefined) return kind.open(address, options)
  return FileDevice.open(address, { readOnly: options.readOnly === true })
}
