/**
 * `import` guards (issue 12, items 2 and 3): a COW that already backs a snapshot of the volume is
 * refused (same path or same inode, in place or copied: two snapshots writing one COW invalidate
 * each other), and so is a COW whose exceptions do not fit the origin (check's bounds check runs
 * first). `check` lists at most MAX_PROBLEMS problems per COW. In-process through the Volume API
 * where the item is the rule, one spawn each for the CLI's one-line error.
 */
import assert from 'node:assert/strict'
import { link, mkdtemp, readdir, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { SnapError } from '../../src/errors.js'
import { checkCow } from '../../src/volume/check.js'
import { Volume } from '../../src/volume/volume.js'
import { assertBytes, assertError, assertUnchanged, cli, fingerprint, pattern } from './helpers.js'

const MiB = 1024 * 1024
/** check's documented cap (README), stated here rather than imported so the test checks it. */
const MAX_PROBLEMS = 100
let T = ''

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-import-guards-'))
})

after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

/** A volume of `sizeBytes` holding `content`, a 4K-chunk snapshot `s` of it, then `after` written over it. */
async function volumeWithSnapshot(dir: string, sizeBytes: number, content: Buffer, overwrite: Buffer): Promise<void> {
  await Volume.create(dir, { sizeBytes })
  const vol = await Volume.open(dir)
  try {
    await vol.origin.write(content, 0)
    await vol.createSnapshot('s', { chunkSizeBytes: 4096 })
    await vol.origin.write(overwrite, 0)
    await vol.flush()
  } finally {
    await vol.close()
  }
}

function refusedWith(pattern: RegExp) {
  return (err: unknown) => {
    assert.ok(err instanceof SnapError, `a SnapError, got ${String(err)}`)
    assert.match(err.message, pattern)
    assert.doesNotMatch(err.message, /\n/)
    return true
  }
}

describe('import guards', { concurrency: 1 }, () => {
  it('import refuses a COW that already backs a snapshot (same path, copied or in place, hard link) or the origin', async () => {
    const dir = join(T, 'dup')
    const content = pattern(MiB, 1)
    await volumeWithSnapshot(dir, MiB, content, pattern(200_000, 2))
    const cow = join(dir, 'snapshots', 's.cow')
    const alias = join(T, 'dup-alias.cow')
    await link(cow, alias)
    const vol = await Volume.open(dir)
    try {
      for (const [path, inPlace] of [
        [cow, true],
        [cow, false],
        [alias, true],
        [alias, false],
      ] as const) {
        await assert.rejects(
          vol.importSnapshot('dup', path, { inPlace }),
          refusedWith(/COW .* is already used by snapshot 's' of volume dup$/),
          `${path} ${inPlace ? 'in place' : 'copied'}`,
        )
      }
      await assert.rejects(vol.importSnapshot('dup', join(dir, 'origin.img'), { inPlace: true }), refusedWith(/is the origin of volume dup/))
      assert.deepEqual(
        vol.records.map((r) => r.name),
        ['s'],
        'nothing was attached',
      )
      assert.deepEqual(await readdir(join(dir, 'snapshots')), ['s.cow'], 'no copy left behind')
      // The harm the guard prevents: origin writes that would have gone through two stores of one COW.
      await vol.origin.write(pattern(300_000, 3), 500_000)
      await vol.flush()
      assert.equal(vol.snapshot('s').state, 'active')
      assertBytes(await vol.snapshot('s').read(0, MiB), content, 's still reads as the origin when it was taken')
    } finally {
      await vol.close()
    }
  })

  it('cli: import --in-place of the COW of VOL@s fails with one line naming s, files unchanged', async () => {
    const dir = join(T, 'dup-cli')
    await volumeWithSnapshot(dir, 256 * 1024, pattern(256 * 1024, 4), pattern(10_000, 5))
    const before = await fingerprint(dir)
    const r = await cli(['import', `${dir}@dup`, '--cow', join(dir, 'snapshots', 's.cow'), '--in-place'])
    assertError(r, 4, /already used by snapshot 's'/)
    await assertUnchanged(dir, before, 'the refused import')
  })

  it('import refuses a COW made for a larger origin (exceptions beyond its end), copied or in place', async () => {
    const big = join(T, 'big')
    await volumeWithSnapshot(big, 4 * MiB, Buffer.alloc(0), pattern(4 * MiB, 6)) // 1024 exceptions
    const small = join(T, 'small')
    await Volume.create(small, { sizeBytes: MiB }) // 256 chunks of 4K
    const vol = await Volume.open(small)
    try {
      for (const inPlace of [false, true]) {
        await assert.rejects(
          vol.importSnapshot('x', join(big, 'snapshots', 's.cow'), { inPlace }),
          refusedWith(/COW .* does not fit volume small: area \d+ entry \d+: origin chunk \d+ is beyond the end of the origin \(256 chunks\) \(at least 100 problems\)$/),
        )
      }
      assert.deepEqual(vol.records, [])
      assert.deepEqual(await readdir(join(small, 'snapshots')), [])
    } finally {
      await vol.close()
    }
  })

  it('cli: import of a COW made for a larger origin fails with one line, files unchanged', async () => {
    const big = join(T, 'big-cli')
    await volumeWithSnapshot(big, 2 * MiB, Buffer.alloc(0), pattern(2 * MiB, 7))
    const small = join(T, 'small-cli')
    await Volume.create(small, { sizeBytes: MiB })
    const before = await fingerprint(small)
    assertError(await cli(['import', `${small}@x`, '--cow', join(big, 'snapshots', 's.cow')]), 1, /does not fit volume small-cli: .*beyond the end of the origin/)
    await assertUnchanged(small, before, 'the refused import')
  })

  it(`check lists at most ${MAX_PROBLEMS} problems for a whole COW, then says it stopped`, async () => {
    const big = join(T, 'big-check')
    await volumeWithSnapshot(big, 4 * MiB, Buffer.alloc(0), pattern(4 * MiB, 8)) // 768 exceptions beyond 1M
    const problems = await checkCow(join(big, 'snapshots', 's.cow'), { originSizeBytes: MiB })
    assert.equal(problems.length, MAX_PROBLEMS + 1, `${problems.length} lines`)
    const chunks = problems.slice(0, MAX_PROBLEMS).map((p) => {
      const m = /^area \d+ entry \d+: origin chunk (\d+) is beyond the end of the origin/.exec(p)
      assert.ok(m, p)
      return Number(m[1])
    })
    assert.ok(chunks.every((c) => c >= 256 && c < 1024), 'each names a chunk beyond the 1M origin')
    assert.equal(new Set(chunks).size, MAX_PROBLEMS, 'each names a different chunk')
    assert.match(problems[MAX_PROBLEMS]!, /more problems not listed \(check stops after 100\)/)
    assert.deepEqual(await checkCow(join(big, 'snapshots', 's.cow'), { originSizeBytes: 4 * MiB }), [], 'clean against its own origin')
  })
})
