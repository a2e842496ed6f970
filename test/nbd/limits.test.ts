/**
 * Server-wide resource bounds (issue 13 item 4): the connection limit refuses the client over it
 * before the greeting; the pending-bytes cap holds across clients that pipeline large writes
 * (observed at the device, which sees how many writes the server let through, and on the
 * server's own gauge); the payload buffer pool is let go of when the last client leaves.
 *
 * Writes are held at a gate in the device until the test releases them one by one, so what the
 * server admits is decided by the cap, not by how fast anything runs.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { BaseBlockDevice, type DeviceCapabilities } from '../../src/device/block-device.js'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { staticExports } from '../../src/nbd/export.js'
import { DEFAULT_MAX_CONNECTIONS } from '../../src/nbd/server.js'
import { ByteQueue } from '../../src/protocol/nbd/byte-queue.js'
import { RequestParser } from '../../src/protocol/nbd/request.js'
import { requestBytes } from '../support/nbd-bytes.js'
import { RawNbdClient } from '../support/nbd-raw-client.js'
import { logsAreClean, startTestServer } from '../support/nbd-test-server.js'
import { Random } from '../support/random.js'

const TIMEOUT = 30_000
const KiB = 1024
const MiB = 1024 * KiB
const CMD_WRITE = 1

/** Writes wait at a gate until released, oldest first. */
class GatedDevice extends BaseBlockDevice {
  readonly inner: MemoryDevice
  private readonly gate: Array<() => void> = []
  outstanding = 0
  maxOutstanding = 0
  onArrive: (() => void) | null = null

  constructor(sizeBytes: number) {
    super(sizeBytes, 'gated')
    this.inner = new MemoryDevice(sizeBytes)
  }

  get capabilities(): DeviceCapabilities {
    return this.inner.capabilities
  }

  get waiting(): number {
    return this.gate.length
  }

  releaseOne(): void {
    this.gate.shift()?.()
  }

  protected override async _write(data: Uint8Array, offset: number): Promise<void> {
    this.outstanding++
    this.maxOutstanding = Math.max(this.maxOutstanding, this.outstanding)
    this.onArrive?.()
    await new Promise<void>((resolve) => this.gate.push(resolve))
    await this.inner.write(data, offset)
    this.outstanding--
  }

  protected override _readInto(target: Uint8Array, offset: number): Promise<void> {
    return this.inner.readInto(target, offset)
  }

  protected override _flush(): Promise<void> {
    return this.inner.flush()
  }

  protected override _close(): Promise<void> {
    return this.inner.close()
  }
}

async function until(condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + TIMEOUT - 5000
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`gave up waiting: ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 2))
  }
}

async function connected(port: number, name = 'gated'): Promise<RawNbdClient> {
  const c = await RawNbdClient.connect({ port })
  await c.handshake()
  await c.go(name)
  return c
}

test('connection N+1 is closed before the greeting while N are open (default limit), and admitted once one leaves', { timeout: TIMEOUT }, async () => {
  assert.equal(DEFAULT_MAX_CONNECTIONS, 16)
  const srv = await startTestServer({ exports: staticExports([{ name: 'm', device: new MemoryDevice(MiB), readOnly: false }]) })
  const clients: RawNbdClient[] = []
  try {
    for (let i = 0; i < DEFAULT_MAX_CONNECTIONS; i++) {
      const c = await RawNbdClient.connect({ port: srv.port })
      await c.handshake() // the greeting arrived: admitted
      clients.push(c)
    }
    assert.equal(srv.server.connectionCount, DEFAULT_MAX_CONNECTIONS)
    const over = await RawNbdClient.connect({ port: srv.port })
    await assert.rejects(over.read(1), /server closed the connection \(wanted 1 bytes, had 0\)/, 'closed before any byte of the greeting')
    assert.equal(srv.logs.filter((l) => l.startsWith('warn') && l.includes('refusing') && l.includes(`${DEFAULT_MAX_CONNECTIONS} connections`)).length, 1)

    clients.pop()!.destroy()
    await until(() => srv.server.connectionCount === DEFAULT_MAX_CONNECTIONS - 1, 'the server saw a client leave')
    const again = await RawNbdClient.connect({ port: srv.port })
    await again.handshake()
    clients.push(again)
  } finally {
    for (const c of clients) c.destroy()
    await srv.close()
  }
  assert.ok(logsAreClean(srv.logs))
})

test('the pending-bytes cap holds across clients pipelining large writes; the pool is trimmed when they leave', { timeout: TIMEOUT }, async () => {
  const capBytes = 1 * MiB
  const requestBytes = 256 * KiB
  const perClient = 12
  const clientCount = 3
  const sizeBytes = clientCount * perClient * requestBytes
  const device = new GatedDevice(sizeBytes)
  const srv = await startTestServer({ exports: staticExports([{ name: 'gated', device, readOnly: false }]), maxPendingBytes: capBytes })
  let maxGauge = 0
  device.onArrive = () => {
    maxGauge = Math.max(maxGauge, srv.server.pendingBytes.bytes)
  }
  const random = new Random(13)
  const model = new Uint8Array(sizeBytes)
  const clients: RawNbdClient[] = []
  try {
    for (let i = 0; i < clientCount; i++) clients.push(await connected(srv.port))
    const replies = clients.map(async (c, ci) => {
      const errors: number[] = []
      for (let k = 0; k < perClient; k++) errors.push((await c.reply()).error)
      assert.deepEqual(errors, new Array(perClient).fill(0), `client ${ci}: every write succeeded`)
    })
    // Awaited below; a failure before that must be reported as itself, not as these readers'.
    for (const r of replies) r.catch(() => {})
    // Each client pipelines all its writes at once, to its own region.
    clients.forEach((c, ci) => {
      for (let k = 0; k < perClient; k++) {
        const offset = (ci * perClient + k) * requestBytes
        const payload = random.bytes(requestBytes)
        model.set(payload, offset)
        c.request({ type: CMD_WRITE, cookie: k, offset, length: requestBytes }, payload)
      }
    })
    // The cap admits requests while less than it is held: at most cap/request + 1 at once.
    const admitted = capBytes / requestBytes + 1
    let remaining = clientCount * perClient
    while (remaining > 0) {
      // Wait until the server has let through all the cap allows (or all that is left) ...
      await until(() => device.outstanding * requestBytes >= capBytes || device.outstanding === remaining, 'writes reached the device')
      // ... and give it the chance to let through more than it should.
      await new Promise((resolve) => setTimeout(resolve, 20))
      assert.ok(device.outstanding <= admitted, `${device.outstanding} writes at the device at once; the cap admits ${admitted}`)
      device.releaseOne()
      remaining--
    }
    await Promise.all(replies)
    assert.ok(device.maxOutstanding <= admitted)
    assert.ok(device.maxOutstanding >= capBytes / requestBytes, 'the cap was reached: the test exercised it')
    const gauge = srv.server.pendingBytes
    assert.equal(gauge.capBytes, capBytes)
    assert.ok(gauge.peakBytes <= capBytes + requestBytes, `peak ${gauge.peakBytes} within cap + one request`)
    assert.ok(maxGauge <= capBytes + requestBytes)
    assert.equal(gauge.bytes, 0, 'nothing held once every write is answered')
    assert.deepEqual(Buffer.from(await device.inner.read(0, sizeBytes)), Buffer.from(model), 'every write landed')

    assert.ok(srv.server.pooledBytes > 0, 'payload buffers are pooled while clients are connected')
    for (const c of clients) c.end()
    await Promise.all(clients.map((c) => c.closed))
    await until(() => srv.server.connectionCount === 0, 'the server saw every client leave')
    assert.equal(srv.server.pooledBytes, 0, 'the pool is let go of when the last client leaves')
  } finally {
    for (const c of clients) c.destroy()
    await srv.close()
  }
  assert.ok(logsAreClean(srv.logs))
})

test('a client whose payload is arriving when its connection ends gives back what it held', { timeout: TIMEOUT }, async () => {
  const device = new GatedDevice(4 * MiB)
  const srv = await startTestServer({ exports: staticExports([{ name: 'gated', device, readOnly: false }]), maxPendingBytes: MiB })
  try {
    const c = await connected(srv.port)
    // A header and half its payload, then the client goes away.
    c.request({ type: CMD_WRITE, cookie: 1, offset: 0, length: MiB }, Buffer.alloc(MiB / 2))
    await until(() => srv.server.pendingBytes.bytes === MiB, 'the arriving payload is held')
    c.destroy()
    await until(() => srv.server.connectionCount === 0, 'the server saw the client leave')
    assert.equal(srv.server.pendingBytes.bytes, 0)
    // Room again: another client's write goes through.
    const d = await connected(srv.port)
    d.request({ type: CMD_WRITE, cookie: 2, offset: 0, length: 4096 }, Buffer.alloc(4096, 9))
    await until(() => device.waiting === 1, 'the write reached the device')
    device.releaseOne()
    assert.equal((await d.reply()).error, 0)
    d.destroy()
  } finally {
    await srv.close()
  }
})

test('a payload still arriving is copied as it comes: received chunks are not kept for its length', () => {
  const queue = new ByteQueue()
  const parser = new RequestParser(32 * MiB, queue)
  const payload = new Random(5).bytes(4 * MiB)
  const frame = requestBytes({ type: CMD_WRITE, cookie: 3, offset: 8192, length: payload.length }, payload)
  const pieceBytes = 64 * KiB
  let event = null
  for (let at = 0; at < frame.length; at += pieceBytes) {
    assert.equal(event, null, 'no request before its last byte')
    queue.push(frame.subarray(at, at + pieceBytes))
    event = parser.next()
    assert.ok(queue.length < pieceBytes, `${queue.length} bytes left queued after ${at + pieceBytes} received`)
  }
  assert.ok(event !== null && event.kind === 'request')
  assert.equal(event.header.offset, 8192)
  assert.deepEqual(event.payload, Buffer.from(payload))
})
