/**
 * NbdClientDevice survives its server dying: requests in flight are resent on a new connection,
 * and when the server stays away they fail with one clear SNAP_IO line. nbdkit's file plugin
 * keeps the data in a file, so a restarted server serves what the killed one acknowledged.
 *
 * Deterministic: the server is SIGSTOPped before the second batch, so every request of that
 * batch is unanswered (in flight) when it is killed, whatever the timing.
 */
import { after, describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { NbdClientDevice } from '../../src/device/nbd-client-device.js'
import { PeerServer } from '../support/nbd-peer.js'
import { requireTools } from '../support/nbd-tools.js'
import { Random } from '../support/random.js'

await requireTools('nbdkit')
const dir = await mkdtemp(join(tmpdir(), 'blocksnap-nbd-reconnect-'))
const peers: PeerServer[] = []
after(async () => {
  await Promise.all(peers.map((peer) => peer.stop()))
  await rm(dir, { recursive: true, force: true })
})

const SIZE = 4 * 1024 * 1024
let count = 0

async function fileServer(): Promise<{ peer: PeerServer; file: string }> {
  const file = join(dir, `disk${count}.img`)
  await writeFile(file, '')
  await truncate(file, SIZE)
  const peer = PeerServer.nbdkit(join(dir, `s${count++}.sock`), ['file', file])
  peers.push(peer)
  await peer.start()
  return { peer, file }
}

/** Lets corked request bytes reach the socket. */
const flushTicks = () => new Promise((resolve) => setImmediate(resolve))

describe('nbd-client-device: reconnection', () => {
  it('nbd-client-device: requests in flight when the server is killed are resent after it restarts; acknowledged writes stay', async () => {
    const { peer, file } = await fileServer()
    const device = await NbdClientDevice.open(peer.uri(), { reconnect: { attempts: 100, initialDelayMs: 5, maxDelayMs: 50 } })
    const random = new Random(18)
    const model = new Uint8Array(SIZE)
    const write = (offset: number, length: number) => {
      const data = random.bytes(length)
      model.set(data, offset)
      return device.write(data, offset)
    }
    // Batch A: acknowledged before anything goes wrong.
    await Promise.all(Array.from({ length: 16 }, (_, i) => write(i * 65_536 + 3, 5000)))
    // Batch B: sent to a stopped server, so none of it is answered, then the server dies.
    await peer.signal('SIGSTOP')
    const batchB = Promise.all(Array.from({ length: 16 }, (_, i) => write(2 * 1024 * 1024 + i * 65_536 + 7, 9000)))
    // The stopped server answers nothing: once all 16 are on the wire they stay in flight.
    for (let spins = 0; device.inFlightCount < 16; spins++) {
      assert.ok(spins < 100_000, `only ${device.inFlightCount} of batch B went out`)
      await flushTicks()
    }
    await flushTicks() // and their bytes reach the socket
    await peer.signal('SIGKILL')
    await peer.start()
    await batchB
    assert.equal(device.stats.resent, 16)
    assert.ok(device.stats.reconnects >= 1)
    await device.flush()
    assert.deepEqual(await device.read(0, SIZE), model)
    // And independently of the client: the file holds every write.
    assert.deepEqual(new Uint8Array(await readFile(file)), model)
    await device.close()
  })

  it('nbd-client-device: with the server gone for good, requests fail with SNAP_IO naming the URI and the attempts; it recovers when the server returns', async () => {
    const { peer } = await fileServer()
    const device = await NbdClientDevice.open(peer.uri(), { reconnect: { attempts: 3, initialDelayMs: 1, maxDelayMs: 1 } })
    await device.write(new Uint8Array(512).fill(1), 0)
    await peer.stop()
    await assert.rejects(device.write(new Uint8Array(512).fill(2), 4096), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'SNAP_IO')
      assert.match(err.message, /^NBD server nbd\+unix:\/\/\/\?socket=.* unreachable after 3 attempts: /)
      assert.ok(!err.message.includes('\n'))
      return true
    })
    await peer.start()
    await device.write(new Uint8Array(512).fill(3), 8192)
    assert.deepEqual(await device.read(0, 512), new Uint8Array(512).fill(1))
    assert.deepEqual(await device.read(8192, 512), new Uint8Array(512).fill(3))
    await device.close()
  })
})

describe('nbd-client-device: multi-conn', () => {
  it('nbd-client-device: spreads requests over several connections when the server offers multi-conn, and uses one when it does not', async () => {
    const memory = PeerServer.nbdkit(join(dir, `m${count++}.sock`), ['memory', String(SIZE)])
    peers.push(memory)
    await memory.start()
    const device = await NbdClientDevice.open(memory.uri(), { connections: 4, maxInFlightPerConnection: 2 })
    assert.equal(device.connectionCount, 4)
    const random = new Random(4)
    const model = new Uint8Array(SIZE)
    const writes: Promise<void>[] = []
    for (let offset = 0; offset + 70_000 <= SIZE; offset += 70_001) {
      const data = random.bytes(70_000)
      model.set(data, offset)
      writes.push(device.write(data, offset))
    }
    await Promise.all(writes)
    await device.flush()
    // A second client sees it all: the writes went to the server, whichever connection carried them.
    const other = await NbdClientDevice.open(memory.uri())
    assert.deepEqual(await other.read(0, SIZE), model)
    await other.close()
    await device.close()

    // nbdkit told not to promise multi-conn.
    const single = PeerServer.nbdkit(join(dir, `n${count++}.sock`), ['memory', String(SIZE), 'multi-conn-mode=disable'], ['--filter=multi-conn'])
    peers.push(single)
    await single.start()
    const lone = await NbdClientDevice.open(single.uri(), { connections: 4 })
    assert.equal(lone.info.transmissionFlags & 0x100, 0)
    assert.equal(lone.connectionCount, 1)
    await lone.close()
  })
})
