//! firstkd: FIRST (Efficient Trustworthy Distillation) for LLMs.
//!
//! Data flows one way: input -> teacher -> store -> query / calibration / trainer -> eval.

pub mod calibration;
pub mod digest;
pub mod error;
pub mod eval;
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod input;
pub mod label;
pub mod plot;
pub mod query;
pub mod runtime;
pub mod schema;
pub mod share;
pub mod store;
pub mod teacher;
pub mod temperature;
#[doc(hidden)]
pub mod testing;
pub mod tokenize;
pub mod trainer;
pub mod weights;

pub use error::{parse_value, Error, Result};
pub use temperature::Temperature;

/// The firstkd version written into every store.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
