/**
 * Server memory (issue 13): RSS of `blocksnap serve` while 16 clients each keep four 32 MiB writes
 * in flight (64 pipelined writes, 2 GiB), and after they leave, against its idle RSS.
 */
import { DEFAULT_BIN, type MemoryResult, measureServeMemory } from '../memory.js'
import type { Results } from '../lib/context.js'
import { log } from '../lib/log.js'
import type { Suite } from '../lib/suite.js'

function section(results: Results): string[] {
  const m = results.memory as MemoryResult | null
  if (!m) return []
  const after = m.rssAfterClientsLeftMiB
  return [
    '## Server memory under 64 pipelined 32 MiB writes',
    '',
    `${m.connections} NBD clients (fio's nbd engine) × ${m.writesPerConnection} writes of ${m.writeMiB} MiB in flight each (${m.totalMiB} MiB in ${m.seconds} s); default --max-pending.`,
    '',
    '| idle RSS | peak RSS | RSS after the clients left (each second) |',
    '| --- | --- | --- |',
    `| ${m.idleRssMiB} MiB | ${m.peakRssMiB} MiB | ${after.map((x) => `${x}`).join(', ')} MiB |`,
    '',
  ]
}

export const memorySuite: Suite = {
  name: 'memory',
  usesPeers: false,
  initialResults: () => ({ memory: null }),
  async run(ctx) {
    log('server memory: 16 clients x 4 pipelined 32 MiB writes, then 10 s idle')
    ctx.results.memory = await measureServeMemory({ connections: 16, perConnection: 4, settleSeconds: 10, bin: DEFAULT_BIN, serveExtra: [] })
  },
  section,
}
