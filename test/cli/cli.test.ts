/**
 * CLI end-to-end, offline: every command spawned as the compiled CLI on temp directories, the
 * `list --json` shape, kernel status lines, exit codes, one-line errors, and files left unchanged
 * by every failing command. Tests are independent (each makes its own volumes) and run a few at a
 * time.
 */
import assert from 'node:assert/strict'
import { cp, mkdtemp, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import {
  assertBytes,
  assertError,
  assertUnchanged,
  cli,
  cliOk,
  fingerprint,
  MERGE_PROGRESS_LINE,
  ok,
  parseList,
  pattern,
  persistentStatus,
  sha256,
} from './helpers.js'
import { poke } from '../support/poke.js'

const MiB = 1024 * 1024
let T = ''

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-cli-'))
})

after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

/** Overwrites `bytes` at `offset` of `file` in place. */

const sizeOf = async (p: string) => (await stat(p)).size

describe('cli (offline)', { concurrency: 2 }, () => {
  it('cli: create with --size (bytes, K, M, G) and --from IMAGE', async () => {
    const cases: [string, number][] = [
      ['8192', 8192],
      ['64K', 64 * 1024],
      ['2M', 2 * MiB],
      ['1G', 1024 * MiB],
    ]
    for (const [text, bytes] of cases) {
      const vol = join(T, `create-${text}`)
      await cliOk(['create', vol, '--size', text])
      const st = await stat(join(vol, 'origin.img'))
      assert.equal(st.size, bytes, `--size ${text}`)
      if (bytes === 1024 * MiB) assert.ok(st.blocks * 512 < MiB, `the 1G origin is sparse (${st.blocks} blocks allocated)`)
    }
    const image = join(T, 'create-image.raw')
    const content = pattern(192 * 1024 + 512, 7)
    await writeFile(image, content)
    const vol = join(T, 'create-from')
    await cliOk(['create', vol, '--from', image])
    assertBytes(await cliOk(['read', vol]), content, 'volume created --from IMAGE')
    assertBytes(await readFile(image), content, 'the source image is untouched')
    const info = parseList(await cliOk(['list', vol, '--json']))
    assert.equal(info.sizeBytes, content.length)
    assert.equal(info.name, 'create-from')
    assert.equal(info.path, vol)
    assert.equal(info.originPath, join(vol, 'origin.img'))
    assert.deepEqual(info.snapshots, [])
    assert.equal(info.merge, null)
  })

  it('cli: write (stdin and --input, odd offsets) and read (stdout, --output, --offset/--length)', async () => {
    const vol = join(T, 'rw')
    const size = MiB
    await cliOk(['create', vol, '--size', '1M'])
    const model = Buffer.alloc(size)
    const a = pattern(10_001, 1)
    await cliOk(['write', vol, '--offset', '4097'], { input: a })
    a.copy(model, 4097)
    const b = pattern(513, 2)
    const input = join(T, 'rw-input.bin')
    await writeFile(input, b)
    await cliOk(['write', vol, '--offset', '1', '--input', input])
    b.copy(model, 1)
    await cliOk(['write', vol, '--offset', String(size - 3)], { input: Buffer.from([0xaa, 0xbb, 0xcc]) })
    model.set([0xaa, 0xbb, 0xcc], size - 3)
    assertBytes(await cliOk(['read', vol]), model, 'read of the whole volume to stdout')
    const output = join(T, 'rw-output.bin')
    await cliOk(['read', vol, '--offset', '4095', '--length', '7001', '--output', output])
    assertBytes(await readFile(output), model.subarray(4095, 4095 + 7001), 'read --offset --length --output')
    assertBytes(await readFile(join(vol, 'origin.img')), model, 'origin.img holds the written bytes')
  })

  it('cli: snapshot with chunk sizes 512/4K/64K and --cow-size; status follows the kernel; views stay at their point in time', async () => {
    const vol = join(T, 'snap')
    const size = MiB
    const sectors = size / 512
    await cliOk(['create', vol, '--size', '1M'])
    const before = pattern(70_000, 3)
    await cliOk(['write', vol, '--offset', '0'], { input: before })
    const model = Buffer.alloc(size)
    before.copy(model)
    const snaps = [
      { name: 'c512', args: ['--chunk-size', '512'], chunk: 512, fixed: null as number | null },
      { name: 'c4k', args: [], chunk: 4096, fixed: null },
      { name: 'c64k', args: ['--chunk-size', '64K'], chunk: 65536, fixed: null },
      { name: 'fixed', args: ['--chunk-size', '4K', '--cow-size', '256K'], chunk: 4096, fixed: 256 * 1024 },
    ]
    const statusOf = async (name: string) => (await cliOk(['status', `${vol}@${name}`])).toString('utf8')
    const cowPath = (name: string) => join(vol, 'snapshots', `${name}.cow`)
    for (const s of snaps) {
      await cliOk(['snapshot', `${vol}@${s.name}`, ...s.args])
      const fresh = persistentStatus(s.chunk, 0)
      const total = (s.fixed ?? (await sizeOf(cowPath(s.name)))) / 512
      if (s.fixed !== null) assert.equal(await sizeOf(cowPath(s.name)), s.fixed, `${s.name}: the fixed COW has its size`)
      assert.equal(await statusOf(s.name), `0 ${sectors} snapshot ${fresh.allocated}/${total} ${fresh.metadata}\n`, `${s.name} fresh`)
    }
    // A fresh 4K-chunk persistent snapshot says 16/<t> 16 (header chunk + first metadata area).
    assert.deepEqual(persistentStatus(4096, 0), { allocated: 16, metadata: 16 })
    assert.equal((await cliOk(['status', vol])).toString(), `0 ${sectors} snapshot-origin\n`)

    // 20000 bytes at offset 1 touch chunks 0..39 (512), 0..4 (4K), 0 (64K).
    const after = pattern(20_000, 4)
    await cliOk(['write', vol, '--offset', '1'], { input: after })
    after.copy(model, 1)
    const touched: Record<string, number> = { c512: 40, c4k: 5, c64k: 1, fixed: 5 }
    for (const s of snaps) {
      const want = persistentStatus(s.chunk, touched[s.name]!)
      const total = (s.fixed ?? (await sizeOf(cowPath(s.name)))) / 512
      assert.equal(await statusOf(s.name), `0 ${sectors} snapshot ${want.allocated}/${total} ${want.metadata}\n`, `${s.name} after writes`)
    }
    // 512-byte chunks hold 32 exceptions per area: 40 exceptions crossed into a second area.
    assert.deepEqual(persistentStatus(512, 40), { allocated: 43, metadata: 3 })

    const then = Buffer.alloc(size)
    before.copy(then)
    for (const s of snaps) assertBytes(await cliOk(['read', `${vol}@${s.name}`]), then, `${s.name} still shows the data from before the writes`)
    assertBytes(await cliOk(['read', vol]), model, 'the origin shows the new data')

    const info = parseList(await cliOk(['list', vol, '--json']))
    assert.deepEqual(
      info.snapshots.map((s) => [s.name, s.chunkSizeBytes, s.store, s.overflow, s.state]),
      snaps.map((s) => [s.name, s.chunk, 'persistent', false, 'active']),
    )
    for (const s of info.snapshots) {
      const def = snaps.find((x) => x.name === s.name)!
      const want = persistentStatus(def.chunk, touched[s.name]!)
      assert.equal(s.cowPath, cowPath(s.name))
      assert.equal(s.cowSizeBytes, await sizeOf(cowPath(s.name)))
      assert.equal(s.allocatedBytes, want.allocated * 512, `${s.name} allocatedBytes`)
      assert.equal(s.metadataBytes, want.metadata * 512, `${s.name} metadataBytes`)
    }
  })

  it('cli: list shows a table with the snapshot rows, and --overflow makes a PO snapshot', async () => {
    const vol = join(T, 'table')
    await cliOk(['create', vol, '--size', '1M'])
    await cliOk(['snapshot', `${vol}@plain`])
    await cliOk(['snapshot', `${vol}@po`, '--overflow', '--cow-size', '16K'])
    const table = (await cliOk(['list', vol])).toString('utf8').trimEnd().split('\n')
    assert.equal(table.length, 4, table.join('\n'))
    assert.match(table[0]!, /^NAME\s+CHUNK\s+STORE\s+DATA%\s+ORIGIN%\s+COW\s+STATE$/)
    assert.match(table[1]!, /^table\s+-\s+origin\s+-\s+-\s+1M\s+active$/)
    assert.match(table[2]!, /^table@plain\s+4K\s+P\s+0\.00\s+0\.00\s+\S+\s+active$/)
    assert.match(table[3]!, /^table@po\s+4K\s+PO\s+0\.00\s+0\.00\s+16K\s+active$/)

    // The PO snapshot's COW has room for two data chunks: a bigger write to it is refused.
    const before = await fingerprint(vol)
    const r = await cli(['write', `${vol}@po`, '--offset', '0'], { input: pattern(20_000, 5) })
    assertError(r, 1, /overflow/i)
    const info = parseList(await cliOk(['list', vol, '--json']))
    const po = info.snapshots.find((s) => s.name === 'po')!
    assert.equal(po.overflow, true)
    assert.equal(po.cowSizeBytes, 16 * 1024)
    assert.equal((await fingerprint(vol)).get('origin.img'), before.get('origin.img'), 'a write to a snapshot leaves the origin alone')
  })

  it('cli: remove deletes the COW file and list no longer shows the snapshot', async () => {
    const vol = join(T, 'remove')
    await cliOk(['create', vol, '--size', '256K'])
    await cliOk(['snapshot', `${vol}@a`])
    await cliOk(['snapshot', `${vol}@b`])
    await cliOk(['remove', `${vol}@a`])
    await assert.rejects(stat(join(vol, 'snapshots', 'a.cow')), { code: 'ENOENT' })
    await stat(join(vol, 'snapshots', 'b.cow'))
    const info = parseList(await cliOk(['list', vol, '--json']))
    assert.deepEqual(
      info.snapshots.map((s) => s.name),
      ['b'],
    )
  })

  it('cli: offline merge makes the origin the snapshot content and drops the snapshot', async () => {
    const vol = join(T, 'merge')
    await cliOk(['create', vol, '--size', '512K'])
    const a = pattern(100_000, 6)
    await cliOk(['write', vol, '--offset', '3'], { input: a })
    await cliOk(['snapshot', `${vol}@s`, '--chunk-size', '4K'])
    await cliOk(['write', vol, '--offset', '50001'], { input: pattern(200_000, 7) })
    const expected = Buffer.alloc(512 * 1024)
    a.copy(expected, 3)
    const merged = ok(await cli(['merge', `${vol}@s`]), 'merge', { stderr: MERGE_PROGRESS_LINE })
    assert.match(merged.stderr, /merged (\d+)\/\1 chunks[^\n]*\n$/, 'the last progress line has every chunk merged')
    assertBytes(await cliOk(['read', vol]), expected, 'origin after the merge')
    const info = parseList(await cliOk(['list', vol, '--json']))
    assert.deepEqual(info.snapshots, [])
    assert.equal(info.merge, null)
    await assert.rejects(stat(join(vol, 'snapshots', 's.cow')), { code: 'ENOENT' })
  })

  it("cli: import adopts another volume's COW for an origin with the same content", async () => {
    const volA = join(T, 'import-a')
    const volB = join(T, 'import-b')
    await cliOk(['create', volA, '--size', '1M'])
    await cliOk(['write', volA, '--offset', '0'], { input: pattern(300_000, 8) })
    await cliOk(['snapshot', `${volA}@s`, '--chunk-size', '64K'])
    await cliOk(['write', volA, '--offset', '70001'], { input: pattern(400_000, 9) })
    // The COW pairs with A's origin as it is now: copy that as B's origin.
    const image = join(T, 'import-origin.img')
    await cp(join(volA, 'origin.img'), image)
    await cliOk(['create', volB, '--from', image])
    const cowA = join(volA, 'snapshots', 's.cow')
    const cowHash = sha256(await readFile(cowA))
    await cliOk(['import', `${volB}@s`, '--cow', cowA])
    const viewA = await cliOk(['read', `${volA}@s`])
    assertBytes(await cliOk(['read', `${volB}@s`]), viewA, 'B@s reads as A@s')
    assert.equal(sha256(await readFile(cowA)), cowHash, 'the source COW is untouched')
    const info = parseList(await cliOk(['list', volB, '--json']))
    assert.equal(info.snapshots.length, 1)
    const s = info.snapshots[0]!
    assert.equal(s.name, 's')
    assert.equal(s.chunkSizeBytes, 65536, 'the chunk size comes from the COW header')
    assert.equal(s.store, 'persistent')
    assert.equal(s.cowPath, join(volB, 'snapshots', 's.cow'), 'imported COWs are copied into the volume')
    assert.equal(sha256(await readFile(s.cowPath)), cowHash)
  })

  it('cli: check passes a clean volume and reports corrupt COWs without changing them', async () => {
    const base = join(T, 'check')
    await cliOk(['create', base, '--size', '1M'])
    await cliOk(['snapshot', `${base}@s`])
    await cliOk(['write', base, '--offset', '0'], { input: pattern(20_000, 10) }) // exceptions 0->2 .. 4->6
    const clean = await cli(['check', base])
    ok(clean, 'check of a clean volume')
    assert.equal(clean.stderr, '')
    ok(await cli(['check', `${base}@s`]), 'check of a clean snapshot')

    // An exception for origin chunk 1000 of a 256-chunk origin: the volume opens, check finds it.
    const vol = join(T, 'check-bounds')
    await cp(base, vol, { recursive: true })
    await poke(join(vol, 'snapshots', 's.cow'), 4096, Buffer.from([0xe8, 0x03]))
    const before = await fingerprint(vol)
    const r = await cli(['check', `${vol}@s`])
    assert.equal(r.code, 3, r.stderr)
    assert.match(r.stderr, /origin chunk 1000 is beyond the end of the origin/)
    assert.doesNotMatch(r.stderr, /\n\s+at /)
    await assertUnchanged(vol, before, 'check')
  })

  describe('cli: corrupt, truncated or foreign COW files', { concurrency: 2 }, () => {
    const corruptions: [string, (cow: string) => Promise<void>, RegExp][] = [
      ['header magic', (cow) => poke(cow, 0, Buffer.from('XXXX')), /magic/i],
      ['truncated inside the header', (cow) => truncate(cow, 100), /small|header|truncat|corrupt/i],
      ['truncated before the first metadata area', (cow) => truncate(cow, 4096), /area|end/i],
      ['duplicate entry', (cow) => poke(cow, 4096 + 16, Buffer.alloc(8)), /duplicate|twice/i],
      ['exception outside the COW', (cow) => poke(cow, 4096 + 8, Buffer.from([0xff, 0xff])), /outside|beyond/i],
      ['foreign file (not a COW)', (cow) => writeFile(cow, pattern(8192, 11)), /magic|corrupt|not a/i],
      ['zeroed header', (cow) => poke(cow, 0, Buffer.alloc(512)), /header|corrupt/i],
    ]
    let base = ''
    before(async () => {
      base = join(T, 'corrupt-base')
      await cliOk(['create', base, '--size', '1M'])
      await cliOk(['snapshot', `${base}@s`])
      await cliOk(['write', base, '--offset', '0'], { input: pattern(20_000, 12) })
    })
    corruptions.forEach(([what, damage, expected], i) => {
      it(`cli: ${what}: reads of the snapshot and check fail with one line, files unchanged`, async () => {
        const vol = join(T, `corrupt-${i}`)
        await cp(base, vol, { recursive: true })
        await damage(join(vol, 'snapshots', 's.cow'))
        const before = await fingerprint(vol)
        // The volume opens with the snapshot broken (test/cli/broken-snapshot.test.ts): reading it names it.
        const refused = assertError(await cli(['read', `${vol}@s`, '--length', '512']), 1, expected)
        assert.match(refused, new RegExp(`corrupt-${i}@s is broken`))
        const checked = await cli(['check', vol])
        assert.equal(checked.code, 3, `check: ${checked.stderr}`)
        assert.match(checked.stderr, expected)
        assert.doesNotMatch(checked.stderr, /\n\s+at /)
        await assertUnchanged(vol, before, what)
      })
    })
  })

  it('cli: errors are one line with the right exit code and change nothing', async () => {
    const vol = join(T, 'errors')
    await cliOk(['create', vol, '--size', '64K'])
    await cliOk(['snapshot', `${vol}@s`])
    const data = pattern(64 * 1024, 13)
    await cliOk(['write', vol, '--offset', '0'], { input: data })
    const before = await fingerprint(vol)
    const check = (what: string) => assertUnchanged(vol, before, what)

    assertError(await cli(['frobnicate', vol]), 2, /unknown command/)
    assertError(await cli(['create', join(T, 'errors-q'), '--size', '12Q']), 2, /12Q/)
    await assert.rejects(stat(join(T, 'errors-q')), { code: 'ENOENT' }, 'no volume made with a bad size')
    assertError(await cli(['snapshot', `${vol}@odd`, '--chunk-size', '3000']), 2, /power of two/)
    assertError(await cli(['list', join(T, 'no-such-volume')]), 1, /no-such-volume/)
    assertError(await cli(['status', `${vol}@nope`]), 1, /nope/)
    assertError(await cli(['remove', `${vol}@nope`]), 1, /nope/)
    assertError(await cli(['create', vol, '--size', '1M']), 1, /exists/)
    assertError(await cli(['write', vol, '--offset', String(64 * 1024 - 10)], { input: pattern(11, 14) }), 1, /beyond|end/)
    assertError(await cli(['snapshot', `${vol}@s`]), 1, /already exists/)
    assertError(await cli(['snapshot', `${vol}@t`, '--store', 'transient']), 1, /transient/)
    assertError(await cli(['merge', vol]), 2, /VOL@SNAP/)
    assertError(await cli(['serve', vol, '--write-back', 'lots']), 2, /write-back size 'lots'/)
    assertError(await cli(['serve', vol, '--handshake-limit', 'soon']), 2, /handshake limit 'soon'/)
    await check('the failing commands')
    assertBytes(await readFile(join(vol, 'origin.img')), data, 'origin bytes after a refused write past the end')

    const help = await cli(['--help'])
    ok(help, '--help')
    assert.match(help.stdout.toString(), /Usage: blocksnap/)
    for (const command of ['create', 'snapshot', 'list', 'status', 'read', 'write', 'merge', 'remove', 'import', 'check', 'serve']) {
      assert.match(help.stdout.toString(), new RegExp(`\\n\\s+${command}\\b`), `--help lists ${command}`)
    }
    const sub = await cli(['snapshot', '--help'])
    ok(sub, 'snapshot --help')
    assert.match(sub.stdout.toString(), /Usage: blocksnap snapshot .*VOL@SNAP/)
    assert.match(sub.stdout.toString(), /--chunk-size/)
    const version = await cli(['--version'])
    ok(version, '--version')
    assert.match(version.stdout.toString(), /^\d+\.\d+\.\d+\n$/)
    await check('--help/--version')
  })
})
