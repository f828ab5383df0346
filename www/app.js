// The page: collects the user's choices, talks to the worker, and draws progress.
import { zipStored } from './zip.js';

const $ = (id) => document.getElementById(id);
const worker = new Worker('worker.js', { type: 'module' });
const pending = new Map();
let nextId = 1;
const state = { model: null, data: '', evalData: '', trainPoints: [], evalPoints: [], marginPoints: [], running: false, trained: false, checkpoint: null };

function call(cmd, args = {}) {
  const id = nextId++;
  worker.postMessage({ id, cmd, ...args });
  return new Promise((resolve, reject) => pending.set(id, { resolve, reject }));
}

function showError(text) {
  const el = $('error');
  el.textContent = text;
  el.hidden = !text;
}

async function guarded(fn) {
  try {
    showError('');
    return await fn();
  } catch (e) {
    showError(e instanceof Error ? e.message : String(e));
    return undefined;
  }
}

// ---- GPU ----
async function checkGpu() {
  if (!navigator.gpu) {
    $('gpu-status').textContent = 'WebGPU is not available in this browser. Use a recent Chrome, Edge or Firefox with WebGPU enabled (or the hone CLI).';
    showError('WebGPU is missing: training needs it.');
    return;
  }
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) {
    $('gpu-status').textContent = 'WebGPU is present but offered no GPU adapter.';
    showError('No WebGPU adapter: training needs one.');
    return;
  }
  const mb = (n) => `${Math.round(n / 2 ** 20)} MiB`;
  const info = adapter.info || {};
  $('gpu-status').textContent = `GPU: ${info.vendor || 'unknown'} ${info.architecture || ''} · largest buffer ${mb(adapter.limits.maxBufferSize)}, storage binding ${mb(adapter.limits.maxStorageBufferBindingSize)}${adapter.features.has('shader-f16') ? ' · f16' : ''}${info.isFallbackAdapter || /swiftshader/i.test(info.architecture || '') ? ' · software adapter (runs on the CPU)' : ''}`;
}

// ---- settings ----
function num(id) {
  const v = $(id).value.trim();
  return v === '' ? undefined : Number(v);
}

function settings() {
  const s = {
    rank: num('rank'),
    alpha: num('alpha'),
    dropout: num('dropout'),
    targets: $('targets').value.trim() || undefined,
    lr: num('lr'),
    warmup_steps: num('warmup-steps'),
    adam_epsilon: num('adam-epsilon'),
    optim: $('optim').value,
    min_8bit_size: num('min-8bit-size'),
    batch_size: num('batch-size'),
    grad_accum: num('grad-accum'),
    max_len: num('max-len'),
    seed: num('seed'),
    quantize: $('quantize').value,
    train_on_prompts: $('train-on-prompts').checked,
    dora: $('dora').checked || undefined,
    rslora: $('rslora').checked || undefined,
    init: $('init').value === 'default' ? undefined : $('init').value,
    columns: $('columns').value.trim() || undefined,
  };
  // Preference tuning (DPO, ORPO): pairs instead of examples; their settings only then.
  const method = $('method').value;
  if (method !== 'sft') {
    s.method = method;
    s.beta = num('beta');
    if (method === 'dpo') s.loss_type = $('loss-type').value;
    delete s.train_on_prompts;
  }
  const steps = num('steps');
  if (steps) s.steps = steps;
  else s.epochs = num('epochs');
  const split = num('eval-split');
  if (split && !state.evalData) s.eval_split = split;
  for (const k of Object.keys(s)) if (s[k] === undefined) delete s[k];
  return s;
}

function applySettings(s) {
  const set = (id, v) => { if (v !== undefined && v !== null) $(id).value = v; };
  set('rank', s.rank); set('alpha', s.alpha); set('dropout', s.dropout); set('targets', s.targets);
  set('lr', s.lr); set('warmup-steps', s.warmup_steps); set('adam-epsilon', s.adam_epsilon); set('optim', s.optim); set('min-8bit-size', s.min_8bit_size); set('batch-size', s.batch_size); set('grad-accum', s.grad_accum);
  set('max-len', s.max_len); set('seed', s.seed); set('quantize', s.quantize); set('eval-split', s.eval_split);
  if (s.steps) set('steps', s.steps); else { $('steps').value = ''; set('epochs', s.epochs); }
  $('train-on-prompts').checked = !!s.train_on_prompts;
  $('dora').checked = !!s.dora; $('rslora').checked = !!s.rslora; $('init').value = s.init || 'default'; $('columns').value = s.columns || '';
  $('method').value = s.method || 'sft';
  set('loss-type', s.loss_type); $('beta').value = s.beta ?? '';
}

async function refreshEstimate() {
  if (!state.model) return;
  const e = await call('estimate', { settings: settings() }).catch((err) => ({ error: err.message }));
  if (e.error) {
    $('estimate').textContent = e.error;
    return;
  }
  const mb = (n) => `${(n / 1e6).toFixed(1)} MB`;
  $('estimate').textContent = `Estimated GPU memory: ${e.total} (base ${mb(e.base_bytes)}, LoRA ${e.lora_params.toLocaleString()} parameters with optimizer ${mb(e.lora_bytes)}, activations ${mb(e.activation_bytes)}).`
    + (e.host_table_bytes ? ` The embedding table (${mb(e.host_table_bytes)}) stays in this tab's memory.` : '')
    + (e.fits ? '' : ` Does not fit: ${e.largest_buffer} needs ${mb(e.largest_buffer_bytes)} in one buffer; this GPU allows ${mb(e.max_buffer_size)}.`);
}

// ---- model ----
async function modelOpened(info) {
  state.model = info;
  $('estimate').textContent = '';
  $('model-status').textContent = `Opened ${info.name}: ${info.model_type}, ${info.layers} layers, hidden size ${info.hidden_size}, vocabulary ${info.vocab_size}${info.has_chat_template ? ', chat template' : ''}.`;
  // Sensible defaults for this model: the longest context it was trained for, up to 512.
  $('max-len').value = Math.min(512, info.max_position_embeddings);
  if (!$('base-name').value) $('base-name').value = info.name;
  $('start').disabled = false;
  $('generate').disabled = false;
  $('compare').disabled = false;
  await refreshEstimate();
  await refreshPreview();
  await offerResume();
}

async function openFiles(name, files) {
  $('model-status').textContent = `Opening ${name}…`;
  const info = await guarded(() => call('open', { name, files }));
  if (info) await modelOpened(info);
  else $('model-status').textContent = 'No model yet.';
}

async function collectDir(handle, prefix, out) {
  for await (const [name, entry] of handle.entries()) {
    if (entry.kind === 'file') out.push({ name: prefix + name, file: await entry.getFile() });
  }
}

$('pick-folder').addEventListener('click', () => guarded(async () => {
  if (!window.showDirectoryPicker) throw new Error('This browser has no folder picker: choose the model files with the file input instead.');
  const dir = await window.showDirectoryPicker({ id: 'hone-model' });
  const files = [];
  await collectDir(dir, '', files);
  await openFiles(dir.name, files);
}));

$('model-files').addEventListener('change', async (e) => {
  const files = [...e.target.files];
  if (!files.length) return;
  const rel = files[0].webkitRelativePath;
  const name = rel ? rel.split('/')[0] : files.length === 1 ? files[0].name : 'model';
  await openFiles(name, files.map((f) => ({ name: f.name, file: f })));
});

async function openUrl(url) {
  $('model-status').textContent = `Fetching ${url}…`;
  const info = await guarded(() => call('openUrl', { url }));
  if (info) await modelOpened(info);
  else $('model-status').textContent = 'No model yet.';
}

$('load-url').addEventListener('click', () => {
  const url = $('model-url').value.trim();
  if (url) openUrl(url);
});

// ---- Hub models, cached in OPFS ----
const HUB_ENDPOINT = ['https:/', 'huggingface.co'].join('/');
$('hub-endpoint').value = localStorage.getItem('hone-hub-endpoint') || HUB_ENDPOINT;
const gb = (n) => (n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(2)} GiB` : `${(n / 2 ** 20).toFixed(1)} MiB`);

async function refreshCache() {
  const models = await call('hubList').catch(() => []);
  const ul = $('model-cache');
  ul.replaceChildren(...models.map((m) => {
    const li = document.createElement('li');
    li.textContent = `${m.repo} · ${gb(m.bytes)} `;
    li.dataset.repo = m.repo;
    li.dataset.bytes = String(m.bytes);
    const del = document.createElement('button');
    del.type = 'button';
    del.textContent = `Delete ${m.repo}`;
    del.addEventListener('click', () => guarded(async () => {
      await call('hubDelete', { folder: m.folder });
      await refreshCache();
    }));
    li.append(del);
    return li;
  }));
  if (!models.length) ul.replaceChildren(Object.assign(document.createElement('li'), { textContent: 'none' }));
  const est = navigator.storage && navigator.storage.estimate ? await navigator.storage.estimate() : null;
  $('storage-status').textContent = est ? `This page's storage: ${gb(est.usage || 0)} used of ${gb(est.quota || 0)} the browser grants.` : '';
}

// Refuses a download the browser's storage quota cannot hold, before any byte is fetched.
async function checkQuota(plan) {
  if (!plan.missing) return;
  const est = await navigator.storage.estimate();
  const free = (est.quota || 0) - (est.usage || 0);
  if (plan.missing > free) {
    throw new Error(`${plan.repo} needs ${gb(plan.missing)} more of this browser's storage, but only ${gb(Math.max(0, free))} is free (quota ${gb(est.quota || 0)}, used ${gb(est.usage || 0)}): delete downloaded models below, free disk space, or train it with the hone CLI.`);
  }
  // Ask that the cache not be evicted under storage pressure (the browser may say no).
  if (navigator.storage.persist) await navigator.storage.persist().catch(() => false);
}

$('load-hub').addEventListener('click', async () => {
  const id = $('hub-id').value.trim();
  const endpoint = $('hub-endpoint').value.trim().replace(/\/+$/, '') || HUB_ENDPOINT;
  if (!id) return;
  localStorage.setItem('hone-hub-endpoint', endpoint);
  $('model-status').textContent = `Looking up ${id}…`;
  const info = await guarded(async () => {
    const plan = await call('hubPlan', { endpoint, hubId: id });
    await checkQuota(plan);
    $('model-status').textContent = plan.missing ? `Downloading ${plan.repo} (${gb(plan.missing)})…` : `Opening ${plan.repo} from this browser's storage…`;
    return call('hubOpen', { endpoint, hubId: id });
  });
  if (info) {
    // Set before the status says "Opened", which is what scripts wait for.
    $('model-status').dataset.downloaded = String(info.downloaded_bytes);
    await modelOpened(info);
  } else {
    $('model-status').textContent = 'No model yet.';
  }
  await refreshCache();
});
refreshCache();

$('default-model').addEventListener('click', async () => {
  const index = await guarded(async () => {
    const r = await fetch('models/index.json');
    if (!r.ok) throw new Error('This server has no default model (run `cargo xtask serve`).');
    return r.json();
  });
  if (index && index.default) openUrl(new URL(`models/${index.default}`, location.href).href);
});

// ---- data ----
async function readFileText(input) {
  const f = input.files[0];
  if (!f) return '';
  if (/\.parquet$/i.test(f.name)) return call('parquet', { bytes: await f.arrayBuffer(), name: f.name });
  const text = await f.text();
  // CSV (a header row, then one example per row) becomes the JSONL the page trains on.
  return /\.csv$/i.test(f.name) ? call('csv', { text, name: f.name }) : text;
}

// Re-rendered only when what it shows changes, and swapped in one piece, so the page does not
// shift under the pointer while the user clicks elsewhere.
let previewKey = '';
async function refreshPreview() {
  const el = $('preview');
  const s = settings();
  const key = JSON.stringify([state.model && state.model.name, state.data.slice(0, 20000), s.max_len, s.train_on_prompts, s.method, s.columns]);
  if (key === previewKey) return;
  previewKey = key;
  if (!state.model || !state.data.trim()) {
    el.replaceChildren();
    return;
  }
  const nodes = [];
  try {
    const examples = await call('preview', { data: state.data, settings: s });
    const heading = document.createElement('p');
    const pairs = s.method !== undefined;
    heading.textContent = pairs
      ? 'First pairs as the model sees them, each as its chosen and its rejected sequence (the completions are marked):'
      : 'First examples as the model sees them (highlighted tokens are trained on):';
    nodes.push(heading);
    for (const tokens of examples) {
      const pre = document.createElement('pre');
      pre.className = 'example';
      const side = tokens.find((t) => t.part && t.part !== 'prompt');
      if (side) pre.dataset.part = side.part;
      for (const t of tokens) {
        const span = document.createElement('span');
        span.textContent = t.text;
        if (t.part === 'chosen' || t.part === 'rejected') span.className = t.part;
        else if (t.trained) span.className = 'trained';
        pre.append(span);
      }
      nodes.push(pre);
    }
  } catch (e) {
    // Shown in the preview, where the data is: the error names the dataset line.
    const p = document.createElement('p');
    p.className = 'preview-error';
    p.textContent = e.message;
    nodes.push(p);
  }
  el.replaceChildren(...nodes);
}

$('dataset-file').addEventListener('change', async (e) => {
  state.data = await readFileText(e.target);
  $('dataset-text').value = state.data.length < 200000 ? state.data : '';
  await refreshPreview();
});
$('eval-file').addEventListener('change', async (e) => {
  state.evalData = await readFileText(e.target);
});
let typing;
$('dataset-text').addEventListener('input', (e) => {
  state.data = e.target.value;
  clearTimeout(typing);
  typing = setTimeout(refreshPreview, 400);
});
for (const el of document.querySelectorAll('#settings-h ~ .grid input, #settings-h ~ .grid select')) {
  el.addEventListener('change', () => { refreshEstimate(); refreshPreview(); });
}

// ---- training ----
function setRunning(running, paused = false) {
  state.running = running;
  $('start').disabled = running || paused || !state.model;
  $('pause').disabled = !running && !paused;
  $('pause').textContent = paused ? 'Continue' : 'Pause';
  $('cancel').disabled = !running && !paused;
  $('generate').disabled = running || !state.model;
  $('compare').disabled = running || !state.model;
  $('save-folder').disabled = running || !state.trained;
  $('save-zip').disabled = running || !state.trained;
  $('save-gguf').disabled = running || !state.trained;
}

function drawChart() {
  const all = [...state.trainPoints, ...state.evalPoints];
  if (!all.length) return;
  const total = Number($('progress').max) || 1;
  const max = Math.max(...all.map((p) => p.loss));
  const min = Math.min(...all.map((p) => p.loss));
  const span = max - min || 1;
  const xy = (p) => `${(10 + (580 * p.step) / total).toFixed(1)},${(185 - (160 * (p.loss - min)) / span).toFixed(1)}`;
  $('train-line').setAttribute('points', state.trainPoints.map(xy).join(' '));
  $('eval-line').setAttribute('points', state.evalPoints.map(xy).join(' '));
  $('chart').dataset.points = String(state.trainPoints.length);
  $('chart-max').textContent = max.toFixed(3);
  $('chart-min').textContent = min.toFixed(3);
  // Preference runs: the reward margin on its own scale (its range in the legend).
  const m = state.marginPoints;
  $('margin-legend').textContent = m.length ? `reward margin ${Math.min(...m.map((p) => p.loss)).toFixed(3)}…${Math.max(...m.map((p) => p.loss)).toFixed(3)}` : '';
  if (m.length) {
    const [mMax, mMin] = [Math.max(...m.map((p) => p.loss)), Math.min(...m.map((p) => p.loss))];
    const mSpan = mMax - mMin || 1;
    $('margin-line').setAttribute('points', m.map((p) => `${(10 + (580 * p.step) / total).toFixed(1)},${(185 - (160 * (p.loss - mMin)) / mSpan).toFixed(1)}`).join(' '));
  } else $('margin-line').setAttribute('points', '');
  $('chart').dataset.marginPoints = String(m.length);
}

function fmtTime(s) {
  if (!isFinite(s)) return '–';
  s = Math.round(s);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

async function start(resume) {
  if (!state.data.trim()) {
    showError('Choose a dataset file or paste JSONL first.');
    return;
  }
  state.trainPoints = [];
  state.evalPoints = [];
  state.metrics = [];
  $('metrics-csv').disabled = true;
  state.marginPoints = [];
  $('train-line').setAttribute('points', '');
  $('eval-line').setAttribute('points', '');
  setRunning(true);
  $('progress-text').textContent = 'Loading weights and preparing…';
  const r = await guarded(() => call('start', { data: state.data, evalData: state.evalData, settings: settings(), saveEvery: num('save-every') || 0, baseName: $('base-name').value.trim(), resume }));
  if (!r) {
    setRunning(false);
    $('progress-text').textContent = '';
    return;
  }
  $('resume-offer').hidden = true;
  $('progress').max = r.total_steps;
  $('progress').value = r.resumed_at;
  $('progress-text').textContent = `${r.train_examples} training and ${r.eval_examples} held-out examples, ${r.adapted_layers} layers adapted; ${r.truncated} truncated to max length. ${r.resumed_at ? `Resumed at step ${r.resumed_at}.` : ''}`;
}

$('start').addEventListener('click', () => start(false));
$('pause').addEventListener('click', () => guarded(() => call(state.running ? 'pause' : 'resume')));
$('cancel').addEventListener('click', () => guarded(() => call('cancel')));

worker.onmessage = ({ data }) => {
  if (data.id !== undefined) {
    const p = pending.get(data.id);
    pending.delete(data.id);
    if (data.ok) p.resolve(data.result);
    else p.reject(new Error(data.error));
    return;
  }
  switch (data.event) {
    case 'progress': {
      $('progress').max = data.total_steps;
      $('progress').value = data.step;
      $('progress').dataset.tokensPerSecond = data.tokens_per_second;
      $('progress').dataset.wasmHeapBytes = data.wasm_heap_bytes;
      const pref = data.preference ? ` · margin ${data.preference['rewards/margins'].toFixed(4)} · accuracy ${data.preference['rewards/accuracies'].toFixed(2)}` : data.trained_tokens === 0 ? ' (no token counted: this step\'s completions are masked or cut by the max length)' : '';
      $('progress-text').textContent = `step ${data.step}/${data.total_steps} · epoch ${data.epoch + 1} · loss ${data.loss.toFixed(4)}${pref} · lr ${data.lr.toExponential(2)} · ${data.tokens_per_second < 10 ? data.tokens_per_second.toFixed(data.tokens_per_second < 1 ? 3 : 1) : Math.round(data.tokens_per_second)} tokens/s · ETA ${fmtTime(data.eta_seconds)} · wasm heap ${Math.round(data.wasm_heap_bytes / 2 ** 20)} MiB`;
      state.trainPoints.push({ step: data.step, loss: data.loss });
      addMetrics({ step: data.step, split: 'train', loss: data.loss, lr: data.lr, grad_norm: data.grad_norm, tokens_per_s: data.tokens_per_second, epoch: data.epoch, rewards_margin: data.preference && data.preference['rewards/margins'], rewards_accuracy: data.preference && data.preference['rewards/accuracies'] });
      if (data.preference) state.marginPoints.push({ step: data.step, loss: data.preference['rewards/margins'] });
      state.trained = true;
      drawChart();
      break;
    }
    case 'eval':
      state.evalPoints.push({ step: data.step, loss: data.loss });
      addMetrics({ step: data.step, split: 'eval', loss: data.loss, perplexity: data.perplexity, rewards_margin: data['rewards/margins'], rewards_accuracy: data['rewards/accuracies'] });
      drawChart();
      break;
    case 'checkpoint':
      $('progress').dataset.checkpoint = String(data.step);
      break;
    case 'state':
      if (data.state === 'running') setRunning(true);
      else if (data.state === 'paused') setRunning(false, true);
      else setRunning(false);
      if (data.state === 'done') $('progress-text').textContent += ' · done';
      if (data.state === 'cancelled') {
        state.trained = false;
        $('progress-text').textContent = 'Cancelled.';
        setRunning(false);
      }
      break;
    case 'error':
      showError(data.error);
      break;
    case 'download': {
      const left = data.rate > 0 && data.total ? (data.total - data.done) / data.rate : null;
      $('model-status').textContent = `Downloading ${data.file}: ${gb(data.done)} of ${gb(data.total)} · ${gb(data.rate)}/s${left != null ? ` · ${fmtTime(left)} left` : ''}`;
      break;
    }
    case 'warning':
      $('progress-text').textContent = `Warning: ${data.message}`;
      $('progress').dataset.warning = data.message;
      break;
    default:
      break;
  }
};

// ---- resume after a reload ----
async function offerResume() {
  const info = await call('checkpointInfo').catch(() => null);
  state.checkpoint = info;
  if (!info) return;
  $('resume-text').textContent = `Training of ${info.model} stopped at step ${info.step} of ${info.total}.` + (state.model && state.model.name === info.model ? '' : ` Open ${info.model} to resume.`);
  $('resume-offer').hidden = false;
  $('resume-checkpoint').disabled = !(state.model && state.model.name === info.model);
}

$('resume-checkpoint').addEventListener('click', async () => {
  const info = state.checkpoint;
  if (!info) return;
  applySettings(info.settings);
  $('save-every').value = info.saveEvery;
  if (info.baseName) $('base-name').value = info.baseName;
  state.data = info.data;
  state.evalData = info.evalData || '';
  await start(true);
});
$('discard-checkpoint').addEventListener('click', async () => {
  await guarded(() => call('discardCheckpoint'));
  $('resume-offer').hidden = true;
});

// ---- generation ----
$('generate').addEventListener('click', () => guarded(async () => {
  $('generate').disabled = true;
  $('out-base').textContent = '…';
  $('out-tuned').textContent = state.trained ? '…' : '(train first)';
  try {
    const r = await call('generate', { prompt: $('prompt').value, maxNewTokens: num('max-new-tokens') || 48, ignoreEos: $('ignore-eos').checked, settings: settings() });
    // The token ids ride along for scripts and tests (data-ids).
    $('out-base').textContent = r.base.text;
    $('out-base').dataset.ids = r.base.ids.join(',');
    if (r.tuned !== null) {
      $('out-tuned').textContent = r.tuned.text;
      $('out-tuned').dataset.ids = r.tuned.ids.join(',');
    }
  } finally {
    $('generate').disabled = state.running;
  }
}));

// ---- compare on held-out data ----
function fillTable(table, head, rows) {
  const tr = (cells, tag) => {
    const row = document.createElement('tr');
    for (const c of cells) {
      const cell = document.createElement(tag);
      cell.textContent = c;
      row.append(cell);
    }
    return row;
  };
  table.replaceChildren(tr(head, 'th'), ...rows.map((r) => tr(r, 'td')));
  table.hidden = false;
}

function showComparison(report) {
  const v = report.variants;
  const pct = (x) => `${(100 * x).toFixed(1)}%`;
  const base = v[0].general_perplexity;
  const rows = [
    ['held-out loss', ...v.map((x) => x.loss.toFixed(4))],
    ['held-out perplexity', ...v.map((x) => x.perplexity.toFixed(3))],
    ['exact match', ...v.map((x) => pct(x.exact_match))],
    ['contains', ...v.map((x) => pct(x.contains))],
    ['token F1', ...v.map((x) => pct(x.token_f1))],
    ['ROUGE-L', ...v.map((x) => pct(x.rouge_l))],
    ...report.checks.map((c, i) => [`check ${c}`, ...v.map((x) => pct(x.checks[i]))]),
    ['general-text perplexity', ...v.map((x) => x.general_perplexity.toFixed(3))],
    ['forgetting (vs base)', ...v.map((x) => `${x.general_perplexity >= base ? '+' : ''}${(100 * (x.general_perplexity / base - 1)).toFixed(1)}%`)],
    ['generation tokens/s', ...v.map((x) => x.tokens_per_s.toFixed(1))],
  ];
  fillTable($('compare-table'), ['', ...v.map((x) => x.name)], rows);
  fillTable($('compare-samples'), ['prompt', 'reference', ...v.map((x) => x.name)], report.rows.map((r) => [r.prompt, r.reference, ...r.replies]));
}

$('compare').addEventListener('click', () => guarded(async () => {
  const picked = $('compare-file').files[0];
  const heldOut = picked ? await readFileText($('compare-file')) : state.evalData;
  if (!heldOut || !heldOut.trim()) throw new Error('Pick a held-out file (here or in step 2): rows the model did not train on, with prompts and reference completions.');
  const name = picked ? picked.name : ($('eval-file').files[0] || { name: 'held-out data' }).name;
  const checks = $('compare-checks').value.split('\n').map((c) => c.trim()).filter(Boolean);
  const options = { name, checks, limit: num('compare-limit') || undefined, maxNewTokens: num('compare-max-new-tokens') || 64, blind: $('compare-blind').checked, seed: num('seed') || 0 };
  $('compare').disabled = true;
  $('compare-download').disabled = true;
  $('compare-status').textContent = 'Comparing…';
  try {
    const started = performance.now();
    const r = await call('compare', { heldOut, options, settings: settings() });
    state.comparison = r;
    showComparison(r.report);
    $('compare-status').textContent = `Compared ${r.report.variants.map((x) => x.name).join(' and ')} on ${r.report.rows.length} prompts of ${name} in ${((performance.now() - started) / 1000).toFixed(1)} s.`;
    $('compare-download').disabled = false;
  } finally {
    $('compare').disabled = state.running || !state.model;
  }
}));

$('compare-download').addEventListener('click', () => {
  const enc = new TextEncoder();
  const files = Object.entries(state.comparison.files).map(([n, text]) => [n, enc.encode(text)]);
  download(new Blob([zipStored(files)], { type: 'application/zip' }), 'compare-report.zip');
});

// ---- saving ----
async function adapterFiles() {
  const files = await call('adapter', { baseName: $('base-name').value.trim() });
  return Object.entries(files);
}

$('save-folder').addEventListener('click', () => guarded(async () => {
  if (!window.showDirectoryPicker) throw new Error('This browser cannot write to a folder: use "Download adapter (.zip)".');
  const files = await adapterFiles();
  const dir = await window.showDirectoryPicker({ id: 'hone-adapter', mode: 'readwrite' });
  for (const [name, bytes] of files) {
    const w = await (await dir.getFileHandle(name, { create: true })).createWritable();
    await w.write(bytes);
    await w.close(); // the file is replaced only now, whole
  }
  $('save-status').textContent = `Saved ${files.map((f) => f[0]).join(' and ')} to ${dir.name}.`;
}));

// The adapter folder's name (what `hone export --gguf` puts in general.name, too).
function adapterName() {
  return `${($('base-name').value.trim() || 'model').split('/').pop()}-lora-adapter`;
}

function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  $('save-status').textContent = `Downloaded ${name}.`;
}

// ---- the run's series as CSV (the columns of `hone train --log-dir`'s metrics.jsonl) ----
const METRIC_COLUMNS = ['step', 'split', 'loss', 'lr', 'grad_norm', 'tokens_per_s', 'epoch', 'perplexity', 'rewards_margin', 'rewards_accuracy'];
state.metrics = [];
function addMetrics(row) {
  state.metrics.push(row);
  $('metrics-csv').disabled = false;
}
function metricsCsv(rows) {
  const cell = (v) => (v === undefined || v === null || (typeof v === 'number' && !Number.isFinite(v)) ? '' : String(v));
  return [METRIC_COLUMNS.join(','), ...rows.map((r) => METRIC_COLUMNS.map((c) => cell(r[c])).join(','))].join('\n') + '\n';
}
$('metrics-csv').addEventListener('click', () => {
  download(new Blob([metricsCsv(state.metrics)], { type: 'text/csv' }), `${adapterName()}-metrics.csv`);
});

$('save-zip').addEventListener('click', () => guarded(async () => {
  download(new Blob([zipStored(await adapterFiles())], { type: 'application/zip' }), `${adapterName()}.zip`);
}));

$('save-gguf').addEventListener('click', () => guarded(async () => {
  const bytes = await call('adapterGguf', { baseName: $('base-name').value.trim(), name: adapterName() });
  download(new Blob([bytes], { type: 'application/octet-stream' }), `${adapterName()}.gguf`);
}));

checkGpu();
worker.addEventListener('error', (e) => showError(`The worker failed: ${e.message}`));
call('checkpointInfo').then((info) => {
  if (info) offerResume();
}).catch(() => {});
