// The page at a headline size: a random-weight checkpoint of Phi-3-mini's shapes (3.8B
// parameters, bf16 shards as the Hub ships them; `cargo xtask make-checkpoint`) given to the
// page as files, in Debian's chromium (WebGPU on SwiftShader). It loads, quantizes to NF4 in
// the worker and trains 2 QLoRA steps; the wasm heap stays within 1 GiB; and the downloaded
// adapter equals what `hone train` writes natively for the same files, data, settings and seed.
//   node www/tests/phi3.test.mjs <page url> <hone binary> <model dir> <out dir>
// Opt-in (`cargo xtask test page-phi3`): most of an hour on SwiftShader.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { assert, checks, launch, readSafetensors, readZip, worstRelativeError } from './harness.mjs';

const [url, hone, modelDir, outDir] = process.argv.slice(2);
fs.mkdirSync(outDir, { recursive: true });
const modelFiles = fs.readdirSync(modelDir).filter((f) => !f.startsWith('.')).map((f) => path.join(modelDir, f));
const dataPath = path.join(outDir, 'phi3.jsonl');
fs.writeFileSync(dataPath, ['The sea is calm tonight.', 'A tide of green water rose.', 'Gulls cried over the harbour.', 'The lamp burned until dawn.'].map((text) => JSON.stringify({ text })).join('\n') + '\n');
// Adam epsilon 1: AdamW's first steps send every gradient element to about ±lr whatever its
// size, so on random weights the few elements whose gradient is at f32 noise level take either
// sign (measured: 52 of 32768 in one tensor, 3.7e-2 relative error, with the default 1e-8; the
// losses agreed to 4 decimals). With epsilon well above the gradients the update is lr·g, and the
// adapter compares the gradients themselves.
const SETTINGS = { 'LoRA rank': 4, 'Adam epsilon': 1, 'LoRA alpha': 8, 'LoRA dropout': 0, 'Learning rate': 0.01, 'Steps (overrides epochs)': 2, 'Batch size': 1, 'Max length': 32, Seed: 7, 'Checkpoint every N steps': 0 };
const BASE_NAME = 'phi3-random';
const HEAP_LIMIT = 2 ** 30;

const browser = await launch();
const context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1100, height: 1500 } });
const requests = [];
context.on('request', (r) => requests.push(r.url()));
const page = await context.newPage();
page.setDefaultTimeout(Number(process.env.PAGE_TIMEOUT_MS || 4 * 3600 * 1000));
const consoleLines = [];
page.on('console', (m) => consoleLines.push(m.text()));
page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));
const { check, finish } = checks('phi3_page', () => page, consoleLines, ['gpu-status', 'model-status', 'progress-text', 'error', 'estimate']);
const errorText = async () => ((await page.locator('#error').isHidden()) ? '' : await page.locator('#error').textContent());

await page.goto(url);
await page.waitForFunction(() => !document.getElementById('gpu-status').textContent.startsWith('Starting'));
const t0 = Date.now();
const elapsed = () => `${((Date.now() - t0) / 60000).toFixed(1)} min`;

await check('opens_the_sharded_bf16_checkpoint', async () => {
  await page.getByLabel('Model files', { exact: true }).setInputFiles(modelFiles);
  await page.waitForFunction(() => document.getElementById('model-status').textContent.startsWith('Opened') || !document.getElementById('error').hidden);
  const e = await errorText();
  assert(!e, e);
  console.log(`phi3 page: opened after ${elapsed()}: ${await page.locator('#model-status').textContent()}`);
});

await check('trains_two_steps_within_the_heap_limit', async () => {
  await page.getByLabel('Dataset file', { exact: true }).setInputFiles(dataPath);
  await page.waitForSelector('#preview pre.example');
  for (const [label, value] of Object.entries(SETTINGS)) await page.getByLabel(label, { exact: true }).fill(String(value));
  console.log(`phi3 page: ${await page.locator('#estimate').textContent()}`);
  await page.getByRole('button', { name: 'Start', exact: true }).click();
  await page.waitForFunction(() => document.getElementById('progress-text').textContent.endsWith('done') || !document.getElementById('error').hidden);
  const e = await errorText();
  assert(!e, e);
  const text = await page.locator('#progress-text').textContent();
  const heap = Number(await page.locator('#progress').getAttribute('data-wasm-heap-bytes'));
  console.log(`phi3 page: trained after ${elapsed()}: ${text}; wasm heap ${(heap / 2 ** 20).toFixed(0)} MiB`);
  assert(heap > 0 && heap <= HEAP_LIMIT, `wasm heap ${heap} bytes, over ${HEAP_LIMIT}`);
});

let browserFiles = null;
await check('saves_the_adapter', async () => {
  const [download] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Download adapter (.zip)', exact: true }).click()]);
  const zipPath = path.join(outDir, 'adapter.zip');
  await download.saveAs(zipPath);
  browserFiles = readZip(fs.readFileSync(zipPath));
  assert(browserFiles['adapter_model.safetensors'], Object.keys(browserFiles).join(','));
});

await check('browser_adapter_equals_native_hone_train', async () => {
  const nativeOut = path.join(outDir, 'native-adapter');
  fs.rmSync(nativeOut, { recursive: true, force: true });
  const flags = ['--rank', '4', '--alpha', '8', '--dropout', '0', '--lr', '0.01', '--steps', '2', '--batch-size', '1', '--max-len', '32', '--seed', '7', '--adam-epsilon', '1', '--base-model-name', BASE_NAME];
  execFileSync(hone, ['train', '--model', modelDir, '--data', dataPath, '--out', nativeOut, '--quiet', ...flags], { stdio: ['ignore', 'inherit', 'inherit'] });
  const native = readSafetensors(fs.readFileSync(path.join(nativeOut, 'adapter_model.safetensors')));
  const web = readSafetensors(Buffer.from(browserFiles['adapter_model.safetensors']));
  const { worst, worstName } = worstRelativeError(native, web);
  console.log(`phi3 page: browser vs native adapter, worst relative error ${worst.toExponential(2)} (${worstName}), after ${elapsed()}`);
  assert(worst < 1e-4, `relative error ${worst} at ${worstName}`);
});

await check('fetches_only_the_page', async () => {
  const foreign = requests.filter((u) => !u.startsWith(url));
  assert(foreign.length === 0, `foreign requests: ${foreign}`);
});

await browser.close();
process.exit(finish());
