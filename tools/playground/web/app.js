// The playground page: inputs in, the engine's JSON out, drawn as tables and SVG charts.
// State lives in the URL fragment (#s=<base64url JSON>), so a link restores a case; nothing is
// sent anywhere: the engine runs here, and the only files loaded are this page's own.
import init, { check, flags, sequence } from './edge_playground.js';

const $ = (sel) => document.querySelector(sel);
const $$ = (sel) => [...document.querySelectorAll(sel)];
const PLUGINS = ['rate_limit', 'flag_router', 'idempotency', 'cached_fallback'];
const SVG = 'http://www.w3.org/2000/svg';

// The plugins' README examples (copied next to the page by ./build.sh), so the defaults are
// configurations the plugins' own tests parse.
const EXAMPLES = {
  rate_limit: 'examples/rate-limit/per-client-ip.json',
  flag_router: 'examples/flag-router/checkout-rollout.json',
  idempotency: 'examples/idempotency/required-key.json',
  cached_fallback: 'examples/cached-fallback/recommendations.json',
};

const DEFAULT_REQUESTS = [
  { method: 'GET', path: '/api/recommendations', times: 4 },
  { waitMs: 500 },
  { method: 'GET', path: '/api/recommendations', headers: [['x-user-id', 'alice']], upstream: { status: 503, latencyMs: 20 } },
  { method: 'GET', path: '/api/recommendations', times: 6 },
  { waitMs: 2000 },
  { method: 'GET', path: '/api/recommendations', headers: [['x-tier', 'beta']] },
  { method: 'POST', path: '/payments', headers: [['idempotency-key', 'order-1']], body: '{"amount":10}', upstream: { status: 201, body: '{"id":"pay_1"}' } },
  { method: 'POST', path: '/payments', headers: [['idempotency-key', 'order-1']], body: '{"amount":10}' },
  { method: 'POST', path: '/payments', headers: [['idempotency-key', 'order-1']], body: '{"amount":99}' },
];

const FIELDS = ['check-input', 'check-kind', 'flags-flagd', 'flags-context', 'flags-router', 'flags-request',
  'flags-users', 'seq-timeout', 'seq-requests', ...PLUGINS.map((p) => `cfg-${p}`)];

let tab = 'check';

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function svg(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function call(fn, input) {
  return JSON.parse(fn(JSON.stringify(input)));
}

// --- state in the URL fragment -------------------------------------------------------------

function encode(obj) {
  const bytes = new TextEncoder().encode(JSON.stringify(obj));
  let s = '';
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function decode(text) {
  const b = atob(text.replace(/-/g, '+').replace(/_/g, '/'));
  return JSON.parse(new TextDecoder().decode(Uint8Array.from(b, (c) => c.charCodeAt(0))));
}

function snapshot() {
  const state = { tab, mode: $('input[name=flags-mode]:checked').value, chain: $$('.chain-on').filter((c) => c.checked).map((c) => c.value) };
  for (const id of FIELDS) state[id] = $(`#${id}`).value;
  return state;
}

function restore(state) {
  for (const id of FIELDS) if (typeof state[id] === 'string') $(`#${id}`).value = state[id];
  if (state.mode) $(`#flags-mode-${state.mode}`).checked = true;
  if (Array.isArray(state.chain)) for (const c of $$('.chain-on')) c.checked = state.chain.includes(c.value);
  if (state.tab) tab = state.tab;
}

function remember() {
  const url = `${location.origin}${location.pathname}#s=${encode(snapshot())}`;
  history.replaceState(null, '', url);
  $('#share-url').value = url;
}

function fromFragment() {
  const m = location.hash.match(/^#s=([A-Za-z0-9_-]+)$/);
  if (!m) return false;
  try {
    restore(decode(m[1]));
    return true;
  } catch (e) {
    status(`The link's state could not be read (${e.message}); showing the examples.`);
    return false;
  }
}

function status(text, bad = false) {
  $('#status').textContent = text;
  $('#status').classList.toggle('bad', bad);
}

// --- tabs ----------------------------------------------------------------------------------

function show(name) {
  tab = name;
  for (const v of ['check', 'flags', 'sequence']) {
    $(`#view-${v}`).hidden = v !== name;
    $(`#tab-${v}`).classList.toggle('active', v === name);
  }
  run();
}

function run() {
  if (tab === 'check') runCheck();
  else if (tab === 'flags') runFlags();
  else runSequence();
  remember();
}

// --- check ---------------------------------------------------------------------------------

function runCheck() {
  const text = $('#check-input').value;
  const out = call(check, { text, kind: $('#check-kind').value, file: 'pasted' });
  const list = $('#findings');
  list.replaceChildren();
  const byLine = new Map();
  if (out.error || out.unreadable) {
    list.append(el('li', { class: 'finding error', text: out.error || out.unreadable }));
    $('#check-summary').textContent = 'Cannot be read.';
  } else {
    const n = out.findings.length;
    const what = out.kind === 'envoy' ? 'Envoy config' : `${out.kind} configuration`;
    $('#check-summary').textContent = n === 0 ? `${what}: no findings.` : `${what}: ${n} finding${n > 1 ? 's' : ''}.`;
    $('#check-summary').classList.toggle('ok', n === 0);
    for (const f of out.findings) {
      const li = el('li', { class: `finding ${f.severity}`, 'data-line': String(f.line) },
        el('span', { class: 'where', text: `line ${f.line}` }),
        el('span', { class: 'sev', text: f.severity }),
        f.plugin ? el('span', { class: 'plugin', text: f.plugin }) : '',
        el('code', { class: 'field', text: f.path }),
        el('span', { class: 'msg', text: f.message }));
      list.append(li);
      if (!byLine.has(f.line)) byLine.set(f.line, []);
      byLine.get(f.line).push(f);
    }
  }
  // The text itself, each finding under its line.
  const pre = $('#check-annotated');
  pre.replaceChildren();
  text.split('\n').forEach((line, i) => {
    const found = byLine.get(i + 1) || [];
    const row = el('div', { class: `line${found.length ? ' bad' : ''}` },
      el('span', { class: 'no', text: String(i + 1) }), el('span', { text: line || ' ' }));
    pre.append(row);
    for (const f of found) {
      pre.append(el('div', { class: `inline ${f.severity}`, text: `↑ ${f.path}: ${f.message}` }));
    }
  });
  // The first finding's line in view, without moving the page.
  const first = pre.querySelector('.line.bad');
  pre.scrollTop = first ? Math.max(0, first.offsetTop - pre.clientHeight / 3) : 0;
}

// --- flags ---------------------------------------------------------------------------------

function parseRequest(text) {
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#'));
  let method = 'GET';
  let path = '/';
  const headers = [];
  if (lines.length && /^[A-Z]+\s+\//.test(lines[0])) {
    [method, path] = lines.shift().split(/\s+/);
  }
  for (const l of lines) {
    const i = l.indexOf(':');
    if (i > 0) headers.push([l.slice(0, i).trim(), l.slice(i + 1).trim()]);
  }
  return { method, path, headers };
}

function runFlags() {
  const mode = $('input[name=flags-mode]:checked').value;
  for (const e of $$('.mode-context')) e.hidden = mode !== 'context';
  for (const e of $$('.mode-request')) e.hidden = mode !== 'request';
  const out = call(flags, {
    mode,
    flagd: $('#flags-flagd').value,
    context: $('#flags-context').value,
    router: $('#flags-router').value,
    request: parseRequest($('#flags-request').value),
    users: Number($('#flags-users').value) || 1000,
  });
  const errors = $('#flags-errors');
  errors.replaceChildren();
  if (out.error) errors.append(el('li', { class: 'finding error', text: out.error }));
  for (const e of out.errors || []) {
    errors.append(el('li', { class: 'finding error' },
      el('span', { class: 'where', text: `${e.source}, line ${e.line}` }),
      el('code', { class: 'field', text: e.path || '(document)' }),
      el('span', { class: 'msg', text: e.message })));
  }
  for (const e of out.typeErrors || []) {
    errors.append(el('li', { class: 'finding warning' }, el('code', { class: 'field', text: e.attribute }), el('span', { class: 'msg', text: e.message })));
  }
  const body = $('#flag-results tbody');
  body.replaceChildren();
  for (const r of out.results || []) {
    body.append(el('tr', { 'data-flag': r.flag },
      el('td', { text: r.flag }),
      el('td', { class: 'variant', text: r.variant ?? '—' }),
      el('td', { text: r.value ?? '—' }),
      el('td', { class: `reason ${r.reason}`, text: r.reason + (r.error ? `: ${r.error}` : '') }),
      el('td', { text: r.header ? (r.value != null ? `${r.header}: ${r.value}` : `${r.header} removed`) : '—' })));
  }
  $('#flags-context-used').textContent = out.context ? `context evaluated: ${JSON.stringify(out.context)}` : '';
  $('#split-by').textContent = out.splitBy ? `${out.users} synthetic users, varying ${out.splitBy}` : '';
  drawSplit(out.split || [], out.users || 0);
}

const COLORS = ['#2f6fdf', '#e8833a', '#3aa876', '#c94a6a', '#8a63d2', '#9a8f2e', '#4aa3b8'];

function drawSplit(split, users) {
  const box = $('#split-chart');
  box.replaceChildren();
  const rows = split.flatMap((f) => [{ head: f.flag }, ...f.variants.map((v) => ({ ...v, flag: f.flag }))]);
  if (!rows.length) {
    box.append(el('p', { class: 'muted', text: 'Nothing to split: no flag evaluated, or the users cannot vary.' }));
    return;
  }
  const width = 720;
  const label = 200;
  const rowH = 26;
  const s = svg('svg', { width, height: rows.length * rowH + 10, role: 'img', 'aria-label': 'variant split', id: 'split-svg' });
  rows.forEach((r, i) => {
    const y = i * rowH + 5;
    if (r.head) {
      s.append(svg('text', { x: 0, y: y + 17, class: 'head' }, r.head));
      return;
    }
    const w = ((width - label - 140) * r.percent) / 100;
    const flag = split.find((f) => f.flag === r.flag);
    const color = COLORS[flag.variants.findIndex((v) => v.variant === r.variant) % COLORS.length];
    s.append(svg('text', { x: 12, y: y + 17 }, `${r.variant}${r.value != null ? ` (${r.value})` : ''}`));
    const bar = svg('rect', { x: label, y: y + 3, width: Math.max(w, 1), height: rowH - 8, fill: color, class: 'bar', 'data-variant': r.variant, 'data-count': r.count });
    bar.append(svg('title', {}, `${r.count} of ${users}`));
    s.append(bar);
    s.append(svg('text', { x: label + w + 6, y: y + 17 }, `${r.percent.toFixed(1)} % (${r.count})`));
  });
  box.append(s);
}

// --- sequence ------------------------------------------------------------------------------

function runSequence() {
  const errors = $('#seq-errors');
  errors.replaceChildren();
  let requests;
  try {
    requests = JSON.parse($('#seq-requests').value || '[]');
  } catch (e) {
    errors.append(el('li', { class: 'finding error' }, el('code', { class: 'field', text: 'requests' }), el('span', { class: 'msg', text: e.message })));
    return;
  }
  const chain = $$('.chain-on').filter((c) => c.checked).map((c) => ({ plugin: c.value, config: $(`#cfg-${c.value}`).value }));
  // A flag_router with a `source` gets the Flags view's flag file, as its fetch would.
  let flagd = '';
  try { if (JSON.parse($('#cfg-flag_router').value).source) flagd = $('#flags-flagd').value; } catch { /* its error is shown below */ }
  const out = call(sequence, { chain, requests, flagd, routeTimeoutMs: Number($('#seq-timeout').value) || 15000 });
  if (out.error) errors.append(el('li', { class: 'finding error', text: out.error }));
  for (const e of out.errors || []) {
    errors.append(el('li', { class: 'finding error' },
      el('span', { class: 'where', text: `${e.plugin}, line ${e.line}` }),
      el('code', { class: 'field', text: e.path }),
      el('span', { class: 'msg', text: e.message })));
  }
  drawTokens(out.tokens || []);
  const names = chain.map((c) => c.plugin);
  $('#seq-results thead').replaceChildren(el('tr', {},
    el('th', { text: '#' }), el('th', { text: 't (ms)' }), el('th', { text: 'request' }),
    ...names.map((n) => el('th', { text: n })), el('th', { text: 'application' }), el('th', { text: 'answer' })));
  const body = $('#seq-results tbody');
  body.replaceChildren();
  (out.requests || []).forEach((r, i) => {
    const cells = names.map((n) => {
      const td = el('td', { class: 'decision' });
      for (const d of r.decisions.filter((x) => x.plugin === n)) {
        const div = el('div', { class: `d ${d.phase}`, title: d.detail }, el('b', { text: d.decision }));
        if (d.detail) div.append(el('small', { text: d.detail }));
        for (const h of d.headers) {
          div.append(el('code', { class: 'hdr', text: h.value === null ? `− ${h.name}` : `+ ${h.name}: ${h.value}` }));
        }
        td.append(div);
      }
      return td;
    });
    const up = r.upstream ? `${r.upstream.method} ${r.upstream.path}` : 'not reached';
    const res = r.response;
    body.append(el('tr', { 'data-status': String(res.status) },
      el('td', { text: String(i + 1) }),
      el('td', { text: String(r.sentAtMs) }),
      el('td', { text: `${r.method} ${r.path}` }),
      ...cells,
      el('td', { class: r.upstream ? '' : 'muted', text: up }),
      el('td', { class: `answer s${String(res.status)[0]}`, title: res.body },
        el('b', { class: 'status', text: String(res.status) }), el('small', { text: ` by ${res.by}` }))));
  });
}

function drawTokens(series) {
  const box = $('#tokens-chart');
  box.replaceChildren();
  if (!series.length) {
    box.append(el('p', { class: 'muted', text: 'No rate limit rule matched a request.' }));
    return;
  }
  const W = 720; const H = 240; const L = 44; const B = 30; const T = 10; const R = 130;
  const points = series.flatMap((s) => s.points);
  const tMax = Math.max(1, ...points.map((p) => p.atMs));
  const yMax = Math.max(1, ...series.map((s) => s.burst), ...points.map((p) => p.remaining));
  const x = (t) => L + ((W - L - R) * t) / tMax;
  const y = (v) => T + (H - T - B) * (1 - v / yMax);
  const s = svg('svg', { width: W, height: H, role: 'img', 'aria-label': 'remaining tokens over time', id: 'tokens-svg' });
  s.append(svg('line', { x1: L, y1: y(0), x2: W - R, y2: y(0), class: 'axis' }));
  s.append(svg('line', { x1: L, y1: T, x2: L, y2: y(0), class: 'axis' }));
  for (const v of [0, yMax]) s.append(svg('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end' }, String(v)));
  s.append(svg('text', { x: L, y: H - 8 }, '0 ms'));
  s.append(svg('text', { x: W - R, y: H - 8, 'text-anchor': 'end' }, `${tMax} ms`));
  series.forEach((ser, i) => {
    const color = COLORS[i % COLORS.length];
    // Tokens left after each request, held until the next one (a step line).
    let d = '';
    ser.points.forEach((p, j) => {
      d += j === 0 ? `M${x(p.atMs)},${y(p.remaining)}` : `H${x(p.atMs)}V${y(p.remaining)}`;
    });
    s.append(svg('path', { d, fill: 'none', stroke: color, 'stroke-width': 2, class: 'series' }));
    for (const p of ser.points) {
      const dot = svg('circle', { cx: x(p.atMs), cy: y(p.remaining), r: 4, class: `point ${p.outcome.replace(/\s/g, '-')}`, fill: p.outcome === 'allowed' ? color : '#d33' });
      dot.append(svg('title', {}, `${p.atMs} ms: ${p.remaining} left (${p.outcome})`));
      s.append(dot);
    }
    s.append(svg('text', { x: W - R + 8, y: T + 14 + i * 16, fill: color }, `rule ${ser.rule}`));
  });
  s.append(svg('text', { x: W - R + 8, y: T + 14 + series.length * 16, fill: '#d33' }, '● limited'));
  box.append(s);
}

// --- start ---------------------------------------------------------------------------------

async function examples() {
  const texts = {};
  await Promise.all(Object.entries(EXAMPLES).map(async ([p, url]) => {
    const r = await fetch(url);
    texts[p] = r.ok ? await r.text() : '{}';
  }));
  for (const p of PLUGINS) $(`#cfg-${p}`).value = texts[p];
  $('#check-input').value = texts.rate_limit.replace('"10s"', '"10"');
  $('#flags-router').value = texts.flag_router;
  let flagd = { flags: {} };
  try { flagd = { flags: JSON.parse(texts.flag_router).flags }; } catch { /* left empty */ }
  $('#flags-flagd').value = JSON.stringify(flagd, null, 2);
  $('#flags-context').value = JSON.stringify({ targetingKey: 'alice', tier: 'free' }, null, 2);
  $('#flags-request').value = 'GET /checkout\nx-user-id: alice\nx-tier: free';
  $('#seq-requests').value = JSON.stringify(DEFAULT_REQUESTS, null, 1);
}

async function start() {
  await init();
  const restored = fromFragment();
  if (!restored) await examples();
  for (const b of $$('.tab')) b.addEventListener('click', () => show(b.dataset.tab));
  $('#check-run').addEventListener('click', run);
  $('#flags-run').addEventListener('click', run);
  $('#seq-run').addEventListener('click', run);
  for (const r of $$('input[name=flags-mode]')) r.addEventListener('change', run);
  for (const c of $$('.chain-on')) c.addEventListener('change', run);
  $('#check-kind').addEventListener('change', run);
  let timer;
  for (const id of FIELDS) {
    $(`#${id}`).addEventListener('input', () => {
      clearTimeout(timer);
      timer = setTimeout(run, 300);
    });
  }
  $('#copy-link').addEventListener('click', async () => {
    remember();
    try {
      await navigator.clipboard.writeText($('#share-url').value);
      status('Link copied: it restores everything on this page.');
    } catch {
      $('#share-url').select();
      status('Copy the selected link: it restores everything on this page.');
    }
  });
  status(restored ? 'State restored from the link.' : 'Ready. Edit anything; results follow as you type.');
  document.body.dataset.ready = 'true';
  show(tab);
}

start().catch((e) => status(`The engine did not start: ${e.message}`, true));
