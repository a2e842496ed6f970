/**
 * COW images written by the real Linux dm-snapshot (kernel version in expected.json), made by
 * test/kernel/make-fixtures.ts in a VM: blocksnap must present the same views (sha256 of the
 * whole device) and the same dmsetup status lines, without a VM. Chunk sizes 512 B (many
 * metadata areas), 4 KiB (two areas), 8 KiB, 64 KiB (PO), a COW the kernel invalidated when it
 * filled up, and a COW the kernel merged (empty table).
 */
import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { test } from 'node:test'
import { fileURLToPath } from 'node:url'
import { gunzipSync } from 'node:zlib'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { ExceptionEvents } from '../../src/snapshot/exception-events.js'
import { Origin } from '../../src/snapshot/origin.js'
import { Snapshot } from '../../src/snapshot/snapshot.js'
import { PersistentStore } from '../../src/store/persistent-store.js'

const DIR = join(fileURLToPath(new URL('.', import.meta.url)), '../fixtures/kernel')

interface Expected {
  kernel: string
  sizeBytes: number
  origin: { image: string; sha256: string }
  snapshots: Record<string, { cow: string; cowBytes: number; sha256: string; status: string }>
}

const expected = JSON.parse(readFileSync(join(DIR, 'expected.json'), 'utf8')) as Expected
const load = (name: string): Uint8Array => new Uint8Array(gunzipSync(readFileSync(join(DIR, name))))
const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex')

async function view(dev: { read(off: number, len: number): Promise<Uint8Array> }, size: number): Promise<string> {
  try {
    return sha(await dev.read(0, size))
  } catch {
    return 'EIO'
  }
}

test(`kernel fixtures (${expected.kernel}): blocksnap reads kernel-written COWs with the kernel's views and status`, async () => {
  const originBytes = load(expected.origin.image)
  assert.equal(originBytes.length, expected.sizeBytes)
  const origin = new Origin(MemoryDevice.fromBytes(originBytes), { events: new ExceptionEvents() })
  const cows = new Map<string, { dev: MemoryDevice; before: Uint8Array }>()
  const sectors = expected.sizeBytes / 512
  try {
    assert.equal(await view(origin, expected.sizeBytes), expected.origin.sha256, 'origin')
    const snaps = new Map<string, Snapshot>()
    for (const [name, e] of Object.entries(expected.snapshots)) {
      const bytes = load(e.cow)
      assert.equal(bytes.length, e.cowBytes, `${name} size`)
      const dev = MemoryDevice.fromBytes(bytes)
      cows.set(name, { dev, before: bytes.slice() })
      // No chunk size given: the header's is used, as the kernel does with chunk size 0.
      const snap = new Snapshot({ name, store: new PersistentStore(dev) })
      await origin.addSnapshot(snap)
      snaps.set(name, snap)
    }
    const problems: string[] = []
    for (const [name, e] of Object.entries(expected.snapshots)) {
      const snap = snaps.get(name) as Snapshot
      const status = `0 ${sectors} snapshot ${snap.statusText()}`
      if (status !== e.status) problems.push(`${name}: status ${JSON.stringify(status)}, kernel ${JSON.stringify(e.status)}`)
      const got = await view(snap, expected.sizeBytes)
      if (got !== e.sha256) problems.push(`${name}: sha256 ${got}, kernel ${e.sha256}`)
    }
    assert.deepEqual(problems, [])
    // Reading never changes a COW (the kernel writes nothing when it loads one either).
    await origin.flush()
    for (const [name, { dev, before }] of cows) {
      assert.ok(Buffer.compare(await dev.read(0, dev.sizeBytes), before) === 0, `${name} COW bytes changed by reading`)
    }
  } finally {
    await origin.close()
  }
})

test('kernel fixtures: headers as the kernel wrote them (valid, invalidated, chunk size)', () => {
  const header = (name: string): number[] => {
    const b = load(expected.snapshots[name]!.cow)
    const v = new DataView(b.buffer, b.byteOffset, 16)
    return [v.getUint32(0, true), v.getUint32(4, true), v.getUint32(8, true), v.getUint32(12, true)]
  }
  assert.deepEqual(header('f4'), [0x70416e53, 1, 1, 8])
  assert.deepEqual(header('f512'), [0x70416e53, 1, 1, 1])
  assert.deepEqual(header('f64'), [0x70416e53, 1, 1, 128])
  assert.deepEqual(header('finv'), [0x70416e53, 0, 1, 8])
})
