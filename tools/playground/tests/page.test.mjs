// The playground page in headless Chromium (Debian's, driven by playwright-core): what a user
// pastes, clicks and sees. Serves dist/playground/ (./build.sh playground --no-serve) on a free
// port of 127.0.0.1; a screenshot of each view goes to target/playground-screenshots/.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { mkdir, readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { extname, join, normalize, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
const DIST = join(ROOT, 'dist/playground');
const SHOTS = join(ROOT, 'target/playground-screenshots');
const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.wasm': 'application/wasm', '.json': 'application/json' };

let server;
let browser;
let base;
/** Requests the page made that are not its own files (there must be none). */
const foreign = [];

before(async () => {
  assert.ok(existsSync(join(DIST, 'edge_playground_bg.wasm')), 'run ./build.sh playground --no-serve first');
  server = createServer(async (req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname)).replace(/^(\.\.[/\\])+/, '');
    const file = join(DIST, path.endsWith('/') ? `${path}index.html` : path);
    try {
      const body = await readFile(file);
      res.writeHead(200, { 'content-type': TYPES[extname(file)] || 'application/octet-stream' });
      res.end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  base = `http://127.0.0.1:${server.address().port}/`;
  await mkdir(SHOTS, { recursive: true });
  // playwright gives the browser a fresh profile in a temporary directory, removed at close.
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  await new Promise((ok) => (server ? server.close(ok) : ok()));
  assert.deepEqual(foreign, [], 'the page must load nothing but its own files');
});

async function open(url = base) {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.on('request', (r) => {
    if (!r.url().startsWith(base)) foreign.push(r.url());
  });
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(url);
  await page.waitForSelector('body[data-ready=true]', { timeout: 20000 });
  assert.deepEqual(errors, []);
  return page;
}

async function paste(page, selector, text) {
  await page.fill(selector, text);
}

test('an Envoy YAML with a bad plugin field shows the finding at its line, naming the field', async () => {
  const page = await open();
  // The page starts on the check view with a rate limit config whose window lacks its unit.
  await page.waitForSelector('#findings .finding');
  assert.match(await page.textContent('#findings'), /rules\[0\]\.limit\.window/);

  const yaml = await readFile(join(ROOT, 'tools/edge-check/tests/fixtures/bad-plugin-field.yaml'), 'utf8');
  await page.selectOption('#check-kind', 'envoy');
  await paste(page, '#check-input', yaml);
  await page.click('#check-run');
  const finding = page.locator('#findings .finding').first();
  assert.equal(await finding.getAttribute('data-line'), '92');
  assert.match(await finding.textContent(), /rate_limit/);
  assert.match(await finding.locator('.field').textContent(), /^rules\[0\]\.limit\.requests$/);
  assert.match(await finding.textContent(), /must be > 0/);
  // Inline, under line 92 of the pasted text.
  const marked = page.locator('#check-annotated .line.bad');
  assert.equal(await marked.count(), 1);
  assert.match(await marked.textContent(), /^92\s+"limit": \{ "requests": 0/);
  assert.match(await page.textContent('#check-annotated .inline'), /rules\[0\]\.limit\.requests/);
  await page.screenshot({ path: join(SHOTS, 'check.png'), fullPage: true });

  // A clean plugin JSON says so.
  await page.selectOption('#check-kind', 'auto');
  await paste(page, '#check-input', '{ "rules": [ { "name": "a", "limit": { "requests": 5, "window": "1s" } } ] }');
  await page.click('#check-run');
  assert.equal(await page.locator('#findings .finding').count(), 0);
  assert.match(await page.textContent('#check-summary'), /rate_limit configuration: no findings/);
  await page.close();
});

test('flags: variant, value and reason per flag, and the split drawn as bars', async () => {
  const page = await open();
  await page.click('#tab-flags');
  const flagd = {
    flags: {
      checkout: {
        state: 'ENABLED', variants: { on: 'v2', off: 'v1' }, defaultVariant: 'off',
        targeting: { if: [{ '==': [{ var: 'tier' }, 'beta'] }, 'on', { fractional: [['on', 25], ['off', 75]] }] },
      },
      dark: { state: 'DISABLED', variants: { on: true, off: false }, defaultVariant: 'off' },
    },
  };
  await paste(page, '#flags-flagd', JSON.stringify(flagd, null, 2));
  await paste(page, '#flags-context', '{ "tier": "beta", "targetingKey": "bob" }');
  await page.fill('#flags-users', '2000');
  await page.click('#flags-run');
  const row = page.locator('#flag-results tr[data-flag=checkout]');
  assert.equal(await row.locator('.variant').textContent(), 'on');
  assert.match(await row.textContent(), /v2/);
  assert.match(await row.textContent(), /TARGETING_MATCH/);
  assert.match(await page.textContent('#flag-results tr[data-flag=dark]'), /DISABLED/);

  // Beta users all get `on`: the split is over the rollout only for the others.
  await paste(page, '#flags-context', '{ "tier": "free" }');
  await page.click('#flags-run');
  const bars = page.locator('#split-svg rect.bar');
  const counts = {};
  for (const bar of await bars.all()) {
    counts[await bar.getAttribute('data-variant')] = Number(await bar.getAttribute('data-count'));
  }
  // checkout: on + off; dark: none (disabled) for everyone.
  assert.equal(counts.on + counts.off, 2000);
  assert.ok(counts.on > 400 && counts.on < 600, `about a quarter on: ${counts.on}`);
  assert.equal(counts['(none: DISABLED)'], 2000);
  await page.screenshot({ path: join(SHOTS, 'flags.png'), fullPage: true });

  // The same flags through a flag-router config and request headers: the flag file is what
  // its source would fetch.
  await page.check('#flags-mode-request');
  await paste(page, '#flags-router', JSON.stringify({
    targetingKey: { header: 'x-user-id' }, context: { tier: { header: 'x-tier' } },
    headers: { checkout: 'x-route-checkout' }, source: { cluster: 'flags', path: '/flags.json' },
  }));
  await paste(page, '#flags-request', 'GET /checkout\nx-user-id: alice\nx-tier: beta');
  await page.click('#flags-run');
  const routed = page.locator('#flag-results tr[data-flag=checkout]');
  assert.match(await routed.textContent(), /x-route-checkout: v2/);
  assert.match(await page.textContent('#split-by'), /header x-user-id/);

  // A flag file that does not parse names the field and line.
  await paste(page, '#flags-flagd', '{\n  "flags": {\n    "x": { "state": "ON", "variants": {"a": 1}, "defaultVariant": "a" }\n  }\n}');
  await page.click('#flags-run');
  assert.match(await page.textContent('#flags-errors'), /flagd, line 3.*flags\.x\.state/s);
  await page.close();
});

test('a request sequence: each policy decides, the tokens are charted', async () => {
  const page = await open();
  await page.click('#tab-sequence');
  await page.waitForSelector('#seq-results tbody tr');
  const rows = page.locator('#seq-results tbody tr');
  // The default sequence: 11 requests to /api/recommendations against 10 per 10 s per client,
  // then a payment, its replay and the key reused with another body.
  const statuses = await rows.evaluateAll((trs) => trs.map((tr) => tr.dataset.status));
  assert.deepEqual(statuses, ['200', '200', '200', '200', '200', '200', '200', '200', '200', '200', '429', '200', '201', '201', '422']);
  const limited = rows.nth(10);
  assert.match(await limited.textContent(), /answered 429/);
  assert.match(await limited.textContent(), /by rate_limit/);
  assert.match(await rows.nth(4).textContent(), /replaced with 200/);
  assert.match(await rows.nth(13).textContent(), /replayed/);
  assert.match(await rows.nth(14).textContent(), /answered 422/);
  assert.match(await rows.nth(11).textContent(), /\+ x-route-checkout: v2|x-route-search/);
  // The chart: one point per request the rule matched, the limited one marked.
  assert.equal(await page.locator('#tokens-svg circle.point').count(), 12);
  assert.equal(await page.locator('#tokens-svg circle.point.limited').count(), 1);
  assert.ok((await page.getAttribute('#tokens-svg path.series', 'd')).length > 20);
  await page.screenshot({ path: join(SHOTS, 'sequence.png'), fullPage: true });

  // A broken config in the chain names its field.
  await paste(page, '#cfg-rate_limit', '{ "rules": [ { "name": "a", "limit": { "requests": 0, "window": "1s" } } ] }');
  await page.click('#seq-run');
  assert.match(await page.textContent('#seq-errors'), /rate_limit, line 1.*rules\[0\]\.limit\.requests/s);
  await page.close();
});

test('a shared link restores the view and its inputs', async () => {
  const page = await open();
  await page.click('#tab-flags');
  await paste(page, '#flags-context', '{ "tier": "gold", "targetingKey": "zoe" }');
  await page.click('#flags-run');
  await page.click('#copy-link');
  const link = await page.inputValue('#share-url');
  assert.match(link, /#s=/);
  await page.close();

  const again = await open(link);
  assert.equal(await again.isVisible('#view-flags'), true);
  assert.equal(await again.isVisible('#view-check'), false);
  assert.equal(await again.inputValue('#flags-context'), '{ "tier": "gold", "targetingKey": "zoe" }');
  assert.match(await again.textContent('#status'), /restored/);
  assert.match(await again.textContent('#flags-context-used'), /zoe/);
  await again.close();
});
