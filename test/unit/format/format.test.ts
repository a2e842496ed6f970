/**
 * Golden tests of the on-disk format (reference §2.1–§2.3, invariant 9) against bytes built by
 * an independent builder (test/support/byte-builder.ts), never against src/format itself.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { clearEntries, decodeArea, decodeAreaInto, readEntry, writeEntry } from '../../../src/format/area.js'
import { ExceptionList } from '../../../src/format/exception-list.js'
import { checkVersion, decodeHeader, encodeHeader } from '../../../src/format/header.js'
import {
  ENTRY_BYTES,
  FIRST_DATA_CHUNK,
  FORMAT_VERSION,
  HEADER_BYTES,
  SNAP_MAGIC,
  areaChunk,
  dataChunkOfEntry,
  isMetadataChunk,
  layoutFor,
  nextDataChunk,
} from '../../../src/format/layout.js'
import { ByteBuilder, buildArea, buildCow, buildEntry, buildHeader, hex, nthDataChunk } from '../../support/byte-builder.js'

const TWO_53 = 2n ** 53n

function throwsCode(fn: () => unknown, code: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.equal((err as { code?: unknown }).code, code)
    return true
  })
}

// ---------------------------------------------------------------------------------------------
// byte builder sanity (the oracle must itself be right)

test('byte-builder: u32le and u64le lay out little-endian bytes', () => {
  const bytes = new ByteBuilder().u32le(0x70416e53).u64le(0x0102030405060708n).u64le(2n ** 64n - 1n).build()
  assert.equal(hex(bytes), '53 6E 41 70 08 07 06 05 04 03 02 01 FF FF FF FF FF FF FF FF')
})

test('byte-builder: buildCow places area k at chunk 1 + k*(E+1)', () => {
  const chunkBytes = 512 // E = 32, stride 33
  const entries: Array<[number, number]> = Array.from({ length: 40 }, (_, i) => [1000 + i, nthDataChunk(chunkBytes, i)])
  const image = buildCow({ chunkBytes, cowBytes: 80 * chunkBytes, entries })
  assert.equal(hex(image.subarray(0, 16)), '53 6E 41 70 01 00 00 00 01 00 00 00 01 00 00 00')
  // area 0 entry 0 at chunk 1; area 1 entry 0 (the 33rd entry) at chunk 34
  assert.deepEqual(image.subarray(512, 528), buildEntry(1000, 2))
  assert.deepEqual(image.subarray(34 * 512, 34 * 512 + 16), buildEntry(1032, 35))
  assert.equal(nthDataChunk(chunkBytes, 31), 33)
  assert.equal(nthDataChunk(chunkBytes, 32), 35)
})

// ---------------------------------------------------------------------------------------------
// header (§2.2, invariant 9)

test('encodeHeader: golden bytes "SnAp", valid 1, version 1, chunk size LE32, then zeros', () => {
  for (const chunkSectors of [1, 8, 16, 32, 128, 1024]) {
    const chunkBytes = chunkSectors * 512
    const bytes = encodeHeader({ valid: true, version: 1, chunkSizeSectors: chunkSectors }, chunkBytes)
    assert.equal(bytes.length, chunkBytes)
    const lo = chunkSectors & 0xff
    const hi = (chunkSectors >> 8) & 0xff
    const expected = `53 6E 41 70 01 00 00 00 01 00 00 00 ${hex(Uint8Array.of(lo, hi, 0, 0))}`
    assert.equal(hex(bytes.subarray(0, 16)), expected)
    assert.ok(bytes.subarray(16).every((b) => b === 0), 'rest of chunk 0 is zero')
    assert.deepEqual(bytes, buildHeader({ chunkBytes }))
  }
})

test('encodeHeader: valid=false writes 0 in the valid field', () => {
  const bytes = encodeHeader({ valid: false, version: 1, chunkSizeSectors: 8 }, 4096)
  assert.equal(hex(bytes.subarray(0, 16)), '53 6E 41 70 00 00 00 00 01 00 00 00 08 00 00 00')
  assert.deepEqual(bytes, buildHeader({ chunkBytes: 4096, valid: 0 }))
})

test('layout constants: magic, version and entry size match the reference', () => {
  assert.equal(SNAP_MAGIC, 0x70416e53)
  assert.equal(FORMAT_VERSION, 1)
  assert.equal(ENTRY_BYTES, 16)
  assert.equal(HEADER_BYTES, 16)
  assert.equal(FIRST_DATA_CHUNK, 2)
})

test('decodeHeader: zero magic means a new COW, other fields ignored', () => {
  const bytes = new ByteBuilder().u32le(0).u32le(7).u32le(99).u32le(12345).padTo(512).build()
  assert.deepEqual(decodeHeader(bytes), { kind: 'new' })
  assert.deepEqual(decodeHeader(new Uint8Array(512)), { kind: 'new' })
})

test('decodeHeader: bad magic throws SNAP_CORRUPT_METADATA', () => {
  for (const magic of [0x70416e54, 0x536e4170, 1, 0xffffffff]) {
    throwsCode(() => decodeHeader(buildHeader({ chunkBytes: 512, magic })), 'SNAP_CORRUPT_METADATA')
  }
})

test('decodeHeader: truncated input throws SNAP_CORRUPT_METADATA', () => {
  throwsCode(() => decodeHeader(buildHeader({ chunkBytes: 512 }).subarray(0, 15)), 'SNAP_CORRUPT_METADATA')
})

test('decodeHeader: returns valid, version and chunk size of an existing header', () => {
  assert.deepEqual(decodeHeader(buildHeader({ chunkBytes: 4096 })), { kind: 'existing', valid: true, version: 1, chunkSizeSectors: 8 })
  assert.deepEqual(decodeHeader(buildHeader({ chunkBytes: 512, valid: 0, chunkSectors: 128 })), {
    kind: 'existing',
    valid: false,
    version: 1,
    chunkSizeSectors: 128,
  })
})

test('decodeHeader: version is returned, not checked; checkVersion rejects anything but 1', () => {
  const decoded = decodeHeader(buildHeader({ chunkBytes: 512, version: 2 }))
  assert.equal(decoded.kind, 'existing')
  if (decoded.kind !== 'existing') return
  assert.equal(decoded.version, 2)
  throwsCode(() => checkVersion(decoded), 'SNAP_BAD_FORMAT_VERSION')
  throwsCode(() => checkVersion({ valid: true, version: 0, chunkSizeSectors: 8 }), 'SNAP_BAD_FORMAT_VERSION')
  assert.doesNotThrow(() => checkVersion({ valid: true, version: 1, chunkSizeSectors: 8 }))
})

test('decodeHeader: works on a subarray with a non-zero byteOffset', () => {
  const buffer = new Uint8Array(600)
  buffer.set(buildHeader({ chunkBytes: 512, chunkSectors: 16 }), 7)
  assert.deepEqual(decodeHeader(buffer.subarray(7, 519)), { kind: 'existing', valid: true, version: 1, chunkSizeSectors: 16 })
})

// ---------------------------------------------------------------------------------------------
// layout (§2.1, §2.5)

test('layout: worked example chunk 8 sectors, E=256, stride 257', () => {
  const layout = layoutFor(4096)
  assert.equal(layout.exceptionsPerArea, 256)
  assert.equal(layout.stride, 257)
  for (const k of [0, 1, 2, 3, 1000]) assert.equal(areaChunk(layout, k), 1 + 257 * k)
  const handed: number[] = []
  let chunk = FIRST_DATA_CHUNK
  for (let i = 0; i < 513; i++) {
    handed.push(chunk)
    chunk = nextDataChunk(layout, chunk)
  }
  assert.deepEqual(handed.slice(0, 256), Array.from({ length: 256 }, (_, i) => 2 + i))
  assert.deepEqual(handed.slice(256, 512), Array.from({ length: 256 }, (_, i) => 259 + i))
  assert.equal(handed[512], 516)
  assert.equal(nextDataChunk(layout, 257), 259)
  assert.equal(nextDataChunk(layout, 514), 516)
  assert.equal(nextDataChunk(layout, 2), 3)
})

test('layout: table of geometries from the reference', () => {
  const table: Array<[number, number, number]> = [
    // chunk bytes, E, stride
    [512, 32, 33],
    [4096, 256, 257],
    [8192, 512, 513],
    [16384, 1024, 1025],
    [65536, 4096, 4097],
  ]
  for (const [chunkBytes, e, stride] of table) {
    const layout = layoutFor(chunkBytes)
    assert.equal(layout.chunkBytes, chunkBytes)
    assert.equal(layout.exceptionsPerArea, e, `E for ${chunkBytes}`)
    assert.equal(layout.stride, stride, `stride for ${chunkBytes}`)
    assert.equal(areaChunk(layout, 0), 1)
    assert.equal(areaChunk(layout, 1), 1 + stride)
    assert.equal(areaChunk(layout, 7), 1 + 7 * stride)
  }
})

test('isMetadataChunk: header and every c with c mod stride == 1, nothing else', () => {
  for (const chunkBytes of [512, 4096]) {
    const layout = layoutFor(chunkBytes)
    const stride = layout.stride
    for (let c = 0; c < 4 * stride + 3; c++) {
      const expected = c === 0 || c % stride === 1
      assert.equal(isMetadataChunk(layout, c), expected, `chunk ${c} at ${chunkBytes}`)
    }
  }
})

test('dataChunkOfEntry: entry i of area k describes chunk 2 + k(E+1) + i (invariant 11)', () => {
  const layout = layoutFor(512)
  for (let i = 0; i < 100; i++) {
    const k = Math.floor(i / 32)
    assert.equal(dataChunkOfEntry(layout, k, i % 32), nthDataChunk(512, i))
  }
  assert.equal(dataChunkOfEntry(layoutFor(4096), 1, 0), 259)
})

// ---------------------------------------------------------------------------------------------
// areas (§2.3)

test('decodeArea: entries until the first new_chunk == 0; later entries ignored', () => {
  const area = buildArea(512, [
    [10, 2],
    [11, 3],
    [999, 0], // terminator: old_chunk irrelevant
    [12, 4], // after the terminator: ignored
  ])
  assert.deepEqual(decodeArea(area), {
    entries: [
      { oldChunk: 10, newChunk: 2 },
      { oldChunk: 11, newChunk: 3 },
    ],
    full: false,
  })
})

test('decodeArea: an empty area has no entries and is not full', () => {
  assert.deepEqual(decodeArea(new Uint8Array(512)), { entries: [], full: false })
})

test('decodeArea: an area with all E entries in use is full', () => {
  const entries: Array<[number, number]> = Array.from({ length: 32 }, (_, i) => [i * 3, 2 + i])
  const decoded = decodeArea(buildArea(512, entries))
  assert.equal(decoded.full, true)
  assert.deepEqual(
    decoded.entries.map((e) => [e.oldChunk, e.newChunk]),
    entries,
  )
  // One entry short is not full.
  assert.equal(decodeArea(buildArea(512, entries.slice(0, 31))).full, false)
})

test('decodeArea: old_chunk 0 is a real entry, only new_chunk 0 terminates', () => {
  const decoded = decodeArea(buildArea(512, [[0, 2], [0, 3]]))
  assert.equal(decoded.entries.length, 2)
})

test('decodeArea: the terminator old_chunk is not decoded even above 2^53', () => {
  const area = buildArea(512, [
    [1, 2],
    [2n ** 63n, 0],
  ])
  assert.deepEqual(decodeArea(area).entries, [{ oldChunk: 1, newChunk: 2 }])
  assert.equal(decodeAreaInto(area, new ExceptionList()), 1)
})

test('decodeAreaInto: appends the same entries as decodeArea and returns the count in use', () => {
  const entries: Array<[number, number]> = [
    [7, 2],
    [8, 3],
    [2 ** 40, 4],
  ]
  const area = buildArea(4096, [...entries, [5, 0], [6, 7]])
  const list = new ExceptionList()
  assert.equal(decodeAreaInto(area, list), 3)
  const seen = Array.from({ length: list.count }, (_, i) => [list.oldAt(i), list.newAt(i)])
  assert.deepEqual(seen, entries)
  const full: Array<[number, number]> = Array.from({ length: 32 }, (_, i) => [i, 2 + i])
  assert.equal(decodeAreaInto(buildArea(512, full), new ExceptionList()), 32)
})

test('area: u64 values up to 2^53-1 decode exactly', () => {
  const max = 2 ** 53 - 1
  const area = buildArea(512, [[TWO_53 - 1n, TWO_53 - 1n], [2n ** 32n, 2n ** 32n + 5n]])
  assert.deepEqual(readEntry(area, 0), { oldChunk: max, newChunk: max })
  assert.deepEqual(readEntry(area, 1), { oldChunk: 2 ** 32, newChunk: 2 ** 32 + 5 })
  assert.deepEqual(decodeArea(area).entries[0], { oldChunk: max, newChunk: max })
})

test('area: u64 at or above 2^53 is rejected with SNAP_CORRUPT_METADATA', () => {
  for (const big of [TWO_53, TWO_53 + 1n, 2n ** 63n, 2n ** 64n - 1n]) {
    const badNew = buildArea(512, [[1, big]])
    throwsCode(() => decodeArea(badNew), 'SNAP_CORRUPT_METADATA')
    throwsCode(() => readEntry(badNew, 0), 'SNAP_CORRUPT_METADATA')
    throwsCode(() => decodeAreaInto(badNew, new ExceptionList()), 'SNAP_CORRUPT_METADATA')
    const badOld = buildArea(512, [[big, 2]])
    throwsCode(() => decodeArea(badOld), 'SNAP_CORRUPT_METADATA')
    throwsCode(() => readEntry(badOld, 0), 'SNAP_CORRUPT_METADATA')
    throwsCode(() => decodeAreaInto(badOld, new ExceptionList()), 'SNAP_CORRUPT_METADATA')
  }
})

test('writeEntry: bytes equal the independent builder, including values above 2^32', () => {
  const entries: Array<[number, number]> = [
    [0, 2],
    [1, 3],
    [0xffffffff, 4],
    [2 ** 32, 2 ** 32 + 1],
    [2 ** 53 - 1, 2 ** 40 + 7],
  ]
  const area = new Uint8Array(512)
  entries.forEach(([o, n], i) => writeEntry(area, i, o, n))
  assert.deepEqual(area, buildArea(512, entries))
  entries.forEach(([o, n], i) => assert.deepEqual(readEntry(area, i), { oldChunk: o, newChunk: n }))
})

test('writeEntry: writes into a subarray at its own offset', () => {
  const backing = new Uint8Array(1024).fill(0xaa)
  const area = backing.subarray(512)
  area.fill(0)
  writeEntry(area, 1, 5, 6)
  assert.deepEqual(area, buildArea(512, [[0, 0], [5, 6]]))
  assert.ok(backing.subarray(0, 512).every((b) => b === 0xaa), 'bytes before the subarray untouched')
})

test('clearEntries: zeroes entries [from, to) only', () => {
  const entries: Array<[number, number]> = [
    [1, 2],
    [2, 3],
    [3, 4],
    [4, 5],
  ]
  const area = buildArea(512, entries)
  clearEntries(area, 1, 3)
  assert.deepEqual(area, buildArea(512, [[1, 2], [0, 0], [0, 0], [4, 5]]))
  assert.equal(decodeArea(area).entries.length, 1)
})

test('round-trip: a builder COW image decodes to the same header and table', () => {
  const chunkBytes = 512
  const entries: Array<[number, number]> = Array.from({ length: 70 }, (_, i) => [(i * 7919) % 5000, nthDataChunk(chunkBytes, i)])
  const image = buildCow({ chunkBytes, cowBytes: 120 * chunkBytes, entries })
  const header = decodeHeader(image.subarray(0, chunkBytes))
  assert.deepEqual(header, { kind: 'existing', valid: true, version: 1, chunkSizeSectors: 1 })
  const layout = layoutFor(chunkBytes)
  const table: Array<[number, number]> = []
  for (let k = 0; ; k++) {
    const at = areaChunk(layout, k) * chunkBytes
    const decoded = decodeArea(image.subarray(at, at + chunkBytes))
    for (const e of decoded.entries) table.push([e.oldChunk, e.newChunk])
    if (!decoded.full) break
  }
  assert.deepEqual(table, entries)
})

test('round-trip: encodeHeader + writeEntry reproduce a builder COW image byte for byte', () => {
  const chunkBytes = 4096
  const layout = layoutFor(chunkBytes)
  const entries: Array<[number, number]> = Array.from({ length: 300 }, (_, i) => [i * 2 + 1, nthDataChunk(chunkBytes, i)])
  const cowBytes = 600 * chunkBytes
  const expected = buildCow({ chunkBytes, cowBytes, entries })
  const image = new Uint8Array(cowBytes)
  image.set(encodeHeader({ valid: true, version: 1, chunkSizeSectors: 8 }, chunkBytes), 0)
  let chunk = FIRST_DATA_CHUNK
  entries.forEach(([o], i) => {
    const k = Math.floor(i / layout.exceptionsPerArea)
    const at = areaChunk(layout, k) * chunkBytes
    writeEntry(image.subarray(at, at + chunkBytes), i % layout.exceptionsPerArea, o, chunk)
    assert.equal(chunk, entries[i]?.[1])
    chunk = nextDataChunk(layout, chunk)
  })
  assert.deepEqual(image, expected)
})
