/**
 * CLI end-to-end for three defects (issue 12 items 6 and 7, issue 14 item 6):
 * - a read-only command on a volume with an interrupted, rate-limited merge does not resume it;
 *   `serve` resumes it at the recorded rate;
 * - `merge VOL@S` right after `snapshot VOL@S` (nothing to merge) ends in the server: `--wait`
 *   returns and `list` no longer shows the snapshot;
 * - `remove` and `merge` of a snapshot an NBD client has open are refused with one line naming
 *   the export and the number of clients; `remove --force` removes it and the client's next
 *   commands get ESHUTDOWN.
 * The tests run in order and share one server.
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { Volume } from '../../src/volume/volume.js'
import { freePort } from '../support/free-port.js'
import { RawNbdClient } from '../support/nbd-raw-client.js'
import { ServeProcess } from '../support/serve-process.js'
import { MERGE_PROGRESS_LINE, assertError, cli, cliOk, fingerprint, ok, parseList } from './helpers.js'

const MiB = 1024 * 1024
const NAME = 'lv'
const RATE = 8 * MiB
const ESHUTDOWN = 108

let T = ''
let vol = ''
let port = 0
let server: ServeProcess | null = null

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-merge-remove-live-'))
  vol = join(T, NAME)
  // A merge of 512 chunks at RATE, stopped after its first step (as by Ctrl-C).
  await Volume.create(vol, { sizeBytes: 4 * MiB })
  const volume = await Volume.open(vol)
  try {
    await volume.createSnapshot('s')
    await volume.origin.write(new Uint8Array(2 * MiB).fill(3), 0)
    await volume.flush()
    const merge = await volume.startMerge('s', { rateBytesPerSecond: RATE })
    await merge.stop()
  } finally {
    await volume.close()
  }
})

/** Resolves once the server has logged `text` (an event, not a time). */
function logged(served: ServeProcess, text: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const check = () => {
      if (!served.log.includes(text)) return
      served.child.stderr?.off('data', check)
      resolve()
    }
    served.child.stderr?.on('data', check)
    void served.exit.then(() => reject(new Error(`server exited before logging '${text}':\n${served.log}`)))
    check()
  })
}

after(async () => {
  if (server?.alive() && server.pid !== undefined) {
    process.kill(server.pid, 'SIGKILL')
    await server.exit
  }
  if (T) await rm(T, { recursive: true, force: true })
})

describe('merge and remove (served)', { timeout: 120_000 }, () => {
  it('list on a volume with a pending merge shows it and changes no file', { timeout: 60_000 }, async () => {
    const before = await fingerprint(vol)
    const info = parseList(await cliOk(['list', vol, '--json']))
    assert.equal(info.merge?.snapshot, 's')
    assert.ok((info.merge?.totalChunks ?? 0) > 0, 'chunks are left to merge')
    assert.equal(info.snapshots.find((s) => s.name === 's')?.state, 'merging')
    assert.deepEqual(await fingerprint(vol), before, 'list advanced the merge')
  })

  it('serve resumes the pending merge at its recorded rate, and it ends', { timeout: 60_000 }, async () => {
    port = await freePort()
    server = await ServeProcess.start([vol, '--listen', `127.0.0.1:${port}`])
    assert.match(server.log, new RegExp(`${NAME}: resuming the merge of s at ${RATE} bytes/s`))
    await logged(server, `${NAME}: merge of s complete`)
    const info = parseList(await cliOk(['list', vol, '--json']))
    assert.equal(info.merge, null)
    assert.deepEqual(info.snapshots, [])
  })

  it('merging a snapshot taken just now ends in the server', { timeout: 60_000 }, async () => {
    await cliOk(['snapshot', `${vol}@e`])
    ok(await cli(['merge', `${vol}@e`, '--wait']), 'merge --wait of an empty snapshot', { stderr: MERGE_PROGRESS_LINE })
    const info = parseList(await cliOk(['list', vol, '--json']))
    assert.equal(info.merge, null, 'the volume is not merging any more')
    assert.deepEqual(info.snapshots, [], 'the merged snapshot is gone')
  })

  it('remove and merge refuse a snapshot an NBD client has open; remove --force shuts the client out', { timeout: 60_000 }, async () => {
    await cliOk(['snapshot', `${vol}@b`])
    const client = await RawNbdClient.connect({ port })
    try {
      await client.handshake()
      await client.go(`${NAME}@b`, { structured: true })
      const refusal = `snapshot ${NAME}@b is open by 1 NBD client \\(export ${NAME}@b\\); use --force`
      assertError(await cli(['remove', `${vol}@b`]), 4, new RegExp(refusal))
      assertError(await cli(['merge', `${vol}@b`]), 4, new RegExp(refusal))
      assert.equal(parseList(await cliOk(['list', vol, '--json'])).snapshots[0]?.state, 'active', 'refusals change nothing')

      ok(await cli(['remove', `${vol}@b`, '--force']), 'remove --force')
      client.request({ type: 0, cookie: 1, offset: 0, length: 4096 })
      const reply = await client.structuredReply()
      assert.equal(reply.at(-1)?.error, ESHUTDOWN, 'READ on the removed export')
      client.request({ type: 3, cookie: 2, offset: 0, length: 0 })
      assert.equal((await client.reply()).error, ESHUTDOWN, 'FLUSH on the removed export')
    } finally {
      client.destroy()
    }
  })
})
