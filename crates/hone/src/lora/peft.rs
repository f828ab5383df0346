//! PEFT's adapter files: `adapter_config.json` and `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`, and for
//! DoRA (`use_dora`) `.lora_magnitude_vector` `[out]`.
//! Writing is deterministic (sorted keys and fields), so the same tensors give the same bytes
//! on every target; reading accepts F32 and BF16 adapters trained elsewhere.

use super::config::{LoraConfig, Targets};
use super::linear::{Lora, LoraLinear, MAGNITUDE};
use crate::error::{Error, Result};
use crate::io::safetensors::{write_f32, SafeTensors};
use crate::io::FileSet;
use crate::ops::HoneBackend;
use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use std::collections::{BTreeMap, BTreeSet};

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// PEFT saves DoRA's magnitude without its module's `.weight`.
fn magnitude_key(module: &str) -> String {
    format!("{PREFIX}{module}.{MAGNITUDE}")
}

/// One adapted layer's tensors on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLora {
    pub module: String,
    pub a: Vec<f32>,
    pub a_shape: [usize; 2],
    pub b: Vec<f32>,
    pub b_shape: [usize; 2],
    /// DoRA's magnitude `[out]`.
    pub magnitude: Option<Vec<f32>>,
}

impl HostLora {
    /// `s·(B·A)` `[out, in]` in f32. The product accumulates over the rank with one fused
    /// multiply-add per step, in rank order, as the f32 GEMM kernels PyTorch calls do, and is then
    /// scaled: PEFT's `(B @ A) * scaling`.
    pub fn delta(&self, scaling: f64) -> Vec<f32> {
        let [out, r] = self.b_shape;
        let inp = self.a_shape[1];
        let s = scaling as f32;
        let mut d = vec![0f32; out * inp];
        for i in 0..out {
            for j in 0..inp {
                let mut acc = 0f32;
                for k in 0..r {
                    acc = self.b[i * r + k].mul_add(self.a[k * inp + j], acc);
                }
                d[i * inp + j] = acc * s;
            }
        }
        d
    }
}

/// An adapter as read from (or about to be written to) PEFT's files.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    /// DoRA: every layer has a magnitude.
    pub use_dora: bool,
    /// An unconverted PiSSA adapter (`init_lora_weights = "pissa"`): it applies to PiSSA's
    /// residual base, not to the checkpoint's weights.
    pub pissa: bool,
    pub base_model_name_or_path: String,
    pub layers: Vec<HostLora>,
    /// Where the tensors came from, for messages.
    pub source: String,
}

impl Adapter {
    pub fn scaling(&self) -> f64 {
        LoraConfig { r: self.r, alpha: self.alpha, use_rslora: self.use_rslora, ..Default::default() }.scaling()
    }

    /// `adapter_config.json`, with the fields PEFT writes (sorted, two-space indent).
    pub fn config_json(&self) -> Vec<u8> {
        let targets: BTreeSet<&str> = self.layers.iter().map(|l| l.module.rsplit('.').next().unwrap_or(&l.module)).collect();
        let alpha = if self.alpha.fract() == 0.0 { serde_json::json!(self.alpha as i64) } else { serde_json::json!(self.alpha) };
        let cfg = serde_json::json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "corda_config": null,
            "ensure_weight_tying": false,
            "eva_config": null,
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": if self.pissa { serde_json::json!("pissa") } else { serde_json::json!(true) },
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": alpha,
            "lora_bias": false,
            "lora_dropout": self.dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "peft_type": "LORA",
            "qalora_group_size": 16,
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": targets,
            "target_parameters": null,
            "task_type": "CAUSAL_LM",
            "trainable_token_indices": null,
            "use_dora": self.use_dora,
            "use_qalora": false,
            "use_rslora": self.use_rslora,
        });
        let mut out = serde_json::to_vec_pretty(&cfg).expect("json");
        out.push(b'\n');
        out
    }

    /// `adapter_model.safetensors` bytes (F32, metadata {"format": "pt"}).
    pub fn weights_bytes(&self) -> Vec<u8> {
        let names: Vec<[String; 3]> = self
            .layers
            .iter()
            .map(|l| [format!("{PREFIX}{}.lora_A.weight", l.module), format!("{PREFIX}{}.lora_B.weight", l.module), magnitude_key(&l.module)])
            .collect();
        let out_shapes: Vec<[usize; 1]> = self.layers.iter().map(|l| [l.b_shape[0]]).collect();
        let mut tensors: Vec<(&str, &[usize], &[f32])> = Vec::new();
        for ((l, [a, b, m]), out) in self.layers.iter().zip(&names).zip(&out_shapes) {
            tensors.push((a, &l.a_shape, &l.a));
            tensors.push((b, &l.b_shape, &l.b));
            if let Some(mag) = &l.magnitude {
                tensors.push((m, out, mag));
            }
        }
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_f32(&tensors, &meta)
    }

    /// Reads PEFT's two files, for the base they name: an unconverted PiSSA adapter is refused
    /// (it belongs on PiSSA's residual of the base; PEFT recomputes that, hone converts instead).
    pub fn read(files: &dyn FileSet) -> Result<Self> {
        let adapter = Self::read_unconverted(files)?;
        if adapter.pissa {
            return Err(Error::unsupported(
                ADAPTER_CONFIG_FILE,
                "an unconverted PiSSA adapter (`init_lora_weights` = \"pissa\"): it applies to PiSSA's residual of the base, not to the base; convert it first (PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)`; `hone train --init pissa` saves it converted)",
            ));
        }
        Ok(adapter)
    }

    /// As [`Adapter::read`], PiSSA's unconverted adapters included (a checkpoint of a PiSSA run,
    /// or one to convert).
    pub fn read_unconverted(files: &dyn FileSet) -> Result<Self> {
        let cfg_src = files.open_required(ADAPTER_CONFIG_FILE)?;
        let file = cfg_src.name().to_string();
        let cfg: serde_json::Value =
            serde_json::from_slice(&cfg_src.read_all()?).map_err(|e| Error::format(&file, format!("invalid JSON: {e}")))?;
        if cfg.get("peft_type").and_then(|v| v.as_str()) != Some("LORA") {
            return Err(Error::unsupported(&file, "not a LoRA adapter (peft_type must be \"LORA\")"));
        }
        if cfg.get("fan_in_fan_out").and_then(|v| v.as_bool()) == Some(true) {
            return Err(Error::unsupported(&file, "fan_in_fan_out adapters"));
        }
        let use_dora = cfg.get("use_dora").and_then(|v| v.as_bool()) == Some(true);
        let pissa = cfg.get("init_lora_weights").and_then(|v| v.as_str()).is_some_and(|s| s.starts_with("pissa"));
        check_config(&cfg, &file)?;
        let r = match cfg.get("r").map(|v| v.as_u64()) {
            Some(Some(r)) if r > 0 => r as usize,
            Some(_) => return Err(Error::format(&file, format!("`r` must be a positive whole number, not {}", cfg["r"]))),
            None => return Err(Error::format(&file, "missing `r`")),
        };
        let alpha = match cfg.get("lora_alpha") {
            None | Some(serde_json::Value::Null) => 8.0,
            Some(v) => v.as_f64().filter(|a| a.is_finite()).ok_or_else(|| Error::format(&file, format!("`lora_alpha` must be a number, not {v}")))?,
        };
        let targets = config_targets(&cfg, "target_modules", &file)?;
        let excluded = config_targets(&cfg, "exclude_modules", &file)?;
        let st = SafeTensors::open(files.open_required(ADAPTER_WEIGHTS_FILE)?)?;
        let mut modules = BTreeSet::new();
        for key in st.tensors().keys() {
            let module = key
                .strip_prefix(PREFIX)
                .and_then(|k| k.strip_suffix(".lora_A.weight").or_else(|| k.strip_suffix(".lora_B.weight")))
                .or_else(|| key.strip_prefix(PREFIX).and_then(|k| k.strip_suffix(&format!(".{MAGNITUDE}"))).filter(|_| use_dora))
                .ok_or_else(|| match key.ends_with(MAGNITUDE) {
                    true => Error::tensor(st.name(), key, format!("a DoRA magnitude, but {file} does not set `use_dora`")),
                    false => Error::tensor(st.name(), key, "not a LoRA A/B weight of a causal LM"),
                })?;
            modules.insert(module.to_string());
        }
        let mut layers = Vec::new();
        for module in modules {
            let (a_key, b_key) = (format!("{PREFIX}{module}.lora_A.weight"), format!("{PREFIX}{module}.lora_B.weight"));
            let shape2 = |key: &str| -> Result<[usize; 2]> {
                match st.info(key).map(|i| i.shape.as_slice()) {
                    Some([x, y]) => Ok([*x, *y]),
                    Some(other) => Err(Error::tensor(st.name(), key, format!("shape {other:?} is not 2-D"))),
                    None => Err(Error::tensor(st.name(), key, "missing")),
                }
            };
            let (a_shape, b_shape) = (shape2(&a_key)?, shape2(&b_key)?);
            if a_shape[0] != b_shape[1] {
                return Err(Error::tensor(st.name(), &b_key, format!("rank {} does not match lora_A's {}", b_shape[1], a_shape[0])));
            }
            // The scale is alpha / r from the config: a config whose r is not the tensors' rank
            // would silently scale the update otherwise than PEFT does with the same files.
            if a_shape[0] != r {
                return Err(Error::tensor(st.name(), &a_key, format!("has rank {}, but {file} says r = {r} (the scale alpha / r depends on it)", a_shape[0])));
            }
            // PEFT loads only the modules its config targets and ignores other tensors.
            let targeted = targets.as_ref().is_none_or(|t| t.matches(&module)) && !excluded.as_ref().is_some_and(|t| t.matches(&module));
            if !targeted {
                return Err(Error::tensor(st.name(), &a_key, format!("its module is not one {file} targets (target_modules / exclude_modules): PEFT would ignore it")));
            }
            let magnitude = if use_dora {
                let key = magnitude_key(&module);
                match st.info(&key).map(|i| i.shape.as_slice()) {
                    Some([n]) if *n == b_shape[0] => Some(st.read_f32(&key)?.1),
                    Some(other) => return Err(Error::tensor(st.name(), &key, format!("shape {other:?}, but lora_B has {} output rows", b_shape[0]))),
                    None => return Err(Error::tensor(st.name(), &key, format!("missing: {file} sets `use_dora`, and every DoRA layer has a magnitude"))),
                }
            } else {
                None
            };
            layers.push(HostLora { a: st.read_f32(&a_key)?.1, a_shape, b: st.read_f32(&b_key)?.1, b_shape, module, magnitude });
        }
        Ok(Adapter {
            r,
            alpha,
            dropout: cfg.get("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0),
            use_rslora: cfg.get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
            use_dora,
            pissa,
            base_model_name_or_path: cfg.get("base_model_name_or_path").and_then(|v| v.as_str()).unwrap_or("").to_string(),
            layers,
            source: st.name().to_string(),
        })
    }

    /// Puts the adapter's tensors on the matching layers, each on its layer's device. Every
    /// adapter module must exist in the model with matching shapes.
    pub fn attach<B: HoneBackend>(&self, linears: Vec<(String, &mut LoraLinear<B>)>) -> Result<()> {
        let mut by_name: BTreeMap<String, &mut LoraLinear<B>> = linears.into_iter().collect();
        for l in &self.layers {
            let key = format!("{PREFIX}{}.lora_A.weight", l.module);
            let lin = by_name
                .get_mut(&l.module)
                .ok_or_else(|| Error::tensor(&self.source, &key, "the model has no such layer"))?;
            let [out, inp] = lin.weight.dims();
            if l.a_shape[1] != inp || l.b_shape[0] != out {
                return Err(Error::tensor(
                    &self.source,
                    &key,
                    format!("A {:?} / B {:?} do not fit a [{out}, {inp}] layer", l.a_shape, l.b_shape),
                ));
            }
            let device = lin.weight.device();
            lin.lora = Some(Lora {
                lora_a: Param::from_tensor(Tensor::from_data(TensorData::new(l.a.clone(), l.a_shape), &device)),
                lora_b: Param::from_tensor(Tensor::from_data(TensorData::new(l.b.clone(), l.b_shape), &device)),
                scaling: self.scaling(),
                dropout: self.dropout,
                dora: None,
            });
            if let Some(m) = &l.magnitude {
                lin.enable_dora(Some(m.clone()));
            }
        }
        Ok(())
    }
}

/// Refuses settings of `adapter_config.json` that hone cannot honour (each would make the
/// adapter compute otherwise than in PEFT), by name.
fn check_config(cfg: &serde_json::Value, file: &str) -> Result<()> {
    let set = |key: &str| match cfg.get(key) {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Object(m)) => !m.is_empty(),
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => true,
    };
    for (key, what) in [
        ("rank_pattern", "per-module ranks (`rank_pattern`)"),
        ("alpha_pattern", "per-module alphas (`alpha_pattern`)"),
        ("modules_to_save", "fully trained modules (`modules_to_save`); merge the adapter with PEFT first"),
        ("lora_bias", "LoRA biases (`lora_bias`)"),
        ("layer_replication", "`layer_replication`"),
    ] {
        if set(key) {
            return Err(Error::unsupported(file, format!("adapters with {what}")));
        }
    }
    match cfg.get("bias").and_then(|v| v.as_str()) {
        None | Some("none") => Ok(()),
        Some(b) => Err(Error::unsupported(file, format!("adapters with trained biases (`bias` = \"{b}\")"))),
    }
}

/// `target_modules` (or `exclude_modules`) as PEFT reads them: a list of names (each the whole
/// module name or its last components), `"all-linear"`, or any other string as a regex that
/// must match the whole name. `None` when absent.
pub(crate) fn config_targets(cfg: &serde_json::Value, key: &str, file: &str) -> Result<Option<Targets>> {
    match cfg.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if s == "all-linear" => Ok(Some(Targets::AllLinear)),
        Some(serde_json::Value::String(s)) => match regex::Regex::new(s) {
            Ok(_) => Ok(Some(Targets::Regex(s.clone()))),
            Err(e) => Err(Error::format(file, format!("`{key}` is not a valid regex: {e}"))),
        },
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| Error::format(file, format!("`{key}` must hold strings, not {v}"))))
            .collect::<Result<Vec<_>>>()
            .map(|l| Some(Targets::List(l))),
        Some(v) => Err(Error::format(file, format!("`{key}` must be a list or a string, not {v}"))),
    }
}

/// Adds fresh adapters to the layers `config.targets` selects (never lm_head for
/// `all-linear`, as PEFT), each on its layer's device. Returns how many layers were adapted.
pub fn add_adapters<B: HoneBackend>(linears: Vec<(String, &mut LoraLinear<B>)>, config: &LoraConfig) -> usize {
    let mut n = 0;
    for (index, (name, lin)) in linears.into_iter().enumerate() {
        let selected = match &config.targets {
            Targets::AllLinear => name != "lm_head",
            t => t.matches(&name),
        };
        if selected {
            let [out, inp] = lin.weight.dims();
            lin.lora = Some(config.init(index as u64, out, inp, &lin.weight.device()));
            if config.use_dora {
                lin.enable_dora(None);
            }
            n += 1;
        }
    }
    n
}

/// The adapter's tensors read back from the device (native: synchronous reads).
#[cfg(not(target_arch = "wasm32"))]
pub fn to_host<B: HoneBackend>(linears: Vec<(String, &LoraLinear<B>)>, config: &LoraConfig, base: &str) -> Adapter {
    let read = |t: burn::tensor::Tensor<B, 2>| t.into_data().to_vec().expect("f32");
    let layers = linears
        .into_iter()
        .filter_map(|(module, lin)| {
            let l = lin.lora.as_ref()?;
            let (a, b) = (l.lora_a.val(), l.lora_b.val());
            let magnitude = l.dora.as_ref().map(|d| read(d.magnitude.val()));
            Some(HostLora { module, a_shape: a.dims(), b_shape: b.dims(), a: read(a), b: read(b), magnitude })
        })
        .collect();
    Adapter::in_memory(config, base, layers)
}

/// The adapter's tensors read back asynchronously (in the browser, the only way).
pub async fn to_host_async<B: HoneBackend>(linears: Vec<(String, &LoraLinear<B>)>, config: &LoraConfig, base: &str) -> Result<Adapter> {
    use crate::readback::read_f32;
    let mut layers = Vec::new();
    for (module, lin) in linears {
        let Some(l) = lin.lora.as_ref() else { continue };
        let (a, b) = (l.lora_a.val(), l.lora_b.val());
        let (a_shape, b_shape) = (a.dims(), b.dims());
        let magnitude = match &l.dora {
            Some(d) => Some(read_f32(d.magnitude.val()).await?),
            None => None,
        };
        layers.push(HostLora { module, a_shape, b_shape, a: read_f32(a).await?, b: read_f32(b).await?, magnitude });
    }
    Ok(Adapter::in_memory(config, base, layers))
}

impl Adapter {
    /// An adapter of `config`'s settings made from tensors read back from a model.
    pub fn in_memory(config: &LoraConfig, base: &str, layers: Vec<HostLora>) -> Adapter {
        Adapter {
            r: config.r,
            alpha: config.alpha,
            dropout: config.dropout,
            use_rslora: config.use_rslora,
            use_dora: layers.iter().any(|l| l.magnitude.is_some()),
            pissa: config.init == super::init::Init::Pissa,
            base_model_name_or_path: base.to_string(),
            layers,
            source: "(in memory)".to_string(),
        }
    }
}
