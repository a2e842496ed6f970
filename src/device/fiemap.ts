/**
 * Where a regular file holds data, read with the FIEMAP ioctl through e2fsprogs' `filefrag`.
 *
 * Node has neither lseek(SEEK_DATA/SEEK_HOLE) nor ioctl(), and blocksnap ships no native code,
 * so the one portable way to ask the file system is a helper process. `filefrag -e -v -s`:
 * - `-s` sets FIEMAP_FLAG_SYNC, so data still in the page cache (delayed allocation, or written
 *   into an unwritten extent) is mapped as data: the coreutils `cp` bug that lost such data
 *   through FIEMAP is exactly what the flag avoids;
 * - extents flagged `unwritten` (fallocated, never written) read as zeros and count as holes,
 *   as `qemu-img map` reports them.
 * Whatever filefrag cannot answer (tool missing, tmpfs and others without FIEMAP, a block
 * device) yields 'unsupported', and callers then report everything as data: never a hole that
 * might hide data. As a guard against a silently wrong answer, the extents must account for
 * the blocks st_blocks says the file holds.
 */
import { spawn } from 'node:child_process'
import { stat } from 'node:fs/promises'
import { createInterface } from 'node:readline'
import { RangeList } from './range-list.js'

export type FileMapResult =
  /** `data`: byte ranges holding data (written extents), clipped to the file size. */
  | { readonly kind: 'mapped'; readonly data: RangeList }
  /** The file system cannot say (permanent for this file). */
  | { readonly kind: 'unsupported'; readonly reason: string }
  /** This attempt cannot be trusted (the file changed under the scan); try again later. */
  | { readonly kind: 'retry'; readonly reason: string }

const SCAN_TIMEOUT_MS = 60_000
/** e2fsprogs installs filefrag in sbin, which a non-root PATH may lack. */
const SEARCH_PATH = ['/usr/sbin', '/sbin', '/usr/bin', '/bin']

// "   1:      256..     271:   21496848..  21496863:     16:   21497600: last,unwritten"
// The length column says 0 for a delayed-allocation extent, so the logical range is what counts.
const EXTENT_LINE = /^\s*\d+:\s*(\d+)\.\.\s*(\d+):\s*\d+\.\.\s*\d+:\s*\d+:\s*\d*:?\s*(\S*)\s*$/
const BLOCK_SIZE_LINE = /\(\d+ blocks? of (\d+) bytes\)$/

export async function mapFileData(path: string, sizeBytes: number): Promise<FileMapResult> {
  const before = await stat(path, { bigint: true }).catch(() => null)
  if (!before || !before.isFile()) return { kind: 'unsupported', reason: `${path} is not a regular file` }
  const data = new RangeList()
  let blockBytes = 0
  let extentBytes = 0
  let extents = 0
  let unparsed: string | null = null
  const env = { ...process.env, PATH: [process.env.PATH ?? '', ...SEARCH_PATH].join(':'), LC_ALL: 'C' }
  const child = spawn('filefrag', ['-e', '-v', '-s', path], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  const timer = setTimeout(() => child.kill('SIGKILL'), SCAN_TIMEOUT_MS)
  let stderr = ''
  child.stderr.on('data', (d: Buffer) => {
    stderr += d.toString('utf8')
  })
  const exited = new Promise<{ code: number | null; error: Error | null }>((resolve) => {
    child.once('error', (error) => resolve({ code: null, error }))
    child.once('close', (code) => resolve({ code, error: null }))
  })
  for await (const line of createInterface({ input: child.stdout, crlfDelay: Infinity })) {
    const size = BLOCK_SIZE_LINE.exec(line)
    if (size && blockBytes === 0) {
      blockBytes = Number(size[1])
      continue
    }
    const m = EXTENT_LINE.exec(line)
    if (!m) {
      if (/^\s*\d+:/.test(line)) unparsed ??= line
      continue
    }
    if (blockBytes === 0) unparsed ??= line
    const first = Number(m[1])
    const blocks = Number(m[2]) - first + 1
    extents++
    extentBytes += blocks * blockBytes
    if (m[3]!.split(',').includes('unwritten')) continue
    data.add(Math.min(first * blockBytes, sizeBytes), Math.min((first + blocks) * blockBytes, sizeBytes))
  }
  const { code, error } = await exited
  clearTimeout(timer)
  if (error) return { kind: 'unsupported', reason: `filefrag: ${error.message}` }
  if (code !== 0) return { kind: 'unsupported', reason: `filefrag exited ${code}: ${stderr.trim().split('\n')[0] ?? ''}` }
  if (unparsed !== null) return { kind: 'unsupported', reason: `filefrag printed an extent line not understood: ${unparsed.trim()}` }
  // Blocks held before the scan must all appear in it (only a discard could free some since,
  // and then the next scan agrees). Extent-tree blocks count in st_blocks but not as extents.
  const heldBytes = Number(before.blocks) * 512
  const slackBytes = (16 + Math.ceil(extents / 64)) * Math.max(blockBytes, 4096)
  if (extentBytes + slackBytes < heldBytes) {
    return { kind: 'retry', reason: `filefrag mapped ${extentBytes} bytes of the ${heldBytes} allocated` }
  }
  return { kind: 'mapped', data }
}
