//! Checkpoints: the adapter (PEFT's two files), the optimizer's moments, and where training is
//! (`trainer_state.json`: step, epoch, data position, and the settings). Written to a temporary
//! directory and renamed into place, so a kill at any moment leaves the previous checkpoint
//! whole. Dropout and data order derive from (seed, step) and (seed, epoch), so no RNG state
//! needs saving.

use super::trainer::{TrainConfig, TrainState};
#[cfg(not(target_arch = "wasm32"))]
use super::trainer::Trainer;
use crate::error::{Error, Result};
use crate::io::safetensors::{write_f32, SafeTensors};
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
pub fn checkpoint_files(adapter: &Adapter, moments: Vec<(String, [usize; 2], Vec<f32>, Vec<f32>)>, saved: &SavedState) -> Vec<(&'static str, Vec<u8>)> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (k, shape, m, v) in moments {
        tensors.push((format!("{k}.exp_avg"), shape.to_vec(), m));
        tensors.push((format!("{k}.exp_avg_sq"), shape.to_vec(), v));
    }
    let refs: Vec<(&str, &[usize], &[f32])> = tensors.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice())).collect();
    let mut files = adapter_files(adapter);
    files.push((OPTIMIZER_FILE, write_f32(&refs, &Default::default())));
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
    pub moments: Vec<(String, [usize; 2], Vec<f32>, Vec<f32>)>,
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
    for name in st.tensors().keys() {
        let Some(base) = name.strip_suffix(".exp_avg") else { continue };
        let (shape, m) = st.read_f32(name)?;
        let (_, v) = st.read_f32(&format!("{base}.exp_avg_sq"))?;
        let shape: [usize; 2] = shape.try_into().map_err(|_| Error::tensor(st.name(), name, "not 2-D"))?;
        moments.push((base.to_string(), shape, m, v));
    }
    Ok(Loaded { adapter, moments, saved })
}
