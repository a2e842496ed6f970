/**
 * A broken snapshot is isolated (issue 14, item 2), end to end: with one snapshot's COW corrupt
 * or missing, `read VOL`, the other snapshots, `list`, `status`, `check` and `serve` work; reads
 * of the broken snapshot, origin writes, merges and a plain `remove` are refused with one line
 * naming it (and the way out), changing no byte; `remove --force` drops it and the origin is
 * writable again. Served, origin writes get EPERM over NBD (checked with libnbd's errno).
 * Volumes are built through the Volume API to keep the CLI spawn count down.
 */
import assert from 'node:assert/strict'
import { access, mkdtemp, readFile, rm, unlink } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { Volume } from '../../src/volume/volume.js'
import { freePort } from '../support/free-port.js'
import { requireTools, run } from '../support/nbd-tools.js'
import { ServeProcess } from '../support/serve-process.js'
import { assertBytes, assertError, assertUnchanged, cli, cliOk, fingerprint, ok, parseList, pattern } from './helpers.js'
import { poke } from '../support/poke.js'

const KiB = 1024
const SIZE = 1024 * KiB
const SECTORS = SIZE / 512

let T = ''
before(async () => {
  await requireTools('qemu-io', 'qemu-img', 'nbdinfo', 'nbdsh')
  T = await mkdtemp(join(tmpdir(), 'blocksnap-broken-cli-'))
})
after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

const exists = (p: string) => access(p).then(
  () => true,
  () => false,
)


/** Volume `vol` with snapshots `good` and `bad`, each holding copies; returns the byte models. */
async function makeVolume(vol: string, seed: number): Promise<{ origin: Buffer; good: Buffer }> {
  await Volume.create(vol, { sizeBytes: SIZE })
  const volume = await Volume.open(vol)
  const origin = pattern(SIZE, seed)
  try {
    await volume.origin.write(origin, 0)
    await volume.createSnapshot('good')
    const good = Buffer.from(origin)
    await volume.createSnapshot('bad')
    const data = pattern(64 * KiB, seed + 1)
    await volume.origin.write(data, 4096)
    data.copy(origin, 4096)
    return { origin, good }
  } finally {
    await volume.close()
  }
}

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\`]/g, '\\$&')

describe('cli: a broken snapshot is isolated', { concurrency: 1 }, () => {
  it('offline: the rest reads, refusals name it and change nothing, remove --force makes the origin writable again', async () => {
    const vol = join(T, 'vm')
    const models = await makeVolume(vol, 10)
    const cow = join(vol, 'snapshots', 'bad.cow')
    await poke(cow, 0, Buffer.from('XXXX'))
    const reason = 'bad magic 0x58585858 in vm/snapshots/bad.cow'
    const before = await fingerprint(vol)

    assertBytes((await cliOk(['read', vol])).subarray(), models.origin, 'read vm')
    assertBytes(await cliOk(['read', `${vol}@good`]), models.good, 'read vm@good')
    assertError(await cli(['read', `${vol}@bad`, '--length', '512']), 1, new RegExp(`^blocksnap: error \\[SNAP_[A-Z_]+\\]: snapshot vm@bad is broken: ${escape(reason)}\n$`))
    assertError(
      await cli(['write', vol, '--offset', '0'], { input: pattern(4096, 1) }),
      1,
      new RegExp(`^blocksnap: error \\[SNAP_[A-Z_]+\\]: origin writes are refused: snapshot vm@bad is broken \\(${escape(reason)}\\); repair it, or drop it with \`blocksnap remove vm@bad --force\`\n$`),
    )
    assertError(await cli(['merge', `${vol}@good`]), 1, /merges are refused: snapshot vm@bad is broken .*--force/)
    assertError(await cli(['remove', `${vol}@bad`]), 1, /vm@bad is broken .*may be repairable.*remove vm@bad --force` drops it and deletes .*bad\.cow/)

    const listed = parseList(await cliOk(['list', vol, '--json']))
    assert.deepEqual(
      listed.snapshots.map((s) => [s.name, s.state, s.reason]),
      [
        ['good', 'active', null],
        ['bad', 'broken', reason],
      ],
    )
    const table = (await cliOk(['list', vol])).toString()
    assert.match(table, /^vm@bad\s+4K\s+P\s+\S+\s+\S+\s+\S+\s+broken$/m)
    assert.match(table, new RegExp(`^vm@bad: broken: ${escape(reason)}$`, 'm'))
    const status = ok(await cli(['status', `${vol}@bad`]), 'status vm@bad', { stderr: /^blocksnap: warning: vm@bad is broken: / })
    assert.equal(status.stdout.toString(), `0 ${SECTORS} snapshot Broken\n`)
    assert.equal(status.stderr, `blocksnap: warning: vm@bad is broken: ${reason}\n`)
    const checked = await cli(['check', vol])
    assert.equal(checked.code, 3, checked.stderr)
    assert.match(checked.stderr, /^blocksnap: check: bad: .*bad magic 0x58585858\n$/)
    await assertUnchanged(vol, before, 'the refused commands and the reads')

    // A healthy snapshot stays writable and a new snapshot can be taken: neither touches origin data.
    const mine = pattern(4096, 2)
    await cliOk(['write', `${vol}@good`, '--offset', '8192'], { input: mine })
    mine.copy(models.good, 8192)
    await cliOk(['snapshot', `${vol}@new`])

    ok(await cli(['remove', `${vol}@bad`, '--force']), 'remove --force')
    assert.equal(await exists(cow), false, 'its COW file is deleted')
    const later = pattern(8192, 3)
    await cliOk(['write', vol, '--offset', '0'], { input: later })
    later.copy(models.origin, 0)
    const after = parseList(await cliOk(['list', vol, '--json']))
    assert.deepEqual(after.snapshots.map((s) => [s.name, s.state]), [['good', 'active'], ['new', 'active']])
    // The write was copied into both remaining snapshots first.
    assertBytes(await cliOk(['read', `${vol}@good`]), models.good, 'vm@good after the origin write')
    assertBytes(await cliOk(['read', vol]), models.origin, 'vm after the origin write')
  })

  it('offline: a missing COW file lists as broken and remove --force drops it', async () => {
    const vol = join(T, 'gone')
    await makeVolume(vol, 20)
    await unlink(join(vol, 'snapshots', 'bad.cow'))
    const listed = parseList(await cliOk(['list', vol, '--json']))
    assert.deepEqual(listed.snapshots.map((s) => [s.name, s.state, s.reason]), [
      ['good', 'active', null],
      ['bad', 'broken', 'COW file gone/snapshots/bad.cow is missing'],
    ])
    ok(await cli(['remove', `${vol}@bad`, '--force']), 'remove --force of a snapshot whose COW is missing')
    const manifest = JSON.parse(await readFile(join(vol, 'volume.json'), 'utf8')) as { snapshots: { name: string }[] }
    assert.deepEqual(manifest.snapshots.map((s) => s.name), ['good'])
  })

  it('served: everything else is exported, origin writes get EPERM until remove --force', async () => {
    const vol = join(T, 'sv')
    const models = await makeVolume(vol, 30)
    await poke(join(vol, 'snapshots', 'bad.cow'), 0, Buffer.from('XXXX'))
    const port = await freePort()
    const server = await ServeProcess.start([vol, '--listen', `127.0.0.1:${port}`])
    const uri = (name: string) => `nbd://127.0.0.1:${port}/${name}`
    /** What an NBD write of 4 KiB at 0 gets: "ok" or the errno name libnbd reports. */
    const nbdWrite = async (name: string): Promise<string> => {
      const script = ['try:', "    h.pwrite(b'\\x5a' * 4096, 0)", "    print('ok')", 'except nbd.Error as e:', '    print(e.errno)'].join('\n')
      const r = await run('nbdsh', ['-u', uri(name), '-c', script])
      assert.equal(r.code, 0, `nbdsh: ${r.stderr}`)
      return r.stdout.trim()
    }
    try {
      const warning = server.log.split('\n').find((l) => l.includes('sv@bad is broken'))
      assert.ok(warning, `serve logs the broken snapshot:\n${server.log}`)
      assert.equal((JSON.parse(warning) as { level: number }).level, 40, 'at level warn')
      assert.match(warning, /bad magic 0x58585858 in sv\/snapshots\/bad\.cow.*origin writes are refused with EPERM.*remove sv@bad --force/)

      const listing = await run('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${port}`])
      assert.equal(listing.code, 0, listing.stderr)
      const names = (JSON.parse(listing.stdout) as { exports: { 'export-name': string }[] }).exports.map((e) => e['export-name'])
      assert.deepEqual(names.sort(), ['sv', 'sv@good'])
      const refusedExport = await run('nbdinfo', [uri('sv@bad')])
      assert.notEqual(refusedExport.code, 0, 'sv@bad is not served')

      const before = await fingerprint(vol)
      const originCopy = join(T, 'sv-origin.raw')
      const converted = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri('sv'), originCopy])
      assert.equal(converted.code, 0, converted.stderr)
      assertBytes(await readFile(originCopy), models.origin, 'the origin over NBD')
      assert.equal(await nbdWrite('sv'), 'EPERM', 'origin write over NBD')
      const qemuWrite = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 4096', uri('sv')])
      assert.match(qemuWrite.stdout + qemuWrite.stderr, /Operation not permitted/, 'qemu-io sees EPERM')
      assertError(await cli(['write', vol, '--offset', '0'], { input: pattern(512, 4) }), 1, /origin writes are refused: snapshot sv@bad is broken/)
      assertError(await cli(['remove', `${vol}@bad`]), 1, /--force/)
      const listed = parseList(await cliOk(['list', vol, '--json']))
      assert.deepEqual(listed.snapshots.map((s) => s.state), ['active', 'broken'])
      const checked = await cli(['check', `${vol}@bad`])
      assert.equal(checked.code, 3, checked.stderr)
      assert.match(checked.stderr, /^blocksnap: check: bad: .*bad magic/)
      await assertUnchanged(vol, before, 'refused writes and removal while served')

      assert.equal(await nbdWrite('sv@good'), 'ok', 'a healthy snapshot stays writable')
      ok(await cli(['remove', `${vol}@bad`, '--force']), 'live remove --force')
      assert.equal(await nbdWrite('sv'), 'ok', 'the origin is writable again without a restart')
      const read = await cliOk(['read', vol, '--length', '4096'])
      assertBytes(read, Buffer.alloc(4096, 0x5a), 'the origin write landed')
    } finally {
      if (server.alive() && server.pid !== undefined) process.kill(server.pid, 'SIGTERM')
      const exit = await server.exit
      assert.equal(exit.code, 0, `serve exit: ${JSON.stringify(exit)}\n${server.log}`)
    }
  })
})
