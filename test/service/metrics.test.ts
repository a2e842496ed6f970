/**
 * `serve --metrics` (issue 19, item 1): a real `blocksnap serve` is scraped at /metrics, and every
 * metric family is checked against what the test did to it: NBD requests counted exactly as
 * nbdsh sent them (by export and op), their duration histogram, clients per export, snapshot
 * fill against `list --json` and the dm-snapshot on-disk layout, copy-outs against the chunks the
 * origin writes touched, validity through an invalidation, a merge's remaining bytes, held
 * write-back bytes, and the process defaults. Also: the address grammar, the loopback default,
 * and what the listener refuses.
 */
import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { request } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { assertError, cli, cliOk, parseList } from '../cli/helpers.js'
import { EXIT_USAGE } from '../../src/cli/exit-codes.js'
import { nbdsh, requireTools } from '../support/nbd-tools.js'
import {
  CHUNK_BYTES,
  FIXED_COW_BYTES,
  type Exposition,
  type Served,
  holdingClient,
  makeVolume,
  scrape,
  select,
  serveWithMetrics,
  statusJson,
  stopServe,
  until,
  value,
} from './service-support.js'

const OPS = ['read', 'write', 'flush', 'trim', 'zero', 'block_status', 'cache']

/** Origin chunks the traffic below writes (offset i * 64 KiB, one 4 KiB chunk each). */
const WRITTEN_CHUNKS = 5

let T = ''
let served: Served | null = null
let dir = ''

before(async () => {
  await requireTools('nbdsh')
  T = await mkdtemp(join(tmpdir(), 'blocksnap-metrics-'))
  dir = join(T, 'vol')
  await makeVolume(dir)
  served = await serveWithMetrics(dir)
})

after(async () => {
  await stopServe(served)
  if (T) await rm(T, { recursive: true, force: true })
})

/** HTTP GET with a chosen Host header (fetch does not let a test set it). */
function getWithHost(base: string, path: string, host: string): Promise<{ status: number; body: string }> {
  const url = new URL(path, base)
  return new Promise((resolve, reject) => {
    const req = request({ host: url.hostname, port: url.port, path: url.pathname, headers: { host } }, (res) => {
      let body = ''
      res.on('data', (d: Buffer) => (body += d.toString()))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }))
    })
    req.on('error', reject)
    req.end()
  })
}

describe('serve --metrics', { concurrency: 1 }, () => {
  it('before any traffic: every family with its type and help; snapshots valid and empty, no clients, no requests', async () => {
    const e = await scrape(served!.base)
    const expectTypes: Record<string, string> = {
      blocksnap_snapshot_allocated_bytes: 'gauge',
      blocksnap_snapshot_cow_bytes: 'gauge',
      blocksnap_snapshot_capacity_bytes: 'gauge',
      blocksnap_snapshot_valid: 'gauge',
      blocksnap_copyout_chunks_total: 'counter',
      blocksnap_merge_remaining_bytes: 'gauge',
      blocksnap_nbd_requests_total: 'counter',
      blocksnap_nbd_request_duration_seconds: 'histogram',
      blocksnap_nbd_connections: 'gauge',
      blocksnap_writeback_held_bytes: 'gauge',
      process_cpu_user_seconds_total: 'counter',
      process_resident_memory_bytes: 'gauge',
      nodejs_heap_size_used_bytes: 'gauge',
      nodejs_eventloop_lag_seconds: 'gauge',
    }
    for (const [name, type] of Object.entries(expectTypes)) {
      assert.equal(e.types.get(name), type, `# TYPE ${name}`)
      assert.ok((e.helps.get(name) ?? '').length > 10, `# HELP ${name}`)
    }
    for (const snapshot of ['fixed', 'grow']) {
      assert.equal(value(e, 'blocksnap_snapshot_valid', { volume: 'vol', snapshot }), 1)
      assert.equal(value(e, 'blocksnap_copyout_chunks_total', { volume: 'vol', snapshot }), 0)
      // Header chunk and the first metadata area: dm-snapshot's persistent layout.
      assert.equal(value(e, 'blocksnap_snapshot_allocated_bytes', { volume: 'vol', snapshot }), 2 * CHUNK_BYTES)
    }
    assert.equal(value(e, 'blocksnap_snapshot_cow_bytes', { volume: 'vol', snapshot: 'fixed' }), FIXED_COW_BYTES)
    assert.equal(value(e, 'blocksnap_snapshot_capacity_bytes', { volume: 'vol', snapshot: 'fixed' }), FIXED_COW_BYTES)
    assert.deepEqual(
      select(e, 'blocksnap_nbd_connections').map((s) => [s.labels.export, s.value]),
      [['vol', 0], ['vol@fixed', 0], ['vol@grow', 0]],
    )
    assert.deepEqual(select(e, 'blocksnap_nbd_requests_total'), [])
    assert.deepEqual(select(e, 'blocksnap_merge_remaining_bytes'), [])
    assert.equal(value(e, 'blocksnap_writeback_held_bytes', { volume: 'vol' }), 0)
    assert.ok(value(e, 'process_resident_memory_bytes', {}) > 1024 * 1024)
  })

  it('NBD traffic: requests counted exactly per export and op, durations histogrammed, clients per export, copy-outs per touched chunk', async () => {
    const base = served!.base
    const uri = (name: string) => `nbd://127.0.0.1:${served!.nbdPort}/${name}`
    // A client that stays on vol@fixed while the origin traffic runs: 2 reads.
    const holder = await holdingClient(uri('vol@fixed'), 'h.pread(4096, 0)\nh.pread(4096, 8192)')
    try {
      await nbdsh(
        uri('vol'),
        [
          `for i in range(${WRITTEN_CHUNKS}): h.pwrite(bytes([i + 1]) * 4096, i * 65536)`,
          'for i in range(3): h.pread(4096, i * 4096)',
          // Zero and trim chunks already written: they copy nothing more out.
          'h.zero(4096, 0)',
          'h.trim(4096, 65536)',
          'h.block_status(65536, 0, lambda *a: 0)',
          'h.cache(4096, 0)',
          'h.flush()',
        ].join('\n'),
        ['--base-allocation'],
      )
      const e = await scrape(base)
      const expected: Record<string, Record<string, number>> = {
        vol: { write: WRITTEN_CHUNKS, read: 3, zero: 1, trim: 1, block_status: 1, cache: 1, flush: 1 },
        'vol@fixed': { read: 2 },
      }
      const seen = select(e, 'blocksnap_nbd_requests_total').map((s) => `${s.labels.export} ${s.labels.op} ${s.value}`).sort()
      const want = Object.entries(expected).flatMap(([exp, ops]) => Object.entries(ops).map(([op, n]) => `${exp} ${op} ${n}`)).sort()
      assert.deepEqual(seen, want, 'requests_total: exactly what nbdsh sent')
      for (const [exp, ops] of Object.entries(expected)) {
        for (const [op, n] of Object.entries(ops)) {
          assert.ok(OPS.includes(op))
          const labels = { export: exp, op }
          assert.equal(value(e, 'blocksnap_nbd_request_duration_seconds_count', labels), n, `duration count ${exp} ${op}`)
          const sum = value(e, 'blocksnap_nbd_request_duration_seconds_sum', labels)
          assert.ok(sum >= 0 && sum < 60, `duration sum ${sum}`)
          const buckets = select(e, 'blocksnap_nbd_request_duration_seconds_bucket', labels).map((s) => [Number(s.labels.le === '+Inf' ? Infinity : s.labels.le), s.value] as const)
          assert.ok(buckets.length > 5)
          for (let i = 1; i < buckets.length; i++) {
            assert.ok(buckets[i]![0] > buckets[i - 1]![0] && buckets[i]![1] >= buckets[i - 1]![1], 'cumulative buckets in order')
          }
          assert.deepEqual(buckets[buckets.length - 1], [Infinity, n], '+Inf bucket holds every request')
        }
      }
      assert.equal(value(e, 'blocksnap_nbd_connections', { export: 'vol@fixed' }), 1, 'the holding client')
      assert.equal(value(e, 'blocksnap_nbd_connections', { export: 'vol' }), 0, 'the origin client has gone')
      // Each origin write touched one chunk not saved yet, in both snapshots.
      for (const snapshot of ['fixed', 'grow']) {
        assert.equal(value(e, 'blocksnap_copyout_chunks_total', { volume: 'vol', snapshot }), WRITTEN_CHUNKS, `copy-outs of ${snapshot}`)
      }
      assert.equal(value(e, 'blocksnap_writeback_held_bytes', { volume: 'vol' }), 0, 'flushed: nothing held')
    } finally {
      await holder.release()
    }
    const e = await until(() => scrape(base), (x) => value(x, 'blocksnap_nbd_connections', { export: 'vol@fixed' }) === 0, 'the holding client gone')
    assert.equal(value(e, 'blocksnap_nbd_requests_total', { export: 'vol@fixed', op: 'read' }), 2)
  })

  it('snapshot fill equals list --json and the on-disk layout; cow bytes of a grow-on-demand COW follow its file', async () => {
    const e = await scrape(served!.base)
    const listed = parseList(await cliOk(['list', dir, '--json']))
    assert.deepEqual(listed.snapshots.map((s) => s.name), ['fixed', 'grow'])
    for (const s of listed.snapshots) {
      const labels = { volume: 'vol', snapshot: s.name }
      assert.equal(value(e, 'blocksnap_snapshot_allocated_bytes', labels), s.allocatedBytes, `${s.name} allocated vs list`)
      // Header, one metadata area and one data chunk per written origin chunk.
      assert.equal(s.allocatedBytes, (2 + WRITTEN_CHUNKS) * CHUNK_BYTES, `${s.name} allocated vs the layout`)
      assert.equal(value(e, 'blocksnap_snapshot_cow_bytes', labels), s.cowSizeBytes, `${s.name} cow bytes vs list`)
    }
    const grow = listed.snapshots.find((s) => s.name === 'grow')!
    assert.ok(grow.cowSizeBytes >= grow.allocatedBytes, `grown to ${grow.cowSizeBytes}`)
    // Capacity is the COW plus its file system's free space, which moves: bounds, not equality.
    assert.ok(value(e, 'blocksnap_snapshot_capacity_bytes', { volume: 'vol', snapshot: 'grow' }) > grow.cowSizeBytes)
  })

  it('an invalidated snapshot: valid drops to 0 for it alone, and status.json says why', async () => {
    // 2 MiB of new origin data cannot fit the 1 MiB fixed COW.
    await nbdsh(`nbd://127.0.0.1:${served!.nbdPort}/vol`, "h.pwrite(b'\\x5a' * (2 * 1024 * 1024), 1024 * 1024)\nh.flush()")
    const e = await scrape(served!.base)
    assert.equal(value(e, 'blocksnap_snapshot_valid', { volume: 'vol', snapshot: 'fixed' }), 0)
    assert.equal(value(e, 'blocksnap_snapshot_valid', { volume: 'vol', snapshot: 'grow' }), 1)
    const status = await statusJson(served!.base)
    const fixed = status.volumes[0].snapshots.find((s: { name: string }) => s.name === 'fixed')
    assert.equal(fixed.state, 'invalid')
    assert.equal(fixed.reason, 'COW full')
    assert.equal(value(e, 'blocksnap_nbd_requests_total', { export: 'vol', op: 'write' }), WRITTEN_CHUNKS + 1)
  })

  it('a merge: remaining bytes are what is left of the snapshot, as status.json shows', async () => {
    // Origin chunks written since the snapshot: the five 4 KiB writes and the 2 MiB one (no overlap).
    const totalBytes = (WRITTEN_CHUNKS + (2 * 1024 * 1024) / CHUNK_BYTES) * CHUNK_BYTES
    // 1 byte/s: the first step merges one chunk, the next is due in over an hour.
    await cliOk(['merge', `${dir}@grow`, '--rate', '1'])
    // The merge pipelines its steps, so one may still finish between reading status.json and
    // scraping: compare only a scrape taken while status.json read the same progress before and
    // after it (the merge then waits over an hour for its next step, so this settles).
    const settled = async () => {
      const before = await statusJson(served!.base)
      const exposition: Exposition = await scrape(served!.base)
      const afterwards = await statusJson(served!.base)
      return { before, exposition, afterwards }
    }
    const { before: status, exposition: e } = await until(
      settled,
      (r) => r.before.volumes[0].merge?.doneBytes > 0 && r.before.volumes[0].merge.doneBytes === r.afterwards.volumes[0].merge?.doneBytes,
      'a settled merge step',
    )
    const merge = status.volumes[0].merge
    assert.equal(merge.snapshot, 'grow')
    assert.equal(merge.state, 'running')
    assert.equal(merge.totalBytes, totalBytes)
    assert.equal(merge.rateLimitBytesPerSecond, 1)
    assert.deepEqual(
      select(e, 'blocksnap_merge_remaining_bytes').map((s) => [s.labels.volume, s.labels.snapshot, s.value]),
      [['vol', 'grow', totalBytes - merge.doneBytes]],
    )
    assert.ok(totalBytes - merge.doneBytes > 0 && (totalBytes - merge.doneBytes) % CHUNK_BYTES === 0)
  })

  it('the listener: GET and HEAD only, 404 elsewhere, loopback host names only on a loopback bind', async () => {
    const base = served!.base
    const post = await fetch(`${base}/metrics`, { method: 'POST', body: 'x' })
    assert.equal(post.status, 405)
    assert.equal(post.headers.get('allow'), 'GET, HEAD')
    const missing = await fetch(`${base}/nope`)
    assert.equal(missing.status, 404)
    assert.match(await missing.text(), /no \/nope here/)
    const head = await fetch(`${base}/status.json`, { method: 'HEAD' })
    assert.equal(head.status, 200)
    assert.equal(await head.text(), '')
    // DNS rebinding: a page of evil.example resolving to 127.0.0.1 sends Host: evil.example.
    assert.equal((await getWithHost(base, '/metrics', 'evil.example:1234')).status, 403)
    assert.equal((await getWithHost(base, '/status.json', `localhost:${new URL(base).port}`)).status, 200)
    assert.equal((await getWithHost(base, '/metrics', '[::1]')).status, 200)
  })
})

describe('serve --metrics: the address', () => {
  it('bad addresses are usage errors naming the flag; a busy port fails serve, naming it', async () => {
    for (const bad of ['abc', '127.0.0.1:70000', '127.0.0.1:', '']) {
      assertError(await cli(['serve', dir, '--metrics', bad]), EXIT_USAGE, /--metrics/)
    }
    // The running server's metrics port is taken.
    const port = new URL(served!.base).port
    const other = await mkdtemp(join(T, 'busy-'))
    await makeVolume(join(other, 'v2'))
    const r = await cli(['serve', join(other, 'v2'), '--listen', '127.0.0.1:0', '--metrics', port])
    assertError(r, 4, new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port} for --metrics`))
  })
})
