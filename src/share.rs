//! Sharing a store with other tools: export to and import from axolotl's KD dataset layout,
//! import of DistillKit's compressed logits, and the Hugging Face dataset card.
//!
//! Everything here reads and writes the store through its typed read side
//! ([`crate::store::StoreReader`]) and its writer ([`crate::store::StoreWriter`]), so it works
//! for every store layout. docs/sharing.md describes the formats and the alignment rules.

pub mod axolotl;
pub mod card;
pub mod distillkit;
mod files;
pub mod import;

pub use axolotl::{
    export_axolotl, export_axolotl_reader, ExportOptions, ExportReport, ExportTemperature,
};
pub use card::{write_card, CardOptions};
pub use distillkit::import_distillkit;
pub use files::FileFormat;
pub use import::{import_axolotl, ImportOptions, ImportReport};
