/**
 * The issue-12 reproduction end to end: a crash left a dead PID in VOL/lock, then two `write`
 * commands start at once. Whatever the interleaving, at most one owns the volume at a time: each
 * command either lands completely or fails with one "in use" line, and the snapshot keeps its
 * point in time exactly.
 */
import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { assertError, cli, cliOk, ok, pattern, volumeLockFree } from './helpers.js'

const MiB = 1024 * 1024

describe('cli: volume lock race', () => {
  let T: string
  before(async () => {
    T = await mkdtemp(join(tmpdir(), 'blocksnap-lockrace-'))
  })
  after(async () => {
    await rm(T, { recursive: true, force: true })
  })

  it('two writes racing a stale lock never both own the volume; the snapshot keeps every original byte', { timeout: 120_000 }, async () => {
    const image = pattern(8 * MiB, 12)
    const a = pattern(5 * MiB, 13)
    const b = pattern(3 * MiB, 14)
    await writeFile(join(T, 'R.img'), image)
    await writeFile(join(T, 'R.a'), a)
    await writeFile(join(T, 'R.b'), b)
    for (let round = 0; round < 3; round++) {
      const vol = join(T, `R${round}`)
      await cliOk(['create', vol, '--from', join(T, 'R.img')])
      await cliOk(['snapshot', `${vol}@s`])
      await writeFile(join(vol, 'lock'), '999999\n')
      const [ra, rb] = await Promise.all([
        cli(['write', vol, '--offset', '0', '--input', join(T, 'R.a')]),
        cli(['write', vol, '--offset', String(5 * MiB), '--input', join(T, 'R.b')]),
      ])
      for (const r of [ra, rb]) if (r.code !== 0) assertError(r, 4, /is in use by /)
      assert.ok(volumeLockFree(vol), 'both commands released the lock')
      const origin = await readFile(join(vol, 'origin.img'))
      assert.ok(origin.subarray(0, 5 * MiB).equals(ra.code === 0 ? a : image.subarray(0, 5 * MiB)), `round ${round}: first half`)
      assert.ok(origin.subarray(5 * MiB).equals(rb.code === 0 ? b : image.subarray(5 * MiB)), `round ${round}: second half`)
      const snap = await cliOk(['read', `${vol}@s`])
      assert.ok(snap.equals(image), `round ${round}: the snapshot still reads the original image`)
      ok(await cli(['check', vol]), 'check')
    }
  })
})
