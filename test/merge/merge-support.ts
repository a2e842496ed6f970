/**
 * Shared helpers for the merge tests: byte comparison with a useful message, and random
 * concurrent I/O batches against a model (one byte array per view).
 */
import assert from 'node:assert/strict'
import type { BlockDevice } from '../../src/device/block-device.js'
import type { Random } from '../support/random.js'
import type { Stack } from '../support/engine-stack.js'

export function assertSameBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  if (actual.length === expected.length && Buffer.compare(Buffer.from(actual), Buffer.from(expected)) === 0) return
  let at = 0
  while (at < actual.length && actual[at] === expected[at]) at++
  assert.fail(`${what}: differs at byte ${at} (lengths ${actual.length} / ${expected.length})`)
}

export function viewDevice(stack: Stack, view: string): BlockDevice {
  if (view === 'origin') return stack.origin
  const snap = stack.snapshots.get(view)
  if (!snap) throw new Error(`no view ${view}`)
  return snap
}

export async function checkViews(stack: Stack, model: Map<string, Uint8Array>, what: string): Promise<void> {
  for (const [view, expected] of model) {
    const actual = await viewDevice(stack, view).read(0, expected.length)
    assertSameBytes(actual, expected, `${what}: view ${view}`)
  }
}

interface Range {
  readonly view: string
  readonly start: number
  readonly end: number
}

export interface BatchOptions {
  readonly maxOps?: number
  readonly maxLength?: number
  /** Probability that an operation targets the origin. */
  readonly originShare?: number
  readonly discards?: boolean
}

/**
 * One batch of concurrent reads, writes, flushes (and discards of the origin) on
 * non-overlapping ranges of each view. Reads are checked against the model; writes update it.
 * Returns the number of operations issued.
 */
export async function randomBatch(
  stack: Stack,
  model: Map<string, Uint8Array>,
  random: Random,
  what: string,
  options: BatchOptions = {},
): Promise<number> {
  const maxOps = options.maxOps ?? 10
  const maxLength = options.maxLength ?? 70000
  const originShare = options.originShare ?? 0.5
  const views = [...model.keys()]
  const claimed: Range[] = []
  const jobs: Array<Promise<void>> = []
  const n = 1 + random.int(maxOps)
  for (let i = 0; i < n; i++) {
    const view = random.chance(originShare) ? 'origin' : random.pick(views)
    const viewModel = model.get(view) as Uint8Array
    const size = viewModel.length
    const length = Math.min(size, random.chance(0.3) ? 1 + random.int(600) : 1 + random.int(maxLength))
    const start = random.int(size - length + 1)
    const range = { view, start, end: start + length }
    if (claimed.some((r) => r.view === view && r.start < range.end && range.start < r.end)) continue
    claimed.push(range)
    const dev = viewDevice(stack, view)
    const roll = random.next()
    if (roll < 0.5) {
      const data = random.bytes(length)
      viewModel.set(data, start)
      jobs.push(dev.write(data, start, { fua: random.chance(0.1) }))
    } else if (roll < 0.55 && view === 'origin' && options.discards === true) {
      viewModel.fill(0, start, start + length)
      jobs.push(dev.discard(start, length))
    } else if (roll < 0.95) {
      const expected = viewModel.slice(start, start + length)
      jobs.push(dev.read(start, length).then((actual) => assertSameBytes(actual, expected, `${what}: read of ${view} [${start}, +${length})`)))
    } else {
      jobs.push(dev.flush())
    }
  }
  const results = await Promise.allSettled(jobs)
  for (const r of results) if (r.status === 'rejected') throw r.reason
  return jobs.length
}
