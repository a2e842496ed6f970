/**
 * fdatasync off libuv's pool (src/device/flush-thread.ts): flushes and FUA writes of file devices
 * complete with their errors intact, close waits for a flush in flight, and an idle flush thread
 * never keeps the process alive.
 */
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, test } from 'node:test'
import { fileURLToPath } from 'node:url'
import { FileDevice } from '../../../src/device/file-device.js'
import { fdatasyncOffPool } from '../../../src/device/flush-thread.js'

const REPO = fileURLToPath(new URL('../../..', import.meta.url))
const dir = await mkdtemp(join(tmpdir(), 'blocksnap-flush-thread-'))
after(() => rm(dir, { recursive: true, force: true }))

test('flush thread: a bad descriptor fails with its errno, on a later turn', async () => {
  let calledBack = false
  const err = await new Promise<NodeJS.ErrnoException | null>((resolve) => {
    fdatasyncOffPool(1 << 30, (e) => {
      calledBack = true
      resolve(e)
    })
    assert.equal(calledBack, false, 'never called back synchronously')
  })
  assert.equal(err?.code, 'EBADF')
})

test('flush thread: many devices flush and FUA-write at once; close waits for the flushes in flight', async () => {
  const devices = await Promise.all(Array.from({ length: 6 }, (_, i) => FileDevice.open(join(dir, `f${i}.img`), { create: 1 << 20 })))
  const work: Array<Promise<void>> = []
  devices.forEach((d, i) => {
    work.push(d.write(new Uint8Array(64 * 1024).fill(i + 1), 0, { fua: true }))
    work.push(d.flush())
  })
  // Closing right away must neither close a descriptor the flush thread still uses nor lose a flush.
  const closes = devices.map((d) => d.close())
  await Promise.all([...work, ...closes])
  for (let i = 0; i < devices.length; i++) {
    const bytes = await readFile(join(dir, `f${i}.img`))
    assert.ok(bytes.subarray(0, 64 * 1024).every((b) => b === i + 1), `device ${i}`)
  }
})

test('flush thread: a process that flushed exits by itself once its work is done', () => {
  const script = `
    import { FileDevice } from './src/device/file-device.ts'
    const d = await FileDevice.open(${JSON.stringify(join(dir, 'exit.img'))}, { create: 4096 })
    await d.write(new Uint8Array(4096).fill(9), 0, { fua: true })
    await d.flush()
    await d.close()
    console.log('flushed')
  `
  // The time limit only guards the test run against a hang: exiting at all is the verdict.
  const child = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: REPO, encoding: 'utf8', timeout: 60_000 })
  assert.equal(child.signal, null, 'the process did not exit on its own: an idle flush thread kept it alive')
  assert.equal(child.status, 0, child.stderr)
  assert.equal(child.stdout.trim(), 'flushed')
})
