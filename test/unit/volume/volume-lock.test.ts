/**
 * The volume lock: atomic (exactly one of several racing processes wins, whatever a crashed
 * owner left in the lock file) and tied to its holder's life (a SIGKILLed owner frees it at once).
 * Several worker processes race hundreds of takeovers; every round, exactly one must win and only
 * the winner may write to the volume.
 */
import assert from 'node:assert/strict'
import { type ChildProcessByStdio, spawn } from 'node:child_process'
import type { Readable, Writable } from 'node:stream'
import { mkdir, mkdtemp, open, readFile, rm, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { after, before, describe, test } from 'node:test'
import { fileURLToPath } from 'node:url'
import { isSnapError } from '../../../src/errors.js'
import { LOCK_FILE, VolumeLock } from '../../../src/volume/volume-lock.js'
import { Random } from '../../support/random.js'

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..')
const WORKER = join(REPO, 'test', 'support', 'lock-worker.ts')
const SLOT_BYTES = 8
const ROUNDS = 300
const WORKERS = 4

class Worker {
  readonly id: string
  readonly child: ChildProcessByStdio<Writable, Readable, null>
  private readonly replies: string[] = []
  private waiter: ((line: string) => void) | null = null

  constructor(id: string) {
    this.id = id
    this.child = spawn(process.execPath, ['--import', 'tsx', WORKER, id], { cwd: REPO, stdio: ['pipe', 'pipe', 'inherit'] })
    createInterface({ input: this.child.stdout }).on('line', (line) => {
      const w = this.waiter
      if (w) {
        this.waiter = null
        w(line)
      } else this.replies.push(line)
    })
  }

  send(line: string): void {
    this.child.stdin.write(`${line}\n`)
  }

  reply(): Promise<string> {
    const queued = this.replies.shift()
    if (queued !== undefined) return Promise.resolve(queued)
    return new Promise((resolveReply, reject) => {
      this.waiter = resolveReply
      this.child.once('exit', (code) => reject(new Error(`worker ${this.id} exited (${code})`)))
    })
  }

  kill(): Promise<void> {
    return new Promise((resolveExit) => {
      if (this.child.exitCode !== null || this.child.signalCode !== null) return resolveExit()
      this.child.once('exit', () => resolveExit())
      this.child.kill('SIGKILL')
    })
  }
}

/** What a crashed or foreign owner may have left in the lock file. */
function staleContent(rng: Random): string {
  switch (rng.int(5)) {
    case 0:
      return '999999\n' // a dead PID
    case 1:
      return '' // created but never written
    case 2:
      return '1\n' // a PID reused by a live process
    case 3:
      return `${process.pid}\n` // the PID of a live process that is not the owner
    default:
      return 'garbage'
  }
}

describe('volume lock', () => {
  let dir: string
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'blocksnap-lock-'))
  })
  after(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  test(`${WORKERS} processes race ${ROUNDS} takeovers of a stale lock: exactly one wins each round, only the winner writes`, async () => {
    const seed = Number(process.env.LOCK_SEED ?? 0x10c4)
    const rng = new Random(seed)
    const vol = join(dir, 'race')
    await rm(vol, { recursive: true, force: true })
    await mkdir(vol)
    await writeFile(join(vol, 'data'), Buffer.alloc(ROUNDS * SLOT_BYTES))
    let workers = Array.from({ length: WORKERS }, (_, i) => new Worker(`w${i}`))
    let nextId = WORKERS
    const winners: string[] = []
    try {
      for (let round = 0; round < ROUNDS; round++) {
        // The previous winner either released or was killed; what it left is overwritten here
        // as a crash would leave it (the lock itself is not content: writing the file frees nothing).
        if (rng.int(2) === 0) await writeFile(join(vol, LOCK_FILE), staleContent(rng))
        for (const w of workers) w.send(`acquire ${vol} ${round}`)
        const replies = await Promise.all(workers.map((w) => w.reply()))
        const won = workers.filter((_, i) => replies[i] === `won ${round}`)
        const errors = replies.filter((r) => r.startsWith('error'))
        assert.deepEqual(errors, [], `seed ${seed} round ${round}: unexpected errors`)
        assert.equal(won.length, 1, `seed ${seed} round ${round}: ${won.length} winners (${replies.join(', ')})`)
        const winner = won[0] as Worker
        winners.push(winner.id)
        if (rng.int(10) === 0) {
          // The owner dies without releasing: the kernel frees the lock with it.
          await winner.kill()
          workers = workers.map((w) => (w === winner ? new Worker(`w${nextId++}`) : w))
        } else {
          winner.send('release')
          assert.equal(await winner.reply(), 'released')
        }
      }
      const data = await readFile(join(vol, 'data'))
      for (let round = 0; round < ROUNDS; round++) {
        const slot = data.subarray(round * SLOT_BYTES, (round + 1) * SLOT_BYTES).toString('utf8').trim()
        assert.equal(slot, winners[round], `seed ${seed} round ${round}: slot written by ${slot}, winner ${winners[round]}`)
      }
    } finally {
      await Promise.all(workers.map((w) => w.kill()))
    }
  })

  test('a lock file naming a live but unrelated process does not block the volume', async () => {
    const vol = join(dir, 'reused')
    await mkdir(vol)
    await writeFile(join(vol, LOCK_FILE), '1\n')
    const lock = await VolumeLock.acquire(vol)
    assert.equal(await readFile(join(vol, LOCK_FILE), 'utf8'), String(process.pid), 'the owner records its PID')
    await lock.release()
  })

  test('a second acquire in the same process is refused while the first holds the lock, and succeeds after release', async () => {
    const vol = join(dir, 'twice')
    await mkdir(vol)
    const first = await VolumeLock.acquire(vol)
    await assert.rejects(VolumeLock.acquire(vol), (err: unknown) => {
      assert.ok(isSnapError(err, 'SNAP_BUSY'))
      assert.match((err as Error).message, new RegExp(`in use by process ${process.pid}$`))
      return true
    })
    await first.release()
    await first.release() // idempotent
    const second = await VolumeLock.acquire(vol)
    await second.release()
    assert.equal(await readFile(join(vol, LOCK_FILE), 'utf8'), '', 'a released lock names no owner')
  })

  test('a symlink planted at VOL/lock is refused and its target left untouched', async () => {
    const vol = join(dir, 'planted')
    await mkdir(vol)
    const victim = join(dir, 'victim')
    await writeFile(victim, 'precious')
    await symlink(victim, join(vol, LOCK_FILE))
    await assert.rejects(VolumeLock.acquire(vol), /is a symbolic link/)
    assert.equal(await readFile(victim, 'utf8'), 'precious')
  })

  test('the lock descriptor is not inherited by processes the owner spawns', async () => {
    const vol = join(dir, 'spawn')
    await mkdir(vol)
    const lock = await VolumeLock.acquire(vol)
    // A long-lived child of the owner...
    const child = spawn('sleep', ['30'], { stdio: 'ignore' })
    try {
      await lock.release()
      // ...must not keep the lock alive after the owner released it.
      const again = await VolumeLock.acquire(vol)
      await again.release()
    } finally {
      child.kill('SIGKILL')
    }
    const handle = await open(join(vol, LOCK_FILE), 'r')
    await handle.close()
  })
})
