/**
 * A one-node Ceph cluster per test file (scripts/ceph-cluster.sh) in a temp directory, and the
 * `rbd` commands the RBD tests check against: create, export, remove. The cluster is stopped by
 * the PIDs in its pid files in after(). Missing Ceph binaries fail the file: CI installs them.
 */
import { after } from 'node:test'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { requireTools, run, runOk } from './nbd-tools.js'

const SCRIPT = new URL('../../scripts/ceph-cluster.sh', import.meta.url).pathname

export class CephCluster {
  /** Temp directory holding the cluster (under `cluster/`) and whatever the test puts next to it. */
  readonly dir: string
  readonly conf: string
  readonly pool: string
  /** Seconds the start script took (for the report). */
  readonly startSeconds: number

  private constructor(dir: string, conf: string, pool: string, startSeconds: number) {
    this.dir = dir
    this.conf = conf
    this.pool = pool
    this.startSeconds = startSeconds
  }

  /**
   * Starts a cluster and registers its stop in after(); call once at the top of a test file.
   * Also sets CEPH_CONF for this process, so child processes (blocksnap, qemu-nbd) find it too.
   */
  static async startForFile(pool = 'rbd'): Promise<CephCluster> {
    await requireCeph()
    const dir = await mkdtemp(join(tmpdir(), 'blocksnap-ceph-'))
    const clusterDir = join(dir, 'cluster')
    after(async () => {
      await run('bash', [SCRIPT, 'stop', clusterDir], { timeoutMs: 30_000 })
      await rm(dir, { recursive: true, force: true })
    })
    const started = Date.now()
    const result = await run('bash', [SCRIPT, 'start', clusterDir, pool], { timeoutMs: 120_000 })
    if (result.code !== 0) {
      const log = await readFile(join(clusterDir, 'log', 'daemons.err'), 'utf8').catch(() => '')
      throw new Error(`ceph-cluster.sh start failed (${result.code}):\n${result.stderr}\n${log}`)
    }
    const conf = /^CEPH_CONF=(.*)$/m.exec(result.stdout)?.[1]
    if (conf === undefined) throw new Error(`ceph-cluster.sh printed no CEPH_CONF:\n${result.stdout}`)
    process.env['CEPH_CONF'] = conf
    return new CephCluster(dir, conf, pool, (Date.now() - started) / 1000)
  }

  /** The blocksnap address of IMAGE in this cluster's pool. */
  address(image: string): string {
    return `rbd:${this.pool}/${image}?conf=${this.conf}`
  }

  async createImage(image: string, sizeBytes: number): Promise<string> {
    await this.rbd(['create', '--size', `${Math.ceil(sizeBytes / 1024)}K`, `${this.pool}/${image}`])
    return this.address(image)
  }

  /** The whole image as bytes, read by Ceph's own tool. */
  async exportImage(image: string): Promise<Buffer> {
    const file = join(this.dir, `export-${image}-${process.pid}-${Date.now()}.raw`)
    await this.exportImageTo(image, file)
    try {
      return await readFile(file)
    } finally {
      await rm(file, { force: true })
    }
  }

  async exportImageTo(image: string, file: string): Promise<void> {
    await rm(file, { force: true })
    await this.rbd(['export', '--no-progress', `${this.pool}/${image}`, file])
  }

  async removeImage(image: string): Promise<void> {
    await this.rbd(['rm', '--no-progress', `${this.pool}/${image}`])
  }

  async listImages(): Promise<string[]> {
    const out = await this.rbd(['ls', this.pool])
    return out.split('\n').filter((line) => line !== '')
  }

  /** `rbd --conf CONF ARGS…`; throws with rbd's output when it fails. */
  async rbd(args: readonly string[]): Promise<string> {
    return (await runOk('rbd', ['--conf', this.conf, ...args], { timeoutMs: 60_000 })).stdout
  }
}

/** Fails (never skips) when a Ceph or qemu binary the RBD tests need is missing. */
export async function requireCeph(): Promise<void> {
  try {
    await requireTools('ceph-mon', 'ceph-mgr', 'ceph-osd', 'ceph', 'rbd', 'qemu-nbd', 'setpriv')
  } catch (err) {
    throw new Error(`${(err as Error).message} (the RBD tests need: apt-get install -y ceph-mon ceph-mgr ceph-osd ceph-common qemu-utils qemu-block-extra)`)
  }
}
