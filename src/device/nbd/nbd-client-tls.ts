/**
 * The TLS material an nbds:// URI names, loaded into node:tls connect options: a PSK from a psk
 * file (the identity is the URI's user), or X.509 with the CA and an optional client
 * certificate from a directory laid out as libnbd's (ca-cert.pem, client-cert.pem,
 * client-key.pem).
 */
import { readFile } from 'node:fs/promises'
import { isIP } from 'node:net'
import { join } from 'node:path'
import type tls from 'node:tls'
import { badArgument } from '../../errors.js'
import { parsePskFile } from '../../protocol/nbd/psk-file.js'
import type { NbdUri } from './nbd-uri.js'

/**
 * PSK suites: TLS 1.3 SHA-256 ones (OpenSSL hands a callback's key to 1.3 as a SHA-256 key) and
 * the TLS 1.2 PSK suites gnutls servers (nbdkit, qemu-nbd) offer.
 */
const PSK_SUITES = [
  'TLS_AES_128_GCM_SHA256',
  'TLS_CHACHA20_POLY1305_SHA256',
  'ECDHE-PSK-CHACHA20-POLY1305',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
  'PSK-CHACHA20-POLY1305',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
].join(':')

async function readOptional(path: string): Promise<Buffer | undefined> {
  try {
    return await readFile(path)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    throw err
  }
}

/** Connect options for the URI's TLS settings, or null for a plaintext URI. */
export async function loadClientTls(uri: NbdUri): Promise<tls.ConnectionOptions | null> {
  const settings = uri.tls
  if (settings === null) return null
  const base: tls.ConnectionOptions = {
    // The certificate is checked against `host` (DNS name or IP); SNI takes names only.
    host: settings.serverName,
    ...(isIP(settings.serverName) === 0 ? { servername: settings.serverName } : {}),
    rejectUnauthorized: settings.verifyPeer,
  }
  if (settings.pskFile !== null) {
    let text: string
    try {
      text = await readFile(settings.pskFile, 'utf8')
    } catch (err) {
      throw badArgument(`${uri.text}: cannot read tls-psk-file: ${(err as Error).message}`)
    }
    const key = parsePskFile(text).get(settings.username)
    if (key === undefined) throw badArgument(`${uri.text}: the psk file has no key for '${settings.username}'`)
    const identity = settings.username
    return { ...base, ciphers: PSK_SUITES, pskCallback: () => ({ identity, psk: key }), checkServerIdentity: () => undefined }
  }
  const dir = settings.certificatesDir
  if (dir === null) return base // system CAs, no client certificate
  const [ca, cert, key] = await Promise.all([
    readOptional(join(dir, 'ca-cert.pem')),
    readOptional(join(dir, 'client-cert.pem')),
    readOptional(join(dir, 'client-key.pem')),
  ])
  if ((cert === undefined) !== (key === undefined)) throw badArgument(`${uri.text}: ${dir} has a client certificate without its key, or a key without its certificate`)
  return { ...base, ...(ca ? { ca } : {}), ...(cert ? { cert } : {}), ...(key ? { key } : {}) }
}
