/**
 * The psk file nbdkit, qemu and libnbd share: `identity:hexkey` lines. Read by the server (its
 * clients' keys) and by the client device (its own key).
 */
import { badArgument } from '../../errors.js'

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
