//! `firstkd convert`: rewrites a store into another log-prob layout (1.0 float16 / float32
//! <-> 2.0 quantized), part for part, keeping provenance, temperature and sample ids.
//!
//! The output is written through [`StoreWriter`], so it is resumable (rerun the same
//! command) and never looks complete before it is. Converting to the quantized layout loses
//! at most its stated bound (docs/format.md); converting back to float32 is exact for what
//! the quantized store holds.

use std::path::Path;

use super::copy::{copy_columns, meta_of};
use super::reader::StoreReader;
use super::writer::{Opened, StoreWriter, WriterOptions};
use crate::error::{Error, Result};
use crate::schema::LogprobDtype;

/// What a conversion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertReport {
    /// Parts written by this run (parts of an interrupted earlier run are not counted).
    pub parts_written: usize,
    /// Samples written by this run.
    pub samples_written: u64,
    /// The output was already complete: nothing written.
    pub already_complete: bool,
}

/// Rewrites the complete store `src` into `dst` with `dtype`, calling `progress(parts done,
/// parts in all)` after each part.
pub fn convert(
    src: &Path,
    dst: &Path,
    dtype: LogprobDtype,
    mut progress: impl FnMut(usize, usize),
) -> Result<ConvertReport> {
    let reader = StoreReader::open(src)?;
    let m = reader.manifest();
    if std::path::absolute(src).ok() == std::path::absolute(dst).ok() {
        return Err(Error::OutputInUse {
            path: dst.to_path_buf(),
            reason: "convert writes a new store; give another output directory".to_string(),
        });
    }
    let meta = meta_of(m, dtype);
    let (mut writer, done) = match StoreWriter::open(dst, meta, WriterOptions::default())? {
        Opened::Fresh(w) => (w, 0),
        Opened::Resumed { writer, cursor } => {
            let done = cursor
                .get("converted_parts")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0) as usize;
            (writer, done)
        }
        Opened::Complete(_) => {
            return Ok(ConvertReport {
                parts_written: 0,
                samples_written: 0,
                already_complete: true,
            })
        }
    };
    let total = m.parts.len();
    let mut report = ConvertReport {
        parts_written: 0,
        samples_written: 0,
        already_complete: false,
    };
    let columns = copy_columns(m);
    for part in done..total {
        for joined in reader.part_labelled_samples(part..part + 1, &columns, |_| true) {
            let joined = joined?;
            let record = joined.record(joined.sample.sample_id, &joined.sample.split);
            writer.push(&record, &joined.sample_labels())?;
            report.samples_written += 1;
        }
        writer.commit(serde_json::json!({ "converted_parts": part + 1 }))?;
        report.parts_written += 1;
        progress(part + 1, total);
    }
    let mut manifest = writer.finish(m.cursor.clone())?;
    manifest.temperature = m.temperature.clone();
    manifest.save(dst)?;
    Ok(report)
}
