/** The machine and peer versions a run was measured on. */
import { readFileSync } from 'node:fs'
import { cpus, release } from 'node:os'
import { run } from '../lib/proc.js'
import { MiB } from '../lib/units.js'

export function machine(workDir: string): Record<string, unknown> {
  const v = (cmd: string, a: string[]) => (run(cmd, a, { allowFail: true }).stdout || '').split('\n')[0]?.trim()
  return {
    nproc: Number(v('nproc', [])),
    cpu: cpus()[0]?.model ?? 'unknown',
    memGiB: Number((Number(/MemTotal:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0) / MiB).toFixed(1)),
    kernel: release(),
    node: process.version,
    fio: v('fio', ['--version']),
    nbdkit: v('nbdkit', ['--version']),
    qemu: v('qemu-img', ['--version']),
    filesystem: v('sh', ['-c', `df -T ${workDir} | tail -1 | awk '{print $2}'`]),
    // What bin/blocksnap gives the servers (it sizes the pool when UV_THREADPOOL_SIZE is unset).
    uvThreadpoolSize: process.env.UV_THREADPOOL_SIZE ?? `${Math.min(16, Math.max(1, cpus().length - 1))} (bin/blocksnap default: cores - 1)`,
  }
}
