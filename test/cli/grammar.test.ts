/**
 * One argument grammar (issue 16, item 3): every byte count takes bytes or K/M/G/T (a share `N%`
 * where one is meant), rates are a size per second, numbers beyond 2^53 - 1 are refused exactly;
 * every error line carries its stable code, and the exit code says what kind of failure it was
 * (1 error, 2 usage, 3 damage found by check, 4 busy).
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { parseRate, parseShare, parseSize } from '../../src/units.js'
import { Volume } from '../../src/volume/volume.js'
import { assertBytes, assertError, cli, cliOk, errorCode, parseList, pattern } from './helpers.js'

let T = ''

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-grammar-'))
})

after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

const K = 1024
const M = 1024 ** 2
const MAX = Number.MAX_SAFE_INTEGER

describe('grammar: parsers', () => {
  it('parseSize: bytes, K/M/G/T with optional B or iB, either case', () => {
    const cases: [string, number][] = [
      ['0', 0],
      ['4096', 4096],
      ['512B', 512],
      ['4K', 4 * K],
      ['4k', 4 * K],
      ['4KB', 4 * K],
      ['4KiB', 4 * K],
      ['16M', 16 * M],
      ['16mib', 16 * M],
      ['1G', 1024 ** 3],
      ['2T', 2 * 1024 ** 4],
      [' 64K ', 64 * K],
      ['007', 7],
    ]
    for (const [text, bytes] of cases) assert.equal(parseSize(text), bytes, text)
    for (const text of ['', 'K', '1.5M', '-1', '1P', '12Q', '4 K', '1e3', '0x10', '4iB', 'lots', '4KK']) {
      assert.ok(Number.isNaN(parseSize(text)), `${JSON.stringify(text)} is not a size`)
    }
  })

  it('parseSize: exact at 2^53 - 1, refused above it (no rounding to a neighbour)', () => {
    assert.equal(parseSize(String(MAX)), MAX)
    assert.equal(parseSize('8191T'), 8191 * 1024 ** 4)
    // Each of these rounds to a safe-looking double when converted naively.
    for (const text of [String(MAX + 1), '9007199254740993', '8192T', '8796093022208K', '9007199254740991K', '99999999999999999999999']) {
      assert.ok(Number.isNaN(parseSize(text)), `${text} is refused`)
    }
  })

  it('parseRate: a size per second, with or without /s', () => {
    for (const text of ['24M', '24M/s', '24MiB/s', '24mb/S', '25165824', '25165824/s']) assert.equal(parseRate(text), 24 * M, text)
    assert.equal(parseRate('0'), 0)
    for (const text of ['24M/h', '24M/', 'fast', '/s', '24M/s/s']) assert.ok(Number.isNaN(parseRate(text)), `${text} is not a rate`)
  })

  it('parseShare: N% or N.N% above 0', () => {
    assert.equal(parseShare('20%'), 20)
    assert.equal(parseShare('12.5%'), 12.5)
    assert.equal(parseShare('150%'), 150)
    for (const text of ['0%', '20', '%', '-5%', '1e2%', '20 %']) assert.ok(Number.isNaN(parseShare(text)), `${text} is not a share`)
  })
})

describe('grammar: the CLI', { concurrency: 1 }, () => {
  it('read --offset/--length and write --offset take sizes (the README example read --length 1M)', async () => {
    const vol = join(T, 'rw')
    await cliOk(['create', vol, '--size', '2M'])
    const data = pattern(3 * K, 1)
    await cliOk(['write', vol, '--offset', '1K', '--input', await file('rw.bin', data)])
    assertBytes(await cliOk(['read', vol, '--offset', '1K', '--length', '3K']), data, 'read --offset 1K --length 3K')
    const whole = await cliOk(['read', vol, '--length', '1M'])
    assert.equal(whole.length, M)
    assertBytes(whole.subarray(K, 4 * K), data, 'read --length 1M')
    assertBytes(await cliOk(['read', vol, '--offset', '1KiB', '--length', '1024B']), data.subarray(0, K), 'KiB and B suffixes')
    assertError(await cli(['read', vol, '--length', '1.5M']), 2, /^blocksnap: error \[SNAP_USAGE\]: invalid length '1\.5M' \(bytes, or a number with K, M, G or T/)
  })

  it('offsets beyond 2^53 - 1 are refused as usage errors; up to it they parse exactly and are out of range', async () => {
    const vol = join(T, 'big')
    await cliOk(['create', vol, '--size', '64K'])
    for (const offset of [String(MAX), '8191T']) {
      assertError(await cli(['read', vol, '--offset', offset]), 1, /^blocksnap: error \[SNAP_OUT_OF_RANGE\]: /)
    }
    for (const offset of [String(MAX + 1), '9007199254740993', '8192T']) {
      assertError(await cli(['read', vol, '--offset', offset]), 2, new RegExp(`^blocksnap: error \\[SNAP_USAGE\\]: invalid offset '${offset}'`))
      assertError(await cli(['write', vol, '--offset', offset], { input: Buffer.from('x') }), 2, /invalid offset/)
    }
  })

  it('snapshot --cow-size takes a size or a share of the origin, rounded up to whole chunks', async () => {
    const vol = join(T, 'cow')
    await cliOk(['create', vol, '--size', '2M'])
    await cliOk(['snapshot', `${vol}@quarter`, '--cow-size', '25%'])
    await cliOk(['snapshot', `${vol}@tenth`, '--cow-size', '10%', '--chunk-size', '8K'])
    await cliOk(['snapshot', `${vol}@fixed`, '--cow-size', '256KiB'])
    const sizes = Object.fromEntries(parseList(await cliOk(['list', vol, '--json'])).snapshots.map((s) => [s.name, s.cowSizeBytes]))
    // 10% of 2 MiB is 209715.2 bytes: 25.6 chunks of 8K, so 26.
    assert.deepEqual(sizes, { quarter: 512 * K, tenth: 26 * 8 * K, fixed: 256 * K })
    assertError(await cli(['snapshot', `${vol}@none`, '--cow-size', '0%']), 2, /^blocksnap: error \[SNAP_USAGE\]: invalid COW size '0%'/)
    assertError(await cli(['snapshot', `${vol}@none`, '--cow-size', 'half']), 2, /invalid COW size 'half' .*N% of the origin's size/)
  })

  it('merge --rate takes a size per second', async () => {
    const vol = join(T, 'rate')
    await cliOk(['create', vol, '--size', '64K'])
    for (const rate of ['24M', '24M/s', '24MiB/s', '0']) {
      await cliOk(['snapshot', `${vol}@s`])
      await cliOk(['write', vol, '--offset', '0'], { input: pattern(8 * K, 2) })
      await cliOk(['merge', `${vol}@s`, '--rate', rate], { stderr: /^blocksnap: merged / })
    }
    await cliOk(['snapshot', `${vol}@s`])
    for (const rate of ['24M/h', 'fast', '-1']) {
      assertError(await cli(['merge', `${vol}@s`, '--rate', rate]), 2, new RegExp(`^blocksnap: error \\[SNAP_USAGE\\]: invalid rate '${rate}' \\(bytes per second`))
    }
  })

  it('serve --write-back and --max-pending go through the same parser', async () => {
    const vol = join(T, 'serve')
    await cliOk(['create', vol, '--size', '64K'])
    assertError(await cli(['serve', vol, '--write-back', '16X']), 2, /^blocksnap: error \[SNAP_USAGE\]: invalid write-back size '16X'/)
    assertError(await cli(['serve', vol, '--max-pending', '8192T']), 2, /^blocksnap: error \[SNAP_USAGE\]: invalid max pending '8192T'/)
  })
})

describe('grammar: error lines and exit codes', { concurrency: 1 }, () => {
  it('usage 2, error 1, damage found by check 3, busy 4; the code is in every error line', async () => {
    const vol = join(T, 'exits')
    await cliOk(['create', vol, '--size', '64K'])
    await cliOk(['snapshot', `${vol}@s`])

    assert.equal(errorCode(assertError(await cli(['frobnicate']), 2, /unknown command 'frobnicate'/)), 'SNAP_USAGE')
    assert.equal(errorCode(assertError(await cli(['list', vol, '--frob']), 2, /unknown option '--frob'/)), 'SNAP_USAGE')
    assert.equal(errorCode(assertError(await cli(['merge', vol]), 2, /expected VOL@SNAP/)), 'SNAP_USAGE')
    assert.equal(errorCode(assertError(await cli(['list', join(T, 'missing')]), 1, /missing/)), 'SNAP_NOT_FOUND')
    assert.equal(errorCode(assertError(await cli(['check', join(T, 'missing')]), 1, /missing/)), 'SNAP_NOT_FOUND')
    assert.equal(errorCode(assertError(await cli(['snapshot', `${vol}@s`]), 1, /already exists/)), 'SNAP_EXISTS')
    assert.equal(errorCode(assertError(await cli(['write', vol, '--offset', '0', '--input', join(T, 'nope.bin')]), 1, /nope\.bin/)), 'SNAP_NOT_FOUND')

    // Held by this process: every command that needs the volume, check included, is busy.
    const held = await Volume.open(vol)
    try {
      for (const args of [['list', vol], ['read', vol, '--length', '1K'], ['snapshot', `${vol}@t`], ['check', vol]]) {
        const stderr = assertError(await cli(args), 4, new RegExp(`volume \\S+ is in use by process ${process.pid}`))
        assert.equal(errorCode(stderr), 'SNAP_BUSY', args.join(' '))
      }
    } finally {
      await held.close()
    }
    await cliOk(['check', vol])

    // Damage: check's findings, exit 3.
    await writeFile(join(vol, 'snapshots', 's.cow'), pattern(8192, 3))
    const checked = await cli(['check', vol])
    assert.equal(checked.code, 3, checked.stderr)
    assert.match(checked.stderr, /^blocksnap: check: s: .*magic/)
    assert.equal(checked.stdout.length, 0)
  })
})

async function file(name: string, data: Uint8Array): Promise<string> {
  const path = join(T, name)
  await writeFile(path, data)
  return path
}
