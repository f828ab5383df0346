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

// ---- safetensors and zip readers (independent of the page's own code) ----
export function readSafetensors(buf) {
  const n = Number(buf.readBigUInt64LE(0));
  const headerBytes = buf.subarray(8, 8 + n);
  const header = JSON.parse(headerBytes.toString('utf8'));
  const tensors = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    assert(t.dtype === 'F32', `${name}: dtype ${t.dtype}`);
    const [a, b] = t.data_offsets;
    const bytes = buf.subarray(8 + n + a, 8 + n + b);
    tensors[name] = { shape: t.shape, values: new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length)) };
  }
  return { headerBytes, tensors };
}
export function readZip(buf) {
  const files = {};
  let at = 0;
  while (buf.readUInt32LE(at) === 0x04034b50) {
    const size = buf.readUInt32LE(at + 18);
    const nameLen = buf.readUInt16LE(at + 26);
    const extraLen = buf.readUInt16LE(at + 28);
    const name = buf.subarray(at + 30, at + 30 + nameLen).toString('utf8');
    const start = at + 30 + nameLen + extraLen;
    files[name] = buf.subarray(start, start + size);
    at = start + size;
  }
  return files;
}


// The largest relative error ‖a − b‖ / ‖a‖ over the tensors of two read safetensors files.
export function worstRelativeError(a, b) {
  let worst = 0;
  let worstName = '';
  for (const [name, t] of Object.entries(a.tensors)) {
    const w = b.tensors[name];
    assert(w, `${name} is missing`);
    let diff = 0;
    let norm = 0;
    for (let i = 0; i < t.values.length; i++) {
      diff += (t.values[i] - w.values[i]) ** 2;
      norm += t.values[i] ** 2;
    }
    const rel = Math.sqrt(diff) / Math.max(Math.sqrt(norm), 1e-12);
    if (rel > worst) [worst, worstName] = [rel, name];
  }
  return { worst, worstName };
}
