/**
 * BufferPool: views of exactly the requested length, buffers reused only once released, and
 * never handed to two holders at once (a randomized run against a model of who holds what).
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { BufferPool } from '../../../src/util/buffer-pool.js'
import { Random } from '../../support/random.js'

test('buffer pool: a released buffer comes back for the next request of its class, as a view of the requested length', () => {
  const pool = new BufferPool()
  const a = pool.acquire(4096)
  assert.equal(a.length, 4096)
  assert.equal(a.buffer.byteLength, 4096)
  pool.release(a)
  assert.equal(pool.freeByteCount, 4096)
  const b = pool.acquire(3000)
  assert.equal(b.length, 3000)
  assert.equal(b.buffer, a.buffer, 'same class (4 KiB): reused')
  assert.equal(pool.freeByteCount, 0)
  const c = pool.acquire(5000)
  assert.notEqual(c.buffer, a.buffer)
  assert.equal(c.buffer.byteLength, 8192)
  assert.equal(pool.acquire(1).buffer.byteLength, 512, 'the smallest class is 512 bytes')
})

test('buffer pool: foreign views, second releases and oversized buffers are ignored', () => {
  const pool = new BufferPool()
  pool.release(new Uint8Array(4096))
  assert.equal(pool.freeByteCount, 0, 'not from this pool')
  const a = pool.acquire(4096)
  pool.release(a)
  pool.release(a)
  assert.equal(pool.freeByteCount, 4096, 'a second release must not put the buffer on the list twice')
  const x = pool.acquire(4096)
  const y = pool.acquire(4096)
  assert.notEqual(x.buffer, y.buffer, 'one buffer handed out twice')
  const big = pool.acquire(8 * 1024 * 1024)
  assert.equal(big.length, 8 * 1024 * 1024)
  pool.release(big)
  assert.equal(pool.freeByteCount, 0, 'buffers above the largest class are not pooled')
})

test('buffer pool: free buffers beyond the cap are left to the garbage collector; trim drops them all', () => {
  const pool = new BufferPool({ maxFreeBytes: 8192 })
  const views = [pool.acquire(4096), pool.acquire(4096), pool.acquire(4096)]
  for (const v of views) pool.release(v)
  assert.equal(pool.freeByteCount, 8192)
  pool.trim()
  assert.equal(pool.freeByteCount, 0)
  assert.ok(!views.some((v) => v.buffer === pool.acquire(4096).buffer), 'a trimmed buffer came back')
})

test('buffer pool: randomized acquire and release never give one buffer to two holders (seeded)', () => {
  for (const seed of [1, 2, 3, 4, 5]) {
    const random = new Random(seed)
    const pool = new BufferPool({ maxFreeBytes: 256 * 1024 })
    const held: Array<{ view: Uint8Array; mark: number }> = []
    for (let step = 0; step < 4000; step++) {
      if (held.length > 0 && random.int(3) === 0) {
        const at = random.int(held.length)
        const [{ view, mark }] = held.splice(at, 1) as [{ view: Uint8Array; mark: number }]
        assert.ok(view.every((b) => b === mark), `seed ${seed} step ${step}: a held buffer was overwritten`)
        pool.release(view)
      } else {
        const view = pool.acquire(1 + random.int(70_000))
        const mark = step & 0xff
        view.fill(mark)
        held.push({ view, mark })
      }
    }
    for (const { view, mark } of held) assert.ok(view.every((b) => b === mark), `seed ${seed}: a held buffer was overwritten`)
  }
})
