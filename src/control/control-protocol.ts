/**
 * Control socket protocol: one JSON object per line in each direction over a Unix socket in the
 * volume directory. Requests {id, op, args}; replies {id, ok: true, result} or
 * {id, ok: false, error: {code, message}}. Binary payloads travel as base64 strings.
 */
export const CONTROL_SOCKET = 'control.sock'

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
