/** A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close). */
import { createServer } from 'node:net'

export async function freePort(): Promise<number> {
  const s = createServer()
  await new Promise<void>((resolve, reject) => {
    s.once('error', reject)
    s.listen(0, '127.0.0.1', () => resolve())
  })
  const address = s.address()
  await new Promise<void>((resolve) => s.close(() => resolve()))
  if (!address || typeof address !== 'object') throw new Error('no address for a port-0 listener')
  return address.port
}
