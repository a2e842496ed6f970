/**
 * One seeded scheduler for the completion order of device operations in model and crash tests.
 *
 * Every FaultyDevice of a test hands its operations to admit(); an operation runs only when the
 * scheduler releases it. The scheduler releases one operation per turn of the event loop (a
 * setImmediate: every microtask the previous release started has run, so every operation it led
 * to has been admitted), picked by its own Random among the operations whose delay has run out.
 * Delays are counted in releases, not milliseconds. Nothing depends on the wall clock, so the
 * order of completions, and all the test does in reaction to them, is a function of the seed.
 *
 * The scheduler's Random is its own stream (streamSeed(seed, 'scheduler')): the operations a
 * test generates from its Random do not shift when the scheduler draws more or fewer numbers.
 */
import type { CompletionGate, FaultOp } from './faulty-device.js'
import { Random, streamSeed } from './random.js'

export interface SchedulerOptions {
  /** Chance that a read is slow: it waits 10-40 releases, so whole copy-and-commit cycles overtake it. */
  readonly slowReadChance?: number
  /** Most releases an ordinary operation waits (0: any pending operation may go next). */
  readonly maxDelay?: number
  /** Keep the label of every release in `trace` (replay tests); otherwise only the digest. */
  readonly record?: boolean
}

interface Pending {
  readonly label: string
  readonly readyAt: number
  readonly release: () => void
}

export class Scheduler implements CompletionGate {
  readonly seed: number
  private readonly random: Random
  private readonly slowReadChance: number
  private readonly maxDelay: number
  private readonly labels: string[] | null
  private pending: Pending[] = []
  private tick = 0
  private turnScheduled = false
  private hash = 0x811c9dc5
  private released = 0

  constructor(seed: number, options: SchedulerOptions = {}) {
    this.seed = seed
    this.random = new Random(streamSeed(seed, 'scheduler'))
    this.slowReadChance = options.slowReadChance ?? 0.03
    this.maxDelay = options.maxDelay ?? 2
    this.labels = options.record === true ? [] : null
  }

  /** Labels of every release so far, in order (only with `record`). */
  get trace(): readonly string[] {
    if (!this.labels) throw new Error('scheduler: trace needs { record: true }')
    return this.labels
  }

  /** Releases so far and a hash of their labels: equal digests mean (almost surely) equal orders. */
  get digest(): string {
    return `${this.released}:${(this.hash >>> 0).toString(16)}`
  }

  /** Operations admitted and not yet released. */
  get waiting(): number {
    return this.pending.length
  }

  admit(device: string, op: FaultOp, offset: number, length: number): Promise<void> {
    const slow = op === 'read' && this.random.chance(this.slowReadChance)
    const delay = slow ? 10 + this.random.int(31) : this.random.chance(0.5) ? 0 : this.random.int(this.maxDelay + 1)
    return new Promise<void>((release) => {
      this.pending.push({ label: `${device} ${op} ${offset}+${length}`, readyAt: this.tick + delay, release })
      this.scheduleTurn()
    })
  }

  private scheduleTurn(): void {
    if (this.turnScheduled) return
    this.turnScheduled = true
    setImmediate(() => this.turn())
  }

  private turn(): void {
    this.turnScheduled = false
    if (this.pending.length === 0) return
    let ready = this.pending.filter((p) => p.readyAt <= this.tick)
    if (ready.length === 0) {
      // Nothing else can happen meanwhile: jump to the earliest operation's time.
      this.tick = Math.min(...this.pending.map((p) => p.readyAt))
      ready = this.pending.filter((p) => p.readyAt <= this.tick)
    }
    const chosen = ready[this.random.int(ready.length)] as Pending
    this.pending.splice(this.pending.indexOf(chosen), 1)
    this.tick++
    this.record(chosen.label)
    chosen.release()
    if (this.pending.length > 0) this.scheduleTurn()
  }

  private record(label: string): void {
    this.released++
    this.labels?.push(label)
    let h = this.hash
    for (let i = 0; i < label.length; i++) h = Math.imul(h ^ label.charCodeAt(i), 0x01000193)
    this.hash = Math.imul(h ^ 0x0a, 0x01000193)
  }
}
