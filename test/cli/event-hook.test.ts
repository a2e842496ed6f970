/**
 * The --on-event hook runner (src/cli/event-hook.ts) in process: hooks run one at a time in
 * event order with the event as a JSON line on stdin; the queue is bounded and what it drops is
 * counted and logged; a hook over its time limit is killed and logged; none of it makes push()
 * wait. Deterministic: the first event is taken at once, so the queue's bound decides exactly
 * which events are dropped.
 */
import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { after, before, it } from 'node:test'
import { type Logger, pino } from 'pino'
import { EventHook } from '../../src/cli/event-hook.js'
import type { ServiceEvent } from '../../src/cli/service-events.js'

let T = ''
before(async () => {
  T = await mkdtemp(join(tmpdir(), 'blocksnap-event-hook-'))
})
after(async () => {
  if (T) await rm(T, { recursive: true, force: true })
})

function capturedLogger(): { log: Logger; records: () => Array<Record<string, unknown>> } {
  let text = ''
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      text += chunk.toString('utf8')
      done()
    },
  })
  const log: Logger = pino({ level: 'info' }, sink)
  return { log, records: () => text.split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as Record<string, unknown>) }
}

const event = (n: number): ServiceEvent => ({ type: 'merge-done', volume: `v${n}`, snapshot: 's', totalBytes: n })

it('runs hooks in order with the event on stdin; a full queue drops and counts; push never waits', async () => {
  const out = join(T, 'events.jsonl')
  const { log, records } = capturedLogger()
  const hook = new EventHook(`cat >> '${out}'; echo "$BLOCKSNAP_EVENT" >> '${out}.types'`, log, { maxQueued: 2 })
  const started = Date.now()
  for (let n = 1; n <= 5; n++) hook.push(event(n)) // 1 runs, 2 and 3 wait, 4 and 5 are dropped
  assert.ok(Date.now() - started < 1000, 'push does not wait for the hook')
  await hook.close(30_000)
  const lines = (await readFile(out, 'utf8')).split('\n').filter((l) => l !== '')
  const got = lines.map((l) => JSON.parse(l) as Record<string, unknown>)
  assert.deepEqual(
    got.map(({ time: _t, ...rest }) => rest),
    [1, 2, 3].map((n) => ({ ...event(n) })),
  )
  for (const g of got) assert.ok(!Number.isNaN(Date.parse(String(g.time))))
  assert.equal(await readFile(`${out}.types`, 'utf8'), 'merge-done\nmerge-done\nmerge-done\n')
  const dropped = records().filter((r) => r.event === 'on-event-dropped')
  assert.deepEqual(dropped.map((r) => [r.level, r.droppedEvents]), [[40, 2]])
})

it('a hook over its time limit is killed (with what it started) and logged; a failing one is logged with its stderr', async () => {
  const { log, records } = capturedLogger()
  const slow = new EventHook('sleep 30; true', log, { timeoutMs: 200 }) // sh forks sleep, which holds stderr open
  slow.push(event(1))
  const t0 = Date.now()
  await slow.close(30_000)
  assert.ok(Date.now() - t0 < 10_000, 'the sleep sh started was killed with it (else its stderr stays open for 30 s)')
  const failing = new EventHook('echo broken >&2; exit 3', log)
  failing.push(event(2))
  await failing.close(30_000)
  const failed = records().filter((r) => r.event === 'on-event-failed')
  assert.deepEqual(
    failed.map((r) => ({ level: r.level, hookEvent: r.hookEvent, timeoutMs: r.timeoutMs, exitCode: r.exitCode, stderr: r.stderr, msg: r.msg })),
    [
      { level: 40, hookEvent: 'merge-done', timeoutMs: 200, exitCode: undefined, stderr: undefined, msg: '--on-event hook for merge-done killed after 200 ms' },
      { level: 40, hookEvent: 'merge-done', timeoutMs: undefined, exitCode: 3, stderr: 'broken', msg: '--on-event hook for merge-done exited with status 3' },
    ],
  )
})
