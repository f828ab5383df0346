//! The base PiSSA trains on, made while loading: a tensor source that reads each targeted linear
//! whole, decomposes it ([`crate::lora::init::pissa`]) and hands on the residual `W − s·B·A`
//! (in the checkpoint's precision, as PEFT casts it back), keeping the initial A and B. The
//! loader then quantizes the residual as it would the weight (QLoRA on PiSSA's residual, as
//! PEFT recommends), so no copy of the original model is kept.

use super::load::{is_decoder_linear, TensorSource};
use crate::error::{Error, Result};
use crate::io::safetensors::{from_f32, Dtype};
use crate::lora::init::{pissa, subtract};
use crate::lora::peft::{Adapter, HostLora};
use crate::lora::{LoraConfig, Targets};
use crate::quant::frozen::{bytes_to_words, StoredFloat};
use std::sync::Mutex;

pub struct PissaSource<'a> {
    inner: &'a dyn TensorSource,
    lora: LoraConfig,
    initial: Mutex<Vec<HostLora>>,
}

impl<'a> PissaSource<'a> {
    pub fn new(inner: &'a dyn TensorSource, lora: &LoraConfig) -> Self {
        PissaSource { inner, lora: lora.clone(), initial: Mutex::new(Vec::new()) }
    }

    /// The module of `name` when it is the weight of a linear the adapter targets (as
    /// `add_adapters` selects them: `all-linear` is every decoder linear, not lm_head).
    fn targeted<'n>(&self, name: &'n str, shape: &[usize]) -> Option<&'n str> {
        let module = name.strip_suffix(".weight")?;
        let linear = shape.len() == 2 && (is_decoder_linear(name) || module == "lm_head");
        let selected = match &self.lora.targets {
            Targets::AllLinear => module != "lm_head",
            t => t.matches(module),
        };
        (linear && selected).then_some(module)
    }

    fn residual(&self, module: &str, name: &str, shape: &[usize], mut w: Vec<f32>) -> Result<Vec<f32>> {
        let (out, inp, r, s) = (shape[0], shape[1], self.lora.r, self.lora.scaling());
        let (a, b) = pissa(&w, out, inp, r, s).map_err(|m| Error::tensor(self.inner.location(), name, format!("PiSSA: {m}")))?;
        let layer = HostLora { module: module.to_string(), a, a_shape: [r, inp], b, b_shape: [out, r], magnitude: None };
        subtract(&mut w, &layer, s);
        self.initial.lock().unwrap_or_else(|e| e.into_inner()).push(layer);
        Ok(w)
    }

    /// The adapter PiSSA starts from (to attach after `add_adapters`, and to subtract when the
    /// trained adapter is saved for the original base).
    pub fn initial(&self, base: &str) -> Adapter {
        let mut layers = std::mem::take(&mut *self.initial.lock().unwrap_or_else(|e| e.into_inner()));
        layers.sort_by(|a, b| a.module.cmp(&b.module));
        Adapter::in_memory(&self.lora, base, layers)
    }
}

impl TensorSource for PissaSource<'_> {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
    fn raw(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.inner.raw(name)
    }
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let w = self.inner.read(name, shape)?;
        match self.targeted(name, shape) {
            Some(module) => self.residual(module, name, shape, w),
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
        let w = self.residual(module, name, shape, w)?;
        let dtype = match format {
            StoredFloat::F32 => Dtype::F32,
            StoredFloat::BF16 => Dtype::BF16,
            StoredFloat::F16 => Dtype::F16,
        };
        Ok((format, bytes_to_words(&from_f32(dtype, &w).expect("a float dtype"))))
    }
}
