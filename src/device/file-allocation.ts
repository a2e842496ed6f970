/**
 * The allocation map of one open file: which byte ranges hold data and which are holes (never
 * written, or fallocated and never written), for NBD base:allocation and `blocksnap map`.
 *
 * The file system is asked once (fiemap.ts: a helper process, so not per request) and the
 * answer is cached. A cached map goes stale only one way: writes through this process turn holes
 * into data. A stale hole would make a backup tool skip real data, so every write is counted:
 * - while it is in flight it is held in `inflight` (covering writes under way when a scan began,
 *   which the scan may or may not have seen);
 * - once done, it is added to `written` unless the map already has it as data.
 * A stale "data" (a range discarded back to a hole) is only slower to copy, so discards count as
 * writes. `written` is bounded: past MAX_WRITTEN_RANGES the map is dropped and the next query
 * scans again. Nothing else writes the file: the volume lock keeps other blocksnap processes out.
 */
import { type FileMapResult, mapFileData } from './fiemap.js'
import { RangeList, unionRanges } from './range-list.js'

const MAX_WRITTEN_RANGES = 65536
/**
 * Written ranges are widened to whole 4 KiB blocks, which is what a file system allocates (and
 * what the next scan would show), so the map does not change shape when it is taken again.
 */
const BLOCK_BYTES = 4096

export type FileScanner = (path: string, sizeBytes: number) => Promise<FileMapResult>

export class FileAllocation {
  private readonly path: string
  private readonly scanner: FileScanner
  /** Data ranges found by the last scan (null: no usable map). */
  private scanned: RangeList | null = null
  private scanning: Promise<void> | null = null
  /** Why the file cannot be mapped, once that is known for good: everything is data. */
  private unsupported: string | null = null
  /** Writes finished since the current map's scan began (tracked only while a map exists or is being made). */
  private written: RangeList | null = null
  /**
   * Writes in flight, by token: [start, end) in inflightRanges at 2 * token (start -1: the
   * token is free). Reused slots rather than a Map entry, a range and a closure per write.
   */
  private inflightRanges = new Float64Array(64).fill(-1)
  private freeTokens: number[] = []
  private tokens = 0

  constructor(path: string, scanner: FileScanner = mapFileData) {
    this.path = path
    this.scanner = scanner
  }

  /** Call as a write or discard of [offset, offset + length) starts; call the result when it ends. */
  writeStarted(offset: number, length: number): () => void {
    const token = this.startWrite(offset, length)
    return () => this.endWrite(token)
  }

  /** writeStarted without a closure: returns a token for endWrite(), to be called once. */
  startWrite(offset: number, length: number): number {
    let token = this.freeTokens.pop()
    if (token === undefined) {
      token = this.tokens++
      if (2 * token >= this.inflightRanges.length) {
        const grown = new Float64Array(this.inflightRanges.length * 2).fill(-1)
        grown.set(this.inflightRanges)
        this.inflightRanges = grown
      }
    }
    this.inflightRanges[2 * token] = Math.floor(offset / BLOCK_BYTES) * BLOCK_BYTES
    this.inflightRanges[2 * token + 1] = Math.ceil((offset + length) / BLOCK_BYTES) * BLOCK_BYTES
    return token
  }

  endWrite(token: number): void {
    const start = this.inflightRanges[2 * token] as number
    if (start < 0) return // ended already
    const end = this.inflightRanges[2 * token + 1] as number
    this.inflightRanges[2 * token] = -1
    this.freeTokens.push(token)
    this.noteWritten(start, end)
  }

  private inflight(): Array<[number, number]> {
    const ranges: Array<[number, number]> = []
    for (let t = 0; t < this.tokens; t++) {
      const start = this.inflightRanges[2 * t] as number
      if (start >= 0) ranges.push([start, this.inflightRanges[2 * t + 1] as number])
    }
    return ranges
  }

  private noteWritten(start: number, end: number): void {
    const written = this.written
    if (written === null || this.scanned?.covers(start, end)) return
    written.add(start, end)
    if (written.count > MAX_WRITTEN_RANGES) this.forget()
  }

  /** Drops the map (e.g. after a resize); the next query scans again. */
  forget(): void {
    this.scanned = null
    this.written = null
  }

  /** Why a map cannot be had, or null. */
  get unsupportedReason(): string | null {
    return this.unsupported
  }

  /**
   * Data ranges within [start, end) of a file of `sizeBytes`, sorted and merged; the rest reads
   * as zeros. When the file system cannot tell, the whole range is data.
   */
  async dataRanges(start: number, end: number, sizeBytes: number): Promise<Array<[number, number]>> {
    if (this.unsupported === null && this.scanned === null) await this.scan(sizeBytes)
    const scanned = this.scanned
    if (this.unsupported !== null || scanned === null || this.written === null) return end > start ? [[start, end]] : []
    return unionRanges([scanned.within(start, end), this.written.within(start, end), this.inflight()], start, end)
  }

  private scan(sizeBytes: number): Promise<void> {
    this.scanning ??= (async () => {
      // Writes that finish from now on are recorded; those under way are in `inflight`; all
      // that finished before are in the file, and FIEMAP_FLAG_SYNC makes the scan see them.
      const written = new RangeList()
      this.written = written
      try {
        const result = await this.scanner(this.path, sizeBytes)
        if (result.kind === 'unsupported') this.unsupported = result.reason
        // A map dropped meanwhile (too many writes, resize) is stale already.
        else if (result.kind === 'mapped' && this.written === written) this.scanned = result.data
      } catch (err) {
        this.unsupported = (err as Error).message
      } finally {
        this.scanning = null
        if (this.scanned === null) this.written = null
      }
    })()
    return this.scanning
  }
}
