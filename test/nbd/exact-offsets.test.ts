/**
 * Offsets above 2^53 in error messages are quoted exactly (issue 12, item 8): a Number would round
 * 2^53 + 1 to 2^53. The NBD range error a client gets for a request offset beyond the export, and
 * the error for a COW entry that does not fit in 53 bits, carry the u64 as sent or stored.
 */
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { staticExports } from '../../src/nbd/export.js'
import { decodeArea, decodeAreaInto } from '../../src/format/area.js'
import { ExceptionList } from '../../src/format/exception-list.js'
import { SnapError } from '../../src/errors.js'
import { RawNbdClient } from '../support/nbd-raw-client.js'
import { logsAreClean, startTestServer, type TestServer } from '../support/nbd-test-server.js'

const TIMEOUT = 20_000
const READ = 0
const EINVAL = 22
let srv: TestServer

before(async () => {
  srv = await startTestServer({ exports: staticExports([{ name: 'mem', device: new MemoryDevice(1024 * 1024), readOnly: false }]) })
}, { timeout: TIMEOUT })

after(async () => {
  await srv.close()
  assert.ok(logsAreClean(srv.logs))
}, { timeout: TIMEOUT })

test('nbd: a READ beyond the end quotes its u64 offset exactly in the error chunk', { timeout: TIMEOUT }, async () => {
  const c = await RawNbdClient.connect({ port: srv.port })
  try {
    await c.handshake()
    await c.go('mem')
    const offsets = [2n ** 53n + 1n, 2n ** 64n - 1n, 12345678901234567891n, 2n ** 40n]
    for (const [i, offset] of offsets.entries()) {
      c.request({ type: READ, cookie: i + 1, offset, length: 512 })
      const [chunk] = await c.structuredReply()
      assert.equal(chunk!.error, EINVAL, `offset ${offset}`)
      const length = chunk!.data.readUInt16BE(4)
      const message = chunk!.data.subarray(6, 6 + length).toString('utf8')
      assert.match(message, new RegExp(`^range ${offset}\\+512 is beyond the end of the export`), message)
    }
  } finally {
    c.destroy()
  }
})

test('format: a COW entry above 2^53 is refused with its exact value', () => {
  const cases: [string, number, bigint][] = [
    ['old_chunk', 0, 2n ** 64n - 1n],
    ['old_chunk', 0, 2n ** 53n + 1n],
    ['new_chunk', 8, 2n ** 53n + 3n],
  ]
  for (const [field, at, value] of cases) {
    const area = Buffer.alloc(512)
    area.writeBigUInt64LE(5n, 0) // a valid entry first: old 5 -> new 2
    area.writeBigUInt64LE(2n, 8)
    area.writeBigUInt64LE(field === 'new_chunk' ? 7n : value, 16) // the entry under test
    area.writeBigUInt64LE(field === 'new_chunk' ? value : 3n, 24)
    const expected = (err: unknown) => {
      assert.ok(err instanceof SnapError && err.code === 'SNAP_CORRUPT_METADATA', String(err))
      assert.equal(err.message, `${field} ${value} at byte ${16 + at} does not fit in 53 bits`)
      return true
    }
    assert.throws(() => decodeArea(area), expected, `decodeArea ${field} ${value}`)
    assert.throws(() => decodeAreaInto(area, new ExceptionList()), expected, `decodeAreaInto ${field} ${value}`)
  }
})
