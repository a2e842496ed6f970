/**
 * Harness for the kernel interop tests: boots Debian's kernel under qemu (TCG) with a tiny
 * busybox initramfs holding dmsetup and the dm-snapshot modules, attaches image files as
 * virtio disks (/dev/vda, /dev/vdb, ... in order), runs a generated shell script and parses
 * `RESULT <name> <value>` lines from the serial console.
 *
 * The kernel package is fetched with `apt-get download` and unpacked with `dpkg -x` into a cache
 * directory outside the repository (BLOCKSNAP_KERNEL_CACHE, default /var/tmp/blocksnap-kernel).
 * BLOCKSNAP_KERNEL_PACKAGE overrides the package (default: what linux-image-amd64 depends on).
 *
 * Host tools needed: qemu-system-x86_64, busybox (busybox-static), dmsetup, cpio, gzip, apt-get, dpkg.
 *
 * Options for tests that talk to the running VM (filesystem.test.ts): `drives` attaches more
 * qemu drives such as `nbd://HOST:PORT/NAME` (qemu's built-in NBD client), `modules` and
 * `binaries` add kernel modules and host executables (with their libraries) to the initramfs,
 * and `onLine` sees each console line and can answer on the serial console, which the script
 * reads with `read`.
 */
import { execFileSync, spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync, writeFileSync, chmodSync, copyFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { gzipSync } from 'node:zlib'

export const CACHE_DIR = process.env.BLOCKSNAP_KERNEL_CACHE ?? '/var/tmp/blocksnap-kernel'

/** Modules in load order (file name without .ko, name in /proc/modules). */
const MODULES: Array<[string, string, string]> = [
  ['kernel/drivers/virtio', 'virtio', 'virtio'],
  ['kernel/drivers/virtio', 'virtio_ring', 'virtio_ring'],
  ['kernel/drivers/virtio', 'virtio_pci_modern_dev', 'virtio_pci_modern_dev'],
  ['kernel/drivers/virtio', 'virtio_pci_legacy_dev', 'virtio_pci_legacy_dev'],
  ['kernel/drivers/virtio', 'virtio_pci', 'virtio_pci'],
  ['kernel/drivers/block', 'virtio_blk', 'virtio_blk'],
  ['kernel/drivers/md', 'dm-mod', 'dm_mod'],
  ['kernel/drivers/md', 'dm-bufio', 'dm_bufio'],
  ['kernel/drivers/md', 'dm-snapshot', 'dm_snapshot'],
]

export interface Kernel {
  readonly packageName: string
  readonly version: string
  readonly vmlinuz: string
  readonly initrd: string
}

function sh(cmd: string, args: string[], options: { cwd?: string } = {}): string {
  return execFileSync(cmd, args, { cwd: options.cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })
}

function kernelPackage(): string {
  if (process.env.BLOCKSNAP_KERNEL_PACKAGE) return process.env.BLOCKSNAP_KERNEL_PACKAGE
  const out = sh('apt-cache', ['depends', 'linux-image-amd64'])
  const m = /Depends:\s*(linux-image-\S+)/.exec(out)
  if (!m) throw new Error(`cannot find the kernel package linux-image-amd64 depends on:\n${out}`)
  return m[1] as string
}

/** Checks the host tools, with a message that names the Debian packages. */
export function missingTools(): string[] {
  const tools: Array<[string, string]> = [
    ['qemu-system-x86_64', 'qemu-system-x86'],
    ['busybox', 'busybox-static'],
    ['dmsetup', 'dmsetup'],
    ['cpio', 'cpio'],
    ['dpkg', 'dpkg'],
    ['apt-get', 'apt'],
  ]
  const missing: string[] = []
  for (const [tool, pkg] of tools) {
    try {
      execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' })
    } catch {
      missing.push(`${tool} (package ${pkg})`)
    }
  }
  return missing
}

function findModule(root: string, sub: string, file: string): string {
  for (const ext of ['.ko', '.ko.xz', '.ko.zst', '.ko.gz']) {
    const p = join(root, sub, file + ext)
    if (existsSync(p)) return p
  }
  // Fall back to a search (module moved between directories).
  const found = sh('find', [root, '-name', `${file}.ko*`]).trim().split('\n').filter(Boolean)
  if (found.length === 0) throw new Error(`module ${file} not found under ${root}`)
  return found[0] as string
}

function decompressedModule(path: string, out: string): void {
  if (path.endsWith('.ko')) copyFileSync(path, out)
  else if (path.endsWith('.xz')) writeFileSync(out, execFileSync('xz', ['-dc', path], { maxBuffer: 1 << 28 }))
  else if (path.endsWith('.zst')) writeFileSync(out, execFileSync('zstd', ['-dc', path], { maxBuffer: 1 << 28 }))
  else if (path.endsWith('.gz')) writeFileSync(out, execFileSync('gzip', ['-dc', path], { maxBuffer: 1 << 28 }))
}

const INIT = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for pass in 1 2; do
  for m in $(cat /modules.list); do
    name=\${m#*:}; file=\${m%%:*}
    grep -q "^$name " /proc/modules || insmod /lib/modules/$file.ko 2>/dev/null
  done
done
for m in $(cat /modules.list); do
  name=\${m#*:}
  grep -q "^$name " /proc/modules || echo "BLOCKSNAP-ERROR module $name did not load"
done
export DM_DISABLE_UDEV=1
echo "BLOCKSNAP-BOOTED $(uname -r)"
if [ -f /test.sh ]; then sh /test.sh; echo "BLOCKSNAP-EXIT $?"; fi
sync
poweroff -f
`

/** Downloads/unpacks the kernel and builds the base initramfs (cached). */
export function prepareKernel(): Kernel {
  const packageName = kernelPackage()
  const dir = join(CACHE_DIR, packageName)
  mkdirSync(dir, { recursive: true })
  const root = join(dir, 'root')
  const stamp = join(dir, 'unpacked')
  if (!existsSync(stamp)) {
    for (const f of readdirSync(dir)) if (f.endsWith('.deb')) rmSync(join(dir, f))
    sh('apt-get', ['download', packageName], { cwd: dir })
    const deb = readdirSync(dir).find((f) => f.endsWith('.deb'))
    if (!deb) throw new Error(`apt-get download ${packageName} produced no .deb in ${dir}`)
    rmSync(root, { recursive: true, force: true })
    sh('dpkg', ['-x', join(dir, deb), root])
    rmSync(join(dir, deb))
    writeFileSync(stamp, packageName + '\n')
  }
  const version = readdirSync(join(root, 'lib/modules'))[0] as string
  const vmlinuz = join(root, 'boot', `vmlinuz-${version}`)
  const initrd = join(dir, 'base-initrd.gz')
  if (!existsSync(initrd)) buildBaseInitramfs(join(root, 'lib/modules', version), initrd)
  return { packageName, version, vmlinuz, initrd }
}

function buildBaseInitramfs(moduleRoot: string, out: string): void {
  const stage = `${out}.stage`
  rmSync(stage, { recursive: true, force: true })
  for (const d of ['bin', 'sbin', 'usr/sbin', 'proc', 'sys', 'dev', 'lib/modules', 'tmp', 'etc']) mkdirSync(join(stage, d), { recursive: true })
  const busybox = sh('sh', ['-c', 'command -v busybox']).trim()
  copyFileSync(busybox, join(stage, 'bin/busybox'))
  chmodSync(join(stage, 'bin/busybox'), 0o755)
  const dmsetup = sh('sh', ['-c', 'command -v dmsetup']).trim()
  copyFileSync(dmsetup, join(stage, 'usr/sbin/dmsetup'))
  chmodSync(join(stage, 'usr/sbin/dmsetup'), 0o755)
  // Shared libraries of dmsetup, at the same paths (realpath content).
  for (const line of sh('ldd', [dmsetup]).split('\n')) {
    const m = /(\/\S+)\s+\(0x/.exec(line)
    if (!m) continue
    const lib = m[1] as string
    mkdirSync(join(stage, dirname(lib)), { recursive: true })
    copyFileSync(lib, join(stage, lib))
  }
  const list: string[] = []
  for (const [sub, file, name] of MODULES) {
    decompressedModule(findModule(moduleRoot, sub, file), join(stage, 'lib/modules', `${file}.ko`))
    list.push(`${file}:${name}`)
  }
  writeFileSync(join(stage, 'modules.list'), list.join('\n') + '\n')
  writeFileSync(join(stage, 'init'), INIT)
  chmodSync(join(stage, 'init'), 0o755)
  writeFileSync(`${out}.tmp`, gzipSync(cpioArchive(stage)))
  renameSync(`${out}.tmp`, out)
  rmSync(stage, { recursive: true, force: true })
}

/** Shared libraries (real paths as ldd prints them) of a host executable. */
function sharedLibraries(binary: string): string[] {
  const libs: string[] = []
  for (const line of sh('ldd', [binary]).split('\n')) {
    const m = /(\/\S+)\s+\(0x/.exec(line)
    if (m) libs.push(m[1] as string)
  }
  return libs
}

function cpioArchive(dir: string): Buffer {
  return execFileSync('sh', ['-c', 'find . -print0 | sort -z | cpio --null -o -H newc --quiet'], { cwd: dir, maxBuffer: 1 << 30 })
}

export interface VmRun {
  /** Values of `RESULT name value` lines (later lines win). */
  readonly results: Map<string, string>
  readonly log: string
  readonly exitCode: number | null
  readonly seconds: number
}

export interface VmOptions {
  readonly disks: readonly string[]
  readonly script: string
  readonly timeoutMs?: number
  readonly memoryMiB?: number
  /** More `-drive file=...` values (e.g. `nbd://127.0.0.1:PORT/NAME`), attached after `disks`
   * with cache=writeback (flushes reach the file/server) and waited for like them. */
  readonly drives?: readonly string[]
  /** More kernel modules (file names without .ko, e.g. 'ext4'), insmod'ed in this order before the script. */
  readonly modules?: readonly string[]
  /** Host executables copied into the VM at the same path, with the shared libraries ldd lists. */
  readonly binaries?: readonly string[]
  /** Called for each console line while the VM runs; `send` writes text to the VM's serial
   * console, where the script can `read` it (e.g. `read -r reply`). */
  readonly onLine?: (line: string, send: (text: string) => void) => void
}

/** Device name of disk i (vda, vdb, ..., vdz, vdaa, ...). */
export function diskName(i: number): string {
  const letters = 'abcdefghijklmnopqrstuvwxyz'
  return i < 26 ? `vd${letters[i]}` : `vd${letters[Math.floor(i / 26) - 1]}${letters[i % 26]}`
}

/** Shell functions available to every test script. */
export const PRELUDE = `
R() { echo "RESULT $1 $2"; }
waitdisks() {
  i=0
  while [ $i -lt 200 ]; do
    ok=1
    for d in "$@"; do [ -b /dev/$d ] || ok=0; done
    [ $ok = 1 ] && return 0
    sleep 0.1; i=$((i+1))
  done
  echo "BLOCKSNAP-ERROR disks missing: $*"; ls /dev; return 1
}
mk() { n=$1; shift; dmsetup create "$n" --table "$*" || R "error.create.$n" failed; dmsetup mknodes; }
reload() { n=$1; shift; dmsetup reload "$n" --table "$*" || R "error.reload.$n" failed; }
# hv KEY DEVICE: sha256 of /dev/mapper/DEVICE, or EIO when it cannot be read whole
hv() { if h=$(sha256sum < /dev/mapper/$2 2>/dev/null); then R "$1" "\${h%% *}"; else R "$1" EIO; fi; }
hash() { R "sha.$1" "$(sha256sum < /dev/mapper/$1 | cut -d' ' -f1)"; }
hashdev() { R "sha.$1" "$(sha256sum < /dev/$2 | cut -d' ' -f1)"; }
st() { R "status.$1" "$(dmsetup status $1)"; }
# wr TARGET DATADISK DATA_OFF LEN DEV_OFF KEY (bytes, multiples of 512): KEY=EIO when it fails.
# (oflag=direct is asked for, but on 6.1 these writes still reach dm as whole pages.)
wr() { dd if=/dev/$2 of=/dev/mapper/$1 bs=$4 count=1 skip=$3 seek=$5 iflag=skip_bytes oflag=seek_bytes,direct conv=notrunc,fsync 2>/dev/null || R "$6" EIO; }
# waitmerge NAME: until allocated == metadata
waitmerge() {
  i=0
  while [ $i -lt 600 ]; do
    s=$(dmsetup status $1)
    set -- $1 $s
    a=\${5%%/*}; m=$6
    [ "$a" = "$m" ] && return 0
    sleep 0.1; i=$((i+1))
  done
  R "error.merge.$1" "timeout $s"
}
`

export async function runVm(kernel: Kernel, options: VmOptions): Promise<VmRun> {
  if (options.disks.length > 28) throw new Error(`${options.disks.length} disks: a q35 VM has PCI slots for about 28 virtio disks`)
  const work = join(CACHE_DIR, 'runs', `${process.pid}-${Date.now()}-${Math.random().toString(16).slice(2)}`)
  mkdirSync(work, { recursive: true })
  try {
    const stage = join(work, 'extra')
    mkdirSync(stage)
    const names = options.disks.map((_, i) => diskName(i))
    for (const _ of options.drives ?? []) names.push(diskName(names.length))
    let loads = ''
    if (options.modules && options.modules.length > 0) {
      const moduleRoot = join(CACHE_DIR, kernel.packageName, 'root', 'lib', 'modules', kernel.version)
      mkdirSync(join(stage, 'lib', 'modules', 'extra'), { recursive: true })
      for (const m of options.modules) {
        decompressedModule(findModule(moduleRoot, 'kernel', m), join(stage, 'lib', 'modules', 'extra', `${m}.ko`))
        loads += `insmod /lib/modules/extra/${m}.ko || echo "BLOCKSNAP-ERROR module ${m} did not load"\n`
      }
    }
    for (const b of options.binaries ?? []) {
      for (const file of [b, ...sharedLibraries(b)]) {
        mkdirSync(join(stage, dirname(file)), { recursive: true })
        copyFileSync(file, join(stage, file))
        if (file === b) chmodSync(join(stage, file), 0o755)
      }
    }
    const script = `${PRELUDE}\n${loads}waitdisks ${names.join(' ')} || exit 1\n${options.script}\n`
    writeFileSync(join(stage, 'test.sh'), script)
    const initrd = join(work, 'initrd.gz')
    writeFileSync(initrd, Buffer.concat([readFileSync(kernel.initrd), gzipSync(cpioArchive(stage))]))
    const args = [
      '-machine', 'q35,accel=tcg', '-cpu', 'max', '-m', String(options.memoryMiB ?? 1024),
      '-nographic', '-no-reboot', '-nodefaults', '-serial', 'stdio', '-monitor', 'none',
      '-kernel', kernel.vmlinuz, '-initrd', initrd,
      '-append', 'console=ttyS0 quiet panic=-1 loglevel=3',
    ]
    for (const d of options.disks) args.push('-drive', `file=${d},format=raw,if=virtio,cache=unsafe`)
    for (const d of options.drives ?? []) args.push('-drive', `file=${d},format=raw,if=virtio,cache=writeback`)
    const start = Date.now()
    const { log, code } = await new Promise<{ log: string; code: number | null }>((resolve, reject) => {
      const onLine = options.onLine
      const child = spawn('qemu-system-x86_64', args, { stdio: [onLine ? 'pipe' : 'ignore', 'pipe', 'pipe'] })
      const chunks: Buffer[] = []
      let partial = ''
      child.stdin?.on('error', () => {}) // the VM may be gone already
      const send = (text: string): void => {
        child.stdin?.write(text)
      }
      child.stdout?.on('data', (b: Buffer) => {
        chunks.push(b)
        if (!onLine) return
        const lines = (partial + b.toString('utf8')).split('\n')
        partial = lines.pop() as string
        for (const line of lines) onLine(line.replace(/\r$/, ''), send)
      })
      child.stderr?.on('data', (b: Buffer) => chunks.push(b))
      const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 240_000)
      child.on('error', (err) => {
        clearTimeout(timer)
        reject(err)
      })
      child.on('close', (c) => {
        clearTimeout(timer)
        resolve({ log: Buffer.concat(chunks).toString('utf8'), code: c })
      })
    })
    const results = new Map<string, string>()
    let exitCode: number | null = null
    for (const raw of log.split('\n')) {
      const line = raw.replace(/\r$/, '')
      const m = /^RESULT (\S+) ?(.*)$/.exec(line)
      if (m) results.set(m[1] as string, (m[2] as string).trim())
      const e = /^BLOCKSNAP-EXIT (\d+)/.exec(line)
      if (e) exitCode = Number(e[1])
    }
    if (process.env.BLOCKSNAP_KERNEL_LOG) writeFileSync(process.env.BLOCKSNAP_KERNEL_LOG, log, { flag: 'a' })
    if (!/BLOCKSNAP-BOOTED/.test(log)) throw new Error(`VM did not boot (qemu exit ${code}):\n${log.slice(-4000)}`)
    if (exitCode === null) throw new Error(`VM script did not finish (qemu exit ${code}, timeout?):\n${log.slice(-4000)}`)
    return { results, log, exitCode, seconds: (Date.now() - start) / 1000 }
  } finally {
    rmSync(work, { recursive: true, force: true })
  }
}

/** Errors the script reported (RESULT error.* and BLOCKSNAP-ERROR lines). */
export function vmErrors(run: VmRun): string[] {
  const errs = [...run.results].filter(([k]) => k.startsWith('error.')).map(([k, v]) => `${k} ${v}`)
  for (const line of run.log.split('\n')) if (line.startsWith('BLOCKSNAP-ERROR')) errs.push(line.trim())
  return errs
}

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex')
}
