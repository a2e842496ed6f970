/**
 * `serve --max-connections N --max-pending SIZE` end to end: with N clients in, the next one is
 * closed before the greeting and the server logs why; the clients in are served normally, a
 * write larger than the pending cap still goes through (one request may go over). Bad values are
 * usage errors.
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { test } from 'node:test'
import { Volume } from '../../src/volume/volume.js'
import { freePort } from '../support/free-port.js'
import { RawNbdClient } from '../support/nbd-raw-client.js'
import { ServeProcess } from '../support/serve-process.js'
import { assertError, cli } from './helpers.js'

const MiB = 1024 * 1024

test('serve --max-connections refuses the client over the limit before the greeting; --max-pending caps, one request may go over', { timeout: 60_000 }, async () => {
  const root = await mkdtemp(join(tmpdir(), 'bs-serve-limits-'))
  let served: ServeProcess | null = null
  const clients: RawNbdClient[] = []
  try {
    const vol = join(root, 'vol')
    await Volume.create(vol, { sizeBytes: 4 * MiB })
    const port = await freePort()
    served = await ServeProcess.start([vol, '--listen', `127.0.0.1:${port}`, '--max-connections', '2', '--max-pending', '64K'])
    for (let i = 0; i < 2; i++) {
      const c = await RawNbdClient.connect({ port })
      await c.handshake()
      await c.go('vol')
      clients.push(c)
    }
    const over = await RawNbdClient.connect({ port })
    await assert.rejects(over.read(1), /had 0/, 'closed before any byte of the greeting')
    // 1 MiB against a 64 KiB cap: admitted alone, answered.
    const payload = Buffer.alloc(MiB, 0x5a)
    clients[0]!.request({ type: 1, cookie: 7, offset: 0, length: MiB }, payload)
    assert.equal((await clients[0]!.reply()).error, 0)
    clients[1]!.request({ type: 0, cookie: 8, offset: 0, length: MiB })
    const read = await clients[1]!.structuredReply()
    assert.equal(read[0]!.error, 0)
    assert.deepEqual(read[0]!.data.subarray(8), payload, 'the other client reads what was written')
    assert.match(served.log, /refusing 127\.0\.0\.1 client: 2 connections already/)
  } finally {
    for (const c of clients) c.destroy()
    if (served?.pid !== undefined && served.alive()) {
      process.kill(served.pid, 'SIGTERM')
      assert.deepEqual(await served.exit, { code: 0, signal: null })
    }
    await rm(root, { recursive: true, force: true })
  }
})

test('serve refuses --max-connections 0 and --max-pending 0 as usage errors', async () => {
  const r = await cli(['serve', '/nonexistent', '--max-connections', '0', '--max-pending', '0'])
  assertError(r, 2, /max connections '0' \(at least 1\)/)
})
