/**
 * Serves FirstTouchCeilingDevice over NBD on 127.0.0.1, for the first-touch suite:
 *   node --import tsx bench/ceiling/rand4k-server.ts ORIGIN COW PORT
 * ORIGIN is written in place (the bench passes a copy); COW must not exist. The export is named
 * "ceiling". The bench starts it with the thread pool blocksnap's launcher would size, so the two
 * servers differ only in what their devices do. SIGTERM flushes and exits.
 */
import { statSync } from 'node:fs'
import { NbdServer } from '../../src/nbd/server.js'
import { staticExports } from '../../src/nbd/export.js'
import { keepFreedHeapMapped } from '../../src/util/heap-trim.js'
import { FirstTouchCeilingDevice } from './rand4k-device.js'

keepFreedHeapMapped()
const [originPath, cowPath, port] = process.argv.slice(2)
if (!originPath || !cowPath || !port) {
  process.stderr.write('usage: rand4k-server.ts ORIGIN COW PORT\n')
  process.exit(2)
}
const device = new FirstTouchCeilingDevice(originPath, cowPath, statSync(originPath).size)
const server = new NbdServer({ exports: staticExports([{ name: 'ceiling', device, readOnly: false }]) })
await server.listen({ port: Number(port), host: '127.0.0.1' })
process.stdout.write(`first-touch ceiling on nbd://127.0.0.1:${port}/ceiling\n`)
process.once('SIGTERM', () => {
  void (async () => {
    await server.close()
    await device.close()
    process.stdout.write(`copies ${device.copies}\n`)
    process.exit(0)
  })()
})
