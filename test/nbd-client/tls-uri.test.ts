/**
 * NbdClientDevice over TLS (PSK against nbdkit, X.509 against blocksnap's own server) and the NBD
 * URI forms it accepts.
 */
import { after, describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { NbdClientDevice } from '../../src/device/nbd-client-device.js'
import { parseNbdUri } from '../../src/device/nbd/nbd-uri.js'
import { openDevice } from '../../src/device/open-device.js'
import { FileDevice } from '../../src/device/file-device.js'
import { staticExports } from '../../src/nbd/export.js'
import { PeerServer } from '../support/nbd-peer.js'
import { makeCaPki, requireTools } from '../support/nbd-tools.js'
import { startTestServer } from '../support/nbd-test-server.js'

await requireTools('nbdkit', 'openssl')
const dir = await mkdtemp(join(tmpdir(), 'blocksnap-nbd-client-tls-'))
const peers: PeerServer[] = []
after(async () => {
  await Promise.all(peers.map((peer) => peer.stop()))
  await rm(dir, { recursive: true, force: true })
})

const rejectsWithMessage = (promise: Promise<unknown>, code: string, pattern: RegExp) =>
  assert.rejects(promise, (err: Error & { code?: string }) => {
    assert.equal(err.code, code, err.message)
    assert.match(err.message, pattern)
    return true
  })

describe('nbd-client-device: TLS', () => {
  it('nbd-client-device: PSK against nbdkit --tls=require: the right key works, a wrong key and plaintext are refused', async () => {
    const keys = join(dir, 'keys.psk')
    const wrong = join(dir, 'wrong.psk')
    await writeFile(keys, `alice:${'11'.repeat(32)}\n`)
    await writeFile(wrong, `alice:${'22'.repeat(32)}\n`)
    const socket = join(dir, 'psk.sock')
    const peer = PeerServer.nbdkit(socket, ['memory', '1M'], ['--tls=require', `--tls-psk=${keys}`])
    peers.push(peer)
    await peer.start()
    const device = await NbdClientDevice.open(`nbds+unix:///?socket=${socket}&tls-psk-file=${keys}&tls-username=alice`)
    await device.write(new Uint8Array(4096).fill(0x5a), 8192, { fua: true })
    assert.deepEqual(await device.read(8192, 4096), new Uint8Array(4096).fill(0x5a))
    await device.close()
    await rejectsWithMessage(NbdClientDevice.open(`nbds+unix:///?socket=${socket}&tls-psk-file=${wrong}&tls-username=alice`), 'SNAP_IO', /TLS handshake failed|closed/)
    await rejectsWithMessage(NbdClientDevice.open(`nbd+unix:///?socket=${socket}`), 'SNAP_IO', /requires TLS \(use nbds:\/\/\)/)
    await rejectsWithMessage(NbdClientDevice.open(`nbds+unix:///?socket=${socket}&tls-psk-file=${keys}&tls-username=bob`), 'SNAP_BAD_ARGUMENT', /no key for 'bob'/)
    // libnbd's form with the user before an empty host names the PSK identity too.
    const byUser = await NbdClientDevice.open(`nbds+unix://alice@/?socket=${socket}&tls-psk-file=${keys}`)
    assert.deepEqual(await byUser.read(8192, 4096), new Uint8Array(4096).fill(0x5a))
    await byUser.close()
    await rejectsWithMessage(NbdClientDevice.open(`nbds+unix://bob@/?socket=${socket}&tls-psk-file=${keys}`), 'SNAP_BAD_ARGUMENT', /no key for 'bob'/)
    await rejectsWithMessage(NbdClientDevice.open(`nbds+unix://alice:secret@/?socket=${socket}&tls-psk-file=${keys}`), 'SNAP_BAD_ARGUMENT', /must not carry a password/)
  })

  it('nbd-client-device: X.509 against blocksnap NbdServer: a client certificate from tls-certificates gets in; a foreign client certificate, or a server not signed by the client CA, is refused', async () => {
    const pki = await makeCaPki(join(dir, 'pki'))
    const device = new MemoryDevice(1 << 20)
    const server = await startTestServer({
      exports: staticExports([{ name: 'mem', device, readOnly: false }]),
      tls: { mode: 'require', cert: await readFile(pki.serverCert), key: await readFile(pki.serverKey), ca: await readFile(pki.caCert), verifyPeer: true },
    })
    try {
      const client = await NbdClientDevice.open(`nbds://127.0.0.1:${server.port}/mem?tls-certificates=${pki.clientDir}`)
      await client.write(new Uint8Array(1000).fill(7), 1)
      assert.deepEqual(await device.read(1, 1000), new Uint8Array(1000).fill(7))
      await client.close()
      // A client certificate another CA signed: the server hangs up on it.
      await rejectsWithMessage(NbdClientDevice.open(`nbds://127.0.0.1:${server.port}/mem?tls-certificates=${pki.otherCaDir}`), 'SNAP_IO', /closed the connection/)
      // A client that trusts another CA refuses our server's certificate.
      const wrongCa = join(dir, 'wrong-ca')
      await mkdir(wrongCa)
      await writeFile(join(wrongCa, 'ca-cert.pem'), await readFile(join(dir, 'pki', 'other-ca-cert.pem')))
      await rejectsWithMessage(NbdClientDevice.open(`nbds://127.0.0.1:${server.port}/mem?tls-certificates=${wrongCa}`), 'SNAP_IO', /TLS handshake failed: .*certificate/)
    } finally {
      await server.close()
    }
  })
})

describe('nbd-client-device: URIs', () => {
  it('nbd-client-device: parses the standard NBD URI forms and refuses malformed ones with one line', () => {
    assert.deepEqual(parseNbdUri('nbd://example.com:10900/disk%201').transport, { kind: 'tcp', host: 'example.com', port: 10900 })
    assert.equal(parseNbdUri('nbd://example.com:10900/disk%201').exportName, 'disk 1')
    assert.deepEqual(parseNbdUri('nbd://[::1]/x').transport, { kind: 'tcp', host: '::1', port: 10809 })
    assert.equal(parseNbdUri('nbd://h').exportName, '')
    assert.equal(parseNbdUri('nbd://h').tls, null)
    const unix = parseNbdUri('nbd+unix:///exp?socket=/run/x.sock')
    assert.deepEqual(unix.transport, { kind: 'unix', path: '/run/x.sock' })
    assert.equal(unix.exportName, 'exp')
    const secure = parseNbdUri('nbds://carol@h:1/e?tls-psk-file=/k&tls-verify-peer=false')
    assert.equal(secure.tls?.username, 'carol')
    assert.equal(secure.tls?.pskFile, '/k')
    assert.equal(secure.tls?.verifyPeer, false)
    for (const [bad, why] of [
      ['http://h/e', /scheme/],
      ['nbd+unix:///e', /socket=PATH/],
      ['nbd://h/e?socket=/x', /only for nbd\+unix/],
      ['nbd://h/e?tls-psk-file=/k', /needs a TLS scheme/],
      ['nbd://h/e?tls-psk=/k', /unknown query parameter 'tls-psk'/],
    ] as const) {
      assert.throws(() => parseNbdUri(bad), (err: Error & { code?: string }) => err.code === 'SNAP_BAD_ARGUMENT' && why.test(err.message) && !err.message.includes('\n'))
    }
  })

  it('nbd-client-device: openDevice opens an NBD URI as an NbdClientDevice and anything else as a file', async () => {
    const socket = join(dir, 'open.sock')
    const peer = PeerServer.nbdkit(socket, ['memory', '64K'])
    peers.push(peer)
    await peer.start()
    const remote = await openDevice(peer.uri(), { readOnly: true })
    assert.ok(remote instanceof NbdClientDevice)
    assert.equal(remote.capabilities.writable, false)
    assert.equal(remote.sizeBytes, 65536)
    await remote.close()
    const path = join(dir, 'plain.img')
    await (await FileDevice.open(path, { create: 4096 })).close()
    const local = await openDevice(path)
    assert.ok(local instanceof FileDevice)
    await local.close()
  })
})
