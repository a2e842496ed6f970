/**
 * `list` and device names (issue 12, item 8): DATA% is the COW's fill as lvs shows it (allocated
 * against the COW's size; for a grow-on-demand COW against its size plus the free space of its
 * file system), never above 100, with the origin-relative share in its own ORIGIN% column; a
 * device name with two '@' is a usage error naming it.
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm, statfs } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { Volume, parseDevice } from '../../src/volume/volume.js'
import { assertError, cli, cliOk, parseList, pattern, persistentStatus } from './helpers.js'

let T = ''

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-list-fill-'))
})

after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

/** The table's rows as column name → cell, found by the header (not by position). */
function tableRows(text: string): Record<string, string>[] {
  const [header, ...rows] = text.trimEnd().split('\n').map((l) => l.trim().split(/\s+/))
  return rows.map((cells) => Object.fromEntries(header!.map((name, i) => [name, cells[i] ?? ''])))
}

const round2 = (x: number) => Math.round(x * 100) / 100

describe('list: DATA% and ORIGIN%', { concurrency: 1 }, () => {
  it('cli: a 64K-chunk snapshot of a 1000448-byte origin, fully overwritten: DATA% at most 100, ORIGIN% 100', async () => {
    const dir = join(T, 'E')
    const sizeBytes = 1_000_448 // 15.27 chunks of 64K: the last chunk is partial
    await Volume.create(dir, { sizeBytes })
    const vol = await Volume.open(dir)
    try {
      await vol.createSnapshot('s', { chunkSizeBytes: 65536 })
      await vol.origin.write(pattern(sizeBytes, 1), 0)
      await vol.flush()
    } finally {
      await vol.close()
    }
    const row = tableRows((await cliOk(['list', dir])).toString('utf8')).find((r) => r.NAME === 'E@s')!
    assert.ok(row, 'the snapshot row')
    const data = Number(row['DATA%'])
    assert.ok(data >= 0 && data <= 100, `DATA% ${row['DATA%']}`)
    assert.equal(row['ORIGIN%'], '100.00', 'every origin chunk was copied')
    const info = parseList(await cliOk(['list', dir, '--json']))
    const s = info.snapshots[0]!
    assert.equal(s.originPercent, 100)
    assert.ok(s.cowCapacityBytes > s.cowSizeBytes, 'a grow-on-demand COW can grow into the free space')
    assert.equal(s.dataPercent, round2((100 * s.allocatedBytes) / s.cowCapacityBytes))
    assert.equal(Number(row['DATA%']).toFixed(2), s.dataPercent.toFixed(2))
  })

  it('a fixed COW: DATA% is allocated / COW size (the kernel status numbers), 0 when only metadata, 100 when full', async () => {
    const dir = join(T, 'fixed')
    await Volume.create(dir, { sizeBytes: 1024 * 1024 })
    const vol = await Volume.open(dir)
    try {
      const cowSizeBytes = 64 * 4096 // header, area 0 and 62 data chunks
      await vol.createSnapshot('f', { chunkSizeBytes: 4096, cowSizeBytes })
      const infoOf = async () => (await vol.info()).snapshots.find((x) => x.name === 'f')!
      assert.equal((await infoOf()).dataPercent, 0, 'header and metadata only: 0 %, as lvs')
      assert.equal((await infoOf()).originPercent, 0)
      // 20 chunks copied: allocated = the kernel's allocated sectors for 20 exceptions.
      await vol.origin.write(pattern(20 * 4096, 2), 0)
      await vol.flush()
      const want = persistentStatus(4096, 20)
      const f = await infoOf()
      assert.equal(f.allocatedBytes, want.allocated * 512)
      assert.equal(f.cowCapacityBytes, cowSizeBytes)
      assert.equal(f.dataPercent, round2((100 * want.allocated * 512) / cowSizeBytes))
      assert.equal(f.originPercent, round2((100 * 20) / 256))
      // Fill it up: the snapshot overflows (invalid) and its fill is 100, not more.
      await vol.origin.write(pattern(100 * 4096, 3), 20 * 4096)
      await vol.flush()
      const full = await infoOf()
      assert.ok(full.dataPercent <= 100 && full.dataPercent >= 99, `full: ${full.dataPercent}`)
    } finally {
      await vol.close()
    }
  })

  it("a grow-on-demand COW's capacity is its size plus its file system's free space", async () => {
    const dir = join(T, 'grow')
    await Volume.create(dir, { sizeBytes: 1024 * 1024 })
    const vol = await Volume.open(dir)
    try {
      await vol.createSnapshot('g', { chunkSizeBytes: 4096 })
      await vol.origin.write(pattern(300_000, 4), 0)
      await vol.flush()
      const fs = await statfs(join(dir, 'snapshots'))
      const g = (await vol.info()).snapshots[0]!
      // Other processes share the file system: the free space is compared to 1 GiB, not exactly.
      const grown = g.cowCapacityBytes - g.cowSizeBytes
      assert.ok(Math.abs(grown - fs.bavail * fs.bsize) < 1024 ** 3, `capacity ${g.cowCapacityBytes}, size ${g.cowSizeBytes}, free ${fs.bavail * fs.bsize}`)
      assert.equal(g.dataPercent, round2((100 * g.allocatedBytes) / g.cowCapacityBytes))
    } finally {
      await vol.close()
    }
  })
})

describe('device names', { concurrency: 1 }, () => {
  it('parseDevice: one @ in the last path component; directories above it may hold @', () => {
    assert.deepEqual(parseDevice('E@s'), { volume: 'E', snapshot: 's' })
    assert.deepEqual(parseDevice('E'), { volume: 'E', snapshot: null })
    assert.deepEqual(parseDevice('/srv/a@b/vm'), { volume: '/srv/a@b/vm', snapshot: null })
    assert.deepEqual(parseDevice('/srv/a@b/vm@s'), { volume: '/srv/a@b/vm', snapshot: 's' })
    for (const bad of ['E@a@b', '/srv/E@a@b', 'E@', '@s', 'E@@s']) {
      assert.throws(() => parseDevice(bad), new RegExp(`bad device '${bad}'`), bad)
    }
  })

  it('cli: snapshot and merge of E@a@b are usage errors (exit 2) naming the device', async () => {
    const dir = join(T, 'names')
    await Volume.create(dir, { sizeBytes: 64 * 1024 })
    for (const command of ['snapshot', 'merge']) {
      assertError(await cli([command, `${dir}@a@b`]), 2, new RegExp(`bad device '${dir}@a@b'`))
    }
  })
})
