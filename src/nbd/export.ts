/**
 * What the server serves. The provider is consulted at every handshake (LIST, INFO, GO,
 * EXPORT_NAME, META_CONTEXT), so exports may appear and disappear while the server runs; a
 * connection already in transmission keeps the export object it was given, and learns that it
 * went away through `withdrawn()`.
 */
import type { BlockDevice } from '../device/block-device.js'

export interface BlockStatusExtent {
  /** Bytes, > 0. */
  readonly length: number
  /** Context-specific status bits. base:allocation: 1 = hole, 2 = reads as zero. */
  readonly flags: number
}

export interface NbdExport {
  readonly name: string
  readonly description?: string
  readonly device: BlockDevice
  /** Refuse write-type commands (EPERM) and advertise NBD_FLAG_READ_ONLY. */
  readonly readOnly: boolean
  /** Extra meta contexts beyond base:allocation, e.g. 'blocksnap:exceptions'. */
  readonly metaContexts?: readonly string[]
  /**
   * Extents for a context over [offset, offset + length), consecutive from `offset`. May cover
   * less than asked (the client asks again) or more (the server trims). Without this method,
   * base:allocation reports the whole range as allocated data (flags 0), which is always safe.
   */
  blockStatus?(context: string, offset: number, length: number): Promise<BlockStatusExtent[]>
  /**
   * Whether WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO may be honoured by discarding. Default:
   * the device can discard. A snapshot origin should say false, because zeroing there forces
   * copy-outs, which is exactly the slow path the flag asks us to refuse.
   */
  readonly fastZero?: boolean
  /**
   * Why the export has gone away (a snapshot removed or handed to a merge), or null while it is
   * served. Asked before every request: once gone, every command on a connection to it gets
   * ESHUTDOWN, so a client never reads stale data nor a stale block-status map.
   */
  withdrawn?(): string | null
}

/** An export that exists but may not be served to this client (NBD_REP_ERR_POLICY). */
export interface RefusedExport {
  readonly refused: string
}

export interface ExportProvider {
  /** Every export, in listing order; the first one is the default for the empty name. */
  list(): readonly NbdExport[]
  get(name: string): NbdExport | RefusedExport | undefined
}

/** A provider over a fixed list, for tests and simple CLIs. */
export function staticExports(exports: readonly NbdExport[]): ExportProvider {
  return {
    list: () => exports,
    get: (name) => exports.find((e) => e.name === name),
  }
}

export function isRefused(value: NbdExport | RefusedExport | undefined): value is RefusedExport {
  return value !== undefined && 'refused' in value
}
