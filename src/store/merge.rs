//! `firstkd merge`: several complete stores labelled by the same teacher and tokenizer into
//! one.
//!
//! Inputs must agree on everything that makes their labels comparable: the teacher (model
//! hash, file, architecture, weight quantisation, compute dtype and mode), the tokenizer
//! (hash, vocabulary size, special tokens), `k` and the selection. The first field that
//! differs is named in the error. Sample ids stay unique: kept as they are when the inputs'
//! ids are disjoint (stores split from one store merge back to the same ids), otherwise
//! input `i`'s ids are shifted by the sum of `max id + 1` of the inputs before it (recorded
//! per input in the manifest's `labeling.merged_from`, so every id traces back). A fitted
//! temperature is kept only when every input has the same one. The output is written through
//! [`StoreWriter`]: resumable by rerunning the same command, never complete before it is.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::copy::{copy_columns, meta_of};
use super::decode::SampleColumn;
use super::manifest::Manifest;
use super::reader::StoreReader;
use super::writer::{Opened, StoreWriter, WriterOptions};
use crate::error::{Error, Result};
use crate::schema::LogprobDtype;

/// How the merged store numbers its samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdPlan {
    /// Every input's ids unchanged (they were disjoint).
    Kept,
    /// Input `i`'s ids shifted by `offsets[i]`.
    Offset,
}

/// What a merge did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    pub ids: IdPlan,
    /// Per input: the shift added to its sample ids (0 when kept).
    pub offsets: Vec<u64>,
    /// Samples written by this run.
    pub samples_written: u64,
    /// Why the inputs' temperature was not kept (`None`: kept, or none fitted).
    pub temperature_dropped: Option<String>,
    /// The output was already complete: nothing written.
    pub already_complete: bool,
}

/// The first field in which `b`'s labels are not comparable with `a`'s, as
/// `(field, value in a, value in b)`.
pub fn incompatibility(a: &Manifest, b: &Manifest) -> Option<(String, String, String)> {
    let (ta, tb) = (&a.teacher, &b.teacher);
    let fields: [(&str, String, String); 11] = [
        ("teacher.sha256", ta.sha256.clone(), tb.sha256.clone()),
        (
            "teacher.file_name",
            ta.file_name.clone(),
            tb.file_name.clone(),
        ),
        (
            "teacher.architecture",
            ta.architecture.clone(),
            tb.architecture.clone(),
        ),
        (
            "teacher.quantization",
            ta.quantization.clone(),
            tb.quantization.clone(),
        ),
        (
            "teacher.compute_dtype",
            ta.compute_dtype.clone(),
            tb.compute_dtype.clone(),
        ),
        (
            "teacher.compute_mode",
            ta.compute_mode.clone(),
            tb.compute_mode.clone(),
        ),
        (
            "tokenizer.sha256",
            a.tokenizer.sha256.clone(),
            b.tokenizer.sha256.clone(),
        ),
        (
            "tokenizer.vocab_size",
            a.tokenizer.vocab_size.to_string(),
            b.tokenizer.vocab_size.to_string(),
        ),
        (
            "tokenizer.special_tokens",
            serde_json::to_string(&a.tokenizer.special_tokens).unwrap_or_default(),
            serde_json::to_string(&b.tokenizer.special_tokens).unwrap_or_default(),
        ),
        ("k", a.k.to_string(), b.k.to_string()),
        (
            "selection",
            a.selection().to_string(),
            b.selection().to_string(),
        ),
    ];
    fields
        .into_iter()
        .find(|(_, x, y)| x != y)
        .map(|(f, x, y)| (f.to_string(), x, y))
}

/// Merges the complete stores `inputs` (in order) into the new store `out`, written in
/// `dtype` (default: the first input's). `progress(parts done, parts in all)`.
pub fn merge(
    inputs: &[PathBuf],
    out: &Path,
    dtype: Option<LogprobDtype>,
    mut progress: impl FnMut(usize, usize),
) -> Result<MergeReport> {
    if inputs.len() < 2 {
        return Err(Error::InvalidArgument(
            "merge needs at least two stores".into(),
        ));
    }
    let out_abs = std::path::absolute(out).ok();
    let mut readers = Vec::with_capacity(inputs.len());
    for path in inputs {
        if std::path::absolute(path).ok() == out_abs {
            return Err(Error::OutputInUse {
                path: out.to_path_buf(),
                reason: "merge writes a new store; give an output directory that is not an input"
                    .to_string(),
            });
        }
        readers.push(StoreReader::open(path)?);
    }
    let first = readers[0].manifest().clone();
    for (path, r) in inputs.iter().zip(&readers).skip(1) {
        if let Some((field, a, b)) = incompatibility(&first, r.manifest()) {
            return Err(Error::InvalidArgument(format!(
                "{}: cannot merge with {}: {field} differs ({a} vs {b}); merge only stores \
                 labelled by the same teacher and tokenizer with the same selection",
                path.display(),
                inputs[0].display()
            )));
        }
    }
    let (ids, offsets) = plan_ids(&readers)?;
    let (temperature, temperature_dropped) = merged_temperature(inputs, &readers);
    let mut meta = meta_of(&first, dtype.unwrap_or(first.logprob_dtype));
    meta.labeling = serde_json::json!({
        "merged_from": inputs.iter().zip(&readers).zip(&offsets).map(|((p, r), off)| {
            let m = r.manifest();
            serde_json::json!({
                "store": p.display().to_string(),
                "samples": m.rows(crate::schema::Table::Samples),
                "sample_id_offset": off,
                "labeling": m.labeling,
                "temperature": m.temperature.as_ref().map(|t| t.value),
            })
        }).collect::<Vec<_>>(),
        "sample_ids": ids,
    });
    let (mut writer, cursor) = match StoreWriter::open(out, meta, WriterOptions::default())? {
        Opened::Fresh(w) => (w, (0, 0)),
        Opened::Resumed { writer, cursor } => {
            let at = |key: &str| cursor.get(key).and_then(serde_json::Value::as_u64);
            (
                writer,
                (
                    at("input").unwrap_or(0) as usize,
                    at("part").unwrap_or(0) as usize,
                ),
            )
        }
        Opened::Complete(_) => {
            return Ok(MergeReport {
                ids,
                offsets,
                samples_written: 0,
                temperature_dropped,
                already_complete: true,
            })
        }
    };
    let total: usize = readers.iter().map(|r| r.manifest().parts.len()).sum();
    let mut done: usize = readers[..cursor.0.min(readers.len())]
        .iter()
        .map(|r| r.manifest().parts.len())
        .sum::<usize>()
        + cursor.1;
    let mut samples_written = 0u64;
    for (i, r) in readers.iter().enumerate().skip(cursor.0) {
        let columns = copy_columns(r.manifest());
        let parts = r.manifest().parts.len();
        let from = if i == cursor.0 { cursor.1 } else { 0 };
        for part in from..parts {
            for joined in r.part_labelled_samples(part..part + 1, &columns, |_| true) {
                let joined = joined?;
                let id = joined
                    .sample
                    .sample_id
                    .checked_add(offsets[i])
                    .ok_or_else(|| Error::InvalidArgument("sample ids overflow u64".into()))?;
                writer.push(
                    &joined.record(id, &joined.sample.split),
                    &joined.sample_labels(),
                )?;
                samples_written += 1;
            }
            let next = if part + 1 < parts {
                serde_json::json!({ "input": i, "part": part + 1 })
            } else {
                serde_json::json!({ "input": i + 1, "part": 0 })
            };
            writer.commit(next)?;
            done += 1;
            progress(done, total);
        }
    }
    let mut manifest = writer.finish(serde_json::json!({ "input": inputs.len(), "part": 0 }))?;
    manifest.temperature = temperature;
    manifest.save(out)?;
    Ok(MergeReport {
        ids,
        offsets,
        samples_written,
        temperature_dropped,
        already_complete: false,
    })
}

/// Keeps the ids when the inputs' ids are disjoint, else shifts each input past the ones
/// before it.
fn plan_ids(readers: &[StoreReader]) -> Result<(IdPlan, Vec<u64>)> {
    let mut seen = HashSet::new();
    let mut disjoint = true;
    let mut maxima = Vec::with_capacity(readers.len());
    for r in readers {
        let mut max = None::<u64>;
        for row in r.sample_rows(&[SampleColumn::SampleId]) {
            let id = row?.sample_id;
            max = Some(max.map_or(id, |m: u64| m.max(id)));
            if disjoint && !seen.insert(id) {
                disjoint = false;
            }
        }
        maxima.push(max);
    }
    if disjoint {
        return Ok((IdPlan::Kept, vec![0; readers.len()]));
    }
    let mut offsets = Vec::with_capacity(readers.len());
    let mut next = 0u64;
    for max in maxima {
        offsets.push(next);
        if let Some(m) = max {
            next = next
                .checked_add(m)
                .and_then(|n| n.checked_add(1))
                .ok_or_else(|| Error::InvalidArgument("sample ids overflow u64".into()))?;
        }
    }
    Ok((IdPlan::Offset, offsets))
}

/// The inputs' common temperature, or why there is none.
fn merged_temperature(
    inputs: &[PathBuf],
    readers: &[StoreReader],
) -> (Option<super::TemperatureInfo>, Option<String>) {
    let temps: Vec<_> = readers
        .iter()
        .map(|r| r.manifest().temperature.clone())
        .collect();
    if temps.iter().all(Option::is_none) {
        return (None, None);
    }
    let values: Vec<String> = inputs
        .iter()
        .zip(&temps)
        .map(|(p, t)| {
            format!(
                "{}: {}",
                p.display(),
                t.as_ref()
                    .map_or("none".to_string(), |t| format!("{:.4}", t.value))
            )
        })
        .collect();
    let same = temps.windows(2).all(|w| match (&w[0], &w[1]) {
        (Some(a), Some(b)) => a.value == b.value && a.objective == b.objective,
        _ => false,
    });
    if same {
        (temps[0].clone(), None)
    } else {
        (
            None,
            Some(format!(
                "the inputs' temperatures differ ({}); run `firstkd calibrate` on the merged store",
                values.join(", ")
            )),
        )
    }
}
