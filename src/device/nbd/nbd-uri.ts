/**
 * NBD URIs as the NBD project's doc/uri.md and libnbd define them:
 *
 *   nbd://HOST[:PORT]/EXPORT            plaintext TCP (port 10809 by default)
 *   nbds://[USER@]HOST[:PORT]/EXPORT    TLS required
 *   nbd+unix:///EXPORT?socket=PATH      Unix socket (nbds+unix:// with TLS)
 *
 * The path minus its leading '/' is the export name (percent-decoded; empty is the default
 * export). Query parameters, as libnbd reads them: `socket`, `tls-psk-file` (user:hexkey lines,
 * the identity is USER or `tls-username`, else the login name), `tls-certificates` (a directory
 * with ca-cert.pem and optionally client-cert.pem/client-key.pem), `tls-verify-peer` (default
 * true). Unknown parameters are refused, so a typo never silently drops a security setting, and
 * so is a password in the user part: a URI is stored and shown, so no secret may live in it.
 */
import { userInfo } from 'node:os'
import { badArgument } from '../../errors.js'

export const NBD_DEFAULT_PORT = 10809

export type NbdTransport = { readonly kind: 'tcp'; readonly host: string; readonly port: number } | { readonly kind: 'unix'; readonly path: string }

export interface NbdClientTlsSettings {
  /** Name the server's certificate is checked against (the URI's host). */
  readonly serverName: string
  readonly pskFile: string | null
  readonly username: string
  readonly certificatesDir: string | null
  readonly verifyPeer: boolean
}

export interface NbdUri {
  /** The URI as given, for messages (no secrets live in it: keys are in files). */
  readonly text: string
  readonly transport: NbdTransport
  readonly exportName: string
  readonly tls: NbdClientTlsSettings | null
}

const SCHEMES = new Set(['nbd:', 'nbds:', 'nbd+unix:', 'nbds+unix:'])
const KNOWN_QUERY = new Set(['socket', 'tls-psk-file', 'tls-certificates', 'tls-verify-peer', 'tls-username'])

/** True when `text` looks like an NBD URI rather than a file path. */
export function isNbdUri(text: string): boolean {
  return /^nbds?(\+unix)?:\/\//i.test(text)
}

/**
 * `nbds+unix://USER@/EXPORT?socket=…` names a TLS user with no host, which libnbd accepts but
 * WHATWG URL refuses (credentials need a host): the user is lifted out before parsing.
 */
function splitUnixUser(text: string): { rest: string; user: string | null } {
  const m = /^(nbds?\+unix:\/\/)([^@/?#]*)@(?=[/?#]|$)/i.exec(text)
  return m ? { rest: `${m[1]}${text.slice(m[0].length)}`, user: m[2] as string } : { rest: text, user: null }
}

export function parseNbdUri(text: string): NbdUri {
  const { rest, user: unixUser } = splitUnixUser(text)
  if (unixUser !== null && unixUser.includes(':')) throw badArgument(`an NBD URI must not carry a password (keys go in a file: ?tls-psk-file=PATH)`)
  let url: URL
  try {
    url = new URL(rest)
  } catch {
    throw badArgument(`'${text}' is not a valid NBD URI`)
  }
  const scheme = url.protocol.toLowerCase()
  if (!SCHEMES.has(scheme)) throw badArgument(`'${text}': scheme must be nbd://, nbds://, nbd+unix:// or nbds+unix://`)
  // A URI is recorded in volume manifests and shown in listings: keys live in files it names.
  if (url.password !== '') throw badArgument(`an NBD URI must not carry a password (keys go in a file: ?tls-psk-file=PATH)`)
  for (const key of url.searchParams.keys()) {
    if (!KNOWN_QUERY.has(key)) throw badArgument(`'${text}': unknown query parameter '${key}'`)
  }
  const query = (key: string) => url.searchParams.get(key)
  const useTls = scheme.startsWith('nbds')
  const unix = scheme.endsWith('+unix:')
  let exportName: string
  try {
    exportName = decodeURIComponent(url.pathname.replace(/^\//, ''))
  } catch {
    throw badArgument(`'${text}': the export name is not valid percent-encoding`)
  }
  let transport: NbdTransport
  let serverName = 'localhost'
  if (unix) {
    if (url.host !== '') throw badArgument(`'${text}': a Unix-socket URI has no host (nbd+unix:///EXPORT?socket=PATH)`)
    const path = query('socket')
    if (path === null || path === '') throw badArgument(`'${text}': nbd+unix URIs need ?socket=PATH`)
    transport = { kind: 'unix', path }
  } else {
    if (query('socket') !== null) throw badArgument(`'${text}': ?socket= is only for nbd+unix:// URIs`)
    const host = url.hostname.replace(/^\[(.*)\]$/, '$1')
    if (host === '') throw badArgument(`'${text}': no host`)
    const port = url.port === '' ? NBD_DEFAULT_PORT : Number(url.port)
    transport = { kind: 'tcp', host, port }
    serverName = host
  }
  const tlsKeys = ['tls-psk-file', 'tls-certificates', 'tls-verify-peer', 'tls-username'].filter((key) => query(key) !== null)
  if (!useTls && tlsKeys.length > 0) throw badArgument(`'${text}': ${tlsKeys[0]} needs a TLS scheme (nbds:// or nbds+unix://)`)
  let tls: NbdClientTlsSettings | null = null
  if (useTls) {
    const verify = query('tls-verify-peer')
    if (verify !== null && !['true', 'false', '1', '0', 'yes', 'no'].includes(verify.toLowerCase())) {
      throw badArgument(`'${text}': tls-verify-peer must be true or false`)
    }
    const uriUser = unixUser ?? url.username
    let username: string
    try {
      username = query('tls-username') ?? (uriUser !== '' ? decodeURIComponent(uriUser) : userInfo().username)
    } catch {
      throw badArgument(`'${text}': the user name is not valid percent-encoding`)
    }
    tls = {
      serverName,
      pskFile: query('tls-psk-file'),
      username,
      certificatesDir: query('tls-certificates'),
      verifyPeer: verify === null || ['true', '1', 'yes'].includes(verify.toLowerCase()),
    }
  }
  return { text, transport, exportName, tls }
}
