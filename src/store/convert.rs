//! `firstkd convert`: rewrites a store into another log-prob layout (1.0 float16 / float32
//! <-> 2.0 quantized), part for part, keeping provenance, temperature and sample ids.
//!
//! The output is written through [`StoreWriter`], so it is resumable (rerun the same
//! command) and never looks complete before it is. Converting to the quantized layout loses
//! at most its stated bound (docs/format.md); converting back to float32 is exact for what
//! the quantized store holds.

use std::path::Path;

use super::decode::{LabelColumn, SampleColumn};
use super::reader::StoreReader;
use super::writer::{Opened, SampleLabels, SampleRecord, StoreMeta, StoreWriter, WriterOptions};
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
        return Err(Error::InvalidArgument(format!(
            "{}: convert writes a new store; give another output directory",
            dst.display()
        )));
    }
    let meta = StoreMeta {
        k: m.k,
        selection: m.selection(),
        logprob_dtype: dtype,
        teacher: m.teacher.clone(),
        tokenizer: m.tokenizer.clone(),
        labeling: m.labeling.clone(),
    };
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
    let mut columns = vec![
        LabelColumn::TopkIds,
        LabelColumn::TopkLogprobs,
        LabelColumn::TargetLogprob,
        LabelColumn::Entropy,
    ];
    if matches!(m.selection(), crate::schema::Selection::Sample { .. }) {
        columns.push(LabelColumn::TopkCounts);
    }
    let sample_columns = SampleColumn::ALL;
    for part in done..total {
        let mut samples = reader.part_sample_rows(part..part + 1, &sample_columns);
        let mut labels = reader.part_label_rows(part..part + 1, &columns, 1 << 16);
        let mut pending: Option<super::LabelRows> = None;
        let mut offset = 0usize;
        for sample in samples.by_ref() {
            let sample = sample?;
            let n = sample.num_positions as usize;
            let mut out = SampleLabels::default();
            let mut need = n;
            while need > 0 {
                if pending.as_ref().is_none_or(|p| offset >= p.len()) {
                    pending = Some(labels.next().transpose()?.ok_or_else(|| Error::Corrupt {
                        path: reader.dir().join(&m.parts[part].labels.file),
                        row: None,
                        reason: format!(
                            "labels end before sample {} has its {n} rows",
                            sample.sample_id
                        ),
                    })?);
                    offset = 0;
                }
                let rows = pending
                    .as_ref()
                    .ok_or_else(|| Error::Internal("no rows".into()))?;
                let take = need.min(rows.len() - offset);
                for i in offset..offset + take {
                    out.topk_ids.extend_from_slice(rows.ids(i));
                    out.topk_logprobs.extend_from_slice(rows.logprobs(i));
                    out.lengths.push(rows.ids(i).len() as u32);
                    out.counts.extend_from_slice(rows.counts(i));
                    out.target_logprobs.push(rows.target_logprob[i]);
                    out.entropy.push(rows.entropy[i]);
                }
                offset += take;
                need -= take;
            }
            let record = SampleRecord {
                sample_id: sample.sample_id,
                source: sample.source,
                split: sample.split,
                record_index: sample.record_index,
                window_index: sample.window_index,
                input_ids: sample.input_ids,
                prompt_len: sample.prompt_len,
            };
            writer.push(&record, &out)?;
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
