// Models by Hugging Face Hub id, cached in the origin-private file system (OPFS), for the worker.
// Files come by `resolve` URL in ranged requests written straight into OPFS through a sync
// access handle (no whole-file Blob in memory; a cut download goes on from the bytes it has),
// under hone-models/models--org--name/<commit>/, with refs.json mapping a revision to its commit
// and complete.json written last, so a snapshot without it is never read as whole. The same
// files are chosen as the CLI chooses (crates/hone-cli/src/hub.rs): config, tokenizer and
// top-level safetensors, or one GGUF file (`org/name:FILE` or a tag it holds).

const ROOT = 'hone-models';
export const CHUNK_BYTES = 32 << 20;
const RETRIES = 3;

export const DEFAULT_ENDPOINT = ['https:/', 'huggingface.co'].join('/');

// `org/name[@revision][:FILE]` → {repo, revision, file}, or null.
export function parseId(text) {
  const m = /^([A-Za-z0-9][\w.-]*\/[A-Za-z0-9][\w.-]*)(?:@([^:]+))?(?::(.+))?$/.exec(text.trim());
  if (!m || /\.gguf$/i.test(m[1])) return null;
  return { repo: m[1], revision: m[2] || 'main', file: m[3] || null };
}

const folderName = (repo) => `models--${repo.replace(/\//g, '--')}`;

const SMALL = ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model', 'chat_template.jinja', 'chat_template.json', 'model.safetensors.index.json'];

// The files of a listing ({name, size}) hone reads.
export function chooseFiles(id, files) {
  const ggufs = files.filter((f) => /\.gguf$/i.test(f.name));
  if (id.file) {
    const exact = ggufs.filter((f) => f.name === id.file);
    const hit = exact.length ? exact : ggufs.filter((f) => f.name.toLowerCase().includes(id.file.toLowerCase()));
    if (hit.length === 1) return hit;
    if (!hit.length) throw new Error(`${id.repo}: no GGUF file matches "${id.file}"; the repository holds ${ggufs.map((f) => f.name).join(', ') || 'no GGUF file'}`);
    throw new Error(`${id.repo}: "${id.file}" matches ${hit.length} files (${hit.map((f) => f.name).join(', ')}); name one`);
  }
  const top = files.filter((f) => !f.name.includes('/'));
  const weights = top.filter((f) => f.name.endsWith('.safetensors'));
  if (!weights.length) {
    if (ggufs.length === 1) return ggufs;
    if (ggufs.length > 1) throw new Error(`${id.repo}: no safetensors weights but ${ggufs.length} GGUF files; choose one as ${id.repo}:FILE (${ggufs.map((f) => f.name).join(', ')})`);
    throw new Error(`${id.repo}: no safetensors weights${files.some((f) => f.name.endsWith('.bin')) ? ' (only PyTorch .bin files, which hone does not read)' : ''} and no GGUF file`);
  }
  if (!top.some((f) => f.name === 'config.json')) throw new Error(`${id.repo}: the repository has no config.json`);
  return [...SMALL.map((n) => top.find((f) => f.name === n)).filter(Boolean), ...weights];
}

async function root(create = true) {
  return (await navigator.storage.getDirectory()).getDirectoryHandle(ROOT, { create });
}

async function readJson(dir, name) {
  try {
    return JSON.parse(await (await (await dir.getFileHandle(name)).getFile()).text());
  } catch {
    return null;
  }
}

async function writeJson(dir, name, value) {
  const w = await (await dir.getFileHandle(name, { create: true })).createWritable();
  await w.write(JSON.stringify(value));
  await w.close();
}

async function fileSize(dir, name) {
  try {
    return (await (await dir.getFileHandle(name)).getFile()).size;
  } catch {
    return 0;
  }
}

function httpError(id, endpoint, status) {
  const why = status === 404 ? 'not found: check the id and the revision' : status === 401 || status === 403 ? 'access denied: the page sends no token, so gated or private models cannot be read here (the hone CLI takes HF_TOKEN)' : 'the endpoint refused the request';
  return new Error(`${id.repo}: ${endpoint} answered ${status}, ${why}`);
}

// What opening `id` takes: its commit, the files with their sizes, and the bytes still to
// download (0 when OPFS holds the whole snapshot). Falls back to the cache when the endpoint
// cannot be reached.
export async function plan(endpoint, text) {
  const id = parseId(text);
  if (!id) throw new Error(`"${text}" is not a Hub id (org/name, optionally @revision and :FILE)`);
  const repoDir = await (await root()).getDirectoryHandle(folderName(id.repo), { create: true });
  let listing;
  try {
    const r = await fetch(`${endpoint}/api/models/${id.repo}/revision/${encodeURIComponent(id.revision)}?blobs=true`);
    if (!r.ok) throw httpError(id, endpoint, r.status);
    const info = await r.json();
    listing = { sha: info.sha, files: info.siblings.map((s) => ({ name: s.rfilename, size: s.size ?? (s.lfs && s.lfs.size) ?? null })) };
  } catch (e) {
    const refs = (await readJson(repoDir, 'refs.json')) || {};
    const sha = refs[id.revision];
    const snap = sha && (await readJson(await repoDir.getDirectoryHandle(sha, { create: true }), 'complete.json'));
    if (!(e instanceof TypeError) || !snap) throw e;
    listing = { sha, files: snap.files, offline: true };
  }
  const files = chooseFiles(id, listing.files);
  const snap = await repoDir.getDirectoryHandle(listing.sha, { create: true });
  const complete = await readJson(snap, 'complete.json');
  let missing = 0;
  for (const f of files) {
    const have = complete && complete.files.some((c) => c.name === f.name) ? f.size ?? 0 : await fileSize(snap, f.name);
    if (f.size == null) missing = null;
    else if (missing != null) missing += Math.max(0, f.size - have);
  }
  return { id, sha: listing.sha, files, missing, offline: !!listing.offline };
}

// Downloads what the snapshot lacks, then opens its files as Blobs backed by OPFS.
// `progress({file, done, total, rate})` is called a few times a second.
export async function fetchSnapshot(endpoint, p, progress) {
  const repoDir = await (await root()).getDirectoryHandle(folderName(p.id.repo), { create: true });
  const snap = await repoDir.getDirectoryHandle(p.sha, { create: true });
  const complete = await readJson(snap, 'complete.json');
  const total = p.files.reduce((n, f) => n + (f.size || 0), 0);
  const started = performance.now();
  let fetched = 0;
  let done = 0;
  let shown = 0;
  const tick = (file, force) => {
    const now = performance.now();
    if (!force && now - shown < 250) return;
    shown = now;
    const rate = fetched / Math.max(1e-3, (now - started) / 1000);
    progress({ file, done, total, rate });
  };
  for (const f of p.files) {
    if (complete && complete.files.some((c) => c.name === f.name)) {
      done += f.size || 0;
      continue;
    }
    const url = `${endpoint}/${p.id.repo}/resolve/${p.sha}/${f.name.split('/').map(encodeURIComponent).join('/')}`;
    const handle = await snap.getFileHandle(f.name, { create: true });
    const access = await handle.createSyncAccessHandle();
    try {
      let at = access.getSize();
      let size = f.size;
      if (size != null && at > size) {
        access.truncate(0);
        at = 0;
      }
      done += at;
      let failures = 0;
      while (size == null || at < size) {
        const end = size == null ? at + CHUNK_BYTES - 1 : Math.min(size, at + CHUNK_BYTES) - 1;
        try {
          const r = await fetch(url, { headers: { Range: `bytes=${at}-${end}` } });
          if (r.status === 416 && size == null) break;
          if (r.status !== 206) throw r.ok ? new Error(`${f.name}: ${endpoint} ignored the range request (HTTP ${r.status})`) : httpError(p.id, endpoint, r.status);
          const range = /\/(\d+)$/.exec(r.headers.get('Content-Range') || '');
          if (range) size = Number(range[1]);
          const reader = r.body.getReader();
          for (;;) {
            const { done: end, value } = await reader.read();
            if (end) break;
            access.write(value, { at });
            at += value.length;
            fetched += value.length;
            done += value.length;
            tick(f.name, false);
          }
          failures = 0;
        } catch (e) {
          // A dropped connection: go on from the bytes written, a few times, then give up
          // keeping them (the next try resumes from them too).
          if (!(e instanceof TypeError) || ++failures > RETRIES) throw new Error(`${f.name}: ${e.message} after ${at} of ${size ?? '?'} bytes (kept; loading again resumes)`);
          access.flush();
          await new Promise((resolve) => setTimeout(resolve, 500 * failures));
          continue;
        }
        if (size == null) break;
      }
      access.flush();
    } finally {
      access.close();
    }
    tick(f.name, true);
  }
  // complete.json last: only a snapshot that has it is used without downloading.
  await writeJson(snap, 'complete.json', { files: p.files.map((f) => ({ name: f.name, size: f.size })) });
  const refs = (await readJson(repoDir, 'refs.json')) || {};
  if (p.id.revision !== p.sha) {
    refs[p.id.revision] = p.sha;
    await writeJson(repoDir, 'refs.json', refs);
  }
  const names = [];
  const blobs = [];
  for (const f of p.files) {
    names.push(f.name);
    blobs.push(await (await snap.getFileHandle(f.name)).getFile());
  }
  return { names, blobs, fetched };
}

// The cached models: [{repo, folder, bytes, snapshots}].
export async function list() {
  const out = [];
  const dir = await root();
  for await (const [name, entry] of dir.entries()) {
    if (entry.kind !== 'directory' || !name.startsWith('models--')) continue;
    let bytes = 0;
    let snapshots = 0;
    for await (const [, snap] of entry.entries()) {
      if (snap.kind !== 'directory') continue;
      snapshots++;
      for await (const [, file] of snap.entries()) {
        if (file.kind === 'file') bytes += (await file.getFile()).size;
      }
    }
    out.push({ repo: name.slice('models--'.length).replace(/--/g, '/'), folder: name, bytes, snapshots });
  }
  out.sort((a, b) => a.repo.localeCompare(b.repo));
  return out;
}

export async function remove(folder) {
  if (!folder.startsWith('models--')) throw new Error(`${folder}: not a cached model`);
  await (await root()).removeEntry(folder, { recursive: true });
}
