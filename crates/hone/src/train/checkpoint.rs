//! Checkpoints: the adapter (PEFT's two files), the optimizer's moments (f32 `exp_avg`/`exp_avg_sq`
//! as torch names them, or 8-bit `state1`/`absmax1`/`state2`/`absmax2` as bitsandbytes does),
//! where training is (`trainer_state.json`: step, epoch, data position, the settings, and a DPO
//! run's reference log-probabilities), and `checksums.json`: every other file's length and
//! SHA-256, so that a corrupted or cut-short checkpoint is refused by name instead of resumed.
//! Dropout and data order derive from (seed, step) and (seed, epoch), so no RNG state needs saving.
//!
//! Natively a checkpoint directory holds two slots, `a` and `b`, as the page's OPFS does: each
//! save replaces the older slot (written to a temporary directory, then renamed), so a kill or a
//! full disk at any moment leaves the newer one whole, and a resume takes the newest slot whose
//! checksums hold, falling back to the other.

use super::preference::PairLogps;
use super::trainer::{TrainConfig, TrainState};
#[cfg(not(target_arch = "wasm32"))]
use super::trainer::Trainer;
use crate::error::{Error, Result};
use super::adamw8bit::HostInt8Moments;
use super::optim::{HostMoments, SavedMoments};
use crate::io::safetensors::{write_tensors, Dtype, SafeTensors};
use crate::io::FileSet;
use crate::lora::peft::{Adapter, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
#[cfg(not(target_arch = "wasm32"))]
use crate::ops::HoneBackend;
#[cfg(not(target_arch = "wasm32"))]
use burn::tensor::backend::AutodiffBackend;
#[cfg(not(target_arch = "wasm32"))]
use std::path::Path;

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
pub const CHECKSUMS_FILE: &str = "checksums.json";
/// The best evaluation's adapter weights (its config is the checkpoint's adapter_config.json).
pub const BEST_WEIGHTS_FILE: &str = "best_adapter_model.safetensors";
/// The two slots of a native checkpoint directory.
pub const SLOTS: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SavedState {
    pub state: TrainState,
    pub config: TrainConfig,
    /// The base model the adapter belongs to (as given by the user).
    pub base_model: String,
    /// Best evaluation loss so far and its step, for early stopping.
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<usize>,
    pub evals_without_improvement: usize,
    /// DPO: the reference log-probabilities of every training pair, from the model the run
    /// started from, so that a resumed run uses the same ones without recomputing them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference_logps: Vec<PairLogps>,
}

#[cfg(not(target_arch = "wasm32"))]
/// Writes `files` (name → bytes) as the directory `dir`, atomically replacing any previous one.
pub fn write_dir_atomic(dir: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    let name = dir.display().to_string();
    let file_name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let old = dir.with_file_name(format!(".{file_name}.old-{}", std::process::id()));
    // What a killed process left of its own write: never read, so removed.
    if let Ok(entries) = std::fs::read_dir(dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with(&format!(".{file_name}.tmp-")) || n.starts_with(&format!(".{file_name}.old-")) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(tmp.display(), e))?;
    for (f, bytes) in files {
        let path = tmp.join(f);
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&path)?;
            file.write_all(bytes)?;
            file.sync_all()
        };
        write().map_err(|e| Error::io(path.display(), e))?;
    }
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| Error::io(&name, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(&name, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The files of a PEFT adapter directory.
pub fn adapter_files(adapter: &Adapter) -> Vec<(&'static str, Vec<u8>)> {
    vec![(ADAPTER_CONFIG_FILE, adapter.config_json()), (ADAPTER_WEIGHTS_FILE, adapter.weights_bytes())]
}

/// A checkpoint's files (name → bytes), the same natively and in the browser's OPFS. `best`:
/// the adapter of the best evaluation so far, when it is not this one (kept so that a resumed
/// run ends with the adapter an uninterrupted one keeps).
pub fn checkpoint_files(adapter: &Adapter, best: Option<&Adapter>, moments: Vec<SavedMoments>, saved: &SavedState) -> Vec<(&'static str, Vec<u8>)> {
    let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for s in moments {
        let k = &s.name;
        match s.moments {
            HostMoments::F32 { exp_avg, exp_avg_sq } => {
                tensors.push((format!("{k}.exp_avg"), Dtype::F32, s.shape.to_vec(), f32_bytes(&exp_avg)));
                tensors.push((format!("{k}.exp_avg_sq"), Dtype::F32, s.shape.to_vec(), f32_bytes(&exp_avg_sq)));
            }
            HostMoments::Int8(h) => {
                tensors.push((format!("{k}.state1"), Dtype::U8, s.shape.to_vec(), h.state1));
                tensors.push((format!("{k}.state2"), Dtype::U8, s.shape.to_vec(), h.state2));
                tensors.push((format!("{k}.absmax1"), Dtype::F32, vec![h.absmax1.len()], f32_bytes(&h.absmax1)));
                tensors.push((format!("{k}.absmax2"), Dtype::F32, vec![h.absmax2.len()], f32_bytes(&h.absmax2)));
            }
        }
    }
    let refs: Vec<(&str, Dtype, &[usize], &[u8])> = tensors.iter().map(|(n, d, s, v)| (n.as_str(), *d, s.as_slice(), v.as_slice())).collect();
    let mut files = adapter_files(adapter);
    if let Some(best) = best {
        files.push((BEST_WEIGHTS_FILE, best.weights_bytes()));
    }
    files.push((OPTIMIZER_FILE, write_tensors(&refs, &Default::default())));
    files.push((STATE_FILE, serde_json::to_vec_pretty(saved).expect("json")));
    let sums = checksums(&files);
    files.push((CHECKSUMS_FILE, sums));
    files
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// `checksums.json`: each file's length and SHA-256, by name (sorted).
fn checksums(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let map: std::collections::BTreeMap<&str, serde_json::Value> =
        files.iter().map(|(name, bytes)| (*name, serde_json::json!({"bytes": bytes.len(), "sha256": sha256_hex(bytes)}))).collect();
    let mut out = serde_json::to_vec_pretty(&map).expect("json");
    out.push(b'\n');
    out
}

/// Checks every file `checksums.json` lists: present, of its length, with its SHA-256. Each
/// failure names the file.
pub fn verify(files: &dyn FileSet) -> Result<()> {
    let src = files.open(CHECKSUMS_FILE)?.ok_or_else(|| Error::format(format!("{}/{CHECKSUMS_FILE}", files.location()), "missing: not a complete checkpoint"))?;
    let listed: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&src.read_all()?).map_err(|e| Error::format(src.name(), format!("invalid: {e}")))?;
    for name in [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE] {
        if !listed.contains_key(name) {
            return Err(Error::format(src.name(), format!("does not list {name}")));
        }
    }
    for (name, want) in &listed {
        let (bytes, sha) = (want["bytes"].as_u64(), want["sha256"].as_str());
        let (Some(bytes), Some(sha)) = (bytes, sha) else {
            return Err(Error::format(src.name(), format!("entry for {name} needs `bytes` and `sha256`")));
        };
        let file = files.open(name)?.ok_or_else(|| Error::io(format!("{}/{name}", files.location()), "missing from the checkpoint"))?;
        if file.len() != bytes {
            return Err(Error::format(file.name(), format!("{} bytes where the checkpoint wrote {bytes}: cut short or changed", file.len())));
        }
        if sha256_hex(&file.read_all()?) != sha {
            return Err(Error::format(file.name(), "SHA-256 differs from the one the checkpoint wrote: the file is corrupted"));
        }
    }
    Ok(())
}

/// Saves the trainer's checkpoint into `dir`'s older slot (see the module doc).
#[cfg(not(target_arch = "wasm32"))]
pub fn save<B: AutodiffBackend + HoneBackend>(dir: &Path, trainer: &Trainer<B>, saved: &SavedState, best: Option<&Adapter>) -> Result<()>
where
    B::InnerBackend: HoneBackend,
{
    let adapter = trainer.adapter(&saved.base_model);
    save_files(dir, &checkpoint_files(&adapter, best, trainer.optimizer_state(), saved))
}

/// Writes a checkpoint's files into the slot of `dir` that does not hold the newest whole
/// checkpoint; the other slot is not touched.
#[cfg(not(target_arch = "wasm32"))]
pub fn save_files(dir: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
    // The older slot, by step (a slot a kill left half-deleted still says its older step).
    let slot = match slots_newest_first(dir).first() {
        Some(&(s, _)) if s == SLOTS[0] => SLOTS[1],
        _ => SLOTS[0],
    };
    let path = dir.join(slot);
    if path.exists() {
        std::fs::remove_dir_all(&path).map_err(|e| Error::io(path.display(), e))?;
    }
    write_dir_atomic(&path, files)?;
    // The rename into place is durable only once the directory holding it is synced.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Whether `dir` holds a checkpoint (a slot, or the older one-slot layout), not just what a
/// kill left of a first save.
#[cfg(not(target_arch = "wasm32"))]
pub fn exists(dir: &Path) -> bool {
    dir.join(STATE_FILE).is_file() || !slots_newest_first(dir).is_empty()
}

/// The step of the newest slot of `dir` whose checksums hold, without touching anything (for
/// messages; `load` also sets a damaged slot aside).
#[cfg(not(target_arch = "wasm32"))]
pub fn newest_whole_step(dir: &Path) -> Option<usize> {
    slots_newest_first(dir).into_iter().find(|(slot, _)| verify(&crate::io::Dir(dir.join(slot))).is_ok()).map(|(_, step)| step)
}

/// The slots of `dir` that hold a `trainer_state.json`, newest step first.
#[cfg(not(target_arch = "wasm32"))]
fn slots_newest_first(dir: &Path) -> Vec<(&'static str, usize)> {
    let step = |slot: &str| -> Option<usize> {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(slot).join(STATE_FILE)).ok()?).ok()?;
        v["state"]["step"].as_u64().map(|s| s as usize)
    };
    let mut found: Vec<(&'static str, usize)> = SLOTS.iter().filter_map(|s| step(s).map(|n| (*s, n))).collect();
    found.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    found
}

pub struct Loaded {
    pub adapter: Adapter,
    /// The best evaluation's adapter, when the checkpoint keeps one.
    pub best: Option<Adapter>,
    pub moments: Vec<SavedMoments>,
    pub saved: SavedState,
}

/// A file set with one file read under another name (the best adapter's weights as
/// `adapter_model.safetensors`).
struct Renamed<'a> {
    files: &'a dyn FileSet,
    name: &'static str,
    as_name: &'static str,
}

impl FileSet for Renamed<'_> {
    fn open(&self, name: &str) -> Result<Option<Box<dyn crate::io::ByteSource>>> {
        self.files.open(if name == self.as_name { self.name } else { name })
    }
    fn location(&self) -> String {
        self.files.location()
    }
}

/// The newest slot of `dir` whose checksums hold; a newer one that fails them is skipped with
/// a warning naming the fault. A directory of the older one-slot layout (the files themselves,
/// no checksums) is read as it is.
#[cfg(not(target_arch = "wasm32"))]
pub fn load(dir: &Path) -> Result<Loaded> {
    if dir.join(STATE_FILE).is_file() {
        return read_unverified(&crate::io::Dir(dir.to_path_buf()));
    }
    let slots = slots_newest_first(dir);
    if slots.is_empty() {
        return Err(Error::io(dir.display(), "no checkpoint here (neither slot holds a trainer_state.json)"));
    }
    let mut faults = Vec::new();
    for (slot, step) in slots {
        match read(&crate::io::Dir(dir.join(slot))) {
            Ok(loaded) => {
                // A damaged slot is set aside (SLOT.damaged), so that the next save does not
                // replace the whole one that this run resumes from.
                for (damaged, fault) in &faults {
                    let aside = dir.join(format!("{damaged}.damaged"));
                    let _ = std::fs::remove_dir_all(&aside);
                    let moved = std::fs::rename(dir.join(damaged), &aside).is_ok();
                    eprintln!("warning: skipped a damaged checkpoint: {fault}; resuming from the one at step {step}{}", if moved { format!(" (the damaged one is now {})", aside.display()) } else { String::new() });
                }
                return Ok(loaded);
            }
            Err(e) => faults.push((slot, format!("step {step}: {e}"))),
        }
    }
    let faults: Vec<String> = faults.into_iter().map(|(_, f)| f).collect();
    Err(Error::format(dir.display(), format!("no whole checkpoint: {}", faults.join("; "))))
}

/// A checkpoint from its files, wherever they are, after checking them against its
/// `checksums.json`.
pub fn read(files: &dyn FileSet) -> Result<Loaded> {
    verify(files)?;
    read_unverified(files)
}

fn read_unverified(files: &dyn FileSet) -> Result<Loaded> {
    let adapter = Adapter::read_unconverted(files)?;
    let best = match files.open(BEST_WEIGHTS_FILE)? {
        Some(_) => Some(Adapter::read_unconverted(&Renamed { files, name: BEST_WEIGHTS_FILE, as_name: ADAPTER_WEIGHTS_FILE })?),
        None => None,
    };
    let state_src = files.open_required(STATE_FILE)?;
    let saved: SavedState = serde_json::from_slice(&state_src.read_all()?).map_err(|e| Error::format(state_src.name(), e))?;
    let st = SafeTensors::open(files.open_required(OPTIMIZER_FILE)?)?;
    let mut moments = Vec::new();
    let two_d = |name: &str, shape: Vec<usize>| -> Result<[usize; 2]> { shape.try_into().map_err(|_| Error::tensor(st.name(), name, "not 2-D")) };
    for name in st.tensors().keys() {
        if let Some(base) = name.strip_suffix(".exp_avg") {
            let (shape, m) = st.read_f32(name)?;
            let (_, v) = st.read_f32(&format!("{base}.exp_avg_sq"))?;
            moments.push(SavedMoments { name: base.to_string(), shape: two_d(name, shape)?, moments: HostMoments::F32 { exp_avg: m, exp_avg_sq: v } });
        } else if let Some(base) = name.strip_suffix(".state1") {
            let codes = |n: &str| -> Result<(Vec<usize>, Vec<u8>)> {
                let (info, bytes) = st.read_raw(n)?;
                if info.dtype != Dtype::U8 {
                    return Err(Error::tensor(st.name(), n, format!("8-bit optimizer state must be U8, found {}", info.dtype.name())));
                }
                Ok((info.shape, bytes))
            };
            let (shape, state1) = codes(name)?;
            let (_, state2) = codes(&format!("{base}.state2"))?;
            let (_, absmax1) = st.read_f32(&format!("{base}.absmax1"))?;
            let (_, absmax2) = st.read_f32(&format!("{base}.absmax2"))?;
            let shape = two_d(name, shape)?;
            let blocks = (shape[0] * shape[1]).div_ceil(super::adamw8bit::BLOCK);
            if absmax1.len() != blocks || absmax2.len() != blocks || state2.len() != state1.len() {
                return Err(Error::tensor(st.name(), name, format!("8-bit state of {shape:?} needs {blocks} absmax values per moment")));
            }
            moments.push(SavedMoments { name: base.to_string(), shape, moments: HostMoments::Int8(HostInt8Moments { state1, absmax1, state2, absmax2 }) });
        }
    }
    Ok(Loaded { adapter, best, moments, saved })
}
