//! Training: the loss, AdamW, learning-rate schedules and the step-by-step trainer.

#[cfg(not(target_arch = "wasm32"))]
pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use schedule::Schedule;
pub use trainer::{EvalReport, StepReport, TrainConfig, TrainState, Trainer};
