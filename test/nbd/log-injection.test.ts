/**
 * Found by npm run torture (NBD streams, seed 2024, case 1727): an export name the client chose
 * was logged as sent, so a newline in it split the server's log line (and could forge one).
 * Client-chosen names are quoted with control characters escaped.
 */
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MemoryDevice } from '../../src/device/memory-device.js'
import { staticExports } from '../../src/nbd/export.js'
import { bytes, infoRequestBytes, optionBytes } from '../support/nbd-bytes.js'
import { RawNbdClient } from '../support/nbd-raw-client.js'
import { startTestServer } from '../support/nbd-test-server.js'

const FORGED = 'x\nwarn nbd conn#99: forged\u001b[2J\u2028'

test('export names with control characters are escaped in the log', { timeout: 20_000 }, async () => {
  const srv = await startTestServer({ exports: staticExports([{ name: 'mem', device: new MemoryDevice(65536), readOnly: false }]) })
  try {
    // GO for an unknown name (answered with an error, logged at debug), then EXPORT_NAME (closes).
    const client = await RawNbdClient.connect({ port: srv.port })
    client.socket.write(
      Buffer.concat([bytes().u32(3).build(), optionBytes(7, infoRequestBytes(FORGED)), optionBytes(1, Buffer.from(FORGED, 'utf8'))]),
    )
    await client.closed
    await srv.close()
    const mine = srv.logs.filter((l) => l.includes('x\\u000a'))
    assert.ok(mine.length >= 2, `both refusals are logged with the name escaped:\n${srv.logs.join('\n')}`)
    for (const line of srv.logs) {
      assert.doesNotMatch(line, /[\u0000-\u001f\u007f-\u009f\u2028\u2029]/, `log line with a control character: ${JSON.stringify(line)}`)
    }
  } finally {
    await srv.close()
  }
})
