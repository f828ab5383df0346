//! Training: the loss, preference losses (DPO), AdamW (32-bit, and bitsandbytes' 8-bit),
//! learning-rate schedules and the step-by-step trainer.

pub mod adamw8bit;
pub mod checkpoint;
#[cfg(not(target_arch = "wasm32"))]
pub mod data_parallel;
#[cfg(not(target_arch = "wasm32"))]
mod wire;
pub mod loss;
pub mod optim;
pub mod plan;
pub mod preference;
pub mod run;
pub mod schedule;
pub mod trainer;

pub use run::RunSettings;
pub use schedule::Schedule;
pub use trainer::{EvalReport, StepReport, TrainConfig, TrainState, Trainer};
