/**
 * NbdClientDevice against servers no packaged peer plays:
 * - an old fixed-newstyle server that knows neither NBD_OPT_GO nor structured replies (every
 *   option but EXPORT_NAME answered NBD_REP_ERR_UNSUP, simple replies only): the client falls
 *   back to EXPORT_NAME and does I/O with simple replies, checked against a byte-array model;
 * - a server that accepts the connection and never greets: the handshake timeout turns it into
 *   one SNAP_IO line instead of a hang.
 * The old server is written here from the NBD spec (doc/proto.md), not from our server's code.
 */
import { after, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { type Server, type Socket, createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { NbdClientDevice } from '../../src/device/nbd-client-device.js'
import { isSnapError } from '../../src/errors.js'
import { Random } from '../support/random.js'

const dir = await mkdtemp(join(tmpdir(), 'blocksnap-nbd-old-'))
const servers: Server[] = []
after(async () => {
  for (const s of servers) await new Promise((resolve) => s.close(resolve))
  await rm(dir, { recursive: true, force: true })
})

const SIZE = 1024 * 1024
const OPT_EXPORT_NAME = 1
const REPLY_MAGIC = 0x3e889045565a9n
const REP_ERR_UNSUP = 0x80000001
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3 }

/** Reads exactly what the protocol asks for, in order, from a socket. */
class Bytes {
  private buffered = Buffer.alloc(0)
  private waiter: (() => void) | null = null
  constructor(socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, d])
      this.waiter?.()
    })
  }
  async take(n: number): Promise<Buffer> {
    while (this.buffered.length < n) await new Promise<void>((resolve) => (this.waiter = resolve))
    const out = this.buffered.subarray(0, n)
    this.buffered = this.buffered.subarray(n)
    return Buffer.from(out)
  }
}

/** An old server over `disk`; records the options the client sent. */
async function oldServer(path: string, disk: Buffer, optionsSeen: number[]): Promise<void> {
  const server = createServer((socket) => {
    const input = new Bytes(socket)
    void (async () => {
      const greeting = Buffer.alloc(18)
      greeting.write('NBDMAGIC', 0, 'latin1')
      greeting.write('IHAVEOPT', 8, 'latin1')
      greeting.writeUInt16BE(1, 16) // FIXED_NEWSTYLE only: no NO_ZEROES, so the 124 zero bytes follow
      socket.write(greeting)
      await input.take(4) // client flags
      for (;;) {
        const header = await input.take(16)
        const option = header.readUInt32BE(8)
        const data = await input.take(header.readUInt32BE(12))
        optionsSeen.push(option)
        if (option === OPT_EXPORT_NAME) {
          assert.equal(data.toString('utf8'), 'old')
          const reply = Buffer.alloc(10 + 124)
          reply.writeBigUInt64BE(BigInt(disk.length), 0)
          reply.writeUInt16BE(1 | 4, 8) // HAS_FLAGS | SEND_FLUSH
          socket.write(reply)
          break
        }
        const reply = Buffer.alloc(20)
        reply.writeBigUInt64BE(REPLY_MAGIC, 0)
        reply.writeUInt32BE(option, 8)
        reply.writeUInt32BE(REP_ERR_UNSUP, 12)
        socket.write(reply)
      }
      for (;;) {
        const request = await input.take(28)
        const type = request.readUInt16BE(6)
        const cookie = request.subarray(8, 16)
        const offset = Number(request.readBigUInt64BE(16))
        const length = request.readUInt32BE(24)
        if (type === CMD.DISC) return socket.end()
        const reply = Buffer.alloc(16)
        reply.writeUInt32BE(0x67446698, 0)
        cookie.copy(reply, 8)
        if (type === CMD.WRITE) (await input.take(length)).copy(disk, offset)
        socket.write(type === CMD.READ ? Buffer.concat([reply, disk.subarray(offset, offset + length)]) : reply)
      }
    })().catch(() => socket.destroy())
  })
  servers.push(server)
  await new Promise<void>((resolve) => server.listen(path, resolve))
}

test('an old server without GO or structured replies: the client falls back to EXPORT_NAME and reads and writes', { timeout: 60_000 }, async () => {
  const disk = Buffer.alloc(SIZE)
  const model = Buffer.alloc(SIZE)
  const optionsSeen: number[] = []
  const socket = join(dir, 'old.sock')
  await oldServer(socket, disk, optionsSeen)
  const device = await NbdClientDevice.open(`nbd+unix:///old?socket=${socket}`)
  try {
    assert.equal(device.sizeBytes, SIZE)
    assert.equal(optionsSeen.at(-1), OPT_EXPORT_NAME, `options sent: ${optionsSeen.join(', ')}`)
    const random = new Random(1707)
    for (let i = 0; i < 40; i++) {
      const length = 1 + random.int(16384)
      const offset = random.int(SIZE - length)
      const data = Buffer.alloc(length, 1 + random.int(255))
      await device.write(data, offset)
      data.copy(model, offset)
    }
    await device.flush()
    const back = Buffer.from(await device.read(0, SIZE))
    assert.ok(back.equals(model), 'reads through the device equal the model')
    assert.ok(disk.equals(model), 'the server holds the model')
  } finally {
    await device.close()
  }
})

test('a server that accepts and never greets: one SNAP_IO line once the handshake timeout passes', { timeout: 60_000 }, async () => {
  const path = join(dir, 'silent.sock')
  const accepted: Socket[] = []
  const server = createServer((socket) => accepted.push(socket))
  servers.push(server)
  await new Promise<void>((resolve) => server.listen(path, resolve))
  try {
    await assert.rejects(NbdClientDevice.open(`nbd+unix:///?socket=${path}`, { handshakeTimeoutMs: 300 }), (err: unknown) => {
      assert.ok(isSnapError(err, 'SNAP_IO'), String(err))
      assert.match((err as Error).message, /handshake not finished within 300 ms/)
      assert.doesNotMatch((err as Error).message, /\n/)
      return true
    })
    assert.equal(accepted.length >= 1, true, 'the client did connect')
  } finally {
    for (const s of accepted) s.destroy()
  }
})
