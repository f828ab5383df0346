//! Adapters that start from the weights, made while loading: a tensor source that reads each
//! targeted linear whole, computes the adapter's start from it and keeps it, and hands the
//! loader the base to build.
//! - PiSSA ([`crate::lora::init::pissa`]): the base handed on is the residual `W − s·B·A` (in the
//!   checkpoint's precision, as PEFT casts it back), then quantized as the weight would be (QLoRA
//!   on PiSSA's residual, as PEFT recommends).
//! - LoftQ ([`crate::lora::init::loftq`]): A and B from the error of the NF4 quantization the
//!   loader is about to make, the base handed on unchanged (so it stays `NF4(W)`).
//!
//! No copy of the original model is kept: one linear at a time.

use super::load::{is_decoder_linear, Nf4Options, TensorSource};
use crate::error::{Error, Result};
use crate::io::safetensors::{from_f32, Dtype};
use crate::lora::init::{loftq, pissa, subtract, Init};
use crate::lora::peft::{Adapter, HostLora};
use crate::lora::{LoraConfig, Targets};
use crate::quant::frozen::{bytes_to_words, StoredFloat};
use std::sync::Mutex;

pub struct InitSource<'a> {
    inner: &'a dyn TensorSource,
    lora: LoraConfig,
    nf4: Option<Nf4Options>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    initial: Vec<HostLora>,
    /// LoftQ: Σ‖W‖², Σ‖W − deq(NF4(W))‖², Σ‖W − deq(NF4(W)) − s·B·A‖² over the targeted linears.
    sums: [f64; 3],
}

impl<'a> InitSource<'a> {
    /// `lora.init` says which start; LoftQ needs the NF4 settings the loader quantizes with.
    pub fn new(inner: &'a dyn TensorSource, lora: &LoraConfig, nf4: Option<Nf4Options>) -> Result<Self> {
        match lora.init {
            Init::Default => return Err(Error::unsupported(inner.location(), "a weight-derived start for PEFT's default initialisation")),
            Init::Loftq if nf4.is_none() => {
                return Err(Error::unsupported(inner.location(), "LoftQ without an NF4 base: it starts the adapter from the quantization error (use --quantize nf4)"))
            }
            _ => {}
        }
        Ok(InitSource { inner, lora: lora.clone(), nf4, state: Mutex::new(State::default()) })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The module of `name` when it is the weight of a linear the adapter targets (as
    /// `add_adapters` selects them: `all-linear` is every decoder linear, not lm_head). LoftQ
    /// starts only the linears the loader quantizes (PEFT's, only its `Linear4bit`s): a
    /// targeted lm_head keeps PEFT's default start.
    fn targeted<'n>(&self, name: &'n str, shape: &[usize]) -> Option<&'n str> {
        let module = name.strip_suffix(".weight")?;
        let quantized_only = self.lora.init == Init::Loftq;
        let linear = shape.len() == 2 && (is_decoder_linear(name) || (module == "lm_head" && !quantized_only));
        let selected = match &self.lora.targets {
            Targets::AllLinear => module != "lm_head",
            t => t.matches(module),
        };
        (linear && selected).then_some(module)
    }

    /// The base to build for a targeted weight `w`, keeping the adapter's start.
    fn adapt(&self, module: &str, name: &str, shape: &[usize], mut w: Vec<f32>) -> Result<Vec<f32>> {
        let (out, inp, r, s) = (shape[0], shape[1], self.lora.r, self.lora.scaling());
        let fail = |m: String| Error::tensor(self.inner.location(), name, m);
        let layer = |(a, b)| HostLora { module: module.to_string(), a, a_shape: [r, inp], b, b_shape: [out, r], magnitude: None };
        let layer = match self.lora.init {
            Init::Pissa => {
                let layer = layer(pissa(&w, out, inp, r, s).map_err(|m| fail(format!("PiSSA: {m}")))?);
                subtract(&mut w, &layer, s);
                layer
            }
            Init::Loftq => {
                let o = self.nf4.expect("checked in new");
                let (ab, residual) = loftq(&w, shape, r, o.blocksize, o.double_quant).map_err(|m| fail(format!("LoftQ: {m}")))?;
                let layer = layer(ab);
                let left: f64 = residual.iter().zip(layer.delta(s)).map(|(e, d)| f64::from(e - d).powi(2)).sum();
                let mut st = self.state();
                st.sums[0] += w.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>();
                st.sums[1] += residual.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>();
                st.sums[2] += left;
                layer
            }
            Init::Default => unreachable!("refused in new"),
        };
        self.state().initial.push(layer);
        Ok(w)
    }

    /// The adapter the run starts from (to attach after `add_adapters`; for PiSSA also to
    /// subtract when the trained adapter is saved for the original base).
    pub fn initial(&self, base: &str) -> Adapter {
        let mut layers = std::mem::take(&mut self.state().initial);
        layers.sort_by(|a, b| a.module.cmp(&b.module));
        Adapter::in_memory(&self.lora, base, layers)
    }

    /// LoftQ: the NF4 error relative to the targeted weights, `‖W − deq(NF4(W))‖ / ‖W‖`, and what
    /// is left of it once the initial adapter is added, `‖W − deq(NF4(W)) − s·B·A‖ / ‖W‖`.
    pub fn loftq_errors(&self) -> Option<(f64, f64)> {
        let [w, before, after] = self.state().sums;
        (self.lora.init == Init::Loftq && w > 0.0).then(|| ((before / w).sqrt(), (after / w).sqrt()))
    }
}

/// A Hugging Face folder loaded with the adapter's start computed from its weights (`lora.init`
/// PiSSA or LoftQ): the model and the initial adapter, to attach after `add_adapters`.
pub fn load_with_init<B: crate::ops::HoneBackend>(files: &dyn crate::io::FileSet, options: super::LoadOptions, lora: &LoraConfig, base: &str, device: &B::Device) -> Result<(super::CausalLm<B>, Adapter)> {
    let config = super::load::read_config(files)?;
    if config.bnb_nf4 {
        return Err(Error::unsupported(files.location(), format!("--init {}: the checkpoint is already quantized; the start needs the original weights", lora.init.name())));
    }
    let weights = crate::io::weights::Weights::open(files)?;
    let source = InitSource::new(&weights, lora, options.nf4)?;
    let model = super::load::build(config, &source, options, device)?;
    Ok((model, source.initial(base)))
}

impl TensorSource for InitSource<'_> {
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
    fn raw(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.inner.raw(name)
    }
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let w = self.inner.read(name, shape)?;
        match self.targeted(name, shape) {
            Some(module) => self.adapt(module, name, shape, w),
            None => Ok(w),
        }
    }
    fn read_chunks(&self, name: &str, shape: &[usize], chunk: usize, f: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
        match self.targeted(name, shape) {
            Some(_) => f(&self.read(name, shape)?),
            None => self.inner.read_chunks(name, shape, chunk, f),
        }
    }
    fn read_packed(&self, name: &str, shape: &[usize]) -> Result<(StoredFloat, Vec<i32>)> {
        let (format, words) = self.inner.read_packed(name, shape)?;
        let Some(module) = self.targeted(name, shape) else { return Ok((format, words)) };
        let mut w = vec![0f32; shape.iter().product()];
        format.decode_words(&words, &mut w);
        let w = self.adapt(module, name, shape, w)?;
        if self.lora.init == Init::Loftq {
            return Ok((format, words));
        }
        let dtype = match format {
            StoredFloat::F32 => Dtype::F32,
            StoredFloat::BF16 => Dtype::BF16,
            StoredFloat::F16 => Dtype::F16,
        };
        Ok((format, bytes_to_words(&from_f32(dtype, &w).expect("a float dtype"))))
    }
}
