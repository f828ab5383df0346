//! Checkpoints: the adapter (PEFT's two files), the optimizer's moments (f32 `exp_avg`/`exp_avg_sq`
//! as torch names them, or 8-bit `state1`/`absmax1`/`state2`/`absmax2` as bitsandbytes does),
//! and where training is
//! (`trainer_state.json`: step, epoch, data position, the settings, and a DPO run's reference
//! log-probabilities). Written to a temporary
//! directory and renamed into place, so a kill at any moment leaves the previous checkpoint
//! whole. Dropout and data order derive from (seed, step) and (seed, epoch), so no RNG state
//! needs saving.

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
    let _ = std::fs::remove_dir_all(&tmp);
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

/// A checkpoint's files (name → bytes), the same natively and in the browser's OPFS.
pub fn checkpoint_files(adapter: &Adapter, moments: Vec<SavedMoments>, saved: &SavedState) -> Vec<(&'static str, Vec<u8>)> {
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
    files.push((OPTIMIZER_FILE, write_tensors(&refs, &Default::default())));
    files.push((STATE_FILE, serde_json::to_vec_pretty(saved).expect("json")));
    files
}

#[cfg(not(target_arch = "wasm32"))]
pub fn save<B: AutodiffBackend + HoneBackend>(dir: &Path, trainer: &Trainer<B>, saved: &SavedState) -> Result<()>
where
    B::InnerBackend: HoneBackend,
{
    let adapter = trainer.adapter(&saved.base_model);
    write_dir_atomic(dir, &checkpoint_files(&adapter, trainer.optimizer_state(), saved))
}

pub struct Loaded {
    pub adapter: Adapter,
    pub moments: Vec<SavedMoments>,
    pub saved: SavedState,
}

#[cfg(not(target_arch = "wasm32"))]
pub fn load(dir: &Path) -> Result<Loaded> {
    read(&crate::io::Dir(dir.to_path_buf()))
}

/// A checkpoint from its files, wherever they are.
pub fn read(files: &dyn FileSet) -> Result<Loaded> {
    let adapter = Adapter::read(files)?;
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
    Ok(Loaded { adapter, moments, saved })
}
