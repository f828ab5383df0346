// What the page tests share: Debian's chromium with WebGPU on SwiftShader, and named checks
// that print like cargo's test harness ("test suite::name ... ok", then "test result: …").
import { chromium } from 'playwright-core';

export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic', '--no-first-run'],
  });
}

export function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}

// Runs named checks against `page()`; on failure prints the page's status lines and the last
// console lines.
export function checks(suite, page, consoleLines, statusIds) {
  const tally = { passed: 0, failed: 0 };
  async function check(name, fn) {
    try {
      await fn();
      tally.passed++;
      console.log(`test ${suite}::${name} ... ok`);
    } catch (e) {
      tally.failed++;
      console.log(`test ${suite}::${name} ... FAILED\n${e.stack || e}`);
      const seen = await page().evaluate((ids) => ids.map((id) => `${id}: ${document.getElementById(id).textContent}`), statusIds).catch(() => []);
      console.log(`  page: ${seen.join('\n  page: ')}\n  console: ${consoleLines.slice(-8).join('\n  console: ')}`);
    }
  }
  function finish() {
    console.log(`test result: ${tally.failed ? 'FAILED' : 'ok'}. ${tally.passed} passed; ${tally.failed} failed`);
    return tally.failed ? 1 : 0;
  }
  return { check, finish };
}
