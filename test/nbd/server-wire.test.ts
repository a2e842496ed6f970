/**
 * Wire-level tests of NbdServer with a raw-socket client: handshake options, framing errors,
 * pipelining and out-of-order replies, bad requests, shutdown. Things libnbd will not send are
 * tested here; real clients are in interop.test.ts.
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, test } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import type { ExportProvider, NbdExport } from '../../src/nbd/export.js'
import { staticExports } from '../../src/nbd/export.js'
import { NbdServer } from '../../src/nbd/server.js'
import { SnapError } from '../../src/errors.js'
import { FaultyDevice } from '../support/faulty-device.js'
import { ManualClock } from '../support/manual-clock.js'
import { bytes, infoRequestBytes, metaContextBytes } from '../support/nbd-bytes.js'
import { RawNbdClient } from '../support/nbd-raw-client.js'
import { logsAreClean, startTestServer, type TestServer } from '../support/nbd-test-server.js'

/** Every test and hook fails instead of hanging if a connection never closes. */
const TIMEOUT = 20_000
const MiB = 1024 * 1024
const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, PEEK: 4, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED: 8, LIST_META: 9, SET_META: 10, EXT: 11 }
const REP = { ACK: 1, SERVER: 2, INFO: 3, META: 4, UNSUP: 0x80000001, POLICY: 0x80000002, INVALID: 0x80000003, TLS_REQD: 0x80000005, UNKNOWN: 0x80000006, TOO_BIG: 0x80000009 }
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7, RESIZE: 8 }
const EPERM = 1
const EIO = 5
const EINVAL = 22
const ENOSPC = 28
const ENOTSUP = 95
const ESHUTDOWN = 108

let srv: TestServer
let mem: MemoryDevice
let slow: FaultyDevice
let noTrim: MemoryDevice
const exportList: NbdExport[] = []

function makeExports(): ExportProvider {
  mem = new MemoryDevice(8 * MiB, { name: 'mem' })
  slow = new FaultyDevice(new MemoryDevice(8 * MiB), 'slow')
  noTrim = new MemoryDevice(1 * MiB)
  // A device without discard: capabilities are read from the instance.
  Object.defineProperty(noTrim, 'capabilities', { value: { ...noTrim.capabilities, discard: false } })
  exportList.push(
    {
      name: 'mem',
      description: 'scratch memory',
      device: mem,
      readOnly: false,
      metaContexts: ['blocksnap:exceptions'],
      async blockStatus(context, offset, length) {
        if (context === 'base:allocation') return [{ length: 65536, flags: 3 }, { length: length + offset, flags: 0 }]
        return [{ length: 4096, flags: 1 }, { length: 4096, flags: 0 }]
      },
    },
    { name: 'ro', device: new MemoryDevice(1 * MiB), readOnly: true },
    { name: 'slow', device: slow, readOnly: false },
    { name: 'notrim', device: noTrim, readOnly: false, fastZero: false },
  )
  const base = staticExports(exportList)
  return {
    list: () => base.list(),
    get: (name) => (name === 'secret' ? { refused: 'secret is not for you' } : base.get(name)),
  }
}

before(async () => {
  srv = await startTestServer({ exports: makeExports(), limits: { maxInFlightRequests: 8 } })
}, { timeout: TIMEOUT })

after(async () => {
  await srv.close()
  assert.ok(logsAreClean(srv.logs), `logs have no stack traces:\n${srv.logs.filter((l) => !l.startsWith('debug')).join('\n')}`)
}, { timeout: TIMEOUT })

async function client(): Promise<RawNbdClient> {
  const c = await RawNbdClient.connect({ port: srv.port })
  await c.handshake()
  return c
}

async function opened(name: string, options: { structured?: boolean; contexts?: string[] } = {}): Promise<RawNbdClient> {
  const c = await client()
  await c.go(name, options)
  return c
}

test('wire: greeting is fixed newstyle with NO_ZEROES', { timeout: TIMEOUT }, async () => {
  const c = await RawNbdClient.connect({ port: srv.port })
  assert.deepEqual(await c.read(18), bytes().ascii('NBDMAGICIHAVEOPT').u16(3).build())
  c.destroy()
})

test('wire: EXPORT_NAME sends 124 zero bytes only when the client did not set NO_ZEROES', { timeout: TIMEOUT }, async () => {
  for (const flags of [1, 3, 0]) {
    const c = await RawNbdClient.connect({ port: srv.port })
    await c.handshake(flags)
    c.option(OPT.EXPORT_NAME, Buffer.from('mem'))
    const reply = await c.read(10)
    assert.equal(reply.readBigUInt64BE(0), BigInt(8 * MiB))
    assert.equal(reply.readUInt16BE(8) & 1, 1)
    if ((flags & 2) === 0) assert.deepEqual(await c.read(124), Buffer.alloc(124))
    // Transmission works straight away, with simple replies (no STRUCTURED_REPLY was negotiated).
    c.request({ type: CMD.READ, cookie: 5, offset: 0, length: 16 })
    const r = await c.reply(16)
    assert.equal(r.structured, false)
    assert.equal(r.cookie, 5n)
    assert.deepEqual(r.data, Buffer.alloc(16))
    c.destroy()
  }
})

test('wire: EXPORT_NAME for an unknown or refused export closes the connection', { timeout: TIMEOUT }, async () => {
  for (const name of ['nope', 'secret']) {
    const c = await client()
    c.option(OPT.EXPORT_NAME, Buffer.from(name))
    await c.closed
  }
})

test('wire: unknown client flags and bad option magic close the connection', { timeout: TIMEOUT }, async () => {
  const c1 = await RawNbdClient.connect({ port: srv.port })
  await c1.handshake(0x7)
  await c1.closed
  const c2 = await client()
  c2.write(bytes().ascii('IHAVEOPX').u32(7).u32(0).build())
  await c2.closed
})

test('wire: unknown, withdrawn and unimplemented options get ERR_UNSUP and parsing goes on', { timeout: TIMEOUT }, async () => {
  const c = await client()
  for (const code of [99, OPT.PEEK, OPT.EXT, 0x7fffffff]) {
    c.option(code, Buffer.from('junk'))
    const [reply] = await c.optionReplies()
    assert.equal(reply!.option, code)
    assert.equal(reply!.type, REP.UNSUP)
  }
  c.option(OPT.LIST)
  const replies = await c.optionReplies()
  assert.deepEqual(
    replies.map((r) => r.type),
    [REP.SERVER, REP.SERVER, REP.SERVER, REP.SERVER, REP.ACK],
  )
  const first = replies[0]!.data
  assert.equal(first.readUInt32BE(0), 3)
  assert.equal(first.subarray(4, 7).toString(), 'mem')
  assert.equal(first.subarray(7).toString(), 'scratch memory')
  c.option(OPT.LIST, Buffer.from('x'))
  assert.equal((await c.optionReplies())[0]!.type, REP.INVALID)
  c.option(OPT.STARTTLS)
  assert.equal((await c.optionReplies())[0]!.type, REP.UNSUP, 'STARTTLS on a server without TLS')
  c.option(OPT.STRUCTURED, Buffer.from('x'))
  assert.equal((await c.optionReplies())[0]!.type, REP.INVALID)
  c.option(OPT.ABORT)
  assert.equal((await c.optionReplies())[0]!.type, REP.ACK)
  await c.closed
})

test('wire: a client that floods options without reading replies is throttled, and every reply arrives in order', { timeout: TIMEOUT }, async () => {
  const c = await client()
  c.socket.pause()
  const count = 1024 // the most options a handshake may have (MAX_HANDSHAKE_OPTIONS)
  c.write(Buffer.concat(Array.from({ length: count }, () => bytes().ascii('IHAVEOPT').u32(OPT.LIST).u32(0).build())))
  await new Promise((resolve) => setTimeout(resolve, 200))
  c.socket.resume()
  for (let i = 0; i < count; i++) {
    const replies = await c.optionReplies()
    assert.equal(replies.length, 5)
    assert.equal(replies[4]!.type, REP.ACK)
  }
  c.destroy()
})

test('wire: truncated GO gets ERR_INVALID, oversized options ERR_TOO_BIG, and the handshake continues', { timeout: TIMEOUT }, async () => {
  const c = await client()
  c.option(OPT.GO, bytes().u32(3).ascii('mem').build())
  assert.equal((await c.optionReplies())[0]!.type, REP.INVALID)
  c.option(OPT.GO, bytes().u32(300).ascii('mem').u16(0).build())
  assert.equal((await c.optionReplies())[0]!.type, REP.INVALID)
  c.option(OPT.SET_META, Buffer.alloc(100_000, 0x61))
  assert.equal((await c.optionReplies())[0]!.type, REP.TOO_BIG)
  await c.go('mem')
  c.destroy()
})

test('wire: INFO and GO agree; default name is the first export; unknown and refused exports', { timeout: TIMEOUT }, async () => {
  const c = await client()
  c.option(OPT.STRUCTURED)
  await c.optionReplies()
  c.option(OPT.INFO, infoRequestBytes('', [1, 2, 3]))
  const info = await c.optionReplies()
  const byType = new Map(info.filter((r) => r.type === REP.INFO).map((r) => [r.data.readUInt16BE(0), r.data]))
  assert.equal(byType.get(0)!.length, 12)
  assert.equal(byType.get(0)!.readBigUInt64BE(2), BigInt(8 * MiB))
  assert.equal(byType.get(1)!.subarray(2).toString(), 'mem', 'canonical name of the default export')
  assert.equal(byType.get(2)!.subarray(2).toString(), 'scratch memory')
  assert.deepEqual(byType.get(3)!.subarray(2), bytes().u32(1).u32(4096).u32(32 * MiB).build())
  c.option(OPT.INFO, infoRequestBytes('nope'))
  const unknown = await c.optionReplies()
  assert.deepEqual(unknown.map((r) => r.type), [REP.UNKNOWN], 'no INFO before ERR_UNKNOWN')
  c.option(OPT.GO, infoRequestBytes('secret'))
  assert.equal((await c.optionReplies())[0]!.type, REP.POLICY)
  c.option(OPT.GO, infoRequestBytes('', []))
  const go = await c.optionReplies()
  assert.deepEqual(go.find((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === 0)!.data, byType.get(0))
  const flags = byType.get(0)!.readUInt16BE(10)
  assert.equal(flags, 0x0ded, 'HAS_FLAGS|FLUSH|FUA|TRIM|WRITE_ZEROES|DF|MULTI_CONN|CACHE|FAST_ZERO')
  c.destroy()
  const r = await client()
  r.option(OPT.INFO, infoRequestBytes('ro'))
  const roFlags = (await r.optionReplies())[0]!.data.readUInt16BE(10)
  assert.equal(roFlags, 0x0507, 'HAS_FLAGS|READ_ONLY|FLUSH|MULTI_CONN|CACHE, no DF without structured replies')
  r.destroy()
})

test('wire: meta contexts: list, wildcards, set, and block status with REQ_ONE', { timeout: TIMEOUT }, async () => {
  const c = await client()
  c.option(OPT.SET_META, metaContextBytes('mem', ['base:allocation']))
  assert.equal((await c.optionReplies())[0]!.type, REP.INVALID, 'SET needs structured replies first')
  c.option(OPT.STRUCTURED)
  await c.optionReplies()
  const names = (replies: { type: number; data: Buffer }[]) =>
    replies.filter((r) => r.type === REP.META).map((r) => [r.data.readUInt32BE(0), r.data.subarray(4).toString()])
  c.option(OPT.LIST_META, metaContextBytes('mem', []))
  assert.deepEqual(names(await c.optionReplies()), [[0, 'base:allocation'], [0, 'blocksnap:exceptions']])
  c.option(OPT.LIST_META, metaContextBytes('mem', ['base:', 'qemu:dirty-bitmap:x']))
  assert.deepEqual(names(await c.optionReplies()), [[0, 'base:allocation']])
  c.option(OPT.LIST_META, metaContextBytes('nope', []))
  assert.equal((await c.optionReplies())[0]!.type, REP.UNKNOWN)
  c.option(OPT.SET_META, bytes().str32('mem').u32(1).u32(99).build())
  assert.equal((await c.optionReplies())[0]!.type, REP.INVALID, 'query length past the data')
  c.option(OPT.SET_META, metaContextBytes('mem', ['base:', 'base:nothing', 'x-other:thing', 'blocksnap:exceptions', 'base:allocation']))
  assert.deepEqual(names(await c.optionReplies()), [[1, 'blocksnap:exceptions'], [2, 'base:allocation']])
  c.option(OPT.GO, infoRequestBytes('mem', [3]))
  await c.optionReplies()
  c.request({ type: CMD.BLOCK_STATUS, cookie: 77, offset: 0, length: MiB })
  const chunks = await c.structuredReply()
  assert.equal(chunks.length, 2)
  assert.equal(chunks[0]!.flags, 0)
  assert.equal(chunks[1]!.flags, 1, 'DONE on the last chunk')
  const decode = (data: Buffer) => {
    const out: number[][] = []
    for (let at = 4; at < data.length; at += 8) out.push([data.readUInt32BE(at), data.readUInt32BE(at + 4)])
    return [data.readUInt32BE(0), out] as const
  }
  assert.deepEqual(decode(chunks[0]!.data), [1, [[4096, 1], [4096, 0]]])
  assert.deepEqual(decode(chunks[1]!.data), [2, [[65536, 3], [MiB - 65536, 0]]], 'trimmed to the request')
  c.request({ type: CMD.BLOCK_STATUS, flags: 8, cookie: 78, offset: 0, length: 1000 })
  const one = await c.structuredReply()
  assert.deepEqual(one.map((ch) => decode(ch.data)), [[1, [[1000, 1]]], [2, [[1000, 3]]]])
  c.request({ type: CMD.BLOCK_STATUS, cookie: 79, offset: 8 * MiB - 10, length: 20 })
  assert.equal((await c.structuredReply())[0]!.error, EINVAL, 'past the end')
  c.destroy()
})

test('wire: block status without a selected context (or for another export) is EINVAL; default is all data', { timeout: TIMEOUT }, async () => {
  const c = await opened('slow')
  c.request({ type: CMD.BLOCK_STATUS, cookie: 1, offset: 0, length: 4096 })
  assert.equal((await c.structuredReply())[0]!.error, EINVAL)
  c.destroy()
  const d = await client()
  d.option(OPT.STRUCTURED)
  await d.optionReplies()
  d.option(OPT.SET_META, metaContextBytes('mem', ['base:allocation']))
  await d.optionReplies()
  d.option(OPT.GO, infoRequestBytes('slow'))
  await d.optionReplies()
  d.request({ type: CMD.BLOCK_STATUS, cookie: 1, offset: 0, length: 4096 })
  assert.equal((await d.structuredReply())[0]!.error, EINVAL, 'the SET named a different export')
  d.destroy()
  const e = await opened('slow', { contexts: ['base:allocation'] })
  e.request({ type: CMD.BLOCK_STATUS, cookie: 2, offset: 4096, length: 8192 })
  const [chunk] = await e.structuredReply()
  assert.deepEqual(chunk!.data, bytes().u32(1).u32(8192).u32(0).build())
  e.destroy()
})

test('wire: structured READ is one OFFSET_DATA chunk with DONE; errors are ERROR chunks with a message', { timeout: TIMEOUT }, async () => {
  await mem.write(Buffer.alloc(4096, 0x5a), 8192)
  const c = await opened('mem')
  c.request({ type: CMD.READ, cookie: 0x1122334455667788n, offset: 8192, length: 4096 })
  const [chunk] = await c.structuredReply()
  assert.equal(chunk!.type, 1)
  assert.equal(chunk!.cookie, 0x1122334455667788n)
  assert.equal(chunk!.data.readBigUInt64BE(0), 8192n)
  assert.deepEqual(chunk!.data.subarray(8), Buffer.alloc(4096, 0x5a))
  c.request({ type: CMD.READ, cookie: 2, offset: 0, length: 0 })
  assert.deepEqual((await c.structuredReply()).map((ch) => [ch.type, ch.flags]), [[0, 1]], 'empty read is NONE')
  c.request({ type: CMD.READ, cookie: 3, offset: 2n ** 40n, length: 512 })
  const [err] = await c.structuredReply()
  assert.equal(err!.type, 0x8001)
  assert.equal(err!.error, EINVAL)
  const messageLength = err!.data.readUInt16BE(4)
  assert.match(err!.data.subarray(6, 6 + messageLength).toString(), /beyond the end/)
  c.request({ type: CMD.READ, flags: 4, cookie: 4, offset: 0, length: 512 })
  assert.equal((await c.structuredReply())[0]!.type, 1, 'DF is accepted with structured replies')
  c.destroy()
})

test('wire: bad requests get the reference table errnos and the connection stays up', { timeout: TIMEOUT }, async () => {
  const c = await opened('mem')
  const size = 8 * MiB
  const cases: [string, Parameters<RawNbdClient['request']>[0], number, Buffer?][] = [
    ['read past end', { type: CMD.READ, offset: size, length: 4096 }, EINVAL],
    ['read straddling end', { type: CMD.READ, offset: size - 1, length: 2 }, EINVAL],
    ['write past end', { type: CMD.WRITE, offset: size, length: 4 }, ENOSPC, Buffer.alloc(4)],
    ['zero past end', { type: CMD.WRITE_ZEROES, offset: size, length: 4096 }, ENOSPC],
    ['trim past end', { type: CMD.TRIM, offset: size, length: 4096 }, EINVAL],
    ['cache past end', { type: CMD.CACHE, offset: size, length: 4096 }, EINVAL],
    ['read undefined flag 0x40', { type: CMD.READ, flags: 0x40, length: 512 }, EINVAL],
    ['write with REQ_ONE', { type: CMD.WRITE, flags: 8, length: 4 }, EINVAL, Buffer.alloc(4)],
    ['read with NO_HOLE', { type: CMD.READ, flags: 2, length: 512 }, EINVAL],
    ['unknown command', { type: 99, length: 0 }, EINVAL],
    ['resize', { type: CMD.RESIZE, length: 0 }, EINVAL],
    ['flush with a range', { type: CMD.FLUSH, offset: 4096, length: 1 }, EINVAL],
    ['33 MiB read', { type: CMD.READ, length: 33 * MiB }, EINVAL],
    ['u64 offset', { type: CMD.READ, offset: 2n ** 64n - 512n, length: 512 }, EINVAL],
    ['fast zero with NO_HOLE', { type: CMD.WRITE_ZEROES, flags: 0x12, length: 4096 }, ENOTSUP],
    ['fine read', { type: CMD.READ, length: 512 }, 0],
    ['fine zero-length write', { type: CMD.WRITE, length: 0 }, 0, Buffer.alloc(0)],
    ['fine cache', { type: CMD.CACHE, flags: 1, length: 4096 }, 0],
  ]
  for (const [name, fields, errno, payload] of cases) {
    c.request({ ...fields, cookie: 1 }, payload)
    const chunks = await c.structuredReply()
    assert.equal(chunks[chunks.length - 1]!.flags & 1, 1, name)
    assert.equal(chunks.find((ch) => ch.error !== 0)?.error ?? 0, errno, name)
  }
  c.destroy()
})

test('wire: oversized WRITE is refused, its payload drained, and the stream stays in sync', { timeout: TIMEOUT }, async () => {
  const c = await opened('mem')
  const big = Buffer.alloc(32 * MiB + 4096, 0x11)
  c.request({ type: CMD.WRITE, cookie: 1, offset: 0, length: big.length }, big)
  c.request({ type: CMD.WRITE, cookie: 2, offset: 0, length: 4 }, Buffer.from('abcd'))
  c.request({ type: CMD.READ, cookie: 3, offset: 0, length: 4 })
  const first = await c.structuredReply()
  assert.equal(first[0]!.cookie, 1n)
  assert.equal(first[0]!.error, EINVAL)
  const replies = [await c.structuredReply(), await c.structuredReply()].flat()
  const read = replies.find((r) => r.cookie === 3n)!
  assert.equal(read.data.subarray(8).toString(), 'abcd')
  assert.equal((await mem.read(4, 4))[0], 0, 'nothing of the refused write landed')
  c.destroy()
})

test('wire: read-only export refuses write-type commands with EPERM', { timeout: TIMEOUT }, async () => {
  const c = await opened('ro')
  c.request({ type: CMD.WRITE, cookie: 1, length: 3 }, Buffer.from('abc'))
  assert.equal((await c.structuredReply())[0]!.error, EPERM)
  c.request({ type: CMD.WRITE_ZEROES, cookie: 2, length: 512 })
  assert.equal((await c.structuredReply())[0]!.error, EPERM)
  c.request({ type: CMD.TRIM, cookie: 3, length: 512 })
  assert.equal((await c.structuredReply())[0]!.error, EPERM)
  c.request({ type: CMD.WRITE, flags: 1, cookie: 4, length: 0 }, Buffer.alloc(0))
  assert.equal((await c.structuredReply())[0]!.error, EINVAL, 'FUA was not advertised on a read-only export')
  c.request({ type: CMD.FLUSH, cookie: 5, length: 0 })
  assert.equal((await c.structuredReply())[0]!.error, 0)
  c.destroy()
})

test('wire: simple replies: errors carry only the errno, DF is refused, data follows the header', { timeout: TIMEOUT }, async () => {
  const c = await opened('mem', { structured: false })
  c.request({ type: CMD.WRITE, cookie: 1, offset: 100, length: 5 }, Buffer.from('hello'))
  assert.equal((await c.reply()).error, 0)
  c.request({ type: CMD.READ, cookie: 2, offset: 100, length: 5 })
  assert.equal((await c.reply(5)).data.toString(), 'hello')
  c.request({ type: CMD.READ, flags: 4, cookie: 3, offset: 0, length: 5 })
  assert.equal((await c.reply()).error, EINVAL)
  c.request({ type: CMD.READ, cookie: 4, offset: 8 * MiB, length: 5 })
  const r = await c.reply()
  assert.deepEqual([r.structured, r.error, r.cookie], [false, EINVAL, 4n])
  c.destroy()
})

test('wire: pipelined requests run concurrently and reply out of order with correct cookies', { timeout: TIMEOUT }, async () => {
  slow.setDelay((op, offset) => (op === 'read' && offset === 0 ? 150 : 0))
  try {
    const c = await opened('slow')
    // All requests in one TCP write: the parser must find every frame in one chunk.
    const frames: Buffer[] = []
    const writes = 20
    for (let i = 0; i < writes; i++) {
      frames.push(bytes().u32(0x25609513).u16(0).u16(CMD.WRITE).u64(100 + i).u64(65536 * (i + 1)).u32(4096).fill(4096, i).build())
    }
    c.write(Buffer.concat([bytes().u32(0x25609513).u16(0).u16(CMD.READ).u64(1).u64(0).u32(4096).build(), ...frames]))
    const order: bigint[] = []
    for (let i = 0; i < writes + 1; i++) order.push((await c.structuredReply())[0]!.cookie)
    assert.equal(order[order.length - 1], 1n, 'the slow read is answered last')
    assert.deepEqual([...order].sort((a, b) => Number(a - b)), [1n, ...Array.from({ length: writes }, (_, i) => BigInt(100 + i))])
    for (let i = 0; i < writes; i++) assert.deepEqual(await slow.read(65536 * (i + 1), 4096), new Uint8Array(4096).fill(i))
    c.destroy()
  } finally {
    slow.setDelay(null)
  }
})

test('wire: back-pressure: hundreds of pipelined reads with a small in-flight limit all complete', { timeout: TIMEOUT }, async () => {
  const c = await opened('mem')
  const count = 400
  const frames: Buffer[] = []
  for (let i = 0; i < count; i++) frames.push(bytes().u32(0x25609513).u16(0).u16(CMD.READ).u64(i).u64(i * 4096).u32(65536).build())
  c.write(Buffer.concat(frames))
  const seen = new Set<bigint>()
  for (let i = 0; i < count; i++) {
    const [chunk] = await c.structuredReply()
    assert.equal(chunk!.data.length, 8 + 65536)
    seen.add(chunk!.cookie)
  }
  assert.equal(seen.size, count)
  c.destroy()
})

test('wire: WRITE_ZEROES punches holes unless NO_HOLE; FAST_ZERO refused where zeroing is slow; TRIM needs discard', { timeout: TIMEOUT }, async () => {
  const c = await opened('mem')
  await mem.write(Buffer.alloc(MiB, 0xff), 2 * MiB)
  c.request({ type: CMD.WRITE_ZEROES, flags: 0x10, cookie: 1, offset: 2 * MiB, length: 65536 })
  assert.equal((await c.structuredReply())[0]!.error, 0, 'fast zero by discard')
  c.request({ type: CMD.WRITE_ZEROES, flags: 0x03, cookie: 2, offset: 2 * MiB + 65536, length: 65536 + 17 })
  assert.equal((await c.structuredReply())[0]!.error, 0, 'NO_HOLE|FUA writes zeros')
  assert.deepEqual(await mem.read(2 * MiB, 2 * 65536 + 17), new Uint8Array(2 * 65536 + 17))
  assert.equal((await mem.read(2 * MiB + 2 * 65536 + 17, 1))[0], 0xff)
  c.destroy()
  const d = await opened('notrim')
  d.request({ type: CMD.TRIM, cookie: 1, offset: 0, length: 512 })
  assert.equal((await d.structuredReply())[0]!.error, EINVAL, 'TRIM was not advertised')
  d.request({ type: CMD.WRITE_ZEROES, flags: 0x10, cookie: 2, offset: 0, length: 512 })
  assert.equal((await d.structuredReply())[0]!.error, ENOTSUP)
  d.request({ type: CMD.WRITE_ZEROES, cookie: 3, offset: 0, length: 512 })
  assert.equal((await d.structuredReply())[0]!.error, 0, 'without FAST_ZERO it must not fail with ENOTSUP')
  d.destroy()
})

test('wire: device errors become EIO error chunks with a one-line message', { timeout: TIMEOUT }, async () => {
  slow.failReads(1)
  const c = await opened('slow')
  c.request({ type: CMD.READ, cookie: 1, offset: 0, length: 512 })
  const [chunk] = await c.structuredReply()
  assert.equal(chunk!.error, EIO)
  assert.ok(!chunk!.data.subarray(6).toString().includes('\n'))
  c.request({ type: CMD.READ, cookie: 2, offset: 0, length: 512 })
  assert.equal((await c.structuredReply())[0]!.error, 0, 'the next read succeeds')
  c.destroy()
})

test('wire: a client sending garbage is dropped without disturbing another client mid-transfer', { timeout: TIMEOUT }, async () => {
  const good = await opened('mem')
  const bad = await opened('mem')
  good.request({ type: CMD.READ, cookie: 1, offset: 0, length: 512 })
  bad.write(bytes().u32(0xdeadbeef).fill(24).build())
  await bad.closed
  await good.structuredReply()
  good.request({ type: CMD.READ, cookie: 2, offset: 0, length: 512 })
  assert.equal((await good.structuredReply())[0]!.cookie, 2n)
  assert.ok(srv.logs.some((l) => l.startsWith('warn') && l.includes('bad request magic 0xdeadbeef')))
  good.destroy()
})

test('wire: random garbage from many clients, in every phase, never disturbs the server', { timeout: TIMEOUT }, async () => {
  let seed = 99
  const rand = (n: number) => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31
    return seed % n
  }
  const noise = (n: number) => Buffer.from(Array.from({ length: n }, () => rand(256)))
  const victims = Array.from({ length: 40 }, async (_, i) => {
    const c = await RawNbdClient.connect({ port: srv.port })
    const phase = i % 4
    if (phase >= 1) await c.handshake(3)
    if (phase >= 2) await c.go('mem')
    if (phase === 3) {
      // Valid-looking headers with random fields: must be answered or refused, never crash.
      for (let k = 0; k < 20; k++) {
        c.request({ type: rand(10), flags: rand(0x40), cookie: k, offset: rand(16 * MiB), length: rand(2) ? rand(70000) : 0 }, undefined)
      }
    }
    c.write(noise(1 + rand(3000)))
    setTimeout(() => c.destroy(), 100)
    await c.closed
  })
  await Promise.all(victims)
  const good = await opened('mem')
  good.request({ type: CMD.READ, cookie: 1, offset: 0, length: 4096 })
  assert.equal((await good.structuredReply())[0]!.error, 0)
  good.destroy()
})

test('wire: DISC lets in-flight requests finish, then the server closes', { timeout: TIMEOUT }, async () => {
  slow.setDelay((op) => (op === 'write' ? 100 : 0))
  try {
    const c = await opened('slow')
    c.request({ type: CMD.WRITE, cookie: 1, offset: 4 * MiB, length: 3 }, Buffer.from('xyz'))
    c.request({ type: CMD.DISC, cookie: 2, length: 0 })
    const [reply] = await c.structuredReply()
    assert.deepEqual([reply!.cookie, reply!.error], [1n, 0])
    await c.closed
    assert.equal(Buffer.from(await slow.read(4 * MiB, 3)).toString(), 'xyz')
  } finally {
    slow.setDelay(null)
  }
})

test('wire: a client that pipelines requests and half-closes still gets every reply', { timeout: TIMEOUT }, async () => {
  const c = await opened('mem')
  const count = 50
  const frames: Buffer[] = []
  for (let i = 0; i < count; i++) frames.push(bytes().u32(0x25609513).u16(0).u16(CMD.READ).u64(i).u64(i * 512).u32(512).build())
  // More requests than the in-flight limit (8), then EOF: buffered requests must not be dropped.
  c.write(Buffer.concat(frames))
  c.end()
  const cookies = new Set<bigint>()
  for (let i = 0; i < count; i++) cookies.add((await c.structuredReply())[0]!.cookie)
  assert.equal(cookies.size, count)
  await c.closed
})

test('wire: the export provider is consulted live at each handshake', { timeout: TIMEOUT }, async () => {
  const c = await client()
  c.option(OPT.INFO, infoRequestBytes('late'))
  assert.equal((await c.optionReplies())[0]!.type, REP.UNKNOWN)
  exportList.push({ name: 'late', device: new MemoryDevice(4096), readOnly: false })
  try {
    c.option(OPT.GO, infoRequestBytes('late'))
    const replies = await c.optionReplies()
    assert.equal(replies[replies.length - 1]!.type, REP.ACK)
  } finally {
    exportList.pop()
  }
  c.destroy()
})

test('server: Unix socket, maxConnections, TLS_REQD without STARTTLS, and graceful close with ESHUTDOWN', { timeout: TIMEOUT }, async () => {
  const dir = await mkdtemp(join(tmpdir(), 'nbd-wire-'))
  try {
    const device = new FaultyDevice(new MemoryDevice(MiB))
    let flushes = 0
    const counted = new Proxy(device, {
      get(target, prop, receiver) {
        if (prop === 'flush') return () => (flushes++, target.flush())
        const value = Reflect.get(target, prop, receiver)
        return typeof value === 'function' ? value.bind(target) : value
      },
    })
    const path = join(dir, 'nbd.sock')
    const local = await startTestServer({ exports: staticExports([{ name: 'd', device: counted, readOnly: false }]), maxConnections: 2 }, { path })
    assert.deepEqual(local.address, { kind: 'unix', path })
    const a = await RawNbdClient.connect({ path })
    await a.handshake()
    await a.go('d')
    const idle = await RawNbdClient.connect({ path })
    await idle.handshake()
    const refused = await RawNbdClient.connect({ path })
    await refused.closed
    assert.ok(local.logs.some((l) => l.includes('connections already')))

    // The first read is held at the device until the test lets it go: it is surely in flight
    // when close() starts, and still in flight when the second request arrives.
    let reachedDevice!: () => void
    const readArrived = new Promise<void>((resolve) => (reachedDevice = resolve))
    let releaseRead!: () => void
    const readReleased = new Promise<void>((resolve) => (releaseRead = resolve))
    device.setGate({
      admit: (_name, op) => {
        if (op !== 'read') return Promise.resolve()
        reachedDevice()
        return readReleased
      },
    })
    a.request({ type: CMD.READ, cookie: 1, offset: 0, length: 512 })
    await readArrived
    const closing = local.close()
    a.request({ type: CMD.READ, cookie: 2, offset: 0, length: 512 })
    const refusedReply = await a.structuredReply()
    releaseRead()
    const replies = [...refusedReply, ...(await a.structuredReply())]
    assert.deepEqual(
      replies.map((r) => [r.cookie, r.error]),
      [[2n, ESHUTDOWN], [1n, 0]],
      'the new read gets ESHUTDOWN at once, the one in flight completes',
    )
    idle.option(OPT.INFO, infoRequestBytes('d'))
    assert.equal((await idle.optionReplies())[0]!.type, 0x80000007, 'ERR_SHUTDOWN during the handshake')
    idle.option(OPT.ABORT)
    assert.equal((await idle.optionReplies())[0]!.type, REP.ACK)
    await Promise.all([a.closed, idle.closed, closing])
    assert.ok(flushes >= 1, 'served devices are flushed on close')
    assert.ok(logsAreClean(local.logs))

    const tlsOnly = await startTestServer({
      exports: staticExports([{ name: 'd', device: new MemoryDevice(4096), readOnly: false }]),
      tls: { mode: 'require', psk: new Map([['u', Buffer.alloc(16, 1)]]) },
    })
    const t = await RawNbdClient.connect({ port: tlsOnly.port })
    await t.handshake()
    for (const code of [OPT.LIST, OPT.STRUCTURED, OPT.GO, OPT.INFO]) {
      t.option(code, code === OPT.GO || code === OPT.INFO ? infoRequestBytes('d') : undefined)
      assert.equal((await t.optionReplies())[0]!.type, REP.TLS_REQD)
    }
    t.option(OPT.EXPORT_NAME, Buffer.from('d'))
    await t.closed
    await tlsOnly.close()
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})

test('server: bad TLS configuration fails at construction or listen; close is idempotent', { timeout: TIMEOUT }, async () => {
  const exports = staticExports([])
  assert.throws(
    () => new NbdServer({ exports, tls: { mode: 'require' } }),
    (err: unknown) => err instanceof SnapError && err.code === 'SNAP_BAD_ARGUMENT',
  )
  const off = new NbdServer({ exports, tls: { mode: 'off' } })
  await off.close()
  await off.close()
  await assert.rejects(off.listen({ port: 0 }), (err: unknown) => err instanceof SnapError && err.code === 'SNAP_BAD_ARGUMENT')
  const missing = new NbdServer({ exports, tls: { mode: 'require', pskFile: '/nonexistent/keys.psk' } })
  await assert.rejects(missing.listen({ port: 0 }), /ENOENT/)
  await missing.close()
})

test('server: STARTTLS over the wire: PSK upgrade forgets earlier negotiation; junk after STARTTLS drops the client', { timeout: TIMEOUT }, async () => {
  const key = Buffer.alloc(32, 7)
  const device = new MemoryDevice(MiB)
  await device.write(Buffer.from('secret data'), 0)
  const tlsServer = await startTestServer({
    exports: staticExports([{ name: 'd', device, readOnly: false }]),
    tls: { mode: 'allow', psk: new Map([['alice', key]]) },
  })
  try {
    const c = await RawNbdClient.connect({ port: tlsServer.port })
    await c.handshake()
    c.option(OPT.STRUCTURED)
    await c.optionReplies()
    c.option(OPT.STARTTLS, Buffer.from('x'))
    assert.equal((await c.optionReplies())[0]!.type, REP.INVALID)
    const t = await c.startTlsPsk(key)
    t.option(OPT.STARTTLS)
    assert.equal((await t.optionReplies())[0]!.type, REP.INVALID, 'TLS is already active')
    // Structured replies were negotiated before STARTTLS and must be forgotten: simple replies.
    await t.go('d', { structured: false })
    t.request({ type: CMD.READ, cookie: 1, offset: 0, length: 11 })
    const reply = await t.reply(11)
    assert.deepEqual([reply.structured, reply.data.toString()], [false, 'secret data'])
    t.request({ type: CMD.DISC, length: 0 })
    await t.closed

    const junk = await RawNbdClient.connect({ port: tlsServer.port })
    await junk.handshake()
    junk.write(Buffer.concat([bytes().ascii('IHAVEOPT').u32(OPT.STARTTLS).u32(0).build(), Buffer.from('not a client hello')]))
    await junk.closed
  } finally {
    await tlsServer.close()
  }
  assert.ok(logsAreClean(tlsServer.logs), tlsServer.logs.join('\n'))
})

test('server: a client that does not finish the handshake within the limit is dropped; one that did stays (injected clock)', { timeout: TIMEOUT }, async () => {
  const device = new MemoryDevice(64 * 1024)
  const clock = new ManualClock()
  const local = await startTestServer({ exports: staticExports([{ name: 'd', device, readOnly: false }]), handshakeTimeoutMs: 300, clock })
  const dropped = () => local.logs.filter((l) => l.includes('handshake not finished within 300 ms')).length
  try {
    const silent = await RawNbdClient.connect({ port: local.port })
    const slow = await RawNbdClient.connect({ port: local.port })
    await slow.handshake() // client flags sent, options never finished
    const served = await RawNbdClient.connect({ port: local.port })
    await served.handshake()
    await served.go('d')
    // The server may accept the silent client after the others: wait for it (no time limit here).
    while (local.server.connectionCount < 3) await new Promise((resolve) => setTimeout(resolve, 2))
    assert.equal(clock.pending, 2, 'a limit runs for each client still negotiating, none for the one in transmission')
    clock.advance(299)
    assert.equal(dropped(), 0, 'nobody is dropped before the limit')
    clock.advance(1)
    await Promise.all([silent.closed, slow.closed])
    assert.equal(dropped(), 2)
    // Well past the limit, the client in transmission still gets answers.
    clock.advance(60_000)
    served.request({ type: 0, cookie: 7, offset: 0, length: 512 })
    const reply = await served.reply(512)
    assert.equal(reply.error, 0)
    assert.equal(local.server.connectionCount, 1)
    served.end()
    await served.closed
  } finally {
    await local.close()
  }
})
