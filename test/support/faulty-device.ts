/**
 * A BlockDevice wrapper that fails chosen operations and delays others, so tests can drive error
 * paths and random completion order without a real flaky disk. A failed operation never reaches
 * the wrapped device: the test can then check exactly what did land. Randomized tests hand the
 * completion order to a CompletionGate (scheduler.ts) instead of wall-clock delays, so a seed
 * replays exactly.
 */
import { BaseBlockDevice, type BlockDevice, type DeviceCapabilities } from '../../src/device/block-device.js'
import { ioError } from '../../src/errors.js'

export type FaultOp = 'read' | 'write' | 'flush' | 'discard'

/**
 * Which operations fail:
 * - a predicate on (offset, length): every matching operation fails (flush passes 0, sizeBytes);
 * - a range: every operation overlapping it fails (a flush overlaps everything);
 * - a count: the next `count` operations fail, later ones succeed;
 * - omitted: every operation of that kind fails until clearFaults().
 */
export type FaultSpec = ((offset: number, length: number) => boolean) | { readonly offset: number; readonly length: number } | number

export type DelayFn = (op: FaultOp, offset: number, length: number) => number

/** Decides when each operation may run: the returned promise resolves at its turn. */
export interface CompletionGate {
  admit(device: string, op: FaultOp, offset: number, length: number): Promise<void>
}

interface FaultRule {
  readonly matches: (offset: number, length: number) => boolean
  remaining: number
}

export class FaultyDevice extends BaseBlockDevice {
  readonly next: BlockDevice
  private readonly rules: Record<FaultOp, FaultRule[]> = { read: [], write: [], flush: [], discard: [] }
  private delay: DelayFn | null = null
  private gate: CompletionGate | null = null
  private injectedCount = 0

  constructor(next: BlockDevice, name = 'faulty device') {
    super(next.sizeBytes, name)
    this.next = next
  }

  get capabilities(): DeviceCapabilities {
    return this.next.capabilities
  }

  /** How many operations have been failed so far. */
  get injected(): number {
    return this.injectedCount
  }

  failReads(spec?: FaultSpec): void {
    this.addRule('read', spec)
  }

  failWrites(spec?: FaultSpec): void {
    this.addRule('write', spec)
  }

  failFlushes(spec?: FaultSpec): void {
    this.addRule('flush', spec)
  }

  failDiscards(spec?: FaultSpec): void {
    this.addRule('discard', spec)
  }

  clearFaults(): void {
    for (const op of Object.keys(this.rules) as FaultOp[]) this.rules[op] = []
  }

  /** Milliseconds to hold each operation before it runs; null removes the delay. */
  setDelay(fn: DelayFn | null): void {
    this.delay = fn
  }

  /** Every operation waits for its turn at `gate` (instead of any delay); null removes it. */
  setGate(gate: CompletionGate | null): void {
    this.gate = gate
  }

  protected override async _readInto(target: Uint8Array, offset: number): Promise<void> {
    const fail = this.shouldFail('read', offset, target.length)
    await this.wait('read', offset, target.length)
    if (fail) throw this.fault('read', offset, target.length)
    await this.next.readInto(target, offset)
  }

  protected override async _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    const fail = this.shouldFail('write', offset, data.length)
    await this.wait('write', offset, data.length)
    if (fail) throw this.fault('write', offset, data.length)
    await this.next.write(data, offset, fua ? { fua } : undefined)
  }

  protected override async _flush(): Promise<void> {
    const fail = this.shouldFail('flush', 0, this._sizeBytes)
    await this.wait('flush', 0, 0)
    if (fail) throw this.fault('flush', 0, 0)
    await this.next.flush()
  }

  protected override async _discard(offset: number, length: number): Promise<void> {
    const fail = this.shouldFail('discard', offset, length)
    await this.wait('discard', offset, length)
    if (fail) throw this.fault('discard', offset, length)
    await this.next.discard(offset, length)
  }

  protected override async _resize(sizeBytes: number): Promise<void> {
    await this.next.resize(sizeBytes)
  }

  protected override async _close(): Promise<void> {
    await this.next.close()
  }

  private addRule(op: FaultOp, spec: FaultSpec | undefined): void {
    if (spec === undefined) {
      this.rules[op].push({ matches: () => true, remaining: Infinity })
    } else if (typeof spec === 'number') {
      this.rules[op].push({ matches: () => true, remaining: spec })
    } else if (typeof spec === 'function') {
      this.rules[op].push({ matches: spec, remaining: Infinity })
    } else {
      const { offset: start, length: span } = spec
      this.rules[op].push({
        matches: (offset, length) => op === 'flush' || (offset < start + span && start < offset + length),
        remaining: Infinity,
      })
    }
  }

  // Decided when the operation is issued, so count rules follow issue order even under delays.
  private shouldFail(op: FaultOp, offset: number, length: number): boolean {
    for (const rule of this.rules[op]) {
      if (rule.remaining > 0 && rule.matches(offset, length)) {
        rule.remaining--
        this.injectedCount++
        return true
      }
    }
    return false
  }

  private fault(op: FaultOp, offset: number, length: number): Error {
    return ioError(`${this.name}: injected ${op} fault`, undefined, { offset, length })
  }

  private async wait(op: FaultOp, offset: number, length: number): Promise<void> {
    if (this.gate) return this.gate.admit(this.name, op, offset, length)
    if (!this.delay) return
    const ms = this.delay(op, offset, length)
    // Even a zero delay yields to the event loop so other operations can overtake this one.
    await new Promise<void>((resolve) => (ms > 0 ? setTimeout(resolve, ms) : setImmediate(resolve)))
  }
}
