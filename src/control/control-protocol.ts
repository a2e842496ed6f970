/**
 * Control socket protocol: one JSON object per line in each direction over a Unix socket in the
 * volume directory. Requests {id, op, args}; replies {id, ok: true, result} or
 * {id, ok: false, error: {code, message}}. Binary payloads travel as base64 strings.
 *
 * The first request is always HELLO carrying the identity of the volume the client means; the
 * server answers with the identity of the volume it owns and carries out nothing else on a
 * connection whose HELLO did not match. A socket reached by a wrong path (a symlink, a moved
 * directory) thus never takes a command meant for another volume.
 */
import { stat } from 'node:fs/promises'

export const CONTROL_SOCKET = 'control.sock'
export const HELLO = 'hello'

/**
 * Which volume a directory is: its device and inode, the same whatever path names it (no
 * manifest field needed, and a copied directory is another volume). `dir` is for messages only.
 */
export interface VolumeIdentity {
  readonly dev: string
  readonly ino: string
  readonly dir: string
}

export async function volumeIdentity(dir: string): Promise<VolumeIdentity> {
  const st = await stat(dir, { bigint: true })
  return { dev: st.dev.toString(), ino: st.ino.toString(), dir }
}

export function sameVolume(a: Pick<VolumeIdentity, 'dev' | 'ino'>, b: Pick<VolumeIdentity, 'dev' | 'ino'>): boolean {
  return a.dev === b.dev && a.ino === b.ino
}

export interface ControlRequest {
  readonly id: number
  readonly op: string
  readonly args: Record<string, unknown>
}

export type ControlReply =
  | { readonly id: number; readonly ok: true; readonly result: unknown }
  | { readonly id: number; readonly ok: false; readonly error: { readonly code: string; readonly message: string } }

/** Splits a stream into lines without losing a line cut across chunks. */
export function lineSplitter(onLine: (line: string) => void): (chunk: Buffer) => void {
  let pending = ''
  return (chunk) => {
    pending += chunk.toString('utf8')
    for (let nl = pending.indexOf('\n'); nl !== -1; nl = pending.indexOf('\n')) {
      const line = pending.slice(0, nl)
      pending = pending.slice(nl + 1)
      if (line.trim()) onLine(line)
    }
  }
}
