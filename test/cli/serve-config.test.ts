/**
 * `serve --config FILE` (issue 19, item 5): the file is checked against the schema and every
 * mistake is one line naming the key (exit 2); its values reach the server (metrics through
 * --metrics' own parsing); flags given on the command line override it and positional VOLs
 * replace its volumes; `--pid-file` is written once the server serves and removed when it stops.
 */
import assert from 'node:assert/strict'
import { access, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { loadServeConfig } from '../../src/cli/serve-config.js'
import { Volume } from '../../src/volume/volume.js'
import { requireTools, runOk } from '../support/nbd-tools.js'
import { ServeProcess } from '../support/serve-process.js'
import { assertError, cli } from './helpers.js'

const TIMEOUT = 60_000

let T = ''
let vol = ''

before(async () => {
  T = await mkdtemp(join(tmpdir(), 'bs-config-'))
  vol = join(T, 'vol')
  await Volume.create(vol, { sizeBytes: 1024 * 1024 })
})

after(async () => {
  await rm(T, { recursive: true, force: true })
})

const exists = (p: string) =>
  access(p).then(
    () => true,
    () => false,
  )

let files = 0
async function configFile(content: unknown, dir = T): Promise<string> {
  const file = join(dir, `config-${files++}.json`)
  await writeFile(file, typeof content === 'string' ? content : JSON.stringify(content))
  return file
}

/** loadServeConfig's message for `content`, without the file name. */
async function configError(content: unknown): Promise<string> {
  const file = await configFile(content)
  const err = await loadServeConfig(file).then(
    () => assert.fail(`${JSON.stringify(content)} was accepted`),
    (e: Error) => e,
  )
  assert.equal(err.constructor.name, 'ConfigError', String(err))
  assert.ok(err.message.startsWith(`${file}: `), err.message)
  assert.doesNotMatch(err.message, /\n/)
  return err.message.slice(file.length + 2)
}

describe('serve --config: parsing', () => {
  it('a full file gives every setting, paths relative to the file, sizes in bytes', async () => {
    const dir = join(T, 'etc')
    await mkdir(dir)
    const file = await configFile(
      {
        volumes: ['vol', '/srv/other'],
        listen: '[::1]:10810',
        socket: 'nbd.sock',
        readOnly: true,
        tls: { mode: 'require', psk: 'keys.psk', cert: '/pki/c.pem', key: 'k.pem', ca: 'ca.pem', verifyPeer: false },
        writeBack: '16M',
        handshakeLimit: 0,
        maxConnections: 4,
        maxPending: 1048576,
        metrics: 9100,
        pidFile: 'run/blocksnap.pid',
        logFile: '/var/log/blocksnap.log',
      },
      dir,
    )
    const config = await loadServeConfig(file)
    assert.deepEqual(config.volumes, [join(dir, 'vol'), '/srv/other'])
    assert.deepEqual(
      Object.fromEntries(config.options),
      {
        listen: '[::1]:10810',
        socket: join(dir, 'nbd.sock'),
        readOnly: true,
        tls: 'require',
        tlsPsk: join(dir, 'keys.psk'),
        tlsCert: '/pki/c.pem',
        tlsKey: join(dir, 'k.pem'),
        tlsCa: join(dir, 'ca.pem'),
        tlsVerifyPeer: false,
        writeBack: 16 * 1024 * 1024,
        handshakeLimit: 0,
        maxConnections: 4,
        maxPending: 1048576,
        metrics: '9100',
        pidFile: join(dir, 'run', 'blocksnap.pid'),
        logFile: '/var/log/blocksnap.log',
      },
    )
    // Every key is optional.
    const empty = await loadServeConfig(await configFile({}))
    assert.equal(empty.volumes, undefined)
    assert.equal(empty.options.size, 0)
  })

  const invalid: [string, unknown, RegExp][] = [
    ['unknown key', { volume: ['vol'] }, /^volume: unknown key$/],
    ['unknown nested key', { tls: { mdoe: 'off' } }, /^tls\.mdoe: unknown key$/],
    ['volumes empty', { volumes: [] }, /^volumes: expected at least one volume$/],
    ['volumes not a list', { volumes: 'vol' }, /^volumes: expected an array, got a string$/],
    ['volume not a string', { volumes: ['vol', 3] }, /^volumes\[1\]: expected a string, got a number$/],
    ['volume empty', { volumes: [''] }, /^volumes\[0\]: expected a path/],
    ['listen', { listen: 'localhost' }, /^listen: expected HOST:PORT$/],
    ['listen port', { listen: '127.0.0.1:70000' }, /^listen: expected HOST:PORT$/],
    ['socket', { socket: null }, /^socket: expected a string, got null$/],
    ['readOnly', { readOnly: 'yes' }, /^readOnly: expected a boolean, got a string$/],
    ['tls', { tls: 'on' }, /^tls: expected an object, got a string$/],
    ['tls.mode', { tls: { mode: 'sometimes' } }, /^tls\.mode: expected one of off\|allow\|require/],
    ['tls.psk', { tls: { psk: 1 } }, /^tls\.psk: expected a string, got a number$/],
    ['tls.cert without key', { tls: { cert: 'c.pem' } }, /^tls\.key: required with tls\.cert$/],
    ['tls.key without cert', { tls: { key: 'k.pem' } }, /^tls\.cert: required with tls\.key$/],
    ['tls.ca without cert', { tls: { ca: 'ca.pem' } }, /^tls\.ca: needs tls\.cert and tls\.key/],
    ['tls.verifyPeer', { tls: { verifyPeer: 'yes' } }, /^tls\.verifyPeer: expected a boolean, got a string$/],
    ['tls.verifyPeer without ca', { tls: { cert: 'c', key: 'k', verifyPeer: true } }, /^tls\.verifyPeer: needs tls\.ca/],
    ['writeBack text', { writeBack: '12Q' }, /^writeBack: expected a write-back size: bytes, or a number with K, M, G or T, got "12Q"$/],
    ['writeBack type', { writeBack: true }, /^writeBack: expected a write-back size/],
    ['writeBack negative', { writeBack: -1 }, /^writeBack: expected at least 0 bytes, got -1$/],
    ['handshakeLimit negative', { handshakeLimit: -1 }, /^handshakeLimit: expected at least 0$/],
    ['handshakeLimit fraction', { handshakeLimit: 1.5 }, /^handshakeLimit: expected an integer$/],
    ['handshakeLimit text', { handshakeLimit: '10' }, /^handshakeLimit: expected a number, got a string$/],
    ['maxConnections', { maxConnections: 0 }, /^maxConnections: expected at least 1$/],
    ['maxPending', { maxPending: '0' }, /^maxPending: expected at least 1 bytes, got "0"$/],
    ['metrics', { metrics: ['127.0.0.1:9100'] }, /^metrics: expected HOST:PORT or a port number$/],
    ['metrics port', { metrics: 65536 }, /^metrics: expected at most 65535$/],
    ['pidFile', { pidFile: 5 }, /^pidFile: expected a string, got a number$/],
    ['logFile', { logFile: '' }, /^logFile: expected a path/],
  ]
  for (const [what, content, expected] of invalid) {
    it(`names the key: ${what}`, async () => {
      assert.match(await configError(content), expected)
    })
  }

  it('a file that is not a JSON object of settings, or missing, is refused', async () => {
    assert.match(await configError('{"listen": '), /^not valid JSON: /)
    assert.match(await configError('[]'), /^expected a JSON object of serve settings$/)
    await assert.rejects(loadServeConfig(join(T, 'missing.json')), /missing\.json: cannot read it: ENOENT/)
  })
})

describe('serve --config: the CLI', () => {
  it('an invalid file: one line naming the file and the key, exit 2', { timeout: TIMEOUT }, async () => {
    const file = await configFile({ volumes: [vol], tls: { mode: 'sometimes' } })
    assertError(await cli(['serve', '--config', file]), 2, new RegExp(`^blocksnap: error \\[SNAP_USAGE\\]: ${file}: tls\\.mode: expected one of off\\|allow\\|require`))
    assertError(await cli(['serve']), 2, /serve needs at least one VOL/)
  })

  it('positional VOLs replace the file\'s volumes', { timeout: TIMEOUT }, async () => {
    const file = await configFile({ volumes: [vol] })
    // The file's volume would serve; the positional one (missing) is what serve tries.
    assertError(await cli(['serve', '--config', file, '--listen', '127.0.0.1:0', join(T, 'no-such-vol')]), 1, /no-such-vol/)
  })

  it('the file\'s settings apply, flags override them; --pid-file is written while serving and removed after', { timeout: TIMEOUT }, async () => {
    await requireTools('nbdinfo')
    // Port 1 is privileged and unused: serving there would fail, so serving at all shows --listen won.
    const file = await configFile({ volumes: ['vol'], listen: '127.0.0.1:1', readOnly: true, pidFile: 'from-config.pid', metrics: '127.0.0.1:0' })
    const pidFile = join(T, 'from-flag.pid')
    const s = await ServeProcess.start(['--config', file, '--listen', '127.0.0.1:0', '--pid-file', pidFile])
    try {
      const port = Number(/"msg":"nbd server listening on 127\.0\.0\.1:(\d+)"/.exec(s.log)?.[1])
      assert.ok(port > 1, s.log)
      assert.equal(await readFile(pidFile, 'utf8'), `${s.pid}\n`)
      assert.equal(await exists(join(T, 'from-config.pid')), false, 'the flag overrides pidFile')
      // readOnly from the file reaches the export (the volume path came from the file too).
      const info = JSON.parse((await runOk('nbdinfo', ['--json', `nbd://127.0.0.1:${port}/vol`])).stdout)
      assert.equal(info.exports[0]['is_read_only'], true, JSON.stringify(info))
      // metrics from the file goes through --metrics' own parsing: Prometheus text on that listener.
      const url = /status page on (http:\/\/127\.0\.0\.1:\d+\/)/.exec(s.log)?.[1]
      assert.ok(url, s.log)
      const scrape = await fetch(`${url}metrics`)
      assert.equal(scrape.status, 200)
      assert.match(await scrape.text(), /^blocksnap_nbd_connections\{export="vol"\} 0$/m)
    } finally {
      process.kill(s.pid as number, 'SIGTERM')
    }
    assert.deepEqual(await s.exit, { code: 0, signal: null }, s.log)
    assert.equal(await exists(pidFile), false, 'the PID file is removed on a clean stop')
  })
})
