//! Opening a model the way every command does: a Hugging Face directory, a GGUF file or a Hub id, and
//! the default model (SmolLM2-135M-Instruct) when none is given.

use hone::io::gguf::Gguf;
use hone::io::{Dir, FileSource};
use hone::io::weights::Weights;
use hone::model::load::{build_placed, TensorSource};
use hone::model::{CausalLm, LoadOptions, Placement};
use indicatif::{ProgressBar, ProgressStyle};
use hone::ops::HoneBackend;
use std::path::{Path, PathBuf};

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `--model` (a path, or a Hub id resolved in the Hugging Face cache and downloaded when
/// missing), or the default model that `cargo xtask default-model` caches.
pub fn resolve(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(m) = model {
        return crate::hub::model_path(m);
    }
    let path = std::env::var_os("HONE_DEFAULT_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("HONE_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/tmp".into()).join(".cache/hone")
        });
        cache.join("models").join(DEFAULT_MODEL_FILE)
    });
    anyhow::ensure!(path.exists(), "no --model given and the default model is not in {} yet: run `cargo xtask default-model`", path.display());
    Ok(path)
}

/// An error naming the file when `path` is a GGUF file where a command needs a Hugging Face
/// directory (`why`: what the command does with the directory).
pub fn require_dir(path: &Path, why: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !is_gguf(path),
        "{}: a GGUF file, but {why}: give the Hugging Face directory the GGUF was made from (every other command reads GGUF files as they are)",
        path.display()
    );
    Ok(())
}

fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn open_gguf(path: &Path) -> anyhow::Result<Gguf> {
    Ok(Gguf::open(Box::new(FileSource::open(path)?))?)
}

/// The tokenizer, the chat template, and the ids that end a reply.
pub type Text = hone::model::ModelText;

pub fn text(path: &Path) -> anyhow::Result<Text> {
    Ok(if is_gguf(path) { Text::from_gguf(&open_gguf(path)?)? } else { Text::from_files(&Dir(path.to_path_buf()))? })
}

pub fn weights<B: HoneBackend>(path: &Path, options: LoadOptions, device: &B::Device) -> anyhow::Result<CausalLm<B>> {
    weights_placed(path, options, |layers| Ok(Placement::single(device.clone(), layers)))
}

/// As [`weights`], each part on the device `place` gives it (called with the model's layer
/// count once the config is read).
pub fn weights_placed<B: HoneBackend>(path: &Path, options: LoadOptions, place: impl FnOnce(usize) -> anyhow::Result<Placement<B::Device>>) -> anyhow::Result<CausalLm<B>> {
    Ok(weights_with_init(path, options, place, None)?.0)
}

/// As [`weights_placed`]; with `init` (the adapter's settings, PiSSA or LoftQ) the adapter's
/// start is computed from the checkpoint's weights while loading (for PiSSA the base is the
/// residual) and comes back with the model.
pub fn weights_with_init<B: HoneBackend>(
    path: &Path,
    options: LoadOptions,
    place: impl FnOnce(usize) -> anyhow::Result<Placement<B::Device>>,
    init: Option<&hone::lora::LoraConfig>,
) -> anyhow::Result<(CausalLm<B>, Option<hone::lora::peft::Adapter>)> {
    let mut initial = None;
    let (model, report) = if let Some(lora) = init {
        let name = format!("--init {}", lora.init.name());
        anyhow::ensure!(
            !is_gguf(path),
            "{}: {name} needs the original 16/32-bit weights, and a GGUF file holds llama.cpp's (mostly quantized) ones: give the Hugging Face directory",
            path.display()
        );
        let dir = Dir(path.to_path_buf());
        let config = hone::model::load::read_config(&dir)?;
        anyhow::ensure!(!config.bnb_nf4, "{}: {name} needs the original weights, and this checkpoint is already quantized", path.display());
        let placement = place(config.num_hidden_layers)?;
        let progress = Progress::new(Weights::open(&dir)?, &config);
        let source = hone::model::init_source::InitSource::new(&progress, lora, options.nf4)?;
        let built = build_placed::<B>(config, &source, options, &placement)?;
        if let Some((before, after)) = source.loftq_errors() {
            eprintln!("LoftQ: NF4's error on the adapted weights is {before:.3e} of ‖W‖; with the initial adapter {after:.3e}");
        }
        initial = Some(source.initial(&path.display().to_string()));
        built
    } else if is_gguf(path) {
        let g = open_gguf(path)?;
        let config = hone::model::gguf::config_from_gguf(&g)?;
        let placement = place(config.num_hidden_layers)?;
        let source = Progress::new(hone::model::gguf::GgufWeights { gguf: &g, config: &config }, &config);
        build_placed::<B>(config.clone(), &source, options, &placement)?
    } else {
        let dir = Dir(path.to_path_buf());
        let config = hone::model::load::read_config(&dir)?;
        let placement = place(config.num_hidden_layers)?;
        let source = Progress::new(Weights::open(&dir)?, &config);
        build_placed::<B>(config, &source, options, &placement)?
    };
    if let Some(e) = report.nf4_rel_error {
        eprintln!("NF4 adds {e:.2e} relative error over the stored weights (‖deq(NF4(W)) − W‖ / ‖W‖, decoder linears)");
    }
    Ok((model, initial))
}

/// A tensor source that moves a progress bar as weights are read (and quantized), one step per
/// decoder-linear weight.
struct Progress<S> {
    inner: S,
    bar: ProgressBar,
}

impl<S: TensorSource> Progress<S> {
    fn new(inner: S, config: &hone::model::Config) -> Self {
        let total = hone::train::plan::linear_shapes(config).len() as u64;
        let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) { ProgressBar::new(total) } else { ProgressBar::hidden() };
        bar.set_style(ProgressStyle::with_template("loading {bar:30} {pos}/{len} weights  {elapsed}").expect("template"));
        Progress { inner, bar }
    }
    fn tick(&self, name: &str) {
        if hone::model::load::is_decoder_linear(name) {
            self.bar.inc(1);
        }
    }
}

impl<S> Drop for Progress<S> {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

impl<S: TensorSource> TensorSource for Progress<S> {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
    fn names(&self) -> Vec<String> {
        self.inner.names()
    }
    fn file_of(&self, name: &str) -> String {
        self.inner.file_of(name)
    }
    fn stored_name(&self, name: &str) -> String {
        self.inner.stored_name(name)
    }
    fn read(&self, name: &str, shape: &[usize]) -> hone::Result<Vec<f32>> {
        let out = self.inner.read(name, shape);
        self.tick(name);
        out
    }
    fn raw(&self, name: &str) -> hone::Result<Option<Vec<u8>>> {
        self.inner.raw(name)
    }
    fn read_packed(&self, name: &str, shape: &[usize]) -> hone::Result<(hone::quant::frozen::StoredFloat, Vec<i32>)> {
        self.inner.read_packed(name, shape)
    }
    fn read_chunks(&self, name: &str, shape: &[usize], chunk: usize, f: &mut dyn FnMut(&[f32]) -> hone::Result<()>) -> hone::Result<()> {
        let out = self.inner.read_chunks(name, shape, chunk, f);
        self.tick(name);
        out
    }
}
