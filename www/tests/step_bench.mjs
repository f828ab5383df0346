// The browser half of `cargo xtask bench --case browser`: trains the tiny SmolLM2-shaped fixture
// through the page (WebGPU on SwiftShader) and prints one JSON line with the training tokens
// per second after the first step, as `hone train` reports natively.
//   node www/tests/step_bench.mjs <page url> <data.jsonl> <steps> <batch size> <max len>
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { launch } from './harness.mjs';

const [url, dataPath, steps, batchSize, maxLen] = process.argv.slice(2);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const fixture = path.join(root, 'tests/fixtures/smollm2');
const browser = await launch();
const page = await (await browser.newContext()).newPage();
page.setDefaultTimeout(Number(process.env.PAGE_TIMEOUT_MS || 600000));
const byLabel = (name) => page.getByLabel(name, { exact: true });
await page.goto(url);
await page.waitForFunction(() => !document.getElementById('gpu-status').textContent.startsWith('Starting'));
await byLabel('Model files').setInputFiles(['config.json', 'model.safetensors', 'tokenizer.json'].map((f) => path.join(fixture, f)));
await page.waitForFunction(() => document.getElementById('model-status').textContent.startsWith('Opened'));
await byLabel('Dataset file').setInputFiles(dataPath);
await page.waitForSelector('#preview pre.example');
const fields = { 'LoRA rank': 4, 'LoRA alpha': 8, 'LoRA dropout': 0, 'Learning rate': 0.01, 'Steps (overrides epochs)': steps, 'Batch size': batchSize, 'Max length': maxLen, Seed: 7, 'Checkpoint every N steps': 0 };
for (const [label, value] of Object.entries(fields)) await page.getByLabel(label).fill(String(value));
const t0 = Date.now();
await page.getByRole('button', { name: 'Start', exact: true }).click();
await page.waitForFunction(() => document.getElementById('progress-text').textContent.endsWith('done'));
const rate = Number(await page.locator('#progress').evaluate((p) => p.dataset.tokensPerSecond));
console.log(JSON.stringify({ train_tokens_per_s: rate, wall_s: (Date.now() - t0) / 1000 }));
await browser.close();
