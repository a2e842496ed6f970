/**
 * keepFreedHeapMapped(): once called, buffers of 1 MiB that are allocated and freed over and over
 * (NBD payloads, socket reads, engine buffers) reuse heap memory instead of being mapped and
 * faulted in afresh each time. Judged by minor page faults, a count, in two child processes
 * running the same allocation pattern with and without the call.
 */
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { test } from 'node:test'
import { fileURLToPath } from 'node:url'

const REPO = fileURLToPath(new URL('../../..', import.meta.url))

const glibc = Boolean((process.report.getReport() as { header?: { glibcVersionRuntime?: string } }).header?.glibcVersionRuntime)

function minorFaults(tuned: boolean): number {
  const script = `
    import { readFileSync } from 'node:fs'
    import { keepFreedHeapMapped } from './src/util/heap-trim.ts'
    const minflt = () => Number(readFileSync('/proc/self/stat', 'utf8').split(') ')[1].split(' ')[7])
    if (${tuned}) keepFreedHeapMapped()
    globalThis.gc()
    const round = () => {
      for (let i = 0; i < 4; i++) Buffer.allocUnsafeSlow(1 << 20).fill(i)
      globalThis.gc()
    }
    for (let r = 0; r < 5; r++) round()
    const before = minflt()
    for (let r = 0; r < 100; r++) round()
    console.log(minflt() - before)
  `
  const child = spawnSync(process.execPath, ['--expose-gc', '--import', 'tsx', '--input-type=module', '-e', script], { cwd: REPO, encoding: 'utf8', timeout: 120_000 })
  assert.equal(child.status, 0, child.stderr)
  return Number(child.stdout.trim())
}

test('heap trim: freed 1 MiB buffers are reused without page faults once keepFreedHeapMapped() ran (glibc)', { skip: !glibc && 'not glibc' }, () => {
  const plain = minorFaults(false)
  const tuned = minorFaults(true)
  // 400 MiB allocated and freed: mapped afresh each time, tens of thousands of 4 KiB page faults.
  assert.ok(plain > 8_000, `without the call the pattern should fault its pages in every time (${plain} faults)`)
  assert.ok(tuned * 5 < plain, `with the call: ${tuned} faults, without: ${plain}`)
})
