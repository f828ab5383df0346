// hone's worker: owns the WebGPU device and the training session, so the page stays
// responsive. Messages in: {id, cmd, ...}; replies: {id, ok, result | error}; events: {event, ...}.
// Checkpoints go to the origin-private file system (OPFS), in two slots written alternately:
// a slot's meta.json is removed first and written last, so a kill mid-write leaves the other
// slot as the latest whole checkpoint.
import init, { Session, deviceLost, csvToJsonl, parquetToJsonl } from './pkg/hone_web.js';
import * as hub from './hub.js';

const ready = init();
let session = null;
let modelName = null;
let job = null; // {data, evalData, settings, saveEvery, evalEvery, running, stop}

const post = (msg) => self.postMessage(msg);
// The wasm heap's size (it only grows): what the worker's module holds in host memory.
const heapBytes = async () => (await ready).memory.buffer.byteLength;
const event = (name, fields) => post({ event: name, ...fields });

function message(e) {
  if (e instanceof Error) return e.message;
  if (typeof e === 'string') return e;
  return String(e);
}

function gpuError(e) {
  const lost = deviceLost();
  return lost ? `The GPU device was lost (${lost}). Reload the page to resume from the last checkpoint.` : message(e);
}

// A panic inside the wasm module traps outside any awaited call (wgpu's, when the GPU device is
// lost mid-step): reported here instead of as a bare worker failure, as a device loss when it is
// one (its callback can come a moment after the trap), with the checkpoint to resume from.
self.addEventListener('error', (e) => {
  e.preventDefault();
  if (job) job.running = false;
  (async () => {
    let lost = null;
    for (let i = 0; i < 40 && !lost; i++) {
      try {
        lost = deviceLost();
      } catch {
        break;
      }
      if (!lost) await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const saved = await checkpoints().catch(() => []);
    const what = lost ? `The GPU device was lost (${lost}).` : `The worker failed: ${e.message}.`;
    const back = saved.length ? ` Reload the page to resume from the last checkpoint (step ${saved[0].meta.step}).` : '';
    event('state', { state: 'error' });
    event('error', { error: what + back });
  })();
});

// ---- OPFS checkpoints ----
const SLOTS = ['hone-checkpoint-a', 'hone-checkpoint-b'];

async function opfs() {
  return navigator.storage.getDirectory();
}

async function writeFile(dir, name, bytes) {
  const handle = await dir.getFileHandle(name, { create: true });
  const w = await handle.createWritable();
  await w.write(bytes);
  await w.close();
}

async function readMeta(slot) {
  try {
    const dir = await (await opfs()).getDirectoryHandle(slot);
    const file = await (await dir.getFileHandle('meta.json')).getFile();
    return { slot, dir, meta: JSON.parse(await file.text()) };
  } catch {
    return null;
  }
}

// The slots whose meta.json was written, newest first.
async function checkpoints() {
  const found = (await Promise.all(SLOTS.map(readMeta))).filter(Boolean);
  found.sort((a, b) => b.meta.step - a.meta.step);
  return found;
}

async function latestCheckpoint() {
  return (await checkpoints())[0] || null;
}

// Restores the newest checkpoint whose files pass their checksums (hone checks checksums.json),
// falling back to the other slot; returns the step resumed at.
async function restoreNewest() {
  const found = await checkpoints();
  if (!found.length) throw new Error('no checkpoint to resume from');
  const faults = [];
  for (const c of found) {
    try {
      const files = new Map();
      for (const name of c.meta.files) {
        const file = await (await c.dir.getFileHandle(name)).getFile();
        files.set(name, new Uint8Array(await file.arrayBuffer()));
      }
      const step = session.restore(files);
      if (faults.length) event('warning', { message: `skipped a damaged checkpoint (${faults.join('; ')}); resumed at step ${step}` });
      return step;
    } catch (e) {
      faults.push(`step ${c.meta.step}: ${message(e)}`);
    }
  }
  throw new Error(`no whole checkpoint: ${faults.join('; ')}`);
}

async function saveCheckpoint(step) {
  const latest = await latestCheckpoint();
  const slot = latest && latest.slot === SLOTS[0] ? SLOTS[1] : SLOTS[0];
  const root = await opfs();
  const dir = await root.getDirectoryHandle(slot, { create: true });
  try { await dir.removeEntry('meta.json'); } catch { /* a fresh slot */ }
  const files = await session.checkpoint();
  const names = [];
  for (const [name, bytes] of files) {
    await writeFile(dir, name, bytes);
    names.push(name);
  }
  // The dataset does not change during a run: each slot gets it once per run, not per checkpoint.
  job.slotsWithData = job.slotsWithData || new Set();
  if (!job.slotsWithData.has(slot)) {
    await writeFile(dir, 'data.jsonl', new TextEncoder().encode(job.data));
    if (job.evalData) await writeFile(dir, 'eval.jsonl', new TextEncoder().encode(job.evalData));
    job.slotsWithData.add(slot);
  }
  const meta = { step, total: job.total, model: modelName, settings: job.settings, saveEvery: job.saveEvery, baseName: job.baseName, files: names, hasEval: !!job.evalData, savedAt: Date.now() };
  await writeFile(dir, 'meta.json', new TextEncoder().encode(JSON.stringify(meta)));
  event('checkpoint', { step });
}

async function clearCheckpoints() {
  const root = await opfs();
  for (const slot of SLOTS) {
    try { await root.removeEntry(slot, { recursive: true }); } catch { /* none */ }
  }
}

// ---- opening models ----
async function fetchBlob(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.blob();
}

async function openFromUrl(url) {
  const name = url.replace(/\/+$/, '').split('/').pop();
  if (/\.gguf$/i.test(url)) return Session.open(name, [name], [await fetchBlob(url)]);
  const base = url.replace(/\/+$/, '') + '/';
  const names = [];
  const blobs = [];
  const add = async (file, optional) => {
    try {
      blobs.push(await fetchBlob(base + file));
      names.push(file);
      return true;
    } catch (e) {
      if (!optional) throw e;
      return false;
    }
  };
  await add('config.json', false);
  await add('tokenizer.json', false);
  await add('tokenizer_config.json', true);
  await add('generation_config.json', true);
  if (await add('model.safetensors.index.json', true)) {
    const index = JSON.parse(await blobs[blobs.length - 1].text());
    for (const shard of new Set(Object.values(index.weight_map))) await add(shard, false);
  } else {
    await add('model.safetensors', false);
  }
  return Session.open(name, names, blobs);
}

// ---- training loop ----
async function runTraining() {
  job.running = true;
  job.stop = null;
  event('state', { state: 'running' });
  const started = performance.now();
  let tokens = 0;
  let steps = 0;
  // Throughput after the first step, which compiles kernels (as `hone train` reports it).
  let warm = null;
  let warmTokens = 0;
  try {
    for (;;) {
      const r = await session.step();
      tokens += r.tokens;
      steps += 1;
      const now = performance.now();
      if (steps === 1) warm = now;
      else warmTokens += r.tokens;
      const elapsed = (now - started) / 1000;
      const eta = ((r.total_steps - r.step) * elapsed) / steps;
      const rate = steps > 1 ? warmTokens / ((now - warm) / 1000) : tokens / elapsed;
      event('progress', { ...r, tokens_per_second: rate, eta_seconds: eta, wasm_heap_bytes: await heapBytes() });
      if (job.evalEvery > 0 && (r.step % job.evalEvery === 0 || r.done)) {
        const e = await session.evaluate();
        if (e) event('eval', { step: r.step, ...e });
      }
      if (job.saveEvery > 0 && r.step % job.saveEvery === 0 && !r.done) await saveCheckpoint(r.step);
      if (r.done) {
        job.running = false;
        await clearCheckpoints();
        event('state', { state: 'done' });
        return;
      }
      if (job.stop) break;
      // Let pause/cancel messages in between steps.
      await new Promise((resolve) => setTimeout(resolve, 0));
    }
  } catch (e) {
    job.running = false;
    event('state', { state: 'error' });
    event('error', { error: gpuError(e) });
    return;
  }
  job.running = false;
  const why = job.stop;
  if (why === 'cancel') {
    await clearCheckpoints();
    session = null;
    job = null;
    event('state', { state: 'cancelled' });
  } else {
    event('state', { state: 'paused' });
  }
}

// ---- commands ----
const commands = {
  async open({ name, files }) {
    session = await Session.open(name, files.map((f) => f.name), files.map((f) => f.file));
    modelName = name;
    return { ...session.info(), wasm_heap_bytes: await heapBytes() };
  },
  async openUrl({ url }) {
    session = await openFromUrl(url);
    modelName = url.replace(/\/+$/, '').split('/').pop();
    return session.info();
  },
  // A Hub id: what it takes (files, sizes, bytes still to download) before anything downloads,
  // so the page can check the storage quota first.
  async hubPlan({ endpoint, hubId }) {
    const p = await hub.plan(endpoint, hubId);
    return { repo: p.id.repo, sha: p.sha, files: p.files, missing: p.missing, offline: p.offline };
  },
  async hubOpen({ endpoint, hubId }) {
    const p = await hub.plan(endpoint, hubId);
    const got = await hub.fetchSnapshot(endpoint, p, (f) => event('download', f));
    session = await Session.open(p.id.repo, got.names, got.blobs);
    modelName = p.id.repo;
    return { ...session.info(), downloaded_bytes: got.fetched, wasm_heap_bytes: await heapBytes() };
  },
  async hubList() {
    return hub.list();
  },
  async hubDelete({ folder }) {
    await hub.remove(folder);
    return hub.list();
  },
  async estimate({ settings }) {
    return session.estimate(settings);
  },
  // A CSV dataset as JSONL (the page trains on and checkpoints JSONL).
  async csv({ text, name }) {
    await ready;
    return csvToJsonl(text, name);
  },
  // A Parquet dataset as JSONL (nested columns, such as messages, as JSON).
  async parquet({ bytes, name }) {
    await ready;
    return parquetToJsonl(new Uint8Array(bytes), name);
  },
  async preview({ data, settings }) {
    return session.preview(data, settings, 3);
  },
  async start({ data, evalData, settings, saveEvery, baseName, resume }) {
    if (job && job.running) throw new Error('training is already running');
    const prepared = await session.prepare(data, evalData || null, settings);
    job = { data, evalData, settings, saveEvery, baseName, evalEvery: prepared.eval_every, total: prepared.total_steps, running: false };
    let from = 0;
    if (resume) {
      from = await restoreNewest();
    } else {
      await clearCheckpoints();
    }
    runTraining();
    return { ...prepared, resumed_at: from };
  },
  async pause() {
    if (job && job.running) job.stop = 'pause';
    return null;
  },
  async resume() {
    if (!job || job.running) throw new Error('nothing to resume');
    runTraining();
    return null;
  },
  async cancel() {
    if (job && job.running) job.stop = 'cancel';
    else {
      await clearCheckpoints();
      job = null;
      event('state', { state: 'cancelled' });
    }
    return null;
  },
  async checkpointInfo() {
    const latest = await latestCheckpoint();
    if (!latest) return null;
    const data = await (await (await latest.dir.getFileHandle('data.jsonl')).getFile()).text();
    let evalData = null;
    if (latest.meta.hasEval) evalData = await (await (await latest.dir.getFileHandle('eval.jsonl')).getFile()).text();
    return { ...latest.meta, data, evalData };
  },
  async discardCheckpoint() {
    await clearCheckpoints();
    return null;
  },
  async generate({ prompt, maxNewTokens, ignoreEos, settings }) {
    if (job && job.running) throw new Error('pause training to generate');
    const base = await session.generate(prompt, maxNewTokens, false, !!ignoreEos, settings);
    const tuned = job ? await session.generate(prompt, maxNewTokens, true, !!ignoreEos, settings) : null;
    return { base, tuned };
  },
  async compare({ heldOut, options, settings }) {
    if (job && job.running) throw new Error('pause training to compare');
    return await session.compare(heldOut, options, settings);
  },
  async adapter({ baseName }) {
    const files = await session.adapter(baseName || null);
    return Object.fromEntries(files);
  },
  async adapterGguf({ baseName, name }) {
    return await session.adapter_gguf(baseName || null, name);
  },
};

self.onmessage = async ({ data }) => {
  const { id, cmd, ...args } = data;
  try {
    await ready;
    if (!commands[cmd]) throw new Error(`unknown command ${cmd}`);
    if (cmd !== 'open' && cmd !== 'openUrl' && !cmd.startsWith('hub') && cmd !== 'csv' && cmd !== 'parquet' && !cmd.startsWith('checkpoint') && cmd !== 'discardCheckpoint' && !session) {
      throw new Error('open a model first');
    }
    post({ id, ok: true, result: await commands[cmd](args) });
  } catch (e) {
    post({ id, ok: false, error: gpuError(e) });
  }
};

post({ event: 'worker-ready' });
