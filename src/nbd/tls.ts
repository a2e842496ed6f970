/**
 * TLS for NBD_OPT_STARTTLS: X.509 certificates and/or pre-shared keys.
 *
 * PSK keys use the nbdkit/qemu psk-file format: one `username:hexkey` per line (the format
 * GnuTLS's psktool writes), so the same file works with `nbdkit --tls-psk` and libnbd's
 * `tls-psk-file`. Certificates follow nbdkit's `--tls-certificates=DIR` layout
 * (server-cert.pem, server-key.pem, optional ca-cert.pem).
 *
 * PSK is a TLS 1.2 feature in Node (OpenSSL only offers external PSK to TLS 1.3 through APIs Node
 * does not expose), so a PSK-only configuration caps the version at 1.2, which the NBD spec
 * requires to be supported anyway.
 */
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import tls from 'node:tls'
import type { Socket } from 'node:net'
import { badArgument } from '../errors.js'

export type TlsMode = 'off' | 'allow' | 'require'

export interface NbdTlsOptions {
  /** off: STARTTLS refused. allow: clients choose. require: nothing but STARTTLS/ABORT before TLS. */
  readonly mode: TlsMode
  /** PEM certificate chain and private key for X.509. */
  readonly cert?: string | Buffer
  readonly key?: string | Buffer
  /** PEM CA bundle; when given, client certificates are requested and verified. */
  readonly ca?: string | Buffer
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
}

/** Parses a psk file. Blank lines and lines starting with # are ignored. */
export function parsePskFile(text: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>()
  const lines = text.split(/\r?\n/)
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim()
    if (line === '' || line.startsWith('#')) continue
    const colon = line.lastIndexOf(':')
    const identity = line.slice(0, colon)
    const hex = line.slice(colon + 1)
    if (colon <= 0 || hex.length === 0 || hex.length % 2 !== 0 || !/^[0-9a-fA-F]+$/.test(hex)) {
      throw badArgument(`psk file line ${i + 1}: expected username:hexkey`)
    }
    keys.set(identity, Buffer.from(hex, 'hex'))
  }
  if (keys.size === 0) throw badArgument('psk file contains no keys')
  return keys
}

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
  }
}

/** Validated, ready-to-use TLS settings shared by every connection. */
export interface TlsContext {
  readonly mode: TlsMode
  upgrade(socket: Socket): tls.TLSSocket
}

const PSK_CIPHERS = 'PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256'

export function createTlsContext(options: NbdTlsOptions | undefined): TlsContext | null {
  if (options === undefined || options.mode === 'off') return null
  const hasCert = options.cert !== undefined && options.key !== undefined
  const psk = options.psk
  if (!hasCert && (psk === undefined || psk.size === 0)) {
    throw badArgument(`tls mode '${options.mode}' needs a certificate and key, or PSK keys`)
  }
  if ((options.cert === undefined) !== (options.key === undefined)) throw badArgument('tls needs both a certificate and its key')
  const secureContext = tls.createSecureContext({
    ...(hasCert ? { cert: options.cert, key: options.key } : {}),
    ...(options.ca ? { ca: options.ca } : {}),
    // With a certificate, keep Node's default suites and add PSK ones; PSK alone caps at 1.2.
    ciphers: psk ? (hasCert ? `${tls.DEFAULT_CIPHERS}:${PSK_CIPHERS}` : PSK_CIPHERS) : tls.DEFAULT_CIPHERS,
    minVersion: 'TLSv1.2',
    ...(psk && !hasCert ? { maxVersion: 'TLSv1.2' as const } : {}),
  })
  const requestCert = options.ca !== undefined
  return {
    mode: options.mode,
    upgrade(socket) {
      return new tls.TLSSocket(socket, {
        isServer: true,
        secureContext,
        requestCert,
        rejectUnauthorized: requestCert,
        ...(psk
          ? {
              pskCallback: (_socket: tls.TLSSocket, identity: string) => psk.get(identity) ?? null,
            }
          : {}),
      })
    },
  }
}
