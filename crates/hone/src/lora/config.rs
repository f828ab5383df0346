//! Which layers get adapters, with what rank and scale, and their seeded initialisation
//! (PEFT's defaults: A kaiming-uniform with a = √5, i.e. U(±1/√in); B zeros).

use super::linear::Lora;
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand_chacha::rand_core::{RngCore, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Module names, matched as PEFT does: the whole name or its last dotted components.
    List(Vec<String>),
    /// A regular expression that must match the whole module name.
    Regex(String),
    /// Every linear layer of the decoder (not lm_head).
    AllLinear,
}

impl Targets {
    /// `all-linear`, a comma-separated list, or (if it has regex characters) a regex.
    pub fn parse(s: &str) -> Self {
        if s == "all-linear" {
            Targets::AllLinear
        } else if s.chars().any(|c| "*+?()[]|^$\\".contains(c)) {
            Targets::Regex(s.to_string())
        } else {
            Targets::List(s.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect())
        }
    }

    pub fn matches(&self, module: &str) -> bool {
        match self {
            Targets::AllLinear => true,
            Targets::List(list) => list.iter().any(|t| module == t || module.ends_with(&format!(".{t}"))),
            Targets::Regex(re) => regex_matches(re, module),
        }
    }
}

/// Whether `re` matches the whole of `module`. Each pattern is compiled once per process: a
/// model's every linear asks, and compiling is most of the cost.
fn regex_matches(re: &str, module: &str) -> bool {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static COMPILED: OnceLock<Mutex<HashMap<String, Option<regex::Regex>>>> = OnceLock::new();
    let mut compiled = COMPILED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let r = compiled.entry(re.to_string()).or_insert_with(|| regex::Regex::new(&format!("^(?:{re})$")).ok());
    r.as_ref().is_some_and(|r| r.is_match(module))
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Targets,
    pub use_rslora: bool,
    /// DoRA (PEFT's `use_dora`): a trained magnitude per output row besides A and B.
    pub use_dora: bool,
    /// How fresh adapters start (PiSSA's A and B are set while loading; see lora::init).
    pub init: super::init::Init,
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { r: 16, alpha: 32.0, dropout: 0.05, targets: Targets::AllLinear, use_rslora: false, use_dora: false, init: super::init::Init::Default, seed: 42 }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// A fresh adapter for a `[out, in]` layer. Each layer draws from its own stream (seed and
    /// layer index), so adding a target does not change the others' initial values.
    pub fn init<B: Backend>(&self, layer_index: u64, out_features: usize, in_features: usize, device: &B::Device) -> Lora<B> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(layer_index);
        let bound = 1.0 / (in_features as f64).sqrt();
        let a: Vec<f32> = (0..self.r * in_features)
            .map(|_| {
                let u = (rng.next_u32() >> 8) as f64 / (1u32 << 24) as f64;
                ((2.0 * u - 1.0) * bound) as f32
            })
            .collect();
        Lora {
            lora_a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [self.r, in_features]), device)),
            lora_b: Param::from_tensor(Tensor::zeros([out_features, self.r], device)),
            scaling: self.scaling(),
            dropout: self.dropout,
            dora: None,
        }
    }
}
