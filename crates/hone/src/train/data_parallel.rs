//! Data parallelism: several peers, each holding the frozen base and the same adapter, share
//! every optimizer step. A step's micro-batches are drawn as one run with `peers` times the
//! gradient accumulation would draw them (the same seeded order on every peer, every sample once
//! per epoch), peer `rank` computes micro-batches `rank, rank + peers, …`, and the LoRA gradients
//! and losses are summed across peers before every peer applies the same clipped AdamW step. So
//! N peers with micro-batch b train as one peer with micro-batch N·b (up to the order of float
//! sums).
//!
//! Peers are threads of one process, summed by burn's collective engine (`burn-collective`), or
//! with [`Nodes`] processes on several hosts ("nodes"), summed over TCP by peer 0 (see
//! [`super::wire`] for why not burn's multi-node all-reduce). Every call runs under a timeout: a
//! peer that dies or a network that drops stops the others with an error naming the lost peer,
//! never a hang. On joining, the peers check that they start at the same step with the same
//! settings and data (a resume from different checkpoints is refused).

use super::wire::Wire;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{all_reduce, finish_collective, register, CollectiveConfig, CollectiveError, PeerId, ReduceOperation};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a peer waits for the others in one call before it gives up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Processes on several hosts (or several processes on one host), one node each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes {
    /// How many nodes.
    pub count: usize,
    /// This node's place, 0 to count - 1.
    pub rank: usize,
    /// `host:port` where peer 0 (on node 0) listens for the others.
    pub orchestrator: String,
}

impl Nodes {
    /// The port of `orchestrator` (`host:port`); an error naming `--orchestrator` otherwise.
    pub fn port(&self) -> crate::Result<u16> {
        self.orchestrator
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| crate::Error::format("--orchestrator", format!("{}: expected host:port", self.orchestrator)))
    }
}

/// This peer's place among the peers.
#[derive(Clone)]
pub struct DataParallel {
    /// Rank among all peers (of every node).
    pub rank: usize,
    /// Peers of every node.
    pub peers: usize,
    /// Several nodes: where peer 0 listens, and which this one is.
    pub nodes: Option<Nodes>,
    /// How long to wait for the others in one call.
    pub timeout: Duration,
    /// Across nodes: the connection(s) to the other peers, made on joining.
    wire: Option<Arc<Mutex<Wire>>>,
}

/// What the peers compare on joining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// The step the peer starts (or resumes) at.
    pub step: usize,
    /// A hash of its training settings and data.
    pub fingerprint: u64,
}

impl DataParallel {
    /// Peer `rank` of `peers`, all threads of this process.
    pub fn new(rank: usize, peers: usize) -> Self {
        DataParallel { rank, peers, nodes: None, timeout: DEFAULT_TIMEOUT, wire: None }
    }

    /// Peer `local_rank` of the `local_peers` threads of this process, on node `nodes.rank`.
    pub fn across(nodes: Nodes, local_rank: usize, local_peers: usize) -> Self {
        let (rank, peers) = (nodes.rank * local_peers + local_rank, nodes.count * local_peers);
        DataParallel { rank, peers, nodes: Some(nodes), timeout: DEFAULT_TIMEOUT, wire: None }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn id(&self) -> PeerId {
        PeerId(self.rank as u32)
    }

    fn local_peers(&self) -> usize {
        self.peers / self.nodes.as_ref().map_or(1, |n| n.count.max(1))
    }

    /// "peer 3 (node 1, 10.0.0.2:41234)".
    fn name(&self, rank: usize, from: Option<SocketAddr>) -> String {
        let node = rank / self.local_peers().max(1);
        match (rank, &self.nodes, from) {
            (0, Some(n), _) => format!("peer 0 (node 0, {})", n.orchestrator),
            (_, Some(_), Some(a)) => format!("peer {rank} (node {node}, {a})"),
            (_, Some(_), None) => format!("peer {rank} (node {node})"),
            _ => format!("peer {rank}"),
        }
    }

    /// Joins the peers on `device` (every peer of this process calls it, each from its own
    /// thread): blocks until all have joined, then checks that every peer starts where this
    /// one does.
    pub fn join<B: Backend>(&mut self, device: &B::Device, start: Start) -> crate::Result<()> {
        if let Some(n) = self.nodes.clone() {
            let name = |r: usize, a: Option<SocketAddr>| self.name(r, a);
            let wire = match self.rank {
                0 => Wire::hub(n.port()?, self.peers, start, self.timeout, &name),
                _ => Wire::spoke(&n.orchestrator, self.rank, self.peers, start, self.timeout),
            };
            let wire = wire.map_err(|e| self.error(format!("joining the peers: {e}")))?;
            self.wire = Some(Arc::new(Mutex::new(wire)));
            return Ok(());
        }
        let config = CollectiveConfig::default().with_num_devices(self.peers);
        let (id, dev) = (self.id(), device.clone());
        self.within("joining the peers", move || register::<B>(id, dev, config))?;
        self.check_start::<B>(device, start)
    }

    /// Every peer's step and fingerprint, in one all-reduce (each peer fills its own slot, the
    /// others are zeros, so the sum is every slot, exactly: 16-bit parts in f32).
    fn check_start<B: Backend>(&self, device: &B::Device, start: Start) -> crate::Result<()> {
        const SLOT: usize = 5;
        let mut slots = vec![0f32; self.peers * SLOT];
        let own = &mut slots[self.rank * SLOT..(self.rank + 1) * SLOT];
        own[0] = start.step as f32;
        for i in 0..4 {
            own[1 + i] = ((start.fingerprint >> (16 * i)) & 0xffff) as f32;
        }
        let summed = self.sum_values::<B>(slots, device)?;
        for r in 0..self.peers {
            let s = &summed[r * SLOT..(r + 1) * SLOT];
            let fingerprint = (0..4).fold(0u64, |acc, i| acc | ((s[1 + i] as u64) << (16 * i)));
            if s[0] as usize != start.step {
                return Err(self.error(format!("{} starts at step {}, peer {} at step {}: resume every peer from the same checkpoint", self.name(r, None), s[0] as usize, self.rank, start.step)));
            }
            if fingerprint != start.fingerprint {
                return Err(self.error(format!("{} trains with other settings or data than peer {}", self.name(r, None), self.rank)));
            }
        }
        Ok(())
    }

    /// Leaves the peers (after the last step).
    pub fn leave<B: Backend>(&self) -> crate::Result<()> {
        if self.nodes.is_some() {
            // The connections close with the process (or when the last clone is dropped).
            return Ok(());
        }
        let id = self.id();
        self.within("leaving the peers", move || finish_collective::<B>(id))
    }

    /// Each tensor summed over the peers, in one all-reduce: flattened, joined, reduced, split.
    /// Across nodes the tensors may sit on several devices (layers split with `--devices`):
    /// they meet in host memory and each sum goes back to its tensor's device.
    pub fn sum<B: Backend, const D: usize>(&self, tensors: Vec<Tensor<B, D>>) -> crate::Result<Vec<Tensor<B, D>>> {
        if tensors.is_empty() {
            return Ok(tensors);
        }
        let shapes: Vec<[usize; D]> = tensors.iter().map(|t| t.dims()).collect();
        let flat: Vec<Tensor<B, 1>> = tensors.into_iter().map(|t| t.flatten(0, D - 1)).collect();
        if self.wire.is_some() {
            // One read and one upload per run of tensors on one device (usually all of them),
            // not one per tensor.
            let mut runs: Vec<(B::Device, Vec<Tensor<B, 1>>)> = Vec::new();
            for t in flat {
                match runs.last_mut() {
                    Some((device, run)) if *device == t.device() => run.push(t),
                    _ => runs.push((t.device(), vec![t])),
                }
            }
            let lens: Vec<usize> = runs.iter().map(|(_, run)| run.iter().map(|t| t.dims()[0]).sum()).collect();
            let mut values = Vec::with_capacity(lens.iter().sum());
            let mut counts = Vec::new();
            let mut devices = Vec::new();
            for (device, run) in runs {
                counts.push(run.len());
                devices.push(device);
                values.extend(Tensor::cat(run, 0).into_data().convert::<f32>().to_vec::<f32>().map_err(|e| self.error(format!("{e:?}")))?);
            }
            let summed = self.sum_values::<B>(values, &devices[0])?;
            let (mut shapes, mut at, mut parts) = (shapes.into_iter(), 0, Vec::new());
            for ((device, count), len) in devices.iter().zip(counts).zip(lens) {
                let run = Tensor::<B, 1>::from_data(TensorData::new(summed[at..at + len].to_vec(), [len]), device);
                at += len;
                parts.extend(split(run, shapes.by_ref().take(count)));
            }
            return Ok(parts);
        }
        let primitive = Tensor::cat(flat, 0).into_primitive().tensor();
        let id = self.id();
        let reduced = self.within("summing the gradients", move || all_reduce::<B>(id, primitive, ReduceOperation::Sum))?;
        Ok(split(Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(reduced)), shapes))
    }

    /// `values` summed over the peers, on the host.
    fn sum_values<B: Backend>(&self, values: Vec<f32>, device: &B::Device) -> crate::Result<Vec<f32>> {
        if let Some(wire) = &self.wire {
            let name = |r: usize, a: Option<SocketAddr>| self.name(r, a);
            let mut wire = wire.lock().map_err(|_| self.error("a peer thread failed while summing".into()))?;
            return wire.sum(values, &name).map_err(|e| self.error(format!("summing the gradients: {e}")));
        }
        let n = values.len();
        let tensor = Tensor::<B, 1>::from_data(TensorData::new(values, [n]), device).into_primitive().tensor();
        let id = self.id();
        let summed = self.within("meeting the peers", move || all_reduce::<B>(id, tensor, ReduceOperation::Sum))?;
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(summed)).into_data().to_vec().map_err(|e| self.error(format!("{e:?}")))
    }

    /// Runs a call of burn's collective engine on a thread of its own and waits at most
    /// `timeout` for it (its calls block until every peer has made them).
    fn within<T: Send + 'static>(&self, what: &str, call: impl FnOnce() -> Result<T, CollectiveError> + Send + 'static) -> crate::Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(call());
        });
        let how = match rx.recv_timeout(self.timeout) {
            Ok(Ok(t)) => return Ok(t),
            Ok(Err(e)) => format!("burn's collective engine failed: {e:?}"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => format!("no answer within {}s: a peer thread of this process has stopped or stalled", self.timeout.as_secs()),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => "burn's collective engine stopped".to_string(),
        };
        Err(self.error(format!("{what}: {how}")))
    }

    fn error(&self, message: String) -> crate::Error {
        crate::Error::Peers { message: format!("peer {} of {}: {message}. Every peer stops; continue from the last checkpoint with --resume", self.rank, self.peers) }
    }
}

/// `flat` cut into consecutive tensors of `shapes`.
fn split<B: Backend, const D: usize>(flat: Tensor<B, 1>, shapes: impl IntoIterator<Item = [usize; D]>) -> Vec<Tensor<B, D>> {
    let mut at = 0;
    shapes
        .into_iter()
        .map(|shape| {
            let n: usize = shape.iter().product();
            let part = flat.clone().narrow(0, at, n).reshape(shape);
            at += n;
            part
        })
        .collect()
}
