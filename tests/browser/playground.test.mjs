// The playground page end to end in headless Chromium (Debian's, driven by
// playwright-core): it renders, a scenario shows a blocked call from an unregistered
// IP with its alert, and a configuration error is shown at its JSON path.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { readFile, writeFile, mkdir } from 'node:fs/promises';
import { extname, join, normalize } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const root = fileURLToPath(new URL('../..', import.meta.url));
const types = { '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css', '.json': 'application/json', '.wasm': 'application/wasm' };
let server;
let browser;
let base;

before(async () => {
  server = createServer(async (req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname));
    if (!path.startsWith('/examples/')) { res.writeHead(404).end(); return; }
    try {
      const body = await readFile(join(root, path));
      res.writeHead(200, { 'content-type': types[extname(path)] ?? 'application/octet-stream' }).end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${server.address().port}`;
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  server?.close();
});

async function open() {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`${base}/examples/playground/index.html`);
  await page.waitForSelector('body[data-ready="true"]', { timeout: 15000 });
  return { page, errors };
}

test('the page renders with the example configuration in force', async () => {
  const { page, errors } = await open();
  assert.match(await page.textContent('#config-status'), /generation 1 in force/);
  assert.match(await page.inputValue('#config'), /hq-pbx1/);
  const shot = await page.screenshot({ fullPage: true });
  const dir = join(root, 'target', 'screenshots');
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'playground.png'), shot);
  // A blank or failed render is a small, uniform PNG; the real page is not.
  assert.ok(shot.length > 20000, `screenshot is only ${shot.length} bytes`);
  assert.deepEqual(errors, []);
  await page.close();
});

test('a call from an unregistered IP is shown blocked, with its alert', async () => {
  const { page, errors } = await open();
  await page.selectOption('#scenario', 'Blocked call from an unregistered IP');
  await page.click('#run-scenario');
  await page.waitForFunction(() => document.querySelectorAll('#results tbody tr').length >= 4);
  const rows = await page.$$eval('#results tbody tr', (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent)));
  const last = rows.at(-1);
  assert.equal(last[3], 'reject');
  assert.equal(last[4], '403');
  assert.equal(last[5], 'not_registered_address');
  assert.equal(last[2], '198.51.100.66:5060');
  assert.equal(rows[1][3], 'accept', `registration: ${rows[1]}`);
  const alerts = await page.$$eval('#alerts li', (lis) => lis.map((li) => li.textContent));
  assert.equal(alerts.length, 1);
  assert.match(alerts[0], /blocked_call: hq-pbx1 at hq/);
  assert.match(alerts[0], /registered 203\.0\.113\.7:5060/);
  assert.deepEqual(errors, []);
  await page.close();
});

test('a configuration error is shown at its JSON path and the last good one stays', async () => {
  const { page, errors } = await open();
  await page.selectOption('#scenario', 'Configuration error (ACL typo)');
  await page.click('#run-scenario');
  await page.waitForSelector('#config-error:not([hidden])');
  const text = await page.textContent('#config-error');
  assert.match(text, /^locations\[1\]\.trunk_groups\[0\]\.acl\[0\]\n/);
  assert.match(text, /192\.0\.2\.0\/33/);
  assert.match(await page.textContent('#config-status'), /refused; generation 1 still in force/);
  // The last good configuration still judges: an inbound call to the branch's DID
  // (in the example configuration, not in the refused one's place) from the core.
  const invite = (source) => [
    'INVITE sip:+15557770000@edge.example.net SIP/2.0',
    `Via: SIP/2.0/UDP ${source};branch=z9hG4bK-pg1`,
    'Max-Forwards: 70',
    'From: <sip:carrier@core.example.net>;tag=c1',
    'To: <sip:+15557770000@edge.example.net>',
    'Call-ID: pg-1@core',
    'CSeq: 1 INVITE',
    'Content-Length: 0',
    '', '',
  ].join('\r\n');
  const judge = async (local) => {
    await page.fill('#message', invite('10.0.0.5:5060'));
    await page.fill('#source', '10.0.0.5:5060');
    await page.fill('#local', local);
    const before = await page.$$eval('#results tbody tr', (trs) => trs.length);
    await page.click('#judge');
    await page.waitForFunction((n) => document.querySelectorAll('#results tbody tr').length > n, before);
    const rows = await page.$$eval('#results tbody tr', (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent)));
    return rows.at(-1);
  };
  const core = await judge('10.0.0.1:5060');
  assert.deepEqual([core[3], core[4], core[5], core[6]], ['reject', '480', 'trunk_unavailable', 'branch-p2p'], `${core}`);
  // The same call arriving on the public socket is not the core: challenged.
  const spoofed = await judge('192.0.2.1:5060');
  assert.deepEqual([spoofed[3], spoofed[4]], ['challenge', '407'], `${spoofed}`);
  assert.deepEqual(errors, []);
  await page.close();
});
