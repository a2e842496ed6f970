/**
 * Direct receive (src/nbd/direct-receive.ts): on plain sockets the server reads WRITE payloads
 * straight into their buffers and everything else into one reused scratch buffer. Whatever the
 * client's byte stream is cut into, every payload must reach the device intact, and bytes left
 * in the scratch buffer by back-pressure must survive the next read.
 *
 * The client pipelines disjoint writes of 1 byte to 2 MiB (so the device's final content does
 * not depend on the order concurrent writes run in), cut into random pieces that it sends with
 * pauses between some of them, against a device whose writes finish after a random number of
 * event-loop turns and a server with small in-flight limits, so the parser often stops with
 * whole requests still buffered, and with read buffers as small as 29 bytes, so frames straddle
 * reads. The device is then read back and compared with the model.
 * Seeded: NBD_DIRECT_SEED=N replays one case.
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { test } from 'node:test'
import { BaseBlockDevice, type DeviceCapabilities } from '../../src/device/block-device.js'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { staticExports } from '../../src/nbd/export.js'
import type { NbdListenOptions } from '../../src/nbd/server.js'
import { ByteQueue } from '../../src/protocol/nbd/byte-queue.js'
import { RequestParser } from '../../src/protocol/nbd/request.js'
import { requestBytes } from '../support/nbd-bytes.js'
import { RawNbdClient, type RawAddress } from '../support/nbd-raw-client.js'
import { logsAreClean, startTestServer } from '../support/nbd-test-server.js'
import { Random } from '../support/random.js'

const KiB = 1024
const MiB = 1024 * KiB
const DEVICE_BYTES = 24 * MiB
const CMD_READ = 0
const CMD_WRITE = 1
const CMD_FLUSH = 3

/** A memory device whose writes finish after a random number of event-loop turns. */
class LaggingDevice extends BaseBlockDevice {
  readonly inner = new MemoryDevice(DEVICE_BYTES)
  private readonly random: Random

  constructor(seed: number) {
    super(DEVICE_BYTES, 'lagging')
    this.random = new Random(seed)
  }

  get capabilities(): DeviceCapabilities {
    return this.inner.capabilities
  }

  protected override async _readInto(target: Uint8Array, offset: number): Promise<void> {
    await this.inner.readInto(target, offset)
  }

  protected override async _write(data: Uint8Array, offset: number): Promise<void> {
    for (let turns = this.random.int(4); turns > 0; turns--) await new Promise((resolve) => setImmediate(resolve))
    await this.inner.write(data, offset)
  }

  protected override async _flush(): Promise<void> {}
}

/** Disjoint [offset, length) ranges covering parts of the device, lengths from 1 byte to 2 MiB, in random order. */
function disjointWrites(random: Random): Array<{ offset: number; length: number }> {
  const sizes = [1, 7, 511, 512, 4096, 4097, 65_535, 65_536, 65_537, 300_000, MiB, 2 * MiB]
  const writes: Array<{ offset: number; length: number }> = []
  let at = 0
  for (;;) {
    const length = random.chance(0.5) ? random.pick(sizes) : 1 + random.int(random.pick([600, 70_000, 1_200_000]))
    const gap = random.chance(0.3) ? random.int(9000) : 0
    if (at + gap + length > DEVICE_BYTES) break
    writes.push({ offset: at + gap, length })
    at += gap + length
  }
  for (let i = writes.length - 1; i > 0; i--) {
    const j = random.int(i + 1)
    ;[writes[i], writes[j]] = [writes[j]!, writes[i]!]
  }
  return writes
}

async function oneCase(seed: number, listen: (dir: string) => NbdListenOptions, address: (port: number, dir: string) => RawAddress): Promise<void> {
  const random = new Random(seed)
  const device = new LaggingDevice(seed + 1)
  const dir = await mkdtemp(join(tmpdir(), 'blocksnap-direct-'))
  const srv = await startTestServer(
    {
      exports: staticExports([{ name: 'd', device, readOnly: false }]),
      limits: { maxInFlightRequests: 1 + random.int(6), maxInFlightBytes: 64 * KiB + random.int(3 * MiB) },
      // Small read buffers in most cases: headers then straddle reads all the time, and the next
      // read overwrites the scratch bytes that a partial frame was left in.
      readBufferBytes: random.pick([29, 100, 1000, 4096, 64 * KiB]),
    },
    listen(dir),
  )
  const client = await RawNbdClient.connect(address(srv.port, dir))
  try {
    await client.handshake()
    await client.go('d', { structured: false })
    const model = new Uint8Array(DEVICE_BYTES)
    const writes = disjointWrites(random)
    const stream: Buffer[] = []
    let cookie = 0
    for (const w of writes) {
      const payload = random.bytes(w.length)
      model.set(payload, w.offset)
      stream.push(requestBytes({ type: CMD_WRITE, cookie: ++cookie, offset: w.offset, length: w.length }, payload))
      if (random.chance(0.05)) stream.push(requestBytes({ type: CMD_FLUSH, cookie: ++cookie, length: 0 }))
    }
    const sent = cookie
    // Replies arrive while the client is still sending, so neither side's buffers fill up.
    const replies = (async () => {
      const seen = new Set<bigint>()
      for (let i = 0; i < sent; i++) {
        const reply = await client.reply()
        assert.equal(reply.error, 0, `seed ${seed}: request ${reply.cookie} failed with errno ${reply.error}`)
        seen.add(reply.cookie)
      }
      assert.equal(seen.size, sent, `seed ${seed}: a cookie was answered twice`)
    })()
    const all = Buffer.concat(stream)
    for (let at = 0; at < all.length; ) {
      const piece = random.pick([1, 13, 28, 29, 4096, 65_536, 65_537, 200_000, 1_500_000])
      const n = Math.min(all.length - at, 1 + random.int(piece))
      client.write(all.subarray(at, at + n))
      at += n
      if (random.chance(0.3)) await new Promise((resolve) => setImmediate(resolve))
    }
    await replies
    for (let offset = 0; offset < DEVICE_BYTES; offset += MiB) {
      client.request({ type: CMD_READ, cookie: 1_000_000 + offset, offset, length: MiB })
      const reply = await client.reply(MiB)
      assert.equal(reply.error, 0)
      const want = model.subarray(offset, offset + MiB)
      if (!reply.data.equals(want)) {
        let first = 0
        while (reply.data[first] === want[first]) first++
        assert.fail(`seed ${seed}: device differs from the model at byte ${offset + first}`)
      }
    }
  } finally {
    client.destroy()
    await srv.close()
    await rm(dir, { recursive: true, force: true })
  }
  assert.ok(logsAreClean(srv.logs), `seed ${seed}: ${srv.logs.join('\n')}`)
}

const SEEDS = process.env.NBD_DIRECT_SEED ? [Number(process.env.NBD_DIRECT_SEED)] : [1, 2, 3, 4, 5, 6]

test('direct receive: payloads cut anywhere reach the device intact over TCP (seeded)', { timeout: 120_000 }, async () => {
  for (const seed of SEEDS) {
    await oneCase(seed, () => ({ host: '127.0.0.1', port: 0 }), (port) => ({ port }))
  }
})

test('direct receive: the same over a Unix socket (seeded)', { timeout: 120_000 }, async () => {
  for (const seed of SEEDS.slice(0, 2)) {
    await oneCase(seed + 100, (dir) => ({ path: join(dir, 'nbd.sock') }), (_port, dir) => ({ path: join(dir, 'nbd.sock') }))
  }
})

test('byte queue: bytes of a transient chunk that a caller keeps are copied; ownTransient() keeps the rest', () => {
  const queue = new ByteQueue()
  const scratch = Buffer.from('abcdefghij')
  queue.push(scratch.subarray(0, 10), true)
  const header = queue.take(2)
  assert.equal(header?.toString(), 'ab')
  const kept = queue.take(3, Buffer.allocUnsafe, true)
  assert.equal(kept?.toString(), 'cde')
  queue.ownTransient()
  scratch.fill('z')
  assert.equal(kept?.toString(), 'cde', 'a kept take is a copy, not a view of the scratch')
  assert.equal(queue.take(5)?.toString(), 'fghij', 'what was left survives the scratch being reused')
  // A transient chunk not yet owned is owned by the next push.
  queue.push(scratch.subarray(0, 4), true)
  queue.push(Buffer.from('12'))
  scratch.fill('y')
  assert.equal(queue.take(6)?.toString(), 'zzzz12')
})

test('request parser: a payload arriving in pieces is filled through payloadTail()', () => {
  const queue = new ByteQueue()
  const parser = new RequestParser(32 * MiB, queue)
  const payload = Buffer.from(new Random(7).bytes(100_000))
  const wire = requestBytes({ type: CMD_WRITE, cookie: 9, offset: 4096, length: payload.length }, payload)
  assert.equal(parser.payloadTail(), null, 'no payload yet')
  queue.push(wire.subarray(0, 28 + 10), true)
  assert.equal(parser.next(), null)
  queue.ownTransient()
  const tail = parser.payloadTail()
  assert.equal(tail?.length, payload.length - 10)
  tail!.set(wire.subarray(38, 38 + 50_000))
  parser.payloadReceived(50_000)
  assert.equal(parser.next(), null)
  // Bytes pushed while a payload is assembling go through the queue again.
  queue.push(wire.subarray(38 + 50_000))
  assert.equal(parser.payloadTail(), null, 'buffered bytes come first')
  const event = parser.next()
  assert.equal(event?.kind, 'request')
  assert.ok(event?.kind === 'request' && event.payload?.equals(payload))
  assert.throws(() => parser.payloadReceived(1), /not there/)
})
