/**
 * `blocksnap map DEVICE [--json]`: where VOL or VOL@SNAP holds data and where it reads as zeros
 * (what NBD base:allocation reports; like `qemu-img map`), live through the server if served.
 * `blocksnap dump VOL@SNAP [--json]`: the COW file's header, geometry and exception runs, read
 * straight from the file (like thin_dump), as far as it decodes.
 */
import type { Command } from 'commander'
import type { VolumeOps } from '../control/volume-ops.js'
import type { AllocationExtent } from '../volume/block-maps.js'
import type { CowDump } from '../volume/dump.js'
import { EXIT_ERROR } from './exit-codes.js'

type WithVolume = <T>(path: string, fn: (ops: VolumeOps, live: boolean) => Promise<T>) => Promise<T>

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)))
  return rows.map((r) => r.map((c, i) => (i < r.length - 1 ? c.padStart(widths[i] ?? 0) : c)).join('  ')).join('\n') + '\n'
}

function formatMap(device: string, sizeBytes: number, extents: readonly AllocationExtent[]): string {
  const rows = [['OFFSET', 'LENGTH', 'TYPE'], ...extents.map((e) => [String(e.offset), String(e.length), e.data ? 'data' : 'zero'])]
  const data = extents.filter((e) => e.data)
  const dataBytes = data.reduce((sum, e) => sum + e.length, 0)
  return `${table(rows)}${device}: ${dataBytes} bytes of data in ${data.length} extent${data.length === 1 ? '' : 's'}, ${sizeBytes - dataBytes} bytes read as zeros\n`
}

function formatDump(name: string, d: CowDump): string {
  const lines = [`${name}: ${d.cowPath} (${d.cowSizeBytes} bytes)`]
  if (d.header) {
    lines.push(`header: magic ${d.header.magic}, ${d.header.valid ? 'valid' : 'INVALID'}, version ${d.header.version}, chunk ${d.header.chunkSizeSectors} sectors`)
  }
  if (d.geometry) {
    const g = d.geometry
    lines.push(`geometry: chunk ${g.chunkSizeBytes} bytes, ${g.exceptionsPerArea} exceptions per area, ${g.cowChunks} chunks in the file, ${g.areasRead} area${g.areasRead === 1 ? '' : 's'} read`)
    lines.push(`exceptions: ${d.exceptions} in ${d.runs.length} run${d.runs.length === 1 ? '' : 's'}`)
    if (d.runs.length > 0) lines.push(table([['ORIGIN_CHUNK', 'COW_CHUNK', 'CHUNKS'], ...d.runs.map((r) => [String(r.originChunk), String(r.cowChunk), String(r.chunks)])]).trimEnd())
  }
  const where = d.stop.area === null ? `at byte ${d.stop.offsetBytes}` : `at area ${d.stop.area} entry ${d.stop.entry ?? 0} (byte ${d.stop.offsetBytes})`
  lines.push(`${d.complete ? 'stopped' : 'STOPPED EARLY'} ${where}: ${d.stop.reason}`)
  return `${lines.join('\n')}\n`
}

export function mapDumpCommands(program: Command, withVolume: WithVolume, usage: (message: string) => Error): void {
  program
    .command('map')
    .description('print where VOL or VOL@SNAP holds data and where it reads as zeros (NBD base:allocation)')
    .argument('<DEVICE>')
    .option('--json', 'machine-readable output')
    .action(async (spec: string, opts: { json?: boolean }) => {
      const { volume, snapshot } = await deviceSpec(spec, usage)
      const { sizeBytes, extents } = await withVolume(volume, async (ops) => ({ sizeBytes: await ops.size(snapshot), extents: await ops.map(snapshot) }))
      if (opts.json) {
        const doc = { version: 1, device: spec, sizeBytes, extents: extents.map((e) => ({ offset: e.offset, length: e.length, data: e.data, zero: !e.data })) }
        process.stdout.write(`${JSON.stringify(doc)}\n`)
      } else process.stdout.write(formatMap(spec, sizeBytes, extents))
    })

  program
    .command('dump')
    .description("print a snapshot's COW header, geometry and exceptions straight from its file; exit 1 if it cannot be read to the end")
    .argument('<VOL@SNAP>')
    .option('--json', 'machine-readable output')
    .action(async (spec: string, opts: { json?: boolean }) => {
      const { volume, snapshot } = await deviceSpec(spec, usage)
      if (!snapshot) throw usage(`expected VOL@SNAP, got '${spec}'`)
      // Loaded here, not at start-up: only this command needs the format decoders.
      const { dumpCow, snapshotCowPath } = await import('../volume/dump.js')
      const dump = await dumpCow(await snapshotCowPath(volume, snapshot))
      process.stdout.write(opts.json ? `${JSON.stringify(dump)}\n` : formatDump(spec, dump))
      if (!dump.complete) {
        process.stderr.write(`blocksnap: dump: ${spec}: stopped early: ${dump.stop.reason}\n`)
        process.exitCode = EXIT_ERROR
      }
    })
}

async function deviceSpec(spec: string, usage: (message: string) => Error): Promise<{ volume: string; snapshot: string | null }> {
  const { parseDevice } = await import('../volume/volume.js')
  try {
    return parseDevice(spec)
  } catch (err) {
    throw usage((err as Error).message)
  }
}
