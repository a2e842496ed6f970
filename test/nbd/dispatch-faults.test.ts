/**
 * Requests the device fails, after the split of connection.ts into negotiation.ts and dispatch.ts:
 * the client gets the errno, onClientFault hears of it once per errno (kind 'request', naming the
 * command and the export), the request observer hears of every answered request, and a request
 * that failed because its export was withdrawn is no client fault (the client gets ESHUTDOWN).
 *
 * In process: an NbdServer over a FaultyDevice, a raw NBD client.
 */
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import type { NbdClientFault } from '../../src/nbd/client-fault.js'
import { staticExports } from '../../src/nbd/export.js'
import type { NbdOp } from '../../src/nbd/request-observer.js'
import { Command, NbdErrno } from '../../src/protocol/nbd/constants.js'
import { FaultyDevice } from '../support/faulty-device.js'
import { RawNbdClient } from '../support/nbd-raw-client.js'
import { type TestServer, logsAreClean, startTestServer } from '../support/nbd-test-server.js'

const SIZE = 1024 * 1024
const BLOCK = 4096

let srv: TestServer
let device: FaultyDevice
let withdrawn: string | null = null
const faults: NbdClientFault[] = []
const observed: { exportName: string; op: NbdOp }[] = []

before(async () => {
  device = new FaultyDevice(new MemoryDevice(SIZE))
  srv = await startTestServer({
    exports: staticExports([{ name: 'mem', device, readOnly: false, withdrawn: () => withdrawn }]),
    onClientFault: (fault) => faults.push(fault),
    requestObserver: { requestDone: (exportName, op) => observed.push({ exportName, op }) },
  })
})

after(async () => {
  await srv?.close()
  assert.ok(logsAreClean(srv.logs), `logs have no stack traces:\n${srv.logs.join('\n')}`)
})

test('dispatch: a failed READ is answered with EIO and reported once per errno as a request fault; every request is observed', async () => {
  faults.length = 0
  observed.length = 0
  const c = await RawNbdClient.connect({ port: srv.port })
  await c.handshake()
  await c.go('mem')
  device.failReads()
  try {
    for (const cookie of [1, 2]) {
      c.request({ type: Command.READ, cookie, offset: 0, length: BLOCK })
      const reply = await c.reply(BLOCK)
      assert.equal(reply.error, NbdErrno.EIO, `READ ${cookie} fails with EIO`)
    }
  } finally {
    device.clearFaults()
  }
  c.request({ type: Command.READ, cookie: 3, offset: 0, length: BLOCK })
  assert.equal((await c.reply(BLOCK)).error, 0, 'READ succeeds once the device does')
  c.request({ type: Command.DISC, cookie: 4, length: 0 })
  c.end()

  assert.equal(faults.length, 1, `one fault for two EIOs: ${JSON.stringify(faults)}`)
  const [fault] = faults
  assert.equal(fault!.kind, 'request')
  assert.equal(fault!.export, 'mem')
  assert.equal(fault!.command, 'NBD_CMD_READ')
  assert.equal(fault!.errno, 'NBD_EIO')
  assert.deepEqual(observed, [
    { exportName: 'mem', op: 'read' },
    { exportName: 'mem', op: 'read' },
    { exportName: 'mem', op: 'read' },
  ])
})

test('dispatch: a request that fails because its export was withdrawn gets ESHUTDOWN and is no client fault', async () => {
  faults.length = 0
  const c = await RawNbdClient.connect({ port: srv.port })
  await c.handshake()
  await c.go('mem')
  // The device fails the write first; the export is withdrawn by the time the failure is mapped.
  device.failWrites(() => {
    withdrawn = "export 'mem' was withdrawn"
    return true
  })
  try {
    c.request({ type: Command.WRITE, cookie: 1, offset: 0, length: BLOCK }, Buffer.alloc(BLOCK, 0xab))
    assert.equal((await c.reply()).error, NbdErrno.ESHUTDOWN)
  } finally {
    device.clearFaults()
    withdrawn = null
  }
  c.destroy()
  assert.deepEqual(faults, [])
})
