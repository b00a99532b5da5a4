//! The soft-label store: a directory of zstd Parquet parts plus `manifest.json`.
//!
//! ```text
//! store/
//!   manifest.json              provenance, k, dtype, parts with row counts and sha256
//!   labels/part-00000.parquet  one row per predicted token position
//!   samples/part-00000.parquet one row per input sample
//! ```
//!
//! A part is written under a temporary name, renamed when complete, and only then
//! recorded in the manifest (itself replaced atomically), so an interrupted writer
//! never leaves a part that looks complete. See docs/format.md.

pub mod convert;
pub mod copy;
pub mod decode;
pub mod decode_v2;
mod encode;
pub mod fault;
pub mod inspect;
pub mod join;
pub mod lock;
pub mod manifest;
pub mod merge;
pub mod reader;
pub mod remote;
pub mod rows;
pub mod shards;
pub mod split;
pub mod stream;
pub mod synthetic;
pub mod verify;
pub mod writer;

pub use convert::{convert, ConvertReport};
pub use decode::{LabelColumn, LabelRows, SampleColumn, SampleRow};
pub use join::{LabelledSample, LabelledSamples};
pub use manifest::{
    Manifest, PartEntry, PartFile, TeacherInfo, TemperatureInfo, TokenizerInfo, MANIFEST_FILE,
};
pub use reader::{BatchIter, StoreReader};
pub use rows::{read_label_file, read_sample_file, LabelRowIter, SampleRowIter};
pub use verify::{verify, Problem, VerifyReport};
pub use writer::{SampleLabels, SampleRecord, StoreMeta, StoreWriter, WriterOptions};

pub use crate::digest::sha256_file;
