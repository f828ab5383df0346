//! A model's weights across one `model.safetensors` or the shards named by
//! `model.safetensors.index.json`: every tensor name mapped to the shard that holds it, each
//! tensor read on its own.

use super::safetensors::{Dtype, SafeTensors, TensorInfo};
use super::FileSet;
use crate::error::{Error, Result};
use std::collections::BTreeMap;

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// The weights of a model: every tensor name mapped to the shard that holds it.
pub struct Weights {
    shards: Vec<SafeTensors>,
    index: BTreeMap<String, usize>,
    location: String,
}

impl Weights {
    pub fn open(files: &dyn FileSet) -> Result<Self> {
        let names: Vec<String> = match files.open(WEIGHTS_INDEX_FILE)? {
            Some(src) => {
                let json: serde_json::Value = serde_json::from_slice(&src.read_all()?)
                    .map_err(|e| Error::format(src.name(), format!("invalid JSON: {e}")))?;
                let map = json
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .ok_or_else(|| Error::format(src.name(), "no `weight_map` object"))?;
                let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
                shards.sort();
                shards.dedup();
                shards
            }
            None => vec![WEIGHTS_FILE.to_string()],
        };
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for name in names {
            let st = SafeTensors::open(files.open_required(&name)?)?;
            for tensor in st.tensors().keys() {
                index.insert(tensor.clone(), shards.len());
            }
            shards.push(st);
        }
        Ok(Weights { shards, index, location: files.location() })
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// The shard holding `name` and the tensor's header entry.
    pub fn info(&self, name: &str) -> Option<(&SafeTensors, &TensorInfo)> {
        let st = &self.shards[*self.index.get(name)?];
        Some((st, st.info(name)?))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    /// The shard holding `name`, after checking the tensor's shape against `shape`.
    fn shard(&self, name: &str, shape: &[usize]) -> Result<&SafeTensors> {
        let shard = self.index.get(name).ok_or_else(|| {
            let file = match self.shards.as_slice() {
                [one] => one.name().to_string(),
                _ => format!("{}/{WEIGHTS_INDEX_FILE}", self.location),
            };
            Error::tensor(file, name, "missing (the model's config needs it)")
        })?;
        let st = &self.shards[*shard];
        let got = &st.info(name).expect("indexed").shape;
        if got != shape {
            return Err(Error::tensor(
                st.name(),
                name,
                format!("shape {got:?} does not match the config, which implies {shape:?}"),
            ));
        }
        Ok(st)
    }

    /// Reads one tensor as f32 and checks its shape.
    pub fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.shard(name, shape)?.read_f32(name)?.1)
    }

    /// One tensor's stored bytes as i32 words (see [`SafeTensors::read_words`]), after checking
    /// its shape.
    pub fn read_words(&self, name: &str, shape: &[usize]) -> Result<(Dtype, Vec<i32>)> {
        self.shard(name, shape)?.read_words(name)
    }

    /// As [`Weights::read`], `chunk` values at a time.
    pub fn read_chunks(&self, name: &str, shape: &[usize], chunk: usize, f: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
        self.shard(name, shape)?.read_f32_chunks(name, chunk, f)
    }
}

