/**
 * What the server tells an observer about each answered request (metrics). The observer is
 * optional: without one, a request costs one null check and nothing else.
 */
import { Command } from '../protocol/nbd/constants.js'

/** A request's command as metrics name it (WRITE_ZEROES is `zero`). */
export type NbdOp = 'read' | 'write' | 'flush' | 'trim' | 'zero' | 'block_status' | 'cache'

export const NBD_OPS: readonly NbdOp[] = ['read', 'write', 'flush', 'trim', 'zero', 'block_status', 'cache']

const OP_OF_COMMAND: ReadonlyMap<number, NbdOp> = new Map([
  [Command.READ, 'read'],
  [Command.WRITE, 'write'],
  [Command.FLUSH, 'flush'],
  [Command.TRIM, 'trim'],
  [Command.WRITE_ZEROES, 'zero'],
  [Command.BLOCK_STATUS, 'block_status'],
  [Command.CACHE, 'cache'],
])

/** The op of a command type; null for DISC and commands the server does not know. */
export function opOfCommand(type: number): NbdOp | null {
  return OP_OF_COMMAND.get(type) ?? null
}

export interface NbdRequestObserver {
  /**
   * A request was answered (successfully or with an error): `seconds` from its dispatch to its
   * reply being queued on the socket. Called synchronously; must not throw.
   */
  requestDone(exportName: string, op: NbdOp, seconds: number): void
}
