/**
 * What a client that can reach the NBD port gets before it is let in (docs/security.md): with TLS
 * required nothing but STARTTLS and ABORT is answered in plaintext; client-chosen names are the
 * spec's strings or refused; a handshake has a bounded number of options; requests stay inside
 * the export. Raw bytes over a real NbdServer (test/support/nbd-raw-client.ts), since libnbd
 * never sends most of these.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { staticExports } from '../../src/nbd/export.js'
import { bytes, infoRequestBytes, metaContextBytes } from '../support/nbd-bytes.js'
import { RawNbdClient, type OptionReply } from '../support/nbd-raw-client.js'
import { logsAreClean, startTestServer } from '../support/nbd-test-server.js'

const TIMEOUT = 30_000
const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, PEEK_EXPORT: 4, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED: 8, LIST_META: 9, SET_META: 10, EXTENDED: 11 }
const REP = { ACK: 1, SERVER: 2, INFO: 3, UNSUP: 0x80000001, INVALID: 0x80000003, TLS_REQD: 0x80000005, UNKNOWN: 0x80000006, TOO_BIG: 0x80000009 }
const EINVAL = 22
const ENOSPC = 28

/** INFO/GO data with the name given as raw bytes (any bytes, unlike infoRequestBytes). */
const rawInfoRequest = (name: Uint8Array) => bytes().u32(name.length).raw(name).u16(0).build()

test('TLS required: before STARTTLS every option but ABORT gets ERR_TLS_REQD, EXPORT_NAME is dropped, and no export is named', { timeout: TIMEOUT }, async () => {
  const key = Buffer.alloc(32, 9)
  const device = new MemoryDevice(64 * 1024)
  await device.write(Buffer.from('confidential'), 0)
  const srv = await startTestServer({
    exports: staticExports([{ name: 'secretvol', description: 'secret description', device, readOnly: false }]),
    tls: { mode: 'require', psk: new Map([['alice', key]]) },
  })
  try {
    const c = await RawNbdClient.connect({ port: srv.port })
    await c.handshake()
    const plaintext: OptionReply[] = []
    const options: [string, number, Buffer?][] = [
      ['LIST', OPT.LIST],
      ['PEEK_EXPORT', OPT.PEEK_EXPORT],
      ['INFO', OPT.INFO, infoRequestBytes('secretvol', [0, 1, 2, 3])],
      ['GO', OPT.GO, infoRequestBytes('secretvol', [3])],
      ['INFO default export', OPT.INFO, infoRequestBytes('')],
      ['STRUCTURED_REPLY', OPT.STRUCTURED],
      ['LIST_META_CONTEXT', OPT.LIST_META, metaContextBytes('secretvol', [])],
      ['SET_META_CONTEXT', OPT.SET_META, metaContextBytes('secretvol', ['base:allocation'])],
      ['EXTENDED_HEADERS', OPT.EXTENDED],
      ['unknown 12', 12],
      ['unknown 0x7fffffff', 0x7fffffff],
      ['malformed INFO', OPT.INFO, Buffer.from([0, 0])],
    ]
    for (const [name, code, data] of options) {
      c.option(code, data)
      const replies = await c.optionReplies()
      plaintext.push(...replies)
      assert.deepEqual(
        replies.map((r) => [r.option, r.type]),
        [[code, REP.TLS_REQD]],
        `${name} before TLS`,
      )
    }
    // An option too large to read is drained and answered ERR_TOO_BIG: it says nothing either.
    c.option(OPT.LIST, Buffer.alloc(65 * 1024))
    const tooBig = await c.optionReplies()
    plaintext.push(...tooBig)
    assert.deepEqual(tooBig.map((r) => r.type), [REP.TOO_BIG])
    for (const reply of plaintext) {
      assert.doesNotMatch(reply.data.toString('utf8'), /secret|confidential|alice/, 'nothing about the exports leaks in plaintext')
    }

    // Only now, STARTTLS with the key: the same session then lists the export, so the refusals
    // above were TLS's doing and nothing else's.
    const t = await c.startTlsPsk(key)
    t.option(OPT.LIST)
    const listed = await t.optionReplies()
    assert.deepEqual(listed.map((r) => r.type), [REP.SERVER, REP.ACK])
    assert.match(listed[0]!.data.toString('utf8'), /secretvol/)
    t.destroy()

    // EXPORT_NAME cannot carry an error: the connection is closed without a byte of reply.
    const e = await RawNbdClient.connect({ port: srv.port })
    await e.handshake()
    e.option(OPT.EXPORT_NAME, Buffer.from('secretvol'))
    await e.closed
    await assert.rejects(e.read(1), /server closed the connection \(wanted 1 bytes, had 0\)/)

    // ABORT is acknowledged (the spec's soft disconnect), then the server closes.
    const a = await RawNbdClient.connect({ port: srv.port })
    await a.handshake()
    a.option(OPT.ABORT)
    assert.deepEqual((await a.optionReplies()).map((r) => r.type), [REP.ACK])
    await a.closed
  } finally {
    await srv.close()
  }
  assert.ok(logsAreClean(srv.logs), srv.logs.join('\n'))
})

test('export names: over 4096 bytes, with a NUL or not UTF-8 are refused and never match an export', { timeout: TIMEOUT }, async () => {
  // A name that a lossy UTF-8 decoder would produce from the bytes 'd' 0xff.
  const lossy = 'd\uFFFD'
  const srv = await startTestServer({ exports: staticExports([{ name: lossy, device: new MemoryDevice(4096), readOnly: false }]) })
  try {
    const badNames: [string, Buffer][] = [
      ['not UTF-8', Buffer.from([0x64, 0xff])],
      ['with a NUL', Buffer.from('d\0', 'latin1')],
      ['4097 bytes', Buffer.alloc(4097, 0x64)],
    ]
    const c = await RawNbdClient.connect({ port: srv.port })
    await c.handshake()
    for (const [what, name] of badNames) {
      for (const code of [OPT.INFO, OPT.GO]) {
        c.option(code, rawInfoRequest(name))
        const replies = await c.optionReplies()
        assert.deepEqual(replies.map((r) => r.type), [REP.INVALID], `${what} in option ${code}`)
      }
      c.option(OPT.LIST_META, bytes().u32(name.length).raw(name).u32(0).build())
      assert.deepEqual((await c.optionReplies()).map((r) => r.type), [REP.INVALID], `${what} in LIST_META_CONTEXT`)
    }
    c.option(OPT.LIST_META, bytes().str32(lossy).u32(1).u32(2).raw(Buffer.from([0x62, 0xff])).build())
    assert.deepEqual((await c.optionReplies()).map((r) => r.type), [REP.INVALID], 'a query that is not UTF-8')
    // The real name, spelled in UTF-8, is found: the refusals above are about the bytes.
    c.option(OPT.INFO, infoRequestBytes(lossy))
    assert.deepEqual((await c.optionReplies()).map((r) => r.type), [REP.INFO, REP.INFO, REP.ACK])
    c.destroy()

    for (const [what, name] of badNames) {
      const e = await RawNbdClient.connect({ port: srv.port })
      await e.handshake()
      e.option(OPT.EXPORT_NAME, name)
      await e.closed
      await assert.rejects(e.read(1), /had 0/, `EXPORT_NAME ${what}: closed without entering transmission`)
    }
    const warnings = srv.logs.filter((line) => line.startsWith('warn') && line.includes('EXPORT_NAME'))
    assert.equal(warnings.length, 3, srv.logs.join('\n'))
    assert.match(warnings[0]!, /refused: string is not valid UTF-8; disconnecting$/)
    assert.match(warnings[1]!, /refused: string contains a NUL byte; disconnecting$/)
    assert.match(warnings[2]!, /'d{64}…' refused: string of 4097 bytes exceeds 4096; disconnecting$/)
  } finally {
    await srv.close()
  }
})

test('a handshake takes at most 1024 options: the client that sends more is dropped; a GO as the 1024th is served', { timeout: TIMEOUT }, async () => {
  const srv = await startTestServer({ exports: staticExports([{ name: 'd', device: new MemoryDevice(4096), readOnly: false }]) })
  const unknown = bytes().ascii('IHAVEOPT').u32(99).u32(0).build()
  try {
    const looping = await RawNbdClient.connect({ port: srv.port })
    await looping.handshake()
    looping.write(Buffer.concat(Array.from({ length: 1025 }, () => unknown)))
    for (let i = 0; i < 1024; i++) assert.equal((await looping.optionReply()).type, REP.UNSUP, `reply ${i}`)
    await looping.closed
    await assert.rejects(looping.read(1), /had 0/, 'the 1025th option is not answered')
    assert.ok(srv.logs.some((line) => line.startsWith('warn') && line.includes('more than 1024 options without choosing an export')), srv.logs.join('\n'))

    const patient = await RawNbdClient.connect({ port: srv.port })
    await patient.handshake()
    patient.write(Buffer.concat(Array.from({ length: 1022 }, () => unknown)))
    for (let i = 0; i < 1022; i++) assert.equal((await patient.optionReply()).type, REP.UNSUP)
    await patient.go('d') // STRUCTURED_REPLY and GO: options 1023 and 1024
    patient.request({ type: 0, cookie: 5, offset: 0, length: 16 })
    const [chunk] = await patient.structuredReply()
    assert.equal(chunk!.error, 0)
    patient.destroy()
  } finally {
    await srv.close()
  }
})

test('requests stay inside the export: BLOCK_STATUS, TRIM and WRITE_ZEROES past the end are refused; nothing lands', { timeout: TIMEOUT }, async () => {
  const size = 64 * 1024
  const device = new MemoryDevice(size)
  await device.write(Buffer.alloc(size, 0xab), 0)
  const srv = await startTestServer({ exports: staticExports([{ name: 'd', device, readOnly: false }]) })
  try {
    const c = await RawNbdClient.connect({ port: srv.port })
    await c.handshake()
    await c.go('d', { contexts: ['base:allocation'] })
    const cases: [string, Parameters<RawNbdClient['request']>[0], number][] = [
      ['block status past the end', { type: 7, offset: size, length: 512 }, EINVAL],
      ['block status straddling the end', { type: 7, offset: size - 512, length: 1024 }, EINVAL],
      ['trim straddling the end', { type: 4, offset: size - 512, length: 1024 }, EINVAL],
      ['zeroes straddling the end', { type: 6, offset: size - 512, length: 1024 }, ENOSPC],
      ['zeroes with u64 offset wrapping to 0', { type: 6, offset: 2n ** 64n - 512n, length: 1024 }, ENOSPC],
      ['trim of 4 GiB - 1 at 0', { type: 4, offset: 0, length: 0xffffffff }, EINVAL],
    ]
    for (const [name, fields, errno] of cases) {
      c.request({ ...fields, cookie: 1 })
      const chunks = await c.structuredReply()
      assert.equal(chunks.find((ch) => ch.error !== 0)?.error ?? 0, errno, name)
    }
    assert.deepEqual(Buffer.from(await device.read(0, size)), Buffer.alloc(size, 0xab), 'no refused request changed a byte')
    c.destroy()
  } finally {
    await srv.close()
  }
})
