/**
 * What went wrong with a client, for the server's owner (serve turns each into a `client-error`
 * event). Reported on the error paths only; request failures once per connection and errno, so
 * a client retrying a failing request cannot flood the owner.
 */
export type NbdClientFaultKind = 'protocol' | 'handshake-timeout' | 'tls' | 'request' | 'connection-limit' | 'internal'

export interface NbdClientFault {
  readonly kind: NbdClientFaultKind
  /** Who: `nbd conn#N ADDRESS:PORT` (or the remote address for a refused connection). */
  readonly client: string
  /** The export in use, null before transmission. */
  readonly export: string | null
  readonly message: string
  /** For kind 'request': the command (NBD_CMD_…) and the errno the client got (EIO, ENOSPC, …). */
  readonly command?: string
  readonly errno?: string
}

export type NbdFaultListener = (fault: NbdClientFault) => void
