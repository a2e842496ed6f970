/**
 * Issue 19 item 3 end to end: `serve` logs each event as a structured pino record (the event's
 * fields, `event` naming it, a message), and `--on-event CMD` gets each event as one JSON line
 * on stdin, in order (a hook that appends its stdin to a file; it fails for client errors, and
 * that failure is logged with its fields). Offline, `write` prints a crossed warning level on
 * stderr, and `snapshot` records --warn-at/--autoextend-* in the manifest.
 */
import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { Command } from '../../src/protocol/nbd/constants.js'
import { MANIFEST_FILE } from '../../src/volume/manifest.js'
import { Volume } from '../../src/volume/volume.js'
import { freePort } from '../support/free-port.js'
import { RawNbdClient } from '../support/nbd-raw-client.js'
import { ServeProcess } from '../support/serve-process.js'
import { assertError, cli, ok } from './helpers.js'

const CHUNK = 4096
const SIZE = 1024 * 1024
const COW_CHUNKS = 100

let T = ''
before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-serve-events-'))
})
after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

type Json = Record<string, unknown>

function records(log: string): Json[] {
  return log
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Json)
}

/** Polls `read` until `done` holds; bounded only so a failure fails instead of hanging. */
async function until<T>(read: () => Promise<T>, done: (value: T) => boolean, what: string): Promise<T> {
  const deadline = Date.now() + 20_000
  for (;;) {
    const value = await read()
    if (done(value)) return value
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(value)}`)
    await new Promise((r) => setTimeout(r, 50))
  }
}

/** The record's fields without pino's own. */
function fieldsOf(record: Json): Json {
  const { level: _l, time: _t, pid: _p, hostname: _h, name: _n, msg: _m, ...fields } = record
  return fields
}

describe('serve: events as structured log records and --on-event hooks', () => {
  it('fill warning, client error and invalidation: pino records with fields, the hook gets each as a JSON line in order', async () => {
    const vol = join(T, 'vol')
    await Volume.create(vol, { sizeBytes: SIZE })
    const v = await Volume.open(vol)
    await v.createSnapshot('s', { chunkSizeBytes: CHUNK, cowSizeBytes: COW_CHUNKS * CHUNK })
    await v.close()
    const hookOut = join(T, 'hook.jsonl')
    // Appends every event; fails (exit 1) for client errors, which serve must log and survive.
    const hook = `cat >> '${hookOut}'; [ "$BLOCKSNAP_EVENT" != client-error ]`
    const port = await freePort()
    const server = await ServeProcess.start([vol, '--listen', `127.0.0.1:${port}`, '--write-back', '0', '--on-event', hook])
    try {
      const c = await RawNbdClient.connect({ port })
      await c.handshake()
      await c.go('vol', { structured: false })
      // 78 fresh chunks: with header and metadata area, 80 of the COW's 100 chunks.
      c.request({ type: Command.WRITE, cookie: 1, offset: 0, length: 78 * CHUNK }, Buffer.alloc(78 * CHUNK, 0xab))
      assert.equal((await c.reply()).error, 0)
      c.request({ type: Command.READ, cookie: 2, offset: SIZE - CHUNK, length: 2 * CHUNK })
      assert.equal((await c.reply()).error, 22, 'EINVAL: beyond the end')
      // 22 more: two more than the COW holds.
      c.request({ type: Command.WRITE, cookie: 3, offset: 78 * CHUNK, length: 22 * CHUNK }, Buffer.alloc(22 * CHUNK, 0xcd))
      assert.equal((await c.reply()).error, 0, 'origin writes go on, as in the kernel')
      c.request({ type: Command.DISC, cookie: 4, length: 0 })
      c.end()
      await until(() => readFile(hookOut, 'utf8').catch(() => ''), (t) => t.split('\n').length > 3, 'three hook runs')
      await until(async () => records(server.log), (rs) => rs.some((r) => r.event === 'on-event-failed'), 'the failed hook logged')
    } finally {
      if (server.pid !== undefined && server.alive()) process.kill(server.pid, 'SIGTERM')
      await server.exit
      await server.closed
    }
    const cowPath = join(vol, 'snapshots', 's.cow')
    const expected: Json[] = [
      {
        event: 'fill-threshold',
        volume: 'vol',
        snapshot: 's',
        thresholdPercent: 80,
        percent: 80,
        allocatedBytes: 80 * CHUNK,
        cowBytes: COW_CHUNKS * CHUNK,
        capacityBytes: COW_CHUNKS * CHUNK,
      },
      { event: 'client-error', kind: 'request', client: '', export: 'vol', message: '', command: 'NBD_CMD_READ', errno: 'NBD_EINVAL' },
      { event: 'snapshot-invalidated', volume: 'vol', snapshot: 's', reason: 'COW full', cowPath },
    ]
    const logged = records(server.log).filter((r) => typeof r.event === 'string' && !String(r.event).startsWith('on-event'))
    assert.deepEqual(
      logged.map((r) => r.level),
      [40, 40, 40],
      'three warnings',
    )
    const [fill, clientError, invalidated] = logged as [Json, Json, Json]
    assert.match(String(clientError.client), /^nbd conn#1 127\.0\.0\.1:\d+$/)
    assert.match(String(clientError.message), /beyond|range|end/i)
    assert.deepEqual(
      logged.map((r) => ({ ...fieldsOf(r), ...(r.event === 'client-error' ? { client: '', message: '' } : {}) })),
      expected,
    )
    assert.equal(fill.msg, `snapshot vol@s is 80.00% full (warning at 80%): ${80 * CHUNK} of ${COW_CHUNKS * CHUNK} bytes`)
    assert.equal(invalidated.msg, `volume vol, snapshot s is now invalid: COW full (${cowPath})`)

    // The hook: the same events, in order, as `type` + fields + `time`.
    const lines = (await readFile(hookOut, 'utf8')).split('\n').filter((l) => l !== '')
    const hooked = lines.map((l) => JSON.parse(l) as Json)
    for (const h of hooked) assert.ok(!Number.isNaN(Date.parse(String(h.time))), `time ${String(h.time)}`)
    assert.deepEqual(
      hooked.map(({ time: _t, type, ...rest }) => ({ event: type, ...rest })),
      logged.map(fieldsOf),
    )
    const failed = records(server.log).filter((r) => r.event === 'on-event-failed')
    assert.equal(failed.length, 1, 'only the client-error run failed')
    assert.equal(failed[0]?.level, 40)
    assert.equal(failed[0]?.hookEvent, 'client-error')
    assert.equal(failed[0]?.exitCode, 1)
    assert.deepEqual(await server.exit, { code: 0, signal: null }, 'a failing hook does not take serve down')
  })
})

describe('offline: fill options and warnings', () => {
  it('snapshot records --warn-at and --autoextend-*; write prints the crossed level; bad combinations are usage errors', async () => {
    const vol = join(T, 'offline')
    await Volume.create(vol, { sizeBytes: SIZE })
    ok(await cli(['snapshot', `${vol}@s`, '--cow-size', String(COW_CHUNKS * CHUNK), '--warn-at', '50', '--autoextend-threshold', '90', '--autoextend-percent', '10']))
    const record = JSON.parse(await readFile(join(vol, MANIFEST_FILE), 'utf8')).snapshots[0]
    assert.equal(record.warnAtPercent, 50)
    assert.deepEqual(record.autoextend, { thresholdPercent: 90, percent: 10 })
    // 53 chunks of 100: past 50 (not 55).
    const r = await cli(['write', vol, '--offset', '0'], { input: Buffer.alloc(51 * CHUNK, 1) })
    assert.equal(r.code, 0, r.stderr)
    assert.equal(r.stderr, `blocksnap: warning: snapshot offline@s is 53.00% full (warning at 50%): ${53 * CHUNK} of ${COW_CHUNKS * CHUNK} bytes\n`)
    assertError(await cli(['snapshot', `${vol}@t`, '--autoextend-threshold', '80']), 2, /--autoextend-threshold needs --cow-size/)
    assertError(await cli(['snapshot', `${vol}@t`, '--cow-size', '1M', '--warn-at', '100']), 2, /invalid --warn-at '100' \(a whole percentage from 1 to 99\)/)
  })
})
