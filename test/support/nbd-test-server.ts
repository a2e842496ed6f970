/**
 * Starts an in-process NbdServer for tests and records its log lines, so tests can assert that
 * bad input produced a one-line log and never a stack trace.
 */
import { NbdServer, type NbdListenOptions, type NbdServerOptions, type NbdAddress } from '../../src/nbd/server.js'
import type { NbdLogger } from '../../src/nbd/logger.js'

export interface TestServer {
  readonly server: NbdServer
  readonly address: NbdAddress
  /** Port for TCP servers (0 for Unix). */
  readonly port: number
  readonly logs: string[]
  close(): Promise<void>
}

export function recordingLogger(logs: string[], echo = process.env.NBD_TEST_LOG === '1'): NbdLogger {
  const record = (level: string) => (msg: string) => {
    logs.push(`${level} ${msg}`)
    if (echo) process.stderr.write(`${level} ${msg}\n`)
  }
  return { debug: record('debug'), info: record('info'), warn: record('warn'), error: record('error') }
}

export async function startTestServer(
  options: Omit<NbdServerOptions, 'logger'>,
  listen: NbdListenOptions = { host: '127.0.0.1', port: 0 },
): Promise<TestServer> {
  const logs: string[] = []
  const server = new NbdServer({ ...options, logger: recordingLogger(logs) })
  const address = await server.listen(listen)
  return { server, address, port: address.kind === 'tcp' ? address.port : 0, logs, close: () => server.close() }
}

/**
 * True when no log line looks like a stack trace or an internal error, and close() never had to
 * drop a client that did not go away (a connection that cannot close is a leak).
 */
export function logsAreClean(logs: readonly string[]): boolean {
  return logs.every(
    (line) => !line.includes('\n') && !/^\s*at /m.test(line) && !line.includes('internal error') && !line.includes('did not close'),
  )
}
