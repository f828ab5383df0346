//! Data parallelism: several peers, each holding the frozen base and the same adapter, share
//! every optimizer step. A step's micro-batches are drawn as one run with `peers` times the
//! gradient accumulation would draw them (the same seeded order on every peer, every sample once
//! per epoch), peer `rank` computes micro-batches `rank, rank + peers, …`, and the LoRA gradients
//! and losses are summed across peers by burn's collective engine (`burn-collective`) before
//! every peer applies the same clipped AdamW step. So N peers with micro-batch b train as one
//! peer with micro-batch N·b (up to the order of float sums).

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_collective::{all_reduce, finish_collective, register, CollectiveConfig, PeerId, ReduceOperation};

/// This process's place among the peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataParallel {
    pub rank: usize,
    pub peers: usize,
}

impl DataParallel {
    fn id(&self) -> PeerId {
        PeerId(self.rank as u32)
    }

    /// Joins the peers on `device` (every peer of this process calls it, each from its own thread).
    pub fn join<B: Backend>(&self, device: &B::Device) -> crate::Result<()> {
        let config = CollectiveConfig::default().with_num_devices(self.peers);
        register::<B>(self.id(), device.clone(), config).map_err(|e| collective_error("joining the peers", e))
    }

    /// Leaves the peers (after the last step).
    pub fn leave<B: Backend>(&self) -> crate::Result<()> {
        finish_collective::<B>(self.id()).map_err(|e| collective_error("leaving the peers", e))
    }

    /// Each tensor summed over the peers, in one all-reduce: flattened, joined, reduced, split.
    pub fn sum<B: Backend, const D: usize>(&self, tensors: Vec<Tensor<B, D>>) -> crate::Result<Vec<Tensor<B, D>>> {
        let shapes: Vec<[usize; D]> = tensors.iter().map(|t| t.dims()).collect();
        let flat: Vec<Tensor<B, 1>> = tensors.into_iter().map(|t| t.flatten(0, D - 1)).collect();
        let joined = Tensor::cat(flat, 0);
        let reduced = all_reduce::<B>(self.id(), joined.into_primitive().tensor(), ReduceOperation::Sum).map_err(|e| collective_error("all-reducing the gradients", e))?;
        let reduced = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(reduced));
        let mut at = 0;
        Ok(shapes
            .into_iter()
            .map(|shape| {
                let n: usize = shape.iter().product();
                let part = reduced.clone().narrow(0, at, n).reshape(shape);
                at += n;
                part
            })
            .collect())
    }
}

fn collective_error(what: &str, e: burn_collective::CollectiveError) -> crate::Error {
    crate::Error::Backend { backend: "collective".into(), message: format!("{what}: {e:?}") }
}
