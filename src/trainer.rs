//! The streaming distillation trainer: a trainable Llama-family student, FIRST / KD / CE losses
//! over the store's top-k labels, batches streamed from the store on a reader thread, AdamW
//! with warmup + cosine decay, and resumable HF-compatible checkpoints.
//!
//! ```no_run
//! # fn main() -> firstkd::Result<()> {
//! use firstkd::trainer::{train, Init, LossKind, TrainOptions};
//! let opts = TrainOptions { loss: LossKind::Kd, steps: 100, ..TrainOptions::default() };
//! let init = Init::parse("random:student.json", 0)?;
//! let summary = train(
//!     "store".as_ref(), &init, "run".as_ref(), &opts, false,
//!     &candle_core::Device::Cpu, &mut |_report| {},
//! )?;
//! println!("final loss {:?}", summary.losses.last());
//! # Ok(()) }
//! ```
//!
//! docs/trainer.md has the loss formulas, batching and resume semantics.

pub mod checkpoint;
pub mod data;
pub mod fused;
pub mod init;
mod layers;
pub mod loss;
pub mod model;
pub mod optim;
mod run;
mod train;

pub use data::{Batch, BatchStream, DataOptions, Sequence, SequenceReader};
pub use init::{initialise, Init, Initialised};
pub use loss::{KdKind, LossKind, LossSpec};
pub use model::{Student, StudentConfig};
pub use optim::{AdamW, AdamWParams, Schedule};
pub use run::{train, train_reader, Trainer};
pub use train::{batch_loss, evaluate, Precision, StepReport, TrainOptions, TrainSummary};
