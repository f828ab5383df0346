// The page on the real default model: SmolLM2-135M-Instruct (Q4_1 GGUF) opened from the
// server's /models/ by "Use the default model", in Debian's chromium (WebGPU on SwiftShader).
//   node www/tests/smollm2.test.mjs <page url, served with the default model>
// Greedy decoding of the chat-formatted "What is the capital of France?" gives transformers' 30
// token ids (tests/fixtures/smollm2_gguf.json, made on the same GGUF weights); a QLoRA
// fine-tune on the demo data starts and its steps report a finite, falling loss; nothing but
// the page and the chosen model is fetched. Prints "test result: ok. N passed; M failed".
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { assert, checks, launch } from './harness.mjs';

const [url] = process.argv.slice(2);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const fixture = JSON.parse(fs.readFileSync(path.join(root, 'tests/fixtures/smollm2_gguf.json'), 'utf8'));
const demo = fs.readFileSync(path.join(root, 'data/demo/ahoy_train.jsonl'), 'utf8').split('\n').filter((l) => l.trim()).slice(0, 8);

const consoleLines = [];
const browser = await launch();
const context = await browser.newContext({ viewport: { width: 1100, height: 1500 } });
const requests = [];
context.on('request', (r) => requests.push(r.url()));
const page = await context.newPage();
page.setDefaultTimeout(Number(process.env.PAGE_TIMEOUT_MS || 600000));
page.on('console', (m) => consoleLines.push(m.text()));
const { check, finish } = checks('smollm2_page', () => page, consoleLines, ['gpu-status', 'model-status', 'progress-text', 'error', 'estimate']);
page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));

await page.goto(url);
await page.waitForFunction(() => !document.getElementById('gpu-status').textContent.startsWith('Starting'));

await check('opens_the_default_model_from_the_server', async () => {
  const t0 = Date.now();
  await page.getByRole('button', { name: 'Use the default model', exact: true }).click();
  await page.waitForFunction(() => document.getElementById('model-status').textContent.startsWith('Opened') || !document.getElementById('error').hidden);
  const status = await page.locator('#model-status').textContent();
  assert(status.startsWith('Opened') && /SmolLM2/i.test(status), status);
  console.log(`smollm2 page: opened in ${((Date.now() - t0) / 1000).toFixed(1)}s: ${status}`);
});

await check('greedy_ids_equal_transformers', async () => {
  await page.locator('#quantize').selectOption('none');
  await page.getByLabel('Prompt', { exact: true }).fill(fixture.question);
  await page.getByLabel('Max new tokens').fill(String(fixture.greedy_ids.length));
  await page.getByLabel('Keep going past end of turn').check();
  const t0 = Date.now();
  await page.getByRole('button', { name: 'Generate', exact: true }).click();
  await page.waitForFunction(() => document.getElementById('out-base').dataset.ids !== undefined || !document.getElementById('error').hidden);
  const ids = (await page.locator('#out-base').getAttribute('data-ids')).split(',').map(Number);
  const text = await page.locator('#out-base').textContent();
  console.log(`smollm2 page: ${ids.length} greedy tokens in ${((Date.now() - t0) / 1000).toFixed(1)}s (loading included): ${JSON.stringify(text)}`);
  assert(JSON.stringify(ids) === JSON.stringify(fixture.greedy_ids), `ids ${ids} vs transformers ${fixture.greedy_ids}`);
});

await check('qlora_fine_tune_starts_and_progresses', async () => {
  await page.locator('#quantize').selectOption('nf4');
  await page.getByLabel('Dataset text').fill(demo.join('\n'));
  await page.waitForSelector('#preview pre.example');
  const settings = { 'LoRA rank': '8', 'LoRA alpha': '16', 'LoRA dropout': '0', 'Learning rate': '0.001', 'Steps (overrides epochs)': '3', 'Batch size': '1', 'Max length': '48', 'Checkpoint every N steps': '0' };
  for (const [label, value] of Object.entries(settings)) await page.getByLabel(label, { exact: true }).fill(value);
  const before = requests.length;
  const t0 = Date.now();
  await page.getByRole('button', { name: 'Start', exact: true }).click();
  await page.waitForFunction(() => Number(document.getElementById('progress').value) >= 2 || !document.getElementById('error').hidden);
  const text = await page.locator('#progress-text').textContent();
  console.log(`smollm2 page: ${((Date.now() - t0) / 1000).toFixed(1)}s to step 2 (NF4 quantization on load included): ${text}`);
  assert(/step [23]\/3/.test(text), text);
  const points = (await page.locator('#train-line').getAttribute('points')).trim().split(/\s+/);
  assert(points.length >= 2, `chart ${points}`);
  const loss = Number(/loss ([0-9.]+)/.exec(text)[1]);
  assert(Number.isFinite(loss) && loss > 0, text);
  const after = requests.slice(before).filter((u) => !u.startsWith(url));
  assert(after.length === 0, `requests to other origins while training: ${after}`);
  await page.getByRole('button', { name: 'Cancel', exact: true }).click();
});

await check('fetches_only_the_page_and_the_chosen_model', async () => {
  const foreign = requests.filter((u) => !u.startsWith(url));
  assert(foreign.length === 0, `foreign requests: ${foreign}`);
  const models = requests.filter((u) => u.includes('/models/'));
  assert(models.length > 0, 'the model came from /models/');
});

await browser.close();
process.exit(finish());
