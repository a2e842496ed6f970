/**
 * CLI contract of `diff`, `export-diff` and `import-diff` (a few spawns): the exact `diff --json`
 * document, the human table, a stream through a pipe (stdout to stdin), progress lines, the
 * one-line refusal of a corrupt stream with the replica unchanged; and the same verbs live on
 * served volumes through their control sockets, exporting a snapshot while a client writes.
 */
import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { freePort } from '../support/free-port.js'
import { ServeProcess } from '../support/serve-process.js'
import { assertBytes, assertError, cli, cliOk, fingerprint, pattern } from './helpers.js'

const SIZE = 1024 * 1024
let T = ''

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-backup-cli-'))
})
after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

const PROGRESS = /^\{"event":"(progress|done)",/

describe('backup CLI', () => {
  it('diff --json prints exactly the documented document; without --json a table and totals', async () => {
    const vol = join(T, 'v')
    await cliOk(['create', vol, '--size', String(SIZE)])
    await cliOk(['snapshot', `${vol}@a`, '--chunk-size', '4K'])
    await cliOk(['write', vol, '--offset', '5000'], { input: pattern(3000, 1) })
    await cliOk(['snapshot', `${vol}@b`, '--chunk-size', '1K'])
    const doc = JSON.parse((await cliOk(['diff', `${vol}@a`, `${vol}@b`, '--json'])).toString('utf8')) as Record<string, unknown>
    assert.deepEqual(Object.keys(doc), ['version', 'from', 'to', 'sizeBytes', 'granularityBytes', 'changedBytes', 'extents'])
    // 5000..8000 in 1 KiB granules: [4096, 8192)
    assert.deepEqual(doc, {
      version: 1,
      from: 'a',
      to: 'b',
      sizeBytes: SIZE,
      granularityBytes: 1024,
      changedBytes: 4096,
      extents: [{ offset: 4096, length: 4096 }],
    })
    const toOrigin = JSON.parse((await cliOk(['diff', `${vol}@b`, vol, '--json'])).toString('utf8')) as Record<string, unknown>
    assert.equal(toOrigin.to, null)
    assert.deepEqual(toOrigin.extents, [])
    const table = (await cliOk(['diff', `${vol}@a`, vol])).toString('utf8')
    assert.match(table, /^OFFSET {2}LENGTH\n4096 {4}4096\n1 extent, 4096 bytes changed \(0\.39% of 1048576\) from .*@a to .*v, granularity 4096 bytes\n$/)
    assertError(await cli(['diff', `${vol}@a`, `${join(T, 'other')}@b`]), 2, /not views of one volume/)
  })

  it('export-diff to stdout piped into import-diff from stdin; a corrupt stream is refused with one line, the replica unchanged', async () => {
    const vol = join(T, 'v')
    const replica = join(T, 'r')
    await cliOk(['create', replica, '--size', String(SIZE)])
    const full = await cliOk(['export-diff', `${vol}@a`, '--output', '-'])
    const fullFile = join(T, 'a.full')
    await writeFile(fullFile, full)
    const done = (await cli(['import-diff', replica, '--input', fullFile, '--json', '--progress'])).stderr
    const lines = done.trim().split('\n')
    for (const l of lines) assert.match(l, PROGRESS)
    const summary = JSON.parse(lines[lines.length - 1] as string) as Record<string, unknown>
    assert.deepEqual(Object.keys(summary), ['event', 'from', 'to', 'sizeBytes', 'changedBytes', 'dataBytes', 'writtenBytes', 'streamBytes'])
    assert.equal(summary.to, 'a')
    const inc = await cliOk(['export-diff', `${vol}@b`, '--from', 'a', '--output', '-', '--json'], { stderr: PROGRESS })
    const bad = Buffer.from(inc)
    bad[bad.length - 40] = (bad[bad.length - 40] as number) ^ 0x10
    const before = await fingerprint(replica)
    assertError(await cli(['import-diff', replica, '--input', '-'], { input: bad }), 1, /invalid or corrupt diff stream: .*fails its checksum/)
    assertError(await cli(['import-diff', replica, '--input', '-'], { input: inc.subarray(0, 500) }), 1, /invalid or corrupt diff stream: truncated/)
    assert.deepEqual(await fingerprint(replica), before, 'a refused stream changed the replica')
    await cliOk(['import-diff', replica, '--input', '-'], { input: inc })
    assertBytes(await cliOk(['read', replica]), await cliOk(['read', `${vol}@b`]), 'replica origin = source b')
  })

  it('live: export-diff from a served volume while a client writes, import-diff into a served replica', async () => {
    const vol = join(T, 'live')
    const replica = join(T, 'live-replica')
    await cliOk(['create', vol, '--size', String(SIZE)])
    await cliOk(['create', replica, '--size', String(SIZE)])
    const servers: ServeProcess[] = []
    try {
      for (const v of [vol, replica]) servers.push(await ServeProcess.start([v, '--listen', `127.0.0.1:${await freePort()}`]))
      await cliOk(['write', vol, '--offset', '0'], { input: pattern(200_000, 2) })
      await cliOk(['snapshot', `${vol}@a`])
      await cliOk(['import-diff', replica, '--input', '-'], { input: await cliOk(['export-diff', `${vol}@a`, '--output', '-']) })
      await cliOk(['write', vol, '--offset', '300000'], { input: pattern(100_000, 3) })
      await cliOk(['snapshot', `${vol}@b`])
      const b = await cliOk(['read', `${vol}@b`])
      // A client writes the origin while b is exported: the stream is b's point in time.
      const out = join(T, 'b.inc')
      const [exported] = await Promise.all([
        cli(['export-diff', `${vol}@b`, '--from', 'a', '--output', out]),
        cli(['write', vol, '--offset', '250000'], { input: pattern(400_000, 4) }),
      ])
      assert.equal(exported.code, 0, exported.stderr)
      const stream = await readFile(out)
      assert.ok(stream.length < 120_000, `incremental stream of ${stream.length} bytes for ~100 KB changed`)
      await cliOk(['import-diff', replica, '--input', out])
      assertBytes(await cliOk(['read', replica]), b, 'served replica origin = source b')
      const list = JSON.parse((await cliOk(['list', replica, '--json'])).toString('utf8')) as { snapshots: Array<{ name: string }> }
      assert.deepEqual(list.snapshots.map((s) => s.name), ['a', 'b'])
    } finally {
      for (const s of servers) {
        if (s.alive() && s.pid !== undefined) process.kill(s.pid, 'SIGTERM')
        await s.exit
      }
    }
  })
})
