//! `hone check-adapter`: what a serving runtime will refuse in a PEFT adapter, or read with
//! another result than PEFT, found from `adapter_config.json` and the tensors' names and shapes
//! before anyone finds out at serving time. The rules follow each runtime's own loader:
//! vLLM's `PEFTHelper` (DoRA, modules_to_save, biases, a rank above `--max-lora-rank`, default
//! 16; PiSSA/OLoRA/CorDA/LoftQ adapters saved unconverted), llama.cpp's
//! `convert_lora_to_gguf.py` and adapter loader (only lora_A/lora_B tensors; one alpha for the
//! file, scale alpha / rank, no rsLoRA), and PEFT itself (an `r` or targets that disagree with
//! the tensors, which PEFT silently ignores or scales otherwise).

use crate::error::{Error, Result};
use crate::io::safetensors::SafeTensors;
use crate::io::FileSet;
use crate::lora::peft::{config_targets, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Runtime {
    Vllm,
    LlamaCpp,
    Peft,
}

impl Runtime {
    pub const ALL: [Runtime; 3] = [Runtime::Vllm, Runtime::LlamaCpp, Runtime::Peft];
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Runtime::Vllm => "vllm",
            Runtime::LlamaCpp => "llama.cpp",
            Runtime::Peft => "peft",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The runtime will not load the adapter.
    Refuses,
    /// It loads, but computes something other than PEFT does with the same files.
    Differs,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub runtime: Runtime,
    pub verdict: Verdict,
    pub message: String,
}

/// The ranks vLLM's `--max-lora-rank` accepts.
const VLLM_RANKS: [usize; 9] = [1, 8, 16, 32, 64, 128, 256, 320, 512];

/// Every finding for `runtimes`; `vllm_max_rank` is the `--max-lora-rank` the server runs with.
pub fn check_adapter(files: &dyn FileSet, runtimes: &[Runtime], vllm_max_rank: usize) -> Result<Vec<Finding>> {
    let src = files.open_required(ADAPTER_CONFIG_FILE)?;
    let file = src.name().to_string();
    let cfg: Value = serde_json::from_slice(&src.read_all()?).map_err(|e| Error::format(&file, format!("invalid JSON: {e}")))?;
    if cfg.get("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(Error::unsupported(&file, "not a LoRA adapter (peft_type must be \"LORA\")"));
    }
    let st = SafeTensors::open(files.open_required(ADAPTER_WEIGHTS_FILE)?)?;
    let a = Adapter::scan(&cfg, &st);
    let mut out = Vec::new();
    for &rt in runtimes {
        let mut say = |verdict, message: String| out.push(Finding { runtime: rt, verdict, message });
        match rt {
            Runtime::Vllm => vllm(&a, vllm_max_rank, &mut say),
            Runtime::LlamaCpp => llama_cpp(&a, &mut say),
            Runtime::Peft => peft(&a, &cfg, &file, &mut say)?,
        }
    }
    Ok(out)
}

/// What the checks look at.
struct Adapter {
    r: Option<u64>,
    alpha: f64,
    use_rslora: bool,
    dora: bool,
    modules_to_save: Vec<String>,
    bias: String,
    lora_bias: bool,
    rank_pattern: BTreeMap<String, u64>,
    alpha_pattern: bool,
    init: Option<String>,
    /// module → (lora_A shape, lora_B shape), from the tensors.
    modules: BTreeMap<String, (Option<Vec<usize>>, Option<Vec<usize>>)>,
    /// Tensors that are neither lora_A nor lora_B weights.
    other_tensors: Vec<String>,
}

impl Adapter {
    fn scan(cfg: &Value, st: &SafeTensors) -> Self {
        let flag = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
        let mut modules: BTreeMap<String, (Option<Vec<usize>>, Option<Vec<usize>>)> = BTreeMap::new();
        let mut other_tensors = Vec::new();
        for (key, info) in st.tensors() {
            let k = key.strip_prefix("base_model.model.").unwrap_or(key);
            if let Some(m) = k.strip_suffix(".lora_A.weight") {
                modules.entry(m.to_string()).or_default().0 = Some(info.shape.clone());
            } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                modules.entry(m.to_string()).or_default().1 = Some(info.shape.clone());
            } else {
                other_tensors.push(key.clone());
            }
        }
        let init = match cfg.get("init_lora_weights") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        Adapter {
            r: cfg.get("r").and_then(Value::as_u64),
            alpha: cfg.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0),
            use_rslora: flag("use_rslora"),
            dora: flag("use_dora") || other_tensors.iter().any(|t| t.contains("lora_magnitude_vector")),
            modules_to_save: match cfg.get("modules_to_save") {
                Some(Value::Array(l)) => l.iter().map(|v| v.as_str().unwrap_or("?").to_string()).collect(),
                Some(Value::String(s)) => vec![s.clone()],
                _ => Vec::new(),
            },
            bias: cfg.get("bias").and_then(Value::as_str).unwrap_or("none").to_string(),
            lora_bias: flag("lora_bias") || other_tensors.iter().any(|t| t.ends_with(".lora_B.bias")),
            rank_pattern: cfg.get("rank_pattern").and_then(Value::as_object).map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_u64()?))).collect()).unwrap_or_default(),
            alpha_pattern: cfg.get("alpha_pattern").and_then(Value::as_object).is_some_and(|m| !m.is_empty()),
            init,
            modules,
            other_tensors,
        }
    }

    /// The largest rank any module has (from the tensors, else the config).
    fn max_rank(&self) -> u64 {
        let from_tensors = self.modules.values().filter_map(|(a, _)| a.as_ref().map(|s| s[0] as u64)).max();
        from_tensors.into_iter().chain(self.r).chain(self.rank_pattern.values().copied()).max().unwrap_or(0)
    }

    /// PiSSA, OLoRA and CorDA change the base while training; saved without PEFT's conversion to
    /// a plain LoRA, the adapter is only right on that changed base.
    fn base_changing_init(&self) -> Option<&str> {
        self.init.as_deref().filter(|i| ["pissa", "olora", "corda"].iter().any(|p| i.starts_with(p)))
    }
}

fn vllm(a: &Adapter, max_rank: usize, say: &mut dyn FnMut(Verdict, String)) {
    if a.dora {
        say(Verdict::Refuses, "DoRA (`use_dora` / lora_magnitude_vector tensors): vLLM does not support DoRA; serve a merged model (`hone merge`)".into());
    }
    if !a.modules_to_save.is_empty() {
        say(Verdict::Refuses, format!("`modules_to_save` {:?}: vLLM only loads adapters whose modules_to_save is None; merge instead", a.modules_to_save));
    }
    if a.bias != "none" || a.lora_bias {
        say(Verdict::Refuses, format!("trained biases (`bias` = \"{}\"{}): vLLM does not support adapter biases", a.bias, if a.lora_bias { ", `lora_bias`" } else { "" }));
    }
    let rank = a.max_rank() as usize;
    if rank > max_rank {
        let need = VLLM_RANKS.iter().find(|&&r| r >= rank).map_or_else(|| "none is large enough".to_string(), |r| format!("start vLLM with --max-lora-rank {r}"));
        say(Verdict::Refuses, format!("rank {rank} is above vLLM's max_lora_rank {max_rank} (its default is 16): {need}"));
    }
    if let Some(init) = a.base_changing_init() {
        say(Verdict::Refuses, format!("`init_lora_weights` = \"{init}\": the adapter was saved for the base as {init} changed it; vLLM serves the original base. Save it converted to a plain LoRA"));
    }
}

fn llama_cpp(a: &Adapter, say: &mut dyn FnMut(Verdict, String)) {
    if a.dora {
        say(Verdict::Refuses, "DoRA: llama.cpp's adapters have no magnitude vector (its converter stops at lora_magnitude_vector); merge the adapter (`hone merge`) and convert the merged model".into());
    }
    if !a.modules_to_save.is_empty() {
        say(Verdict::Refuses, format!("`modules_to_save` {:?}: llama.cpp's converter takes only lora_A/lora_B tensors; merge instead", a.modules_to_save));
    }
    if a.bias != "none" || a.lora_bias {
        say(Verdict::Refuses, "trained biases: llama.cpp's converter takes only lora_A/lora_B weights".into());
    }
    let odd: Vec<&String> = a.other_tensors.iter().filter(|t| !t.contains("lora_magnitude_vector") && !t.ends_with(".lora_B.bias") && !t.contains("_layernorm") && !t.contains(".norm")).collect();
    if !odd.is_empty() && a.modules_to_save.is_empty() {
        say(Verdict::Refuses, format!("tensors that are not LoRA weights ({}): llama.cpp's converter stops at them", odd.iter().take(3).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")));
    }
    if a.use_rslora {
        let r = a.r.unwrap_or(1) as f64;
        say(
            Verdict::Differs,
            format!(
                "rsLoRA: llama.cpp scales by alpha / r = {} instead of PEFT's alpha / sqrt(r) = {}, and convert_lora_to_gguf.py writes alpha unchanged; `hone export --gguf` writes alpha {} so that the scale is PEFT's",
                a.alpha / r,
                a.alpha / r.sqrt(),
                a.alpha * r.sqrt()
            ),
        );
    }
    if a.alpha_pattern {
        say(Verdict::Differs, "`alpha_pattern`: a llama.cpp adapter has one alpha for every tensor; the modules with their own alpha get another scale".into());
    }
    if let Some(init) = a.base_changing_init() {
        say(Verdict::Differs, format!("`init_lora_weights` = \"{init}\": the adapter is right only on the base as {init} changed it, not on the original GGUF"));
    }
}

fn peft(a: &Adapter, cfg: &Value, file: &str, say: &mut dyn FnMut(Verdict, String)) -> Result<()> {
    match a.r {
        None | Some(0) => say(Verdict::Refuses, format!("`r` must be a positive whole number, not {}", cfg.get("r").unwrap_or(&Value::Null))),
        Some(r) => {
            for (m, (ash, bsh)) in &a.modules {
                let (Some(ash), Some(bsh)) = (ash, bsh) else {
                    say(Verdict::Refuses, format!("{m}: lora_A or lora_B is missing"));
                    continue;
                };
                let want = a.rank_pattern.iter().find(|(k, _)| m == *k || m.ends_with(&format!(".{k}"))).map_or(r, |(_, v)| *v);
                if ash.first().map(|&x| x as u64) != Some(want) || bsh.last().map(|&x| x as u64) != Some(want) {
                    say(Verdict::Refuses, format!("{m}: lora_A {ash:?} / lora_B {bsh:?} are not of rank {want}, which the config gives (PEFT's load fails on the shapes)"));
                }
            }
        }
    }
    let targets = config_targets(cfg, "target_modules", file)?;
    let excluded = config_targets(cfg, "exclude_modules", file)?;
    for m in a.modules.keys() {
        if targets.as_ref().is_some_and(|t| !t.matches(m)) || excluded.as_ref().is_some_and(|t| t.matches(m)) {
            say(Verdict::Differs, format!("{m}: the config's target_modules / exclude_modules do not select it, so PEFT ignores its tensors"));
        }
    }
    Ok(())
}
