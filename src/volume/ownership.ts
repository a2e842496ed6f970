/**
 * Who may open a volume for writing, and how that is held: one abstraction over two mechanisms.
 *
 * - A volume on local storage is owned through the flock on its directory (volume-lock.ts): one
 *   kernel sees every contender.
 * - A volume on a shared store — its origin an RBD image, reachable from every host — is owned
 *   through a lease on the cluster (volume-lease.ts): the directory may sit on a shared file
 *   system too, where a flock proves nothing across hosts (and a stalled owner would hold it
 *   forever), so the lease alone decides.
 *
 * Either way the owner calls assertHeld() before every manifest write and release() on close.
 */
import { type RbdAddress, isRbdAddress, parseRbdAddress } from '../device/rbd/rbd-address.js'
import type { SnapError } from '../errors.js'
import { type Manifest, isExternal, isExternalOrigin } from './manifest.js'
import { VolumeLease } from './volume-lease.js'
import { VolumeLock } from './volume-lock.js'

export interface VolumeOwnership {
  /** 'lease' for a volume on a shared store, 'flock' otherwise. */
  readonly kind: 'flock' | 'lease'
  /** Throws (SNAP_BUSY) when this process no longer owns the volume. */
  assertHeld(): Promise<void>
  /** Gives the volume the Volume's current images to fence and record (leases only). */
  trackImages?(images: () => readonly RbdAddress[]): void
  release(): Promise<void>
}

export interface OwnershipOptions {
  /** Lease period of a volume on a shared store (renewed every third of it). */
  readonly leaseSeconds?: number
  /** Take a leased volume even from a live owner, fencing it first. */
  readonly takeover?: boolean
  /** Called once if another host takes the lease over. */
  readonly onLost?: (err: SnapError) => void
  /** Lease progress worth a log line (waiting for a holder, fencing). */
  readonly onNotice?: (message: string) => void
  /**
   * For a reader that must not see files an owner is writing (check): a shared flock beside other
   * readers on a local volume. A lease has no shared form, so a volume on a shared store is
   * still taken whole.
   */
  readonly shared?: boolean
}

/** The volume's origin when it lives on a shared store (an RBD image), else null. */
export function sharedOriginOf(manifest: Manifest): RbdAddress | null {
  return isExternalOrigin(manifest) && isRbdAddress(manifest.originFile) ? parseRbdAddress(manifest.originFile) : null
}

/** The volume's RBD images: its origin and every COW on RBD. */
export function rbdImagesOf(manifest: Manifest): RbdAddress[] {
  const images: RbdAddress[] = []
  const origin = sharedOriginOf(manifest)
  if (origin) images.push(origin)
  for (const record of manifest.snapshots) {
    if (isExternal(record) && isRbdAddress(record.cowFile)) images.push(parseRbdAddress(record.cowFile))
  }
  return images
}

class FlockOwnership implements VolumeOwnership {
  readonly kind = 'flock' as const
  // null: a shared lock on a volume without a lock file (nothing to lock against)
  private readonly lock: { release(): Promise<void> } | null

  constructor(lock: { release(): Promise<void> } | null) {
    this.lock = lock
  }

  // The kernel never takes a flock away from a live process.
  async assertHeld(): Promise<void> {}

  async release(): Promise<void> {
    await this.lock?.release()
  }
}

class LeaseOwnership implements VolumeOwnership {
  readonly kind = 'lease' as const
  readonly lease: VolumeLease

  constructor(lease: VolumeLease) {
    this.lease = lease
  }

  assertHeld(): Promise<void> {
    return this.lease.assertHeld()
  }

  trackImages(images: () => readonly RbdAddress[]): void {
    this.lease.trackImages(images)
  }

  release(): Promise<void> {
    return this.lease.release()
  }
}

/** Takes ownership of volume `dir` as its manifest calls for. */
export async function acquireOwnership(dir: string, manifest: Manifest, options: OwnershipOptions = {}): Promise<VolumeOwnership> {
  const origin = sharedOriginOf(manifest)
  if (origin === null) return new FlockOwnership(options.shared === true ? await VolumeLock.acquireShared(dir) : await VolumeLock.acquire(dir))
  const lease = await VolumeLease.acquire(origin, dir, () => rbdImagesOf(manifest), options)
  return new LeaseOwnership(lease)
}
