/**
 * Loop devices over temp files, the real block devices of the CLI tests (`losetup`, root only).
 * `probe` attaches one over a small file: where that fails the tests skip with the reason
 * instead of passing without checking anything.
 */
import { execFileSync } from 'node:child_process'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'

export class LoopDevices {
  private readonly attached: string[] = []

  /** Attaches `file` to a free loop device and returns its path (detached by detachAll). */
  attach(file: string): string {
    const dev = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim()
    this.attached.push(dev)
    return dev
  }

  /** null when loop devices work here, else why not (a skip reason). */
  async probe(dir: string): Promise<string | null> {
    try {
      await writeFile(join(dir, 'probe.img'), Buffer.alloc(64 * 1024))
      this.attach(join(dir, 'probe.img'))
      return null
    } catch (err) {
      return `no loop devices here (losetup: ${(err as Error).message.split('\n')[0]})`
    }
  }

  detachAll(): void {
    for (const dev of this.attached.splice(0)) {
      try {
        execFileSync('losetup', ['-d', dev], { stdio: 'ignore' })
      } catch {
        // already gone
      }
    }
  }
}
