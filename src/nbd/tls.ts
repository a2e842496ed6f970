/**
 * TLS for NBD_OPT_STARTTLS: X.509 certificates and/or pre-shared keys.
 *
 * PSK keys use the nbdkit/qemu psk-file format: one `username:hexkey` per line (the format
 * GnuTLS's psktool writes), so the same file works with `nbdkit --tls-psk` and libnbd's
 * `tls-psk-file`. Certificates follow nbdkit's `--tls-certificates=DIR` layout
 * (server-cert.pem, server-key.pem, optional ca-cert.pem).
 *
 * Who gets in (see docs/security.md, "TLS: who is authenticated"):
 * - PSK configured: clients that prove a key from the psk file; with a CA verifying client
 *   certificates, also clients with a certificate the CA signed. Nobody else, even though a
 *   server certificate would let an anonymous client finish a handshake.
 * - X.509 with a CA and verifyPeer (the default when a CA is given, as qemu-nbd): clients with a
 *   certificate the CA signed.
 * - X.509 without client verification: any client; only the server is authenticated.
 * The handshake refuses what it can; every TLS client is then checked once more by one function
 * (authenticatePeer), so no combination of options can let an unauthenticated client through.
 */
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { constants as cryptoConstants } from 'node:crypto'
import tls from 'node:tls'
import type { Socket } from 'node:net'
import { badArgument } from '../errors.js'
import { parsePskFile } from '../protocol/nbd/psk-file.js'

export type TlsMode = 'off' | 'allow' | 'require'

export interface NbdTlsOptions {
  /** off: STARTTLS refused. allow: clients choose. require: nothing but STARTTLS/ABORT before TLS. */
  readonly mode: TlsMode
  /** PEM certificate chain and private key for X.509. */
  readonly cert?: string | Buffer
  readonly key?: string | Buffer
  /** PEM CA bundle that client certificates must chain to. */
  readonly ca?: string | Buffer
  /** Request and verify client certificates against `ca`. Default: true when a CA is given. */
  readonly verifyPeer?: boolean
  /** PSK identities to keys. */
  readonly psk?: ReadonlyMap<string, Uint8Array>
}

export interface NbdTlsFiles {
  readonly mode: TlsMode
  /** Directory holding server-cert.pem, server-key.pem and optionally ca-cert.pem. */
  readonly certificatesDir?: string
  readonly certFile?: string
  readonly keyFile?: string
  readonly caFile?: string
  /** nbdkit/qemu psk file: `username:hexkey` lines. */
  readonly pskFile?: string
  readonly verifyPeer?: boolean
}

export { parsePskFile }

async function readOptional(path: string | undefined): Promise<Buffer | undefined> {
  if (path === undefined) return undefined
  try {
    return await readFile(path)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    throw err
  }
}

/** Reads certificate and PSK files into NbdTlsOptions. */
export async function loadTlsFiles(files: NbdTlsFiles): Promise<NbdTlsOptions> {
  const dir = files.certificatesDir
  const certPath = files.certFile ?? (dir ? join(dir, 'server-cert.pem') : undefined)
  const keyPath = files.keyFile ?? (dir ? join(dir, 'server-key.pem') : undefined)
  const caPath = files.caFile ?? (dir ? join(dir, 'ca-cert.pem') : undefined)
  const [cert, key, ca] = await Promise.all([
    certPath === undefined ? undefined : readFile(certPath),
    keyPath === undefined ? undefined : readFile(keyPath),
    // The CA file is optional even inside a certificates directory.
    files.caFile === undefined ? readOptional(caPath) : readFile(files.caFile),
  ])
  const psk = files.pskFile === undefined ? undefined : parsePskFile(await readFile(files.pskFile, 'utf8'))
  return {
    mode: files.mode,
    ...(cert ? { cert } : {}),
    ...(key ? { key } : {}),
    ...(ca ? { ca } : {}),
    ...(psk ? { psk } : {}),
    ...(files.verifyPeer === undefined ? {} : { verifyPeer: files.verifyPeer }),
  }
}

/** Who a TLS client turned out to be, for logs. */
export type TlsPeer = { readonly kind: 'psk'; readonly identity: string } | { readonly kind: 'certificate'; readonly subject: string } | { readonly kind: 'anonymous' }

export function describePeer(peer: TlsPeer): string {
  if (peer.kind === 'psk') return `psk identity '${peer.identity}'`
  if (peer.kind === 'certificate') return `certificate '${peer.subject}'`
  return 'anonymous client'
}

export interface TlsHandshakeHandlers {
  /** The handshake finished and the client may negotiate exports over `socket`. */
  readonly secure: (socket: tls.TLSSocket, peer: TlsPeer) => void
  /** The handshake failed or the client is not one this server admits; close the connection. */
  readonly refused: (reason: string) => void
}

/** Validated, ready-to-use TLS settings shared by every connection. */
export interface TlsContext {
  readonly mode: TlsMode
  /** Who gets in, for the startup log; `anonymous` when that includes clients nobody authenticated. */
  readonly admits: { readonly who: string; readonly anonymous: boolean }
  /** Runs the server side of the TLS handshake over `socket` and reports exactly once. */
  handshake(socket: Socket, handlers: TlsHandshakeHandlers): void
}

/**
 * TLS 1.3 suites offered when PSK is configured: only SHA-256 ones. OpenSSL gives the key from a
 * PSK callback (the only PSK API Node has) to TLS 1.3 as a SHA-256 key; if it picks a SHA-384
 * suite it silently drops the client's PSK and falls back to a certificate handshake, which a
 * PSK-only client cannot do ("Insufficient credentials").
 */
const TLS13_PSK_SUITES = 'TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256'
/** TLS 1.2 PSK suites (gnutls clients offer these; the NBD spec requires 1.2 to work). */
const TLS12_PSK_SUITES = 'ECDHE-PSK-CHACHA20-POLY1305:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256'
/**
 * Node's default TLS 1.2 certificate suites. Its `!PSK` must go: OpenSSL's `!` deletes for good,
 * so it would remove the PSK suites wherever they appear in the list.
 */
const TLS12_CERT_SUITES = tls.DEFAULT_CIPHERS.split(':')
  .filter((suite) => suite !== '!PSK' && !suite.startsWith('TLS_'))
  .join(':')

function cipherList(psk: boolean, hasCert: boolean): string {
  if (!psk) return tls.DEFAULT_CIPHERS
  return [TLS13_PSK_SUITES, TLS12_PSK_SUITES, ...(hasCert ? [TLS12_CERT_SUITES] : [])].join(':')
}

function describeClientAuthentication(options: NbdTlsOptions): TlsContext['admits'] {
  const psk = options.psk !== undefined && options.psk.size > 0
  const verify = options.verifyPeer ?? options.ca !== undefined
  const tlsWho =
    psk && verify
      ? 'TLS clients with a key from the psk file or a certificate signed by the CA'
      : psk
        ? 'only TLS clients with a key from the psk file'
        : verify
          ? 'only TLS clients with a certificate signed by the CA'
          : 'any TLS client (client certificates are not verified: no CA)'
  if (options.mode === 'allow') return { who: `${tlsWho}, and any plaintext client (TLS is optional)`, anonymous: true }
  return { who: tlsWho, anonymous: !psk && !verify }
}

/**
 * The one decision on whether a TLS client is admitted. PSK counts only when the handshake
 * really used the key the callback handed out: in TLS 1.3 that is an external-PSK handshake
 * (reported as a resumed session; tickets are off, so nothing else resumes), in TLS 1.2 a PSK
 * cipher suite. A client certificate counts only when Node verified it against the CA.
 */
function authenticatePeer(socket: tls.TLSSocket, pskIdentity: string | undefined, policy: { psk: boolean; verifyPeer: boolean }): TlsPeer | string {
  if (policy.psk && pskIdentity !== undefined) {
    const usedPsk = socket.getProtocol() === 'TLSv1.3' ? socket.isSessionReused() : /PSK/.test(socket.getCipher().name)
    if (usedPsk) return { kind: 'psk', identity: pskIdentity }
  }
  if (policy.verifyPeer) {
    if (socket.authorized) return { kind: 'certificate', subject: certificateSubject(socket) }
    const why = socket.authorizationError ? String(socket.authorizationError) : 'no client certificate'
    return policy.psk ? `neither a PSK nor a verified client certificate (${why})` : `client certificate not verified (${why})`
  }
  if (policy.psk) return 'client did not authenticate with a PSK'
  return { kind: 'anonymous' }
}

/** OpenSSL's reason ("peer did not return a certificate") without its multi-line error dump. */
function handshakeFailure(err: Error): string {
  const reason = (err as { reason?: unknown }).reason
  return `TLS handshake failed: ${typeof reason === 'string' ? reason : err.message.split('\n')[0]}`
}

function certificateSubject(socket: tls.TLSSocket): string {
  const cert = socket.getPeerX509Certificate()
  return cert ? cert.subject.replace(/\n/g, ', ') : 'unknown'
}

export function createTlsContext(options: NbdTlsOptions | undefined): TlsContext | null {
  if (options === undefined || options.mode === 'off') return null
  const hasCert = options.cert !== undefined && options.key !== undefined
  const psk = options.psk !== undefined && options.psk.size > 0 ? options.psk : undefined
  if (!hasCert && psk === undefined) {
    throw badArgument(`tls mode '${options.mode}' needs a certificate and key, or PSK keys`)
  }
  if ((options.cert === undefined) !== (options.key === undefined)) throw badArgument('tls needs both a certificate and its key')
  const verifyPeer = options.verifyPeer ?? options.ca !== undefined
  if (verifyPeer && options.ca === undefined) throw badArgument('verifying client certificates needs a CA')
  // Without a server certificate there is no certificate handshake in which to ask for one.
  if (verifyPeer && !hasCert) throw badArgument('verifying client certificates needs a server certificate and key')
  const policy = { psk: psk !== undefined, verifyPeer }
  const pskIdentities = new WeakMap<tls.TLSSocket, string>()
  const serverOptions: tls.TlsOptions = {
    ...(hasCert ? { cert: options.cert, key: options.key } : {}),
    ...(options.ca ? { ca: options.ca } : {}),
    ciphers: cipherList(psk !== undefined, hasCert),
    minVersion: 'TLSv1.2',
    // A resumed session skips both the PSK callback and certificate verification, so every
    // connection authenticates afresh.
    secureOptions: cryptoConstants.SSL_OP_NO_TICKET,
    requestCert: verifyPeer,
    // A PSK client has no certificate, so with PSK the certificate check is left to authenticatePeer.
    rejectUnauthorized: verifyPeer && psk === undefined,
    ...(psk
      ? {
          pskCallback: (socket: tls.TLSSocket, identity: string) => {
            const key = psk.get(identity)
            if (key === undefined) return null
            pskIdentities.set(socket, identity)
            return key
          },
        }
      : {}),
  }
  // Validates the material now (bad PEM, mismatched key), not at the first client.
  tls.createSecureContext(serverOptions)
  return {
    mode: options.mode,
    admits: describeClientAuthentication(options),
    handshake(socket, handlers) {
      // A tls.Server, never listening, runs each handshake: only its connection path applies
      // Node's client-certificate verification (a bare server-side TLSSocket never checks it).
      const server = tls.createServer(serverOptions)
      let reported = false
      server.on('secureConnection', (secure: tls.TLSSocket) => {
        if (reported) return
        reported = true
        const peer = authenticatePeer(secure, pskIdentities.get(secure), policy)
        if (typeof peer === 'string') {
          secure.destroy()
          handlers.refused(peer)
        } else {
          handlers.secure(secure, peer)
        }
      })
      server.on('tlsClientError', (err: Error, secure: tls.TLSSocket) => {
        if (reported) return
        reported = true
        // Node drops a client whose certificate failed verification with a bare hang-up.
        const unverified = secure.authorizationError
        handlers.refused(unverified ? `client certificate not verified (${String(unverified)})` : handshakeFailure(err))
      })
      server.emit('connection', socket)
    },
  }
}
