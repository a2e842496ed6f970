/**
 * The status page (issue 19, item 2) in headless Chromium, against a real `serve --metrics`:
 * every volume, snapshot fill bars (against the COW, and against the file system for a
 * grow-on-demand COW) checked against the dm-snapshot layout, states, a merge with rate and ETA,
 * clients per export; it redraws itself after an NBD write without a reload; it loads nothing but
 * its own page and status.json; it fits a phone's width; and its screenshot has real content.
 *
 * Chromium is Debian's (/usr/bin/chromium, installed by .ci/run), driven by playwright-core.
 * STATUS_PAGE_SCREENSHOT=docs/status-page.png writes the README's screenshot.
 */
import assert from 'node:assert/strict'
import { access, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { after, before, describe, it } from 'node:test'
import type { BrowserContext, Page } from 'playwright-core'
import { cliOk } from '../cli/helpers.js'
import { nbdsh, requireTools } from '../support/nbd-tools.js'
import { decodePng } from '../support/png.js'
import { CHUNK_BYTES, FIXED_COW_BYTES, type Served, holdingClient, makeVolume, serveWithMetrics, statusJson, stopServe, until } from './service-support.js'

// The page's globals, for the functions that run inside it (tsconfig has no DOM library).
declare const document: any
declare const window: any
declare function getComputedStyle(element: unknown): { fontSize: string }

const CHROMIUM = '/usr/bin/chromium'
/** Flags that keep Chromium off the network and quiet on a closed machine. */
const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
]

const chromiumMissing = await access(CHROMIUM).then(
  () => null,
  () => `Chromium is not installed at ${CHROMIUM} (apt-get install -y chromium; .ci/run installs it): the status page test is skipped`,
)

/** 256 KiB written at offset 0 after the snapshots: 64 chunks in each. */
const WRITTEN_CHUNKS = 64

let T = ''
let served: Served | null = null
let context: BrowserContext | null = null
let holder: { release: () => Promise<void> } | null = null

before(async () => {
  if (chromiumMissing) return
  await requireTools('nbdsh')
  T = await mkdtemp(join(tmpdir(), 'blocksnap-status-page-'))
  const dir = join(T, 'vol')
  await makeVolume(dir, ['nightly'])
  served = await serveWithMetrics(dir)
  const uri = (name: string) => `nbd://127.0.0.1:${served!.nbdPort}/${name}`
  await nbdsh(uri('vol'), `h.pwrite(b'\\x11' * ${WRITTEN_CHUNKS * CHUNK_BYTES}, 0)\nh.flush()`)
  holder = await holdingClient(uri('vol@grow'), 'h.pread(4096, 0)')
  // 64 chunks at 4 KiB/s: a merge that runs for the whole test, one chunk a second.
  await cliOk(['merge', `${dir}@nightly`, '--rate', '4096'])
  const { chromium } = await import('playwright-core')
  context = await chromium.launchPersistentContext(join(T, 'chromium-profile'), {
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
  })
})

after(async () => {
  await context?.close()
  await holder?.release()
  await stopServe(served)
  if (T) await rm(T, { recursive: true, force: true })
})

/** Opens the page; records every request it makes and every error it reports. */
async function openPage(viewport: { width: number; height: number }): Promise<{ page: Page; requests: string[]; errors: string[] }> {
  const page = await context!.newPage()
  await page.setViewportSize(viewport)
  const requests: string[] = []
  const errors: string[] = []
  page.on('request', (r) => requests.push(r.url()))
  page.on('pageerror', (err) => errors.push(err.message))
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(m.text())
  })
  await page.goto(`${served!.base}/`)
  await page.waitForSelector('[data-snapshot="vol@fixed"]')
  return { page, requests, errors }
}

const percent = (part: number, whole: number) => ((100 * part) / whole).toFixed(2)

describe('status page in Chromium', { concurrency: 1, skip: chromiumMissing ?? false }, () => {
  it('shows every volume, snapshot fill bars, states, the merge with rate and ETA, and clients per export', async () => {
    const { page, requests, errors } = await openPage({ width: 1100, height: 900 })
    try {
      assert.equal(await page.title(), 'blocksnap status')
      assert.equal(await page.locator('section[data-volume="vol"] h2').textContent(), 'vol')
      // dm-snapshot layout: header chunk, one metadata area, one chunk per written origin chunk.
      const allocated = (2 + WRITTEN_CHUNKS) * CHUNK_BYTES
      const fixed = page.locator('[data-snapshot="vol@fixed"]')
      assert.equal(await fixed.getAttribute('data-state'), 'active')
      assert.equal(await fixed.locator('[data-fill="cow"]').getAttribute('data-percent'), percent(allocated, FIXED_COW_BYTES))
      assert.equal(await fixed.locator('[data-fill="fs"]').count(), 0, 'a fixed COW has no file-system bar')
      assert.match((await fixed.textContent()) ?? '', /COW \(fixed size\).*25\.8 % · 264 KiB of 1\.00 MiB/)

      const status = await statusJson(served!.base)
      const growJson = status.volumes[0].snapshots.find((s: { name: string }) => s.name === 'grow')
      assert.equal(growJson.allocatedBytes, allocated)
      const grow = page.locator('[data-snapshot="vol@grow"]')
      assert.equal(await grow.locator('[data-fill="cow"]').getAttribute('data-percent'), percent(allocated, growJson.cowBytes))
      const fsPercent = Number(await grow.locator('[data-fill="fs"]').getAttribute('data-percent'))
      // Against the COW plus the free space, which other processes change: bounds.
      assert.ok(fsPercent >= 0 && fsPercent < Number(percent(allocated, growJson.cowBytes)), `fs fill ${fsPercent}`)
      assert.match((await grow.textContent()) ?? '', /clients 1/)

      const merge = page.locator('[data-merge="vol@nightly"]')
      assert.equal(await merge.getAttribute('data-state'), 'running')
      const mergeText = (await merge.textContent()) ?? ''
      assert.match(mergeText, /merging nightly into vol/)
      assert.match(mergeText, /limit 4\.00 KiB\/s/)
      assert.match(mergeText, /rate [\d.]+ (B|KiB)\/s/)
      assert.match(mergeText, /ETA (\d+m )?\d+s/)
      assert.match(mergeText, /of 256 KiB/)
      // A snapshot being merged is shown with its state, and has no export.
      assert.equal(await page.locator('[data-snapshot="vol@nightly"]').getAttribute('data-state'), 'merging')
      assert.deepEqual(await page.locator('[data-export]').evaluateAll((els) => els.map((e) => [e.getAttribute('data-export'), e.textContent])), [
        ['vol', 'vol0 clients'],
        ['vol@fixed', 'vol@fixed0 clients'],
        ['vol@grow', 'vol@grow1 client'],
      ])
      // Every bar is drawn: its fill is visible and as wide as its percentage says. Found and
      // measured in one page.evaluate: the page replaces its whole DOM on every poll, and a
      // locator's evaluateAll finds the elements and runs the function in two round trips, so a
      // redraw in between hands it detached elements, whose boxes are all 0.
      const bars = await page.evaluate(() =>
        [...document.querySelectorAll('[role="progressbar"]')].map((e: any) => {
          const outer = e.getBoundingClientRect()
          const inner = e.firstElementChild.getBoundingClientRect()
          return { label: e.getAttribute('aria-label'), now: Number(e.getAttribute('aria-valuenow')), outerWidth: outer.width, width: inner.width, height: inner.height }
        }),
      )
      assert.equal(bars.length, 1 + 1 + 2 + 2, 'merge, fixed (COW), grow and nightly (COW and file system)')
      for (const bar of bars) {
        assert.ok(bar.height >= 4, `${bar.label}: fill ${bar.height}px high`)
        assert.ok(Math.abs((100 * bar.width) / bar.outerWidth - bar.now) < 1, `${bar.label}: ${bar.width}px of ${bar.outerWidth}px for ${bar.now} %`)
      }
      assert.equal(await page.locator('#live').textContent(), 'live')
      for (const url of requests) assert.ok(url.startsWith(`${served!.base}/`), `the page requested ${url}`)
      assert.deepEqual(errors, [])
    } finally {
      await page.close()
    }
  })

  it('updates live: an NBD write shows up in the fill bar and the merge moves, without a reload', async () => {
    const { page, requests, errors } = await openPage({ width: 1100, height: 900 })
    try {
      await page.evaluate(() => (window.marker = 42))
      const fixedBar = page.locator('[data-snapshot="vol@fixed"] [data-fill="cow"]')
      const before = await fixedBar.getAttribute('data-percent')
      const mergeBefore = Number(await page.locator('[data-merge]').getAttribute('data-percent'))
      // 64 more chunks, beyond the first write: the fixed COW gets 64 more data chunks.
      await nbdsh(`nbd://127.0.0.1:${served!.nbdPort}/vol`, `h.pwrite(b'\\x22' * ${WRITTEN_CHUNKS * CHUNK_BYTES}, 1024 * 1024)\nh.flush()`)
      const expected = percent((2 + 2 * WRITTEN_CHUNKS) * CHUNK_BYTES, FIXED_COW_BYTES)
      assert.notEqual(before, expected)
      await page.waitForFunction((want) => document.querySelector('[data-snapshot="vol@fixed"] [data-fill="cow"]')?.getAttribute('data-percent') === want, expected, { timeout: 20_000 })
      await page.waitForFunction((was) => Number(document.querySelector('[data-merge]')?.getAttribute('data-percent')) > was, mergeBefore, { timeout: 20_000 })
      assert.equal(await page.evaluate(() => window.marker), 42, 'the same document: no reload')
      assert.equal(requests.filter((u) => u === `${served!.base}/`).length, 1, 'the page itself was loaded once')
      assert.ok(requests.filter((u) => u.endsWith('/status.json')).length >= 2, 'it polled status.json')
      assert.deepEqual(errors, [])
    } finally {
      await page.close()
    }
  })

  it('fits a phone: viewport meta, no sideways scrolling, readable text; the screenshot has content', async () => {
    const { page, errors } = await openPage({ width: 390, height: 844 })
    try {
      assert.equal(await page.locator('meta[name="viewport"]').getAttribute('content'), 'width=device-width, initial-scale=1')
      const widths = await page.evaluate(() => ({ scroll: document.documentElement.scrollWidth, inner: window.innerWidth }))
      assert.ok(widths.scroll <= widths.inner, `page is ${widths.scroll}px wide in a ${widths.inner}px viewport`)
      // One page.evaluate, like the bars: a locator's evaluate can measure a card a redraw detached.
      const cardWidth = await page.evaluate(() => document.querySelector('[data-snapshot="vol@fixed"]').getBoundingClientRect().width)
      assert.ok(cardWidth > 300, `snapshot cards use the phone's width (${cardWidth}px)`)
      const smallest = await page.evaluate(() => Math.min(...[...document.querySelectorAll('body *')].filter((e: any) => e.textContent && e.children.length === 0).map((e: any) => parseFloat(getComputedStyle(e).fontSize))))
      assert.ok(smallest >= 10, `smallest text ${smallest}px`)
      const shot = decodePng(await page.screenshot({ fullPage: true }))
      assertHasContent(shot)
      assert.deepEqual(errors, [])
    } finally {
      await page.close()
    }
    const desktop = await openPage({ width: 1100, height: 760 })
    try {
      const png = await desktop.page.screenshot({ fullPage: true })
      assertHasContent(decodePng(png))
      const out = process.env.STATUS_PAGE_SCREENSHOT
      if (out) await writeFile(resolve(out), png)
    } finally {
      await desktop.page.close()
    }
  })
})

/** Not blank: many pixels differ from the background, in several colours (text, bars, badges). */
function assertHasContent(shot: { width: number; height: number; pixels: Uint8Array }): void {
  const counts = new Map<number, number>()
  for (let i = 0; i < shot.pixels.length; i += 4) {
    const key = (shot.pixels[i]! << 16) | (shot.pixels[i + 1]! << 8) | shot.pixels[i + 2]!
    counts.set(key, (counts.get(key) ?? 0) + 1)
  }
  const total = shot.width * shot.height
  const background = Math.max(...counts.values())
  const coloured = [...counts.entries()].filter(([, n]) => n > total / 2000).length
  assert.ok(total - background > total * 0.05, `only ${total - background} of ${total} pixels differ from the background`)
  assert.ok(coloured >= 5, `only ${coloured} colours cover a visible area`)
}
