//! Decoding record batches of 2.0 (quantized) `labels` files into the same typed rows as 1.0
//! ([`LabelRows`]): fixed-point probabilities, target log-prob and entropy, variable-length
//! lists, draw counts, and `target_id` from the `input_ids` of the part's samples.

use std::collections::HashMap;
use std::path::Path;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{ArrowPrimitiveType, UInt16Type, UInt32Type};
use arrow::record_batch::RecordBatch;

use super::decode::{bools, column, corrupt, mistyped, u32s, u64s, LabelColumn, LabelRows};
use crate::error::Result;
use crate::schema::{labels, labels_v2, Quantization};

impl LabelColumn {
    /// Whether decoding this column of a 2.0 file needs the sample's `input_ids` (the
    /// target is not stored there).
    pub fn needs_inputs(self) -> bool {
        matches!(self, LabelColumn::TargetId | LabelColumn::TargetLogprob)
    }
}

/// Names of the physical columns to read for `columns`: the logical names in a 1.0 file;
/// in a 2.0 file (`v2`) the stored columns they are decoded from.
pub fn physical_label_names(columns: &[LabelColumn], v2: bool) -> Vec<&'static str> {
    if !v2 {
        return columns.iter().map(|c| c.name()).collect();
    }
    let mut names = Vec::new();
    let mut add = |n: &'static str| {
        if !names.contains(&n) {
            names.push(n);
        }
    };
    for &c in columns {
        match c {
            LabelColumn::SampleId | LabelColumn::Position | LabelColumn::InLoss => add(c.name()),
            LabelColumn::TopkIds => add(labels::TOPK_IDS),
            LabelColumn::TopkLogprobs => add(labels_v2::TOPK_PROBS_Q),
            LabelColumn::Entropy => add(labels_v2::ENTROPY_Q),
            LabelColumn::TopkCounts => add(labels_v2::TOPK_COUNTS),
            LabelColumn::TargetId => {
                add(labels::SAMPLE_ID);
                add(labels::POSITION);
            }
            LabelColumn::TargetLogprob => {
                add(labels::SAMPLE_ID);
                add(labels::POSITION);
                add(labels::TOPK_IDS);
                add(labels_v2::TOPK_PROBS_Q);
                add(labels_v2::TARGET_LOGPROB_Q);
            }
        }
    }
    names
}

/// What decoding rows of a 2.0 labels file needs besides the file: the fixed-point scales
/// and, for the target columns, the `input_ids` of the part's samples by sample id.
#[derive(Debug, Clone, Copy)]
pub struct V2Inputs<'a> {
    pub quant: Quantization,
    /// Every list has exactly k items (top-k); else 1..=k (top-p, sample).
    pub fixed_len: bool,
    pub inputs: &'a HashMap<u64, Vec<u32>>,
    /// The samples file the inputs come from (named in errors).
    pub samples_path: &'a Path,
}

/// The flat values of a list column and its row offsets (relative to the values); every row
/// has exactly `k` items when `fixed`, else 1..=k.
fn k_list<'a>(
    batch: &'a RecordBatch,
    name: &str,
    (k, fixed): (usize, bool),
    path: &Path,
    first_row: u64,
) -> Result<(&'a ArrayRef, Vec<usize>)> {
    let col = column(batch, name, path, first_row)?;
    let list = col
        .as_list_opt::<i32>()
        .ok_or_else(|| mistyped(name, col, path, first_row))?;
    let offsets = list.value_offsets();
    let start = usize::try_from(offsets[0]).unwrap_or(usize::MAX);
    let mut rel = Vec::with_capacity(list.len() + 1);
    rel.push(0);
    for i in 0..list.len() {
        let len = usize::try_from(offsets[i + 1] - offsets[i]).unwrap_or(usize::MAX);
        let ok = if fixed {
            len == k
        } else {
            (1..=k).contains(&len)
        };
        if !ok {
            let want = if fixed {
                format!("{k}")
            } else {
                format!("1..={k}")
            };
            return Err(corrupt(
                path,
                first_row + i as u64,
                format!("column {name} has a list of {len}, the store allows {want}"),
            ));
        }
        rel.push(rel[i] + len);
    }
    let values = list.values();
    let total = rel[list.len()];
    if values.null_count() > 0 || values.len() < start.saturating_add(total) {
        return Err(corrupt(
            path,
            first_row,
            format!("column {name} has null or missing list items"),
        ));
    }
    Ok((values, rel))
}

/// `n` values of a list column's flat values from `start`, as type `T`.
fn list_values<T: ArrowPrimitiveType>(
    values: &ArrayRef,
    (start, n): (usize, usize),
    name: &str,
    path: &Path,
    row: u64,
) -> Result<Vec<T::Native>> {
    values
        .as_primitive_opt::<T>()
        .and_then(|a| a.values().get(start..start + n).map(<[T::Native]>::to_vec))
        .ok_or_else(|| mistyped(name, values, path, row))
}

fn list_start(batch: &RecordBatch, name: &str) -> usize {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_list_opt::<i32>())
        .and_then(|l| usize::try_from(l.value_offsets()[0]).ok())
        .unwrap_or(0)
}

/// Decodes the `columns` of one record batch of a 2.0 labels file into the logical rows.
pub fn decode_labels_v2(
    batch: &RecordBatch,
    columns: &[LabelColumn],
    k: usize,
    path: &Path,
    first_row: u64,
    v2: V2Inputs<'_>,
) -> Result<LabelRows> {
    let n = batch.num_rows();
    let mut rows = LabelRows {
        path: path.to_path_buf(),
        first_row,
        k,
        rows: n,
        ..LabelRows::default()
    };
    let q = v2.quant;
    let want = |c: LabelColumn| columns.contains(&c);
    let needs_target = want(LabelColumn::TargetId) || want(LabelColumn::TargetLogprob);
    let shape = (k, v2.fixed_len);
    // Row offsets of the lists: every list column of a row has the same length.
    let mut offsets: Option<Vec<usize>> = None;
    let mut same = |name: &str, rel: Vec<usize>| -> Result<()> {
        match &offsets {
            Some(o) if *o != rel => Err(corrupt(
                path,
                first_row,
                format!(
                    "column {name} has lists of other lengths than {}",
                    labels::TOPK_IDS
                ),
            )),
            Some(_) => Ok(()),
            None => {
                offsets = Some(rel);
                Ok(())
            }
        }
    };
    let ids = if want(LabelColumn::TopkIds) || want(LabelColumn::TargetLogprob) {
        let (values, rel) = k_list(batch, labels::TOPK_IDS, shape, path, first_row)?;
        let start = list_start(batch, labels::TOPK_IDS);
        let total = rel[n];
        same(labels::TOPK_IDS, rel)?;
        list_values::<UInt32Type>(values, (start, total), labels::TOPK_IDS, path, first_row)?
    } else {
        Vec::new()
    };
    let lps: Vec<f32> = if want(LabelColumn::TopkLogprobs) || want(LabelColumn::TargetLogprob) {
        let name = labels_v2::TOPK_PROBS_Q;
        let (values, rel) = k_list(batch, name, shape, path, first_row)?;
        let start = list_start(batch, name);
        let total = rel[n];
        same(name, rel)?;
        let qs = list_values::<UInt16Type>(values, (start, total), name, path, first_row)?;
        qs.into_iter().map(|v| q.logprob(v)).collect()
    } else {
        Vec::new()
    };
    let counts: Vec<u16> = if want(LabelColumn::TopkCounts) {
        let name = labels_v2::TOPK_COUNTS;
        let (values, rel) = k_list(batch, name, shape, path, first_row)?;
        let start = list_start(batch, name);
        let total = rel[n];
        same(name, rel)?;
        list_values::<UInt16Type>(values, (start, total), name, path, first_row)?
    } else {
        Vec::new()
    };
    let offsets = offsets.unwrap_or_default();
    let span = |i: usize| -> std::ops::Range<usize> {
        if offsets.is_empty() {
            i * k..(i + 1) * k
        } else {
            offsets[i]..offsets[i + 1]
        }
    };
    let sample_id = if want(LabelColumn::SampleId) || needs_target {
        u64s(batch, labels::SAMPLE_ID, path, first_row)?
    } else {
        Vec::new()
    };
    let position = if want(LabelColumn::Position) || needs_target {
        u32s(batch, labels::POSITION, path, first_row)?
    } else {
        Vec::new()
    };
    let mut target_id = Vec::new();
    if needs_target {
        target_id.reserve(n);
        for i in 0..n {
            let (s, p) = (sample_id[i], position[i]);
            let t = v2
                .inputs
                .get(&s)
                .and_then(|ids| ids.get(p as usize + 1))
                .ok_or_else(|| {
                    corrupt(
                        path,
                        first_row + i as u64,
                        format!(
                            "sample {s} position {p} has no next token in {}",
                            v2.samples_path.display()
                        ),
                    )
                })?;
            target_id.push(*t);
        }
    }
    if want(LabelColumn::TargetLogprob) {
        let name = labels_v2::TARGET_LOGPROB_Q;
        let col = batch
            .column_by_name(name)
            .ok_or_else(|| corrupt(path, first_row, format!("no column {name}")))?;
        let tq = col
            .as_primitive_opt::<UInt16Type>()
            .ok_or_else(|| mistyped(name, col, path, first_row))?;
        rows.target_logprob.reserve(n);
        for (i, &target) in target_id.iter().enumerate().take(n) {
            let row = span(i);
            let row_ids = &ids[row.clone()];
            let at = row_ids.iter().position(|&id| id == target);
            let lp = match (tq.is_null(i), at) {
                (true, Some(j)) => lps[row.start + j],
                (false, None) => q.target_logprob(tq.value(i)),
                (true, None) => {
                    return Err(corrupt(
                        path,
                        first_row + i as u64,
                        format!(
                            "{name} is null but the target {} is not in topk_ids",
                            target
                        ),
                    ))
                }
                (false, Some(_)) => {
                    return Err(corrupt(
                        path,
                        first_row + i as u64,
                        format!("{name} is set but the target {} is in topk_ids", target),
                    ))
                }
            };
            rows.target_logprob.push(lp);
        }
    }
    if want(LabelColumn::Entropy) {
        let name = labels_v2::ENTROPY_Q;
        let col = column(batch, name, path, first_row)?;
        let e = col
            .as_primitive_opt::<UInt16Type>()
            .ok_or_else(|| mistyped(name, col, path, first_row))?;
        rows.entropy = e.values().iter().map(|&v| q.entropy(v)).collect();
    }
    if want(LabelColumn::InLoss) {
        rows.in_loss = bools(batch, labels::IN_LOSS, path, first_row)?;
    }
    if want(LabelColumn::TopkIds) {
        rows.topk_ids = ids;
    }
    if want(LabelColumn::TopkLogprobs) {
        rows.topk_logprobs = lps;
    }
    rows.topk_counts = counts;
    if !v2.fixed_len {
        rows.offsets = offsets;
    }
    if want(LabelColumn::TargetId) {
        rows.target_id = target_id;
    }
    if want(LabelColumn::SampleId) {
        rows.sample_id = sample_id;
    }
    if want(LabelColumn::Position) {
        rows.position = position;
    }
    Ok(rows)
}
