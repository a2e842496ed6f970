/**
 * A process that holds a volume lease, standing in for an owner on another host in the lease
 * tests: `lease-holder.ts ADDRESS VOLUME LEASE_SECONDS [takeover|local]` takes the lease of the volume
 * whose origin is ADDRESS and prints `held TOKEN`, or `busy MESSAGE` / `error MESSAGE` and exits
 * 4 / 1. While it holds the lease it renews it; when it finds the lease taken from it, it prints
 * `lost MESSAGE` and exits 4, as `serve` does.
 */
import { isSnapError } from '../../src/errors.js'
import { parseRbdAddress } from '../../src/device/rbd/rbd-address.js'
import { VolumeLease } from '../../src/volume/volume-lease.js'

const [address, volume, seconds, mode] = process.argv.slice(2)
const origin = parseRbdAddress(address as string)
try {
  const lease = await VolumeLease.acquire(origin, volume as string, () => [origin], {
    leaseSeconds: Number(seconds),
    takeover: mode === 'takeover',
    // Another host's owner (its PID means nothing to the contenders in the test process), unless
    // told to be a local one.
    ...(mode === 'local' ? {} : { pidSpace: `test-host-${process.pid}` }),
    onLost: (err) => {
      process.stdout.write(`lost ${err.message}\n`)
      process.exit(4)
    },
  })
  process.stdout.write(`held ${lease.token}\n`)
  // Renewals run on an unref'd timer: keep the process alive until it is killed or loses.
  setInterval(() => {}, 1 << 30)
} catch (err) {
  process.stdout.write(`${isSnapError(err, 'SNAP_BUSY') ? 'busy' : 'error'} ${(err as Error).message}\n`)
  process.exit(isSnapError(err, 'SNAP_BUSY') ? 4 : 1)
}
