/**
 * `--json` on every command that reports (issue 16, item 3): one line per document on stdout,
 * `"version": 1` in each, the fields docs/json.md lists and nothing else; `createdAt` on
 * snapshots; merge progress as JSON lines ending in a result; errors under --json as one JSON
 * line on stderr with the stable code and the same exit code as without.
 */
import assert from 'node:assert/strict'
import { cp, mkdtemp, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { Volume } from '../../src/volume/volume.js'
import { type CliResult, cli, cliOk, parseList, pattern } from './helpers.js'

let T = ''

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-json-'))
})

after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

const SNAPSHOT_KEYS = [
  'allocatedBytes',
  'autoextend',
  'chunkSizeBytes',
  'cowCapacityBytes',
  'cowExternal',
  'cowPath',
  'cowSizeBytes',
  'createdAt',
  'dataPercent',
  'metadataBytes',
  'name',
  'originPercent',
  'overflow',
  'reason',
  'state',
  'store',
  'warnAtPercent',
]

/** stdout as JSON lines, each a versioned document. */
function documents(stdout: Buffer): Record<string, unknown>[] {
  const text = stdout.toString('utf8')
  assert.ok(text.endsWith('\n'), `output ends with a newline: ${JSON.stringify(text)}`)
  return text
    .slice(0, -1)
    .split('\n')
    .map((line) => {
      const doc = JSON.parse(line) as Record<string, unknown>
      assert.equal(doc.version, 1, `version 1 in ${line}`)
      return doc
    })
}

/** The one document of a command, with exactly `keys` (version included). */
function document(stdout: Buffer, keys: string[]): Record<string, unknown> {
  const docs = documents(stdout)
  assert.equal(docs.length, 1, 'one document')
  const doc = docs[0]!
  assert.deepEqual(Object.keys(doc).sort(), ['version', ...keys].sort())
  return doc
}

function snapshotObject(value: unknown, name: string, since: number): Record<string, unknown> {
  const s = value as Record<string, unknown>
  assert.deepEqual(Object.keys(s).sort(), SNAPSHOT_KEYS)
  assert.equal(s.name, name)
  const created = Date.parse(s.createdAt as string)
  assert.match(s.createdAt as string, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/)
  assert.ok(created >= since - 1000 && created <= Date.now() + 1000, `createdAt ${String(s.createdAt)} is now`)
  return s
}

/** Under --json: exit `code`, nothing on stdout, one JSON error line on stderr with `errorCode`. */
function assertJsonError(r: CliResult, code: number, errorCode: string, message: RegExp): void {
  assert.equal(r.code, code, `exit ${r.code}: ${r.stderr}`)
  assert.equal(r.stdout.length, 0, `stdout: ${r.stdout.toString()}`)
  assert.match(r.stderr, /^[^\n]+\n$/, `one line: ${r.stderr}`)
  const doc = JSON.parse(r.stderr) as Record<string, unknown>
  assert.deepEqual(Object.keys(doc).sort(), ['error', 'version'])
  assert.equal(doc.version, 1)
  const error = doc.error as Record<string, unknown>
  assert.deepEqual(Object.keys(error).sort(), ['code', 'message'])
  assert.equal(error.code, errorCode)
  assert.match(error.message as string, message)
}

describe('json', { concurrency: 1 }, () => {
  it('snapshot, list, status, check, import and remove print versioned documents with createdAt', async () => {
    const vol = join(T, 'vm')
    await cliOk(['create', vol, '--size', '1M'])
    const since = Date.now()
    const created = document(await cliOk(['snapshot', `${vol}@s`, '--chunk-size', '8K', '--json']), ['device', 'snapshot'])
    assert.equal(created.device, `${vol}@s`)
    const s = snapshotObject(created.snapshot, 's', since)
    assert.equal(s.chunkSizeBytes, 8192)
    assert.equal(s.state, 'active')
    await cliOk(['write', vol, '--offset', '0'], { input: pattern(20_000, 1) })

    const listed = parseList(await cliOk(['list', vol, '--json']))
    assert.equal(listed.version, 1)
    assert.equal(listed.snapshots[0]?.createdAt, s.createdAt, 'list and snapshot agree on createdAt')

    const origin = document(await cliOk(['status', vol, '--json']), ['device', 'statusLine', 'snapshot', 'merge', 'warnings'])
    assert.deepEqual(origin, { version: 1, device: vol, statusLine: '0 2048 snapshot-origin', snapshot: null, merge: null, warnings: [] })
    const status = document(await cliOk(['status', `${vol}@s`, '--json']), ['device', 'statusLine', 'snapshot', 'merge', 'warnings'])
    assert.equal(status.statusLine, (await cliOk(['status', `${vol}@s`])).toString().trimEnd(), 'the same line as without --json')
    assert.equal(snapshotObject(status.snapshot, 's', since).allocatedBytes, listed.snapshots[0]?.allocatedBytes)

    const clean = document(await cliOk(['check', vol, '--json']), ['device', 'clean', 'problems'])
    assert.deepEqual(clean, { version: 1, device: vol, clean: true, problems: [] })

    // import adopts s's COW, copied, into a second volume with the same origin.
    const other = join(T, 'other')
    await cp(vol, other, { recursive: true })
    await cliOk(['remove', `${other}@s`])
    const importedSince = Date.now()
    const imported = document(await cliOk(['import', `${other}@k`, '--cow', join(vol, 'snapshots', 's.cow'), '--json']), ['device', 'snapshot'])
    assert.equal(imported.device, `${other}@k`)
    assert.equal(snapshotObject(imported.snapshot, 'k', importedSince).chunkSizeBytes, 8192)

    const removed = document(await cliOk(['remove', `${other}@k`, '--json']), ['device', 'removed'])
    const cowPath = join(other, 'snapshots', 'k.cow')
    assert.deepEqual(removed, { version: 1, device: `${other}@k`, removed: { name: 'k', cowPath, cowDeleted: true } })
    await assert.rejects(stat(cowPath), { code: 'ENOENT' })
    // A COW imported in place is kept, and the document says so.
    await cliOk(['import', `${other}@ext`, '--cow', join(vol, 'snapshots', 's.cow'), '--in-place'])
    assert.deepEqual(document(await cliOk(['remove', `${other}@ext`, '--json']), ['device', 'removed']).removed, {
      name: 'ext',
      cowPath: join(vol, 'snapshots', 's.cow'),
      cowDeleted: false,
    })
  })

  it('check --json lists the damage per snapshot and exits 3', async () => {
    const vol = join(T, 'damaged')
    await cliOk(['create', vol, '--size', '1M'])
    await cliOk(['snapshot', `${vol}@good`])
    await cliOk(['snapshot', `${vol}@bad`])
    await writeFile(join(vol, 'snapshots', 'bad.cow'), pattern(8192, 2))
    const r = await cli(['check', vol, '--json'])
    assert.equal(r.code, 3, r.stderr)
    assert.equal(r.stderr, '', 'findings are in the document')
    const doc = document(r.stdout, ['device', 'clean', 'problems'])
    assert.equal(doc.clean, false)
    const problems = doc.problems as { snapshot: string; problem: string }[]
    assert.ok(problems.length >= 1)
    for (const p of problems) {
      assert.deepEqual(Object.keys(p).sort(), ['problem', 'snapshot'])
      assert.equal(p.snapshot, 'bad')
    }
    assert.match(problems[0]!.problem, /magic/)
  })

  it('merge --json: progress lines, the last one complete, then the result', async () => {
    const vol = join(T, 'merge')
    await cliOk(['create', vol, '--size', '1M'])
    await cliOk(['snapshot', `${vol}@s`, '--chunk-size', '4K'])
    await cliOk(['write', vol, '--offset', '0'], { input: pattern(64 * 1024, 3) })
    const r = await cli(['merge', `${vol}@s`, '--json'])
    assert.equal(r.code, 0, r.stderr)
    assert.equal(r.stderr, '', 'no progress on stderr under --json')
    const docs = documents(r.stdout)
    const result = docs.pop()!
    assert.deepEqual(result, { version: 1, type: 'result', device: `${vol}@s`, state: 'complete' })
    assert.ok(docs.length >= 1, 'at least one progress line')
    let done = -1
    for (const p of docs) {
      assert.deepEqual(Object.keys(p).sort(), ['device', 'doneBytes', 'doneChunks', 'etaSeconds', 'rateBytesPerSecond', 'totalBytes', 'totalChunks', 'type', 'version'])
      assert.equal(p.type, 'progress')
      assert.equal(p.totalChunks, 16, '64 KiB written in 4K chunks')
      assert.equal(p.totalBytes, 64 * 1024)
      assert.ok((p.doneChunks as number) > done, 'progress only moves forward')
      done = p.doneChunks as number
      assert.equal(p.doneBytes, done * 4096)
    }
    assert.equal(done, 16, 'the last progress line is the complete merge')
  })

  it('errors under --json are one JSON line on stderr with the stable code and the usual exit code', async () => {
    const vol = join(T, 'errors')
    await cliOk(['create', vol, '--size', '1M'])
    assertJsonError(await cli(['list', join(T, 'missing'), '--json']), 1, 'SNAP_NOT_FOUND', /missing/)
    assertJsonError(await cli(['list', vol, '--json', '--frob']), 2, 'SNAP_USAGE', /unknown option '--frob'/)
    assertJsonError(await cli(['snapshot', `${vol}@s`, '--json', '--cow-size', 'big']), 2, 'SNAP_USAGE', /invalid COW size 'big'/)
    assertJsonError(await cli(['check', `${vol}@nope`, '--json']), 1, 'SNAP_NOT_FOUND', /no snapshot 'nope'/)
    assertJsonError(await cli(['merge', `${vol}@nope`, '--json']), 1, 'SNAP_NOT_FOUND', /nope/)
    const held = await Volume.open(vol)
    try {
      assertJsonError(await cli(['status', vol, '--json']), 4, 'SNAP_BUSY', /is in use by process/)
    } finally {
      await held.close()
    }
  })
})
