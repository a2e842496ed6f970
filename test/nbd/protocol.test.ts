/**
 * Codec tests for src/protocol/nbd. Expected bytes come from an independent builder
 * (test/support/nbd-bytes.ts) and from hex captured off a live nbdkit (reference §3-§7);
 * parsers are fed every possible split of their input.
 */
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { test } from 'node:test'
import { ByteQueue } from '../../src/protocol/nbd/byte-queue.js'
import { Command, MAX_OPTION_DATA_BYTES, NbdErrno, Rep, nameOfCommand, nameOfOption } from '../../src/protocol/nbd/constants.js'
import {
  OptionParser,
  buildExportNameReply,
  buildGreeting,
  buildInfoBlockSize,
  buildInfoExport,
  buildInfoName,
  buildOptionError,
  buildOptionReply,
  buildRepMetaContext,
  buildRepServer,
  parseInfoRequest,
  parseMetaContextRequest,
  type OptionEvent,
} from '../../src/protocol/nbd/handshake.js'
import {
  buildBlockStatusChunk,
  buildErrorChunk,
  buildNoneChunk,
  buildOffsetDataHeader,
  buildOffsetHoleChunk,
  buildSimpleReply,
} from '../../src/protocol/nbd/reply.js'
import { RequestParser, parseRequestHeader, type RequestEvent } from '../../src/protocol/nbd/request.js'
import { normalizeExtents } from '../../src/protocol/nbd/extents.js'
import { nbdErrnoFor } from '../../src/nbd/errno.js'
import { parsePskFile } from '../../src/nbd/tls.js'
import { SnapError, type SnapErrorCode } from '../../src/errors.js'
import { bytes, infoRequestBytes, metaContextBytes, optionBytes, requestBytes } from '../support/nbd-bytes.js'

const hex = (text: string) => bytes().hex(text).build()

function drainRequests(parser: RequestParser): RequestEvent[] {
  const out: RequestEvent[] = []
  for (let event = parser.next(); event !== null; event = parser.next()) {
    out.push(event)
    if (event.kind === 'bad-magic') break
  }
  return out
}

function drainOptions(parser: OptionParser): OptionEvent[] {
  const out: OptionEvent[] = []
  for (let event = parser.next(); event !== null; event = parser.next()) out.push(event)
  return out
}

/** Feeds `stream` split into pieces at the given cut points, collecting events after each piece. */
function feedRequests(stream: Buffer, cuts: number[], maxPayload = 1 << 20): RequestEvent[] {
  const parser = new RequestParser(maxPayload)
  const events: RequestEvent[] = []
  let from = 0
  for (const cut of [...cuts, stream.length]) {
    parser.push(stream.subarray(from, cut))
    events.push(...drainRequests(parser))
    from = cut
  }
  return events
}

const simplify = (events: RequestEvent[]) =>
  events.map((e) =>
    e.kind === 'bad-magic' ? e : { kind: e.kind, header: e.header, payload: e.kind === 'request' && e.payload ? e.payload.toString('hex') : null },
  )

test('handshake: greeting matches the captured nbdkit bytes', () => {
  assert.deepEqual(buildGreeting(), hex('4e 42 44 4d 41 47 49 43 49 48 41 56 45 4f 50 54 00 03'))
})

test('handshake: option replies match captured ACK and ERR_UNSUP', () => {
  assert.deepEqual(buildOptionReply(8, Rep.ACK), hex('00 03 e8 89 04 55 65 a9 00 00 00 08 00 00 00 01 00 00 00 00'))
  assert.deepEqual(buildOptionError(99, Rep.ERR_UNSUP), hex('00 03 e8 89 04 55 65 a9 00 00 00 63 80 00 00 01 00 00 00 00'))
  const withMessage = buildOptionError(7, Rep.ERR_UNKNOWN, 'no')
  assert.deepEqual(withMessage, bytes().hex('0003e889045565a9').u32(7).u32(0x80000006).u32(2).ascii('no').build())
})

test('handshake: INFO replies and EXPORT_NAME reply layouts', () => {
  const header = (len: number) => bytes().hex('0003e889045565a9').u32(6).u32(3).u32(len)
  assert.deepEqual(buildInfoExport(6, 64 * 1024 * 1024, 0x0ded), header(12).hex('00 00 | 00 00 00 00 04 00 00 00 | 0d ed'.replace(/\|/g, '')).build())
  assert.deepEqual(buildInfoName(6, 'mem'), header(5).u16(1).ascii('mem').build())
  assert.deepEqual(buildInfoBlockSize(6, 1, 4096, 33554432), header(14).u16(3).u32(1).u32(4096).u32(33554432).build())
  assert.deepEqual(buildExportNameReply(2 ** 40 + 5, 0x0c6d, true), bytes().u64(2 ** 40 + 5).u16(0x0c6d).build())
  assert.deepEqual(buildExportNameReply(512, 1, false), bytes().u64(512).u16(1).fill(124).build())
  assert.deepEqual(
    buildRepServer(3, 'disk', 'a disk'),
    bytes().hex('0003e889045565a9').u32(3).u32(2).u32(14).str32('disk').ascii('a disk').build(),
  )
  assert.deepEqual(
    buildRepMetaContext(10, 1, 'base:allocation'),
    bytes().hex('0003e889045565a9').u32(10).u32(4).u32(19).u32(1).ascii('base:allocation').build(),
  )
})

test('handshake: parseInfoRequest decodes the captured GO and rejects bad framing', () => {
  const captured = hex('49 48 41 56 45 4f 50 54 00 00 00 07 00 00 00 0b 00 00 00 03 6d 65 6d 00 01 00 03')
  assert.deepEqual(parseInfoRequest(captured.subarray(16)), { name: 'mem', infos: [3] })
  assert.deepEqual(parseInfoRequest(infoRequestBytes('', [])), { name: '', infos: [] })
  assert.ok('error' in parseInfoRequest(hex('00 00 00')))
  assert.ok('error' in parseInfoRequest(bytes().u32(100).ascii('mem').u16(0).build()))
  assert.ok('error' in parseInfoRequest(bytes().str32('mem').u16(2).u16(3).build()))
  assert.ok('error' in parseInfoRequest(bytes().u32(1).u8(0).u16(0).build()), 'NUL inside a name')
})

test('handshake: parseMetaContextRequest decodes the captured SET and rejects bad framing', () => {
  const captured = hex(
    '00 00 00 03 6d 65 6d 00 00 00 01 00 00 00 0f 62 61 73 65 3a 61 6c 6c 6f 63 61 74 69 6f 6e',
  )
  assert.deepEqual(parseMetaContextRequest(captured), { name: 'mem', queries: ['base:allocation'] })
  assert.deepEqual(parseMetaContextRequest(metaContextBytes('x', ['a:b', 'base:'])), { name: 'x', queries: ['a:b', 'base:'] })
  assert.ok('error' in parseMetaContextRequest(bytes().str32('x').u32(1).u32(50).ascii('abc').build()))
  assert.ok('error' in parseMetaContextRequest(bytes().str32('x').u32(2).str32('a:b').build()))
  assert.ok('error' in parseMetaContextRequest(bytes().str32('x').u32(0).u8(1).build()), 'trailing bytes')
  assert.ok('error' in parseMetaContextRequest(bytes().u32(4097).fill(4097, 0x61).u32(0).build()), 'name too long')
})

test('handshake: OptionParser parses a stream split at every offset', () => {
  const stream = Buffer.concat([optionBytes(8), optionBytes(7, infoRequestBytes('mem', [1, 3])), optionBytes(99, hex('01 02 03'))])
  const expected = [
    { kind: 'option', code: 8, data: '' },
    { kind: 'option', code: 7, data: infoRequestBytes('mem', [1, 3]).toString('hex') },
    { kind: 'option', code: 99, data: '010203' },
  ]
  for (let a = 0; a <= stream.length; a++) {
    for (const b of [a, Math.min(stream.length, a + 1), Math.min(stream.length, a + 17)]) {
      const parser = new OptionParser()
      const events: OptionEvent[] = []
      parser.push(stream.subarray(0, a))
      events.push(...drainOptions(parser))
      parser.push(stream.subarray(a, b))
      events.push(...drainOptions(parser))
      parser.push(stream.subarray(b))
      events.push(...drainOptions(parser))
      assert.deepEqual(
        events.map((e) => (e.kind === 'option' ? { kind: e.kind, code: e.code, data: e.data.toString('hex') } : e)),
        expected,
        `split at ${a}/${b}`,
      )
    }
  }
})

test('handshake: OptionParser drains oversized option data and reports bad magic', () => {
  const big = Buffer.alloc(MAX_OPTION_DATA_BYTES + 1, 0x41)
  const parser = new OptionParser()
  const stream = Buffer.concat([optionBytes(9, big), optionBytes(3)])
  for (let at = 0; at < stream.length; at += 4096) parser.push(stream.subarray(at, at + 4096))
  const events = drainOptions(parser)
  assert.deepEqual(events[0], { kind: 'too-big', code: 9, length: big.length })
  assert.equal(events[1]?.kind, 'option')
  const bad = new OptionParser()
  bad.push(bytes().ascii('IHAVEOPX').u32(1).u32(0).build())
  assert.deepEqual(bad.next(), { kind: 'bad-magic' })
})

test('request: header parse matches the captured READ', () => {
  const captured = hex('25 60 95 13 00 00 00 00 11 22 33 44 55 66 77 88 00 00 00 00 00 00 00 00 00 00 10 00')
  assert.deepEqual(parseRequestHeader(captured), {
    flags: 0,
    type: Command.READ,
    cookieHi: 0x11223344,
    cookieLo: 0x55667788,
    offset: 0,
    offsetHi: 0,
    offsetLo: 0,
    length: 4096,
  })
  const big = parseRequestHeader(requestBytes({ type: 0, offset: 2n ** 64n - 1n, length: 1 }))
  assert.ok(!('badMagic' in big) && big.offset >= 2 ** 64 - 2 ** 12, 'u64 offsets above 2^53 stay huge')
  const mid = parseRequestHeader(requestBytes({ type: 1, flags: 0x11, offset: 2 ** 40 + 12345, length: 7, cookie: 0xffffffffffffffffn }))
  assert.deepEqual(mid, { flags: 0x11, type: 1, cookieHi: 0xffffffff, cookieLo: 0xffffffff, offset: 2 ** 40 + 12345, offsetHi: 2 ** 8, offsetLo: 12345, length: 7 })
})

test('request: parser handles a pipelined stream split at every offset, and at every pair of offsets', () => {
  const payload = Buffer.from(Array.from({ length: 37 }, (_, i) => i * 7))
  const stream = Buffer.concat([
    requestBytes({ type: Command.READ, cookie: 1, offset: 512, length: 4096 }),
    requestBytes({ type: Command.WRITE, flags: 1, cookie: 2, offset: 1000, length: payload.length }, payload),
    requestBytes({ type: Command.WRITE, cookie: 3, offset: 0, length: 0 }),
    requestBytes({ type: Command.FLUSH, cookie: 4, length: 0 }),
  ])
  const expected = simplify(feedRequests(stream, []))
  assert.equal(expected.length, 4)
  assert.deepEqual(expected[1], {
    kind: 'request',
    header: { flags: 1, type: 1, cookieHi: 0, cookieLo: 2, offset: 1000, offsetHi: 0, offsetLo: 1000, length: 37 },
    payload: payload.toString('hex'),
  })
  assert.deepEqual(expected[2], { kind: 'request', header: { flags: 0, type: 1, cookieHi: 0, cookieLo: 3, offset: 0, offsetHi: 0, offsetLo: 0, length: 0 }, payload: '' }, 'zero-length WRITE has an empty payload')
  for (let a = 0; a <= stream.length; a++) {
    assert.deepEqual(simplify(feedRequests(stream, [a])), expected, `split at ${a}`)
    for (let b = a; b <= stream.length; b += 3) assert.deepEqual(simplify(feedRequests(stream, [a, b])), expected, `split at ${a},${b}`)
  }
})

test('request: random chunking of a long stream (fuzz)', () => {
  let seed = 12345
  const rand = (n: number) => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31
    return seed % n
  }
  const parts: Buffer[] = []
  for (let i = 0; i < 300; i++) {
    const type = rand(3) === 0 ? Command.WRITE : Command.READ
    const length = rand(3000)
    parts.push(requestBytes({ type, cookie: i, offset: rand(1 << 20), length }, type === Command.WRITE ? Buffer.alloc(length, i) : undefined))
  }
  const stream = Buffer.concat(parts)
  const expected = simplify(feedRequests(stream, []))
  assert.equal(expected.length, 300)
  for (let round = 0; round < 20; round++) {
    const cuts: number[] = []
    for (let at = rand(200); at < stream.length; at += 1 + rand(700)) cuts.push(at)
    assert.deepEqual(simplify(feedRequests(stream, cuts)), expected, `round ${round}`)
  }
})

test('request: oversized WRITE payload is drained across splits without buffering it', () => {
  const max = 1024
  const big = Buffer.alloc(5000, 0xee)
  const stream = Buffer.concat([
    requestBytes({ type: Command.WRITE, cookie: 9, length: big.length }, big),
    requestBytes({ type: Command.READ, cookie: 10, length: 1 }),
  ])
  for (let a = 0; a <= stream.length; a += 7) {
    const parser = new RequestParser(max)
    const events: RequestEvent[] = []
    for (let at = 0; at < stream.length; at += 100) {
      parser.push(stream.subarray(at, at + 100))
      events.push(...drainRequests(parser))
      assert.ok(parser.bufferedBytes <= 128, 'the refused payload is never accumulated')
    }
    assert.deepEqual(
      events.map((e) => e.kind),
      ['dropped', 'request'],
    )
    assert.equal(events[0]?.kind === 'dropped' && events[0].header.cookieLo, 9)
  }
})

test('request: bad magic is reported', () => {
  const parser = new RequestParser(1024)
  parser.push(bytes().u32(0x25609514).fill(24).build())
  assert.deepEqual(parser.next(), { kind: 'bad-magic', magic: 0x25609514 })
})

test('reply: simple and structured layouts match captured bytes', () => {
  assert.deepEqual(buildSimpleReply(0, 7, 0), hex('67 44 66 98 00 00 00 00 00 00 00 00 00 00 00 07'))
  assert.deepEqual(buildSimpleReply(0x11223344, 0x55667788, 22), hex('67 44 66 98 00 00 00 16 11 22 33 44 55 66 77 88'))
  assert.deepEqual(
    buildOffsetDataHeader(1, 0x11223344, 0x55667788, 0, 4096),
    hex('66 8e 33 ef 00 01 00 01 11 22 33 44 55 66 77 88 00 00 10 08 00 00 00 00 00 00 00 00'),
  )
  assert.deepEqual(buildErrorChunk(1, 0, 0x33, 22), hex('66 8e 33 ef 00 01 80 01 00 00 00 00 00 00 00 33 00 00 00 06 00 00 00 16 00 00'))
  assert.deepEqual(
    buildErrorChunk(1, 0, 1, 5, 'bad'),
    bytes().hex('668e33ef 0001 8001').u64(1).u32(9).u32(5).u16(3).ascii('bad').build(),
  )
  assert.deepEqual(
    buildBlockStatusChunk(1, 0, 0x22, 1, [{ length: 1 << 20, flags: 3 }]),
    bytes().hex('668e33ef 0001 0005').u64(0x22).hex('00 00 00 0c | 00 00 00 01 | 00 10 00 00 00 00 00 03'.replace(/\|/g, '')).build(),
  )
  assert.deepEqual(buildNoneChunk(0, 5), bytes().hex('668e33ef 0001 0000').u64(5).u32(0).build())
  assert.deepEqual(
    buildOffsetHoleChunk(0, 0, 5, 2 ** 33, 512),
    bytes().hex('668e33ef 0000 0002').u64(5).u32(12).u64(2 ** 33).u32(512).build(),
  )
})

test('byte queue: take across chunks, skip, and zero-copy when contiguous', () => {
  const queue = new ByteQueue()
  queue.push(hex('01 02 03'))
  queue.push(hex('04 05'))
  queue.push(hex('06'))
  assert.equal(queue.length, 6)
  assert.deepEqual(queue.take(2), hex('01 02'))
  assert.deepEqual(queue.take(3), hex('03 04 05'))
  assert.equal(queue.take(2), null)
  assert.equal(queue.skip(10), 1)
  assert.equal(queue.length, 0)
  const chunk = hex('aa bb cc dd')
  queue.push(chunk)
  const view = queue.take(2)!
  assert.equal(view.buffer, chunk.buffer, 'a span inside one chunk is a view, not a copy')
})

test('block status: normalizeExtents trims, merges, caps REQ_ONE and falls back to data', () => {
  assert.deepEqual(normalizeExtents([], 4096, false), [{ length: 4096, flags: 0 }])
  assert.deepEqual(normalizeExtents([{ length: 0, flags: 1 }], 4096, false), [{ length: 4096, flags: 0 }])
  assert.deepEqual(
    normalizeExtents(
      [
        { length: 1024, flags: 3 },
        { length: 1024, flags: 3 },
        { length: 8192, flags: 0 },
      ],
      4096,
      false,
    ),
    [
      { length: 2048, flags: 3 },
      { length: 2048, flags: 0 },
    ],
  )
  assert.deepEqual(normalizeExtents([{ length: 1 << 30, flags: 1 }, { length: 5, flags: 0 }], 4096, true), [{ length: 4096, flags: 1 }])
  assert.deepEqual(normalizeExtents([{ length: 512, flags: 1 }, { length: 5, flags: 0 }], 4096, true), [{ length: 512, flags: 1 }])
  assert.deepEqual(normalizeExtents([{ length: 512, flags: 2 }], 4096, false), [{ length: 512, flags: 2 }], 'short answers are allowed')
})

/** Reference §8 (the NBD spec's error values): the only values a server may send. */
const SPEC_ERRNOS: ReadonlyMap<string, number> = new Map([
  ['EPERM', 1],
  ['EIO', 5],
  ['ENOMEM', 12],
  ['EINVAL', 22],
  ['ENOSPC', 28],
  ['EOVERFLOW', 75],
  ['ENOTSUP', 95],
  ['ESHUTDOWN', 108],
])

/** Every SnapErrorCode, read from the union in src/errors.ts, so a code added later is covered too. */
function snapErrorCodes(): SnapErrorCode[] {
  const source = readFileSync(new URL('../../src/errors.ts', import.meta.url), 'utf8')
  const union = source.slice(source.indexOf('export type SnapErrorCode'), source.indexOf('\n\n', source.indexOf('export type SnapErrorCode')))
  return [...union.matchAll(/\|\s*'([A-Z_]+)'/g)].map((m) => m[1] as SnapErrorCode)
}

test('errno: every SnapError code maps to an NBD errno the spec allows for that command, write-type out-of-range is ENOSPC', () => {
  assert.deepEqual(new Map(Object.entries(NbdErrno)), SPEC_ERRNOS, 'NbdErrno against the spec table')
  const allowed = new Set(SPEC_ERRNOS.values())
  const codes = snapErrorCodes()
  for (const code of ['SNAP_CLOSED', 'SNAP_IO', 'SNAP_MERGE_FAILED', 'NBD_PROTOCOL'] as const) assert.ok(codes.includes(code), `parsed codes lack ${code}`)
  const errors: unknown[] = codes.map((code) => new SnapError(code, 'x'))
  for (const errno of ['ENOSPC', 'EDQUOT', 'EFBIG', 'EROFS', 'EPERM', 'EACCES', 'EINVAL', 'EIO', 'ENOENT']) errors.push(Object.assign(new Error(errno), { code: errno }))
  errors.push(new TypeError('bug'), 'not even an Error', undefined)
  for (const err of errors) {
    for (const command of Object.values(Command)) {
      const errno = nbdErrnoFor(err, command)
      const what = `${String((err as { code?: string } | undefined)?.code ?? err)} on ${nameOfCommand(command)}: ${errno}`
      assert.ok(allowed.has(errno), `${what} is not an NBD error value`)
      // ENOMEM: SHOULD NOT be used; EOVERFLOW: only for oversized requests, which no error becomes.
      assert.ok(errno !== SPEC_ERRNOS.get('ENOMEM') && errno !== SPEC_ERRNOS.get('EOVERFLOW'), `${what}: reserved value`)
      // ENOTSUP: only for WRITE_ZEROES (FAST_ZERO).
      if (errno === SPEC_ERRNOS.get('ENOTSUP')) assert.equal(command, Command.WRITE_ZEROES, what)
    }
  }
  // The spec: servers SHOULD map EDQUOT and EFBIG to ENOSPC.
  for (const errno of ['EDQUOT', 'EFBIG']) assert.equal(nbdErrnoFor(Object.assign(new Error(errno), { code: errno }), Command.WRITE), 28, errno)
  const e = (code: SnapErrorCode) => new SnapError(code, 'x')
  assert.equal(nbdErrnoFor(e('SNAP_OUT_OF_RANGE'), Command.READ), NbdErrno.EINVAL)
  assert.equal(nbdErrnoFor(e('SNAP_OUT_OF_RANGE'), Command.WRITE), NbdErrno.ENOSPC)
  assert.equal(nbdErrnoFor(e('SNAP_OUT_OF_RANGE'), Command.WRITE_ZEROES), NbdErrno.ENOSPC)
  assert.equal(nbdErrnoFor(e('SNAP_OUT_OF_RANGE'), Command.TRIM), NbdErrno.EINVAL)
  assert.equal(nbdErrnoFor(e('SNAP_READ_ONLY'), Command.WRITE), NbdErrno.EPERM)
  assert.equal(nbdErrnoFor(e('SNAP_NO_SPACE'), Command.WRITE), NbdErrno.ENOSPC)
  assert.equal(nbdErrnoFor(e('SNAP_OVERFLOW'), Command.WRITE), NbdErrno.ENOSPC)
  assert.equal(nbdErrnoFor(e('SNAP_NOT_SUPPORTED'), Command.TRIM), NbdErrno.EINVAL)
  assert.equal(nbdErrnoFor(e('SNAP_NOT_SUPPORTED'), Command.WRITE_ZEROES), NbdErrno.ENOTSUP)
  for (const code of ['SNAP_INVALID', 'SNAP_IO', 'SNAP_MERGE_FAILED', 'SNAP_CORRUPT_METADATA'] as const) {
    assert.equal(nbdErrnoFor(e(code), Command.READ), NbdErrno.EIO, code)
  }
  assert.equal(nbdErrnoFor(new TypeError('bug'), Command.READ), NbdErrno.EIO)
  assert.equal(nbdErrnoFor(Object.assign(new Error('full'), { code: 'ENOSPC' }), Command.WRITE), NbdErrno.ENOSPC)
})

test('names: log helpers name commands and options', () => {
  assert.equal(nameOfCommand(Command.BLOCK_STATUS), 'NBD_CMD_BLOCK_STATUS')
  assert.equal(nameOfOption(7), 'NBD_OPT_GO')
  assert.equal(nameOfOption(1234), 'NBD_OPT_UNKNOWN(1234)')
})

test('tls: parsePskFile reads username:hexkey lines and rejects garbage', () => {
  const keys = parsePskFile('# comment\nalice:0011aabb\n\nbob:ff\n')
  assert.deepEqual([...keys.keys()], ['alice', 'bob'])
  assert.deepEqual(keys.get('alice'), hex('00 11 aa bb'))
  assert.throws(() => parsePskFile('alice:xyz'), (err: unknown) => err instanceof SnapError && err.code === 'SNAP_BAD_ARGUMENT')
  assert.throws(() => parsePskFile('nokey'), SnapError)
  assert.throws(() => parsePskFile(''), SnapError)
})
