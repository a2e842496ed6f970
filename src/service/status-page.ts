/**
 * The status page served at `/`: one self-contained HTML document (inline style and script, no
 * fonts, images or scripts from anywhere else) that polls `status.json` every second and redraws
 * itself. Names from the volumes reach the DOM only as text (textContent), never as markup.
 *
 * Elements carry data-* attributes (data-volume, data-snapshot, data-fill, data-merge,
 * data-export) so tests and scripts can find them without depending on the layout.
 */

/** How often the page asks for a new picture. */
export const STATUS_POLL_MS = 1000

const STYLE = `
:root { color-scheme: light dark; --bg: #f5f6f8; --card: #fff; --fg: #1d2330; --muted: #5d6778; --line: #d9dde5;
  --ok: #2e9d57; --warn: #d99a1a; --bad: #d0423b; --bar: #e7eaf0; --accent: #3465c9; }
@media (prefers-color-scheme: dark) { :root { --bg: #14171c; --card: #1d2129; --fg: #e6e9ef; --muted: #9aa3b2;
  --line: #2e3440; --bar: #2a303b; --accent: #6d98ee; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; background: var(--bg); color: var(--fg); }
header { display: flex; flex-wrap: wrap; gap: .25rem 1rem; align-items: baseline; padding: .9rem 1rem; border-bottom: 1px solid var(--line); background: var(--card); }
header h1 { font-size: 1.15rem; margin: 0; }
header .meta { color: var(--muted); font-size: .85rem; }
#live { font-size: .8rem; padding: .05rem .5rem; border-radius: 1rem; background: var(--bar); }
#live.on { background: var(--ok); color: #fff; }
#live.off { background: var(--bad); color: #fff; }
main { max-width: 70rem; margin: 0 auto; padding: 1rem; display: grid; gap: 1rem; }
section.volume, section.exports { background: var(--card); border: 1px solid var(--line); border-radius: .6rem; padding: .9rem 1rem; min-width: 0; }
h2 { font-size: 1.05rem; margin: 0 0 .15rem; overflow-wrap: anywhere; }
h3 { font-size: .8rem; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); margin: .9rem 0 .4rem; }
.facts { display: flex; flex-wrap: wrap; gap: .2rem 1.1rem; margin-top: .3rem; color: var(--muted); font-size: .85rem; }
.facts b { color: var(--fg); font-weight: 600; }
.path { font-family: ui-monospace, monospace; font-size: .8rem; color: var(--muted); overflow-wrap: anywhere; }
.snapshots { display: grid; gap: .7rem; grid-template-columns: repeat(auto-fill, minmax(17rem, 1fr)); }
.snapshot { border: 1px solid var(--line); border-radius: .5rem; padding: .6rem .7rem; min-width: 0; }
.snapshot .title { display: flex; justify-content: space-between; gap: .5rem; align-items: baseline; }
.snapshot .name { font-weight: 600; overflow-wrap: anywhere; }
.state { font-size: .75rem; padding: .05rem .45rem; border-radius: 1rem; color: #fff; background: var(--ok); white-space: nowrap; }
.state.invalid, .state.broken, .state.merge-failed, .state.failed { background: var(--bad); }
.state.overflow, .state.merging, .state.pending, .state.paused, .state.stopped { background: var(--warn); }
.reason { color: var(--bad); font-size: .85rem; margin-top: .2rem; }
.fill { margin-top: .45rem; }
.fill .label { display: flex; justify-content: space-between; gap: .5rem; font-size: .8rem; color: var(--muted); }
.bar { height: .6rem; border-radius: .3rem; background: var(--bar); overflow: hidden; margin-top: .15rem; }
.bar > span { display: block; height: 100%; background: var(--ok); transition: width .4s; }
.bar.warn > span { background: var(--warn); }
.bar.bad > span { background: var(--bad); }
.bar.progress > span, .bar.calm > span { background: var(--accent); }
section.exports h3 { margin-top: 0; }
.merge { border: 1px solid var(--line); border-radius: .5rem; padding: .6rem .7rem; }
ul.exports { list-style: none; margin: 0; padding: 0; display: grid; gap: .3rem; }
ul.exports li { display: flex; justify-content: space-between; gap: 1rem; font-size: .9rem; }
ul.exports .name { font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
.empty { color: var(--muted); font-size: .9rem; }
#error { color: var(--bad); padding: 0 1rem; }
@media (max-width: 30rem) { body { font-size: 14px; } main { padding: .6rem; gap: .6rem; } .snapshots { grid-template-columns: 1fr; } }
`

/* The script runs in the browser; it is plain ES2017 without template literals. */
const SCRIPT = `
'use strict';
var POLL_MS = ${STATUS_POLL_MS};
var updates = 0;

function h(tag, attrs) {
  var el = document.createElement(tag);
  for (var k in attrs || {}) {
    if (k === 'text') el.textContent = attrs[k];
    else if (k === 'class') el.className = attrs[k];
    else el.setAttribute(k, attrs[k]);
  }
  for (var i = 2; i < arguments.length; i++) if (arguments[i]) el.appendChild(arguments[i]);
  return el;
}

function bytes(n) {
  var units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  var i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? String(n) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)) + ' ' + units[i];
}

function duration(s) {
  if (s === null || !isFinite(s)) return 'unknown';
  s = Math.round(s);
  var h_ = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (h_ > 0) return h_ + 'h ' + m + 'm';
  if (m > 0) return m + 'm ' + sec + 's';
  return sec + 's';
}

function pct(part, whole) {
  if (!(whole > 0)) return 0;
  return Math.min(100, (100 * part) / whole);
}

function fact(label, value) {
  return h('span', { text: label + ' ' }, h('b', { text: value }));
}

/* calm: a grow-on-demand COW's file is full by design (it grows), so no warning colours. */
function fillBar(kind, label, part, whole, failed, calm) {
  var p = pct(part, whole);
  var cls = 'bar' + (failed ? ' bad' : calm ? ' calm' : p >= 95 ? ' bad' : p >= 80 ? ' warn' : '');
  var bar = h('div', { class: cls, role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100', 'aria-valuenow': p.toFixed(1), 'aria-label': label });
  var fill = h('span');
  fill.style.width = p.toFixed(2) + '%';
  bar.appendChild(fill);
  return h('div', { class: 'fill', 'data-fill': kind, 'data-percent': p.toFixed(2) },
    h('div', { class: 'label' }, h('span', { text: label }), h('span', { text: p.toFixed(1) + ' % \\u00b7 ' + bytes(part) + ' of ' + bytes(whole) })),
    bar);
}

function snapshotCard(v, s) {
  var failed = s.state === 'invalid' || s.state === 'broken';
  var card = h('div', { class: 'snapshot', 'data-snapshot': v.name + '@' + s.name, 'data-state': s.state },
    h('div', { class: 'title' }, h('span', { class: 'name', text: s.name }), h('span', { class: 'state ' + s.state, text: s.state })));
  if (s.reason) card.appendChild(h('div', { class: 'reason', text: s.reason }));
  card.appendChild(fillBar('cow', s.growable ? 'COW file (grows on demand)' : 'COW (fixed size)', s.allocatedBytes, s.cowBytes, failed, s.growable));
  if (s.growable) card.appendChild(fillBar('fs', 'COW and free space on its file system', s.allocatedBytes, s.capacityBytes, failed));
  card.appendChild(h('div', { class: 'facts' },
    fact('chunk', bytes(s.chunkSizeBytes)),
    fact('copied out', s.copiedOutChunks + ' chunks'),
    fact('clients', String(s.connections))));
  return card;
}

function mergeBox(v, m) {
  var p = pct(m.doneBytes, m.totalBytes);
  var bar = h('div', { class: 'bar progress', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100', 'aria-valuenow': p.toFixed(1), 'aria-label': 'merge progress' });
  var fill = h('span');
  fill.style.width = p.toFixed(2) + '%';
  bar.appendChild(fill);
  var rate = m.state === 'running' ? bytes(Math.round(m.rateBytesPerSecond)) + '/s' : '\\u2013';
  return h('div', { class: 'merge', 'data-merge': v.name + '@' + m.snapshot, 'data-state': m.state, 'data-percent': p.toFixed(2) },
    h('div', { class: 'title' }, h('span', { class: 'name', text: 'merging ' + m.snapshot + ' into ' + v.name + ' ' }), h('span', { class: 'state ' + m.state, text: m.state })),
    h('div', { class: 'fill' }, h('div', { class: 'label' }, h('span', { text: p.toFixed(1) + ' %' }), h('span', { text: bytes(m.doneBytes) + ' of ' + bytes(m.totalBytes) })), bar),
    h('div', { class: 'facts' },
      fact('rate', rate),
      fact('limit', m.rateLimitBytesPerSecond ? bytes(m.rateLimitBytesPerSecond) + '/s' : 'none'),
      fact('ETA', m.state === 'running' ? duration(m.etaSeconds) : '\\u2013'),
      fact('left', bytes(m.remainingBytes))));
}

function volumeSection(v) {
  var sec = h('section', { class: 'volume', 'data-volume': v.name },
    h('h2', { text: v.name }),
    h('div', { class: 'path', text: v.path }),
    h('div', { class: 'facts' },
      fact('size', bytes(v.sizeBytes)),
      fact('origin clients', String(v.connections)),
      fact('write-back held', bytes(v.heldWriteBackBytes)),
      fact('snapshots', String(v.snapshots.length))));
  if (v.merge) { sec.appendChild(h('h3', { text: 'Merge' })); sec.appendChild(mergeBox(v, v.merge)); }
  sec.appendChild(h('h3', { text: 'Snapshots' }));
  if (v.snapshots.length === 0) sec.appendChild(h('div', { class: 'empty', text: 'no snapshots' }));
  else {
    var grid = h('div', { class: 'snapshots' });
    v.snapshots.forEach(function (s) { grid.appendChild(snapshotCard(v, s)); });
    sec.appendChild(grid);
  }
  return sec;
}

function render(status) {
  var main = document.getElementById('volumes');
  var parts = status.volumes.map(volumeSection);
  var list = h('ul', { class: 'exports' });
  status.exports.forEach(function (e) {
    list.appendChild(h('li', { 'data-export': e.name }, h('span', { class: 'name', text: e.name }), h('span', { text: e.connections + (e.connections === 1 ? ' client' : ' clients') })));
  });
  parts.push(h('section', { class: 'exports' }, h('h3', { text: 'NBD exports' }), status.exports.length ? list : h('div', { class: 'empty', text: 'none' })));
  main.replaceChildren.apply(main, parts);
  document.getElementById('updated').textContent = 'updated ' + new Date(status.time).toLocaleTimeString() + ' \\u00b7 up ' + duration(status.uptimeSeconds);
  updates++;
  document.body.setAttribute('data-updates', String(updates));
}

function setLive(on, message) {
  var live = document.getElementById('live');
  live.className = on ? 'on' : 'off';
  live.textContent = on ? 'live' : 'disconnected';
  document.getElementById('error').textContent = message || '';
}

function poll() {
  fetch('status.json', { cache: 'no-store' })
    .then(function (r) { if (!r.ok) throw new Error('status.json: HTTP ' + r.status); return r.json(); })
    .then(function (status) { render(status); setLive(true); })
    .catch(function (err) { setLive(false, String(err && err.message || err)); })
    .then(function () { setTimeout(poll, POLL_MS); });
}
poll();
`

export const STATUS_PAGE_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>blocksnap status</title>
<link rel="icon" href="data:,">
<style>${STYLE}</style>
</head>
<body data-updates="0">
<header><h1>blocksnap</h1><span id="live">connecting</span><span class="meta" id="updated"></span></header>
<div id="error" role="alert"></div>
<main id="volumes"><noscript>This page needs JavaScript to show the live status; /status.json and /metrics have the same data.</noscript></main>
<script>${SCRIPT}</script>
</body>
</html>
`
