// Browser test of the sensorflow dashboard (GET /).
//
//   SENSORFLOW_URL=http://127.0.0.1:8000 node --test
//
// Loads the page in headless Chromium (/usr/bin/chromium, or CHROMIUM_PATH), waits until the
// sensor table has rows and the first live chart's received-points counter keeps increasing,
// checks that no console error or page error happened, and saves out/dashboard.png.
// Skips (does not fail) when SENSORFLOW_URL is unset or Chromium is not installed.
// With SENSORFLOW_TOKEN set (a server with auth.api_tokens_file), the page must ask for the
// token exactly once, keep it in localStorage (a reload does not ask again) and use it for
// REST calls and WebSockets; the 401 answers before it was given are the only errors allowed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const baseUrl = process.env.SENSORFLOW_URL;
const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const skip = !baseUrl ? 'SENSORFLOW_URL is not set'
  : !existsSync(executablePath) ? `no Chromium at ${executablePath}` : false;

const TIMEOUT_MS = 30_000;
const token = process.env.SENSORFLOW_TOKEN || null;

// Answers the page's token prompts with SENSORFLOW_TOKEN (none expected without it).
function answerPrompts(page) {
  const asked = { count: 0 };
  page.on('dialog', async (dialog) => {
    asked.count += 1;
    if (dialog.type() === 'prompt' && token) await dialog.accept(token);
    else await dialog.dismiss();
  });
  return asked;
}

// Console errors that are not the expected 401s of a page that has not got the token yet.
function unexpected(errors) {
  return token ? errors.filter((e) => !/status of 401/.test(e)) : errors;
}

// In-page fetch with the token the page stored.
async function pageFetchJSON(page, url) {
  return page.evaluate(async (u) => {
    const t = localStorage.getItem('sensorflow.api_token');
    const r = await fetch(u, { headers: t ? { Authorization: `Bearer ${t}` } : {} });
    return r.json();
  }, url);
}

// Polls `probe` (which runs in the page) until `accept(value)` holds; returns the value.
async function waitFor(page, what, probe, accept, arg) {
  const deadline = Date.now() + TIMEOUT_MS;
  let last;
  while (Date.now() < deadline) {
    last = await page.evaluate(probe, arg);
    if (accept(last)) return last;
    await page.waitForTimeout(100);
  }
  assert.fail(`timed out waiting for ${what}; last value: ${JSON.stringify(last)}`);
}

test('dashboard shows sensors and live charts without console errors', { skip, timeout: 120_000 }, async () => {
  const browser = await chromium.launch({
    executablePath,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1100 } });
    const errors = [];
    page.on('console', (m) => { if (m.type() === 'error') errors.push(`console: ${m.text()}`); });
    page.on('pageerror', (e) => errors.push(`page: ${e.message}`));
    page.on('requestfailed', (r) => errors.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));
    const asked = answerPrompts(page);

    const response = await page.goto(new URL('/', baseUrl).href, { waitUntil: 'load', timeout: TIMEOUT_MS });
    assert.equal(response.status(), 200);

    const rows = await waitFor(page, 'sensor rows',
      () => document.querySelectorAll('[data-testid="sensor-row"]').length, (n) => n > 0);
    assert.ok(rows > 0);
    // After the rows: with a token, the page's first API call opens the prompt, during which
    // the page cannot answer.
    assert.equal(await page.title(), 'sensorflow · live');

    // The first sensor is selected automatically and gets a chart.
    const charted = await waitFor(page, 'a chart card',
      () => [...document.querySelectorAll('[data-testid="chart-card"]')].map((c) => c.dataset.sensorId),
      (ids) => ids.length > 0);
    const firstSensor = await page.evaluate(
      () => document.querySelector('[data-testid="sensor-row"]').dataset.sensorId);
    assert.deepEqual(charted, [firstSensor]);

    const points = () => Number(document.querySelector('[data-testid="chart-points"]')?.textContent || 0);
    const first = await waitFor(page, 'chart points', points, (n) => n > 0);
    const later = await waitFor(page, 'more chart points', points, (n) => n > first);
    assert.ok(later > first, `points went from ${first} to ${later}`);

    // uPlot drew into canvases of a sensible size.
    const canvases = await page.evaluate(() =>
      [...document.querySelectorAll('[data-testid="chart-card"] canvas')].map((c) => [c.width, c.height]));
    assert.ok(canvases.length >= 2, `canvases: ${JSON.stringify(canvases)}`);
    assert.ok(canvases.every(([w, h]) => w > 200 && h > 100), `canvases: ${JSON.stringify(canvases)}`);

    // Clicking a second sensor adds its chart.
    if (rows > 1) {
      await page.locator('[data-testid="sensor-row"]').nth(1).click();
      await waitFor(page, 'a second chart',
        () => document.querySelectorAll('[data-testid="chart-card"]').length, (n) => n === 2);
    }

    // Give the sessions table a chance to fill (only required when the server has sessions).
    const sessions = (await pageFetchJSON(page, '/sessions?active=true')).length;
    if (sessions > 0) {
      await waitFor(page, 'session rows',
        () => document.querySelectorAll('[data-testid="sessions-row"]').length, (n) => n > 0);
    }

    // Let the charts fill a little for the screenshot, then save it.
    await waitFor(page, 'a few seconds of points', points, (n) => n > later + 200);
    const outDir = join(here, 'out');
    mkdirSync(outDir, { recursive: true });
    await page.screenshot({ path: join(outDir, 'dashboard.png'), fullPage: true });

    assert.deepEqual(unexpected(errors), []);
    assert.equal(asked.count, token ? 1 : 0, 'token prompts');
    if (token) {
      assert.equal(await page.evaluate(() => localStorage.getItem('sensorflow.api_token')), token);
      // Kept: a reload goes live again without asking.
      errors.length = 0;
      await page.reload({ waitUntil: 'load', timeout: TIMEOUT_MS });
      await waitFor(page, 'chart points after a reload', points, (n) => n > 0);
      assert.equal(asked.count, 1, 'asked again after a reload');
      assert.deepEqual(errors, []);
    }
  } finally {
    await browser.close();
  }
});

test('docs page renders every endpoint of the OpenAPI document', { skip, timeout: 60_000 }, async () => {
  const browser = await chromium.launch({
    executablePath,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
    const errors = [];
    page.on('console', (m) => { if (m.type() === 'error') errors.push(`console: ${m.text()}`); });
    page.on('pageerror', (e) => errors.push(`page: ${e.message}`));
    const asked = answerPrompts(page);
    await page.goto(new URL('/docs', baseUrl).href, { waitUntil: 'load', timeout: TIMEOUT_MS });
    const shownAny = await waitFor(page, 'endpoints',
      () => document.querySelectorAll('#paths details').length, (n) => n > 0);
    assert.ok(shownAny > 0);
    const doc = await pageFetchJSON(page, '/openapi.json');
    const expected = Object.values(doc.paths).reduce((n, item) => n + Object.keys(item).length, 0);
    const shown = await waitFor(page, 'rendered endpoints',
      () => document.querySelectorAll('#paths details').length, (n) => n >= expected);
    assert.equal(shown, expected);
    await page.locator('#paths details summary').first().click();
    mkdirSync(join(here, 'out'), { recursive: true });
    await page.screenshot({ path: join(here, 'out', 'docs.png'), fullPage: true });
    assert.deepEqual(unexpected(errors), []);
    assert.equal(asked.count, token ? 1 : 0, 'token prompts');
  } finally {
    await browser.close();
  }
});
