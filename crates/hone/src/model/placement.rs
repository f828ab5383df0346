//! Which device holds which part of the model when one device is too small: the embeddings,
//! each decoder layer, and the final norm with the head, like a Hugging Face device map. The
//! forward pass moves the hidden states to a layer's device as it reaches it; gradients move
//! back the same way. Devices are those of one process (one host); nothing crosses hosts.

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Placement<D> {
    pub embed: D,
    pub layers: Vec<D>,
    /// The final norm and lm_head. With tied embeddings the head is the embedding matrix and
    /// runs on `embed`'s device whatever this says; the norm still sits here.
    pub head: D,
}

impl<D: Clone> Placement<D> {
    /// Everything on one device.
    pub fn single(device: D, layers: usize) -> Self {
        Placement { embed: device.clone(), layers: vec![device.clone(); layers], head: device }
    }

    /// From a device index per layer (as [`crate::train::plan::split_layers`] gives): the
    /// embeddings on the first device, the norm and head with the last layer.
    pub fn from_indices(devices: &[D], layer_device: &[usize]) -> Result<Self> {
        let pick = |i: usize| {
            devices.get(i).cloned().ok_or_else(|| Error::unsupported("device map", format!("device index {i}, but only {} devices", devices.len())))
        };
        let first = pick(0)?;
        let last = pick(layer_device.last().copied().unwrap_or(0))?;
        Ok(Placement { embed: first, layers: layer_device.iter().map(|&i| pick(i)).collect::<Result<_>>()?, head: last })
    }
}
