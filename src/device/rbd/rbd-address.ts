/**
 * RBD device addresses: `rbd:POOL/IMAGE` or `rbd:POOL/IMAGE?conf=/path/ceph.conf&id=NAME`.
 *
 * An address names the image on the cluster, not a connection: each host that opens it starts
 * its own gateway (qemu-nbd with qemu's rbd driver), so a manifest holding these addresses means
 * the same images on every host. `conf` defaults to $CEPH_CONF, else /etc/ceph/ceph.conf, as the
 * Ceph tools do; `id` is the Ceph client name without `client.` (default: admin). Namespaces and
 * snapshots (`POOL/NS/IMAGE`, `IMAGE@SNAP`) are not accepted: a volume needs writable images.
 */
import { isAbsolute } from 'node:path'
import { badArgument } from '../../errors.js'

export interface RbdAddress {
  /** The address as given, for messages and manifests. */
  readonly text: string
  readonly pool: string
  readonly image: string
  /** Absolute path of ceph.conf, or null for the Ceph tools' default. */
  readonly confFile: string | null
  /** Ceph client name without `client.`, or null for the default. */
  readonly clientId: string | null
}

const KNOWN_QUERY = new Set(['conf', 'id'])
/** Pool and image names as Ceph accepts them, minus the characters qemu's rbd: syntax reserves. */
const NAME = /^[A-Za-z0-9_.-]{1,128}$/

/** True when `text` is meant as an RBD address rather than a file path or an NBD URI. */
export function isRbdAddress(text: string): boolean {
  return /^rbd:/i.test(text)
}

export function parseRbdAddress(text: string): RbdAddress {
  if (!isRbdAddress(text)) throw badArgument(`'${text}' is not an RBD address (rbd:POOL/IMAGE)`)
  const rest = text.slice('rbd:'.length)
  const queryAt = rest.indexOf('?')
  const path = queryAt < 0 ? rest : rest.slice(0, queryAt)
  const parts = path.split('/')
  if (parts.length !== 2) throw badArgument(`'${text}': an RBD address is rbd:POOL/IMAGE`)
  const [pool, image] = parts as [string, string]
  for (const [what, name] of [['pool', pool], ['image', image]] as const) {
    if (!NAME.test(name) || name === '.' || name === '..') {
      throw badArgument(`'${text}': ${what} name '${name}' must be 1-128 letters, digits, '_', '.' or '-'`)
    }
  }
  const query = new URLSearchParams(queryAt < 0 ? '' : rest.slice(queryAt + 1))
  for (const key of query.keys()) {
    if (!KNOWN_QUERY.has(key)) throw badArgument(`'${text}': unknown query parameter '${key}' (conf, id)`)
  }
  const confFile = query.get('conf')
  if (confFile !== null && (!isAbsolute(confFile) || /[:@\0]/.test(confFile))) {
    throw badArgument(`'${text}': conf must be an absolute path without ':' or '@'`)
  }
  const clientId = query.get('id')
  if (clientId !== null && !NAME.test(clientId)) throw badArgument(`'${text}': client id '${clientId}' is not a valid Ceph name`)
  return { text, pool, image, confFile, clientId }
}

/** The Ceph config file an address uses: its own, else $CEPH_CONF, else the system default. */
export function cephConfOf(address: RbdAddress, env: NodeJS.ProcessEnv = process.env): string {
  return address.confFile ?? env['CEPH_CONF'] ?? '/etc/ceph/ceph.conf'
}

/** qemu's rbd filename for the image (what `qemu-nbd` and `qemu-img` open). */
export function qemuRbdFilename(address: RbdAddress, env: NodeJS.ProcessEnv = process.env): string {
  const id = address.clientId === null ? '' : `:id=${address.clientId}`
  return `rbd:${address.pool}/${address.image}${id}:conf=${cephConfOf(address, env)}`
}
