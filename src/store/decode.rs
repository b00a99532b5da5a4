//! Decoding record batches of the two tables into typed rows, by column name.
//!
//! Decoding checks what a hostile or damaged file could get wrong (a missing or mistyped
//! column, nulls, top-k lists of the wrong length) and reports it as [`Error::Corrupt`]
//! naming the file and row; nothing here panics on file contents.

use std::path::{Path, PathBuf};

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float32Type, UInt32Type, UInt64Type};
use arrow::record_batch::RecordBatch;

use crate::error::{Error, Result};
use crate::schema::{labels, labels_v2, samples};

pub use super::decode_v2::{decode_labels_v2, physical_label_names, V2Inputs};

/// A column of the `labels` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LabelColumn {
    SampleId,
    Position,
    TargetId,
    InLoss,
    TopkIds,
    TopkLogprobs,
    TargetLogprob,
    Entropy,
    /// Draws of each entry: only in stores of a sample selection (not in [`Self::ALL`]).
    TopkCounts,
}

impl LabelColumn {
    /// Every column, in schema order.
    pub const ALL: [LabelColumn; 8] = [
        LabelColumn::SampleId,
        LabelColumn::Position,
        LabelColumn::TargetId,
        LabelColumn::InLoss,
        LabelColumn::TopkIds,
        LabelColumn::TopkLogprobs,
        LabelColumn::TargetLogprob,
        LabelColumn::Entropy,
    ];

    /// Column name in the Parquet files.
    pub fn name(self) -> &'static str {
        match self {
            LabelColumn::SampleId => labels::SAMPLE_ID,
            LabelColumn::Position => labels::POSITION,
            LabelColumn::TargetId => labels::TARGET_ID,
            LabelColumn::InLoss => labels::IN_LOSS,
            LabelColumn::TopkIds => labels::TOPK_IDS,
            LabelColumn::TopkLogprobs => labels::TOPK_LOGPROBS,
            LabelColumn::TargetLogprob => labels::TARGET_LOGPROB,
            LabelColumn::Entropy => labels::ENTROPY,
            LabelColumn::TopkCounts => labels_v2::TOPK_COUNTS,
        }
    }
}

/// A column of the `samples` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SampleColumn {
    SampleId,
    Source,
    Split,
    RecordIndex,
    WindowIndex,
    InputIds,
    PromptLen,
    NumPositions,
}

impl SampleColumn {
    /// Every column, in schema order.
    pub const ALL: [SampleColumn; 8] = [
        SampleColumn::SampleId,
        SampleColumn::Source,
        SampleColumn::Split,
        SampleColumn::RecordIndex,
        SampleColumn::WindowIndex,
        SampleColumn::InputIds,
        SampleColumn::PromptLen,
        SampleColumn::NumPositions,
    ];

    /// Column name in the Parquet files.
    pub fn name(self) -> &'static str {
        match self {
            SampleColumn::SampleId => samples::SAMPLE_ID,
            SampleColumn::Source => samples::SOURCE,
            SampleColumn::Split => samples::SPLIT,
            SampleColumn::RecordIndex => samples::RECORD_INDEX,
            SampleColumn::WindowIndex => samples::WINDOW_INDEX,
            SampleColumn::InputIds => samples::INPUT_IDS,
            SampleColumn::PromptLen => samples::PROMPT_LEN,
            SampleColumn::NumPositions => samples::NUM_POSITIONS,
        }
    }
}

/// Consecutive rows of one `labels` file, decoded. Columns that were not asked for are empty;
/// `topk_*` are row-major, `k` entries per row for top-k (then `offsets` is empty) or
/// `offsets[i]..offsets[i + 1]` for row `i` of a top-p or sample store; log-probs widened to
/// f32 whatever the stored dtype.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelRows {
    /// The file the rows come from.
    pub path: PathBuf,
    /// Row number (0-based, within the file) of the first row.
    pub first_row: u64,
    /// Ids and log-probs per position.
    pub k: usize,
    pub(crate) rows: usize,
    pub sample_id: Vec<u64>,
    pub position: Vec<u32>,
    pub target_id: Vec<u32>,
    pub in_loss: Vec<bool>,
    pub topk_ids: Vec<u32>,
    pub topk_logprobs: Vec<f32>,
    pub target_logprob: Vec<f32>,
    pub entropy: Vec<f32>,
    /// Row starts into `topk_*` (`len() + 1` values) when lists vary in length, else empty.
    pub offsets: Vec<usize>,
    /// Draws per entry, parallel to `topk_ids` (sample selections only).
    pub topk_counts: Vec<u16>,
}

impl LabelRows {
    /// Entries of row `i` in `topk_*`.
    fn span(&self, i: usize) -> std::ops::Range<usize> {
        if self.offsets.is_empty() {
            i * self.k..(i + 1) * self.k
        } else {
            match (self.offsets.get(i), self.offsets.get(i + 1)) {
                (Some(&a), Some(&b)) => a..b,
                _ => 0..0,
            }
        }
    }

    /// Draw counts of row `i` (empty when not a sample store or not read).
    pub fn counts(&self, i: usize) -> &[u16] {
        self.topk_counts.get(self.span(i)).unwrap_or(&[])
    }
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Top-k ids of row `i` (empty when the column was not read).
    pub fn ids(&self, i: usize) -> &[u32] {
        self.topk_ids.get(self.span(i)).unwrap_or(&[])
    }

    /// Top-k log-probs of row `i` (empty when the column was not read).
    pub fn logprobs(&self, i: usize) -> &[f32] {
        self.topk_logprobs.get(self.span(i)).unwrap_or(&[])
    }

    /// Appends rows `range` of `other` (same k, same columns read).
    pub(crate) fn extend_from(&mut self, other: &LabelRows, range: std::ops::Range<usize>) {
        fn part<T: Copy>(to: &mut Vec<T>, from: &[T], span: std::ops::Range<usize>) {
            if let Some(s) = from.get(span) {
                to.extend_from_slice(s);
            }
        }
        // The entries of the rows in the list columns.
        let entries = if other.offsets.is_empty() {
            range.start * self.k..range.end * self.k
        } else {
            let a = other.offsets.get(range.start).copied().unwrap_or(0);
            let b = other.offsets.get(range.end).copied().unwrap_or(a);
            if self.offsets.is_empty() {
                self.offsets.push(0);
            }
            let base = *self.offsets.last().unwrap_or(&0);
            for r in range.clone() {
                self.offsets.push(base + other.offsets[r + 1] - a);
            }
            a..b
        };
        part(&mut self.topk_ids, &other.topk_ids, entries.clone());
        part(
            &mut self.topk_logprobs,
            &other.topk_logprobs,
            entries.clone(),
        );
        part(&mut self.topk_counts, &other.topk_counts, entries);
        part(&mut self.sample_id, &other.sample_id, range.clone());
        part(&mut self.position, &other.position, range.clone());
        part(&mut self.target_id, &other.target_id, range.clone());
        part(&mut self.in_loss, &other.in_loss, range.clone());
        part(
            &mut self.target_logprob,
            &other.target_logprob,
            range.clone(),
        );
        part(&mut self.entropy, &other.entropy, range.clone());
        self.rows += range.len();
    }
}

/// One decoded row of a `samples` file; columns that were not asked for keep their default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleRow {
    /// Row number (0-based) within its samples file.
    pub row: u64,
    pub sample_id: u64,
    pub source: String,
    pub split: String,
    pub record_index: u64,
    pub window_index: u32,
    pub input_ids: Vec<u32>,
    pub prompt_len: u32,
    pub num_positions: u32,
}

pub(crate) fn corrupt(path: &Path, row: u64, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        row: Some(row),
        reason: reason.into(),
    }
}

/// Finds `name` in `batch`, refusing nulls; `first_row` numbers the batch's rows in the file.
pub(super) fn column<'a>(
    batch: &'a RecordBatch,
    name: &str,
    path: &Path,
    first_row: u64,
) -> Result<&'a ArrayRef> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| corrupt(path, first_row, format!("no column {name}")))?;
    if let Some(i) = (0..col.len()).find(|&i| col.is_null(i)) {
        return Err(corrupt(
            path,
            first_row + i as u64,
            format!("{name} is null"),
        ));
    }
    Ok(col)
}

pub(super) fn mistyped(name: &str, col: &ArrayRef, path: &Path, first_row: u64) -> Error {
    corrupt(
        path,
        first_row,
        format!("column {name} has type {}", col.data_type()),
    )
}

pub(super) fn u64s(
    batch: &RecordBatch,
    name: &str,
    path: &Path,
    first_row: u64,
) -> Result<Vec<u64>> {
    let col = column(batch, name, path, first_row)?;
    col.as_primitive_opt::<UInt64Type>()
        .map(|a| a.values().to_vec())
        .ok_or_else(|| mistyped(name, col, path, first_row))
}

pub(super) fn u32s(
    batch: &RecordBatch,
    name: &str,
    path: &Path,
    first_row: u64,
) -> Result<Vec<u32>> {
    let col = column(batch, name, path, first_row)?;
    col.as_primitive_opt::<UInt32Type>()
        .map(|a| a.values().to_vec())
        .ok_or_else(|| mistyped(name, col, path, first_row))
}

pub(super) fn bools(
    batch: &RecordBatch,
    name: &str,
    path: &Path,
    first_row: u64,
) -> Result<Vec<bool>> {
    let col = column(batch, name, path, first_row)?;
    col.as_boolean_opt()
        .map(|a| a.values().iter().collect())
        .ok_or_else(|| mistyped(name, col, path, first_row))
}

fn strings(batch: &RecordBatch, name: &str, path: &Path, first_row: u64) -> Result<Vec<String>> {
    let col = column(batch, name, path, first_row)?;
    col.as_string_opt::<i32>()
        .map(|a| {
            a.iter()
                .map(|s| s.unwrap_or_default().to_string())
                .collect()
        })
        .ok_or_else(|| mistyped(name, col, path, first_row))
}

/// Float16 or float32 values widened to f32.
fn floats(col: &ArrayRef, name: &str, path: &Path, first_row: u64) -> Result<Vec<f32>> {
    if !matches!(col.data_type(), DataType::Float16 | DataType::Float32) {
        return Err(mistyped(name, col, path, first_row));
    }
    let wide = cast(col, &DataType::Float32)?;
    Ok(wide.as_primitive::<Float32Type>().values().to_vec())
}

/// The flat values of a fixed-size list column of `k` items per row.
fn flat_list<'a>(
    batch: &'a RecordBatch,
    name: &str,
    k: usize,
    path: &Path,
    first_row: u64,
) -> Result<&'a ArrayRef> {
    let col = column(batch, name, path, first_row)?;
    let list = col
        .as_fixed_size_list_opt()
        .ok_or_else(|| mistyped(name, col, path, first_row))?;
    if usize::try_from(list.value_length()).ok() != Some(k) {
        return Err(corrupt(
            path,
            first_row,
            format!(
                "column {name} has lists of {}, the store's k is {k}",
                list.value_length()
            ),
        ));
    }
    let values = list.values();
    if values.null_count() > 0 || values.len() != batch.num_rows() * k {
        return Err(corrupt(
            path,
            first_row,
            format!("column {name} has null or missing list items"),
        ));
    }
    Ok(values)
}

/// Decodes the `columns` of one record batch of a labels file.
pub fn decode_labels(
    batch: &RecordBatch,
    columns: &[LabelColumn],
    k: usize,
    path: &Path,
    first_row: u64,
) -> Result<LabelRows> {
    let mut rows = LabelRows {
        path: path.to_path_buf(),
        first_row,
        k,
        rows: batch.num_rows(),
        ..LabelRows::default()
    };
    for &c in columns {
        let name = c.name();
        match c {
            LabelColumn::SampleId => rows.sample_id = u64s(batch, name, path, first_row)?,
            LabelColumn::Position => rows.position = u32s(batch, name, path, first_row)?,
            LabelColumn::TargetId => rows.target_id = u32s(batch, name, path, first_row)?,
            LabelColumn::InLoss => rows.in_loss = bools(batch, name, path, first_row)?,
            LabelColumn::TopkIds => {
                let values = flat_list(batch, name, k, path, first_row)?;
                rows.topk_ids = values
                    .as_primitive_opt::<UInt32Type>()
                    .map(|a| a.values().to_vec())
                    .ok_or_else(|| mistyped(name, values, path, first_row))?;
            }
            LabelColumn::TopkLogprobs => {
                let values = flat_list(batch, name, k, path, first_row)?;
                rows.topk_logprobs = floats(values, name, path, first_row)?;
            }
            LabelColumn::TargetLogprob => {
                let col = column(batch, name, path, first_row)?;
                rows.target_logprob = floats(col, name, path, first_row)?;
            }
            LabelColumn::Entropy => {
                let col = column(batch, name, path, first_row)?;
                rows.entropy = floats(col, name, path, first_row)?;
            }
            // 1.0 stores are top-k: no draws.
            LabelColumn::TopkCounts => {}
        }
    }
    Ok(rows)
}

/// Stores `values[i]` into row `i` of `rows` with `put`.
fn set<T>(rows: &mut [SampleRow], values: Vec<T>, put: impl Fn(&mut SampleRow, T)) {
    for (r, v) in rows.iter_mut().zip(values) {
        put(r, v);
    }
}

/// Decodes the `columns` of one record batch of a samples file.
pub fn decode_samples(
    batch: &RecordBatch,
    columns: &[SampleColumn],
    path: &Path,
    first_row: u64,
) -> Result<Vec<SampleRow>> {
    let n = batch.num_rows();
    let mut out: Vec<SampleRow> = (0..n)
        .map(|i| SampleRow {
            row: first_row + i as u64,
            ..SampleRow::default()
        })
        .collect();
    for &c in columns {
        let name = c.name();
        match c {
            SampleColumn::SampleId => set(&mut out, u64s(batch, name, path, first_row)?, |r, v| {
                r.sample_id = v
            }),
            SampleColumn::RecordIndex => {
                set(&mut out, u64s(batch, name, path, first_row)?, |r, v| {
                    r.record_index = v
                })
            }
            SampleColumn::Source => {
                set(&mut out, strings(batch, name, path, first_row)?, |r, v| {
                    r.source = v
                })
            }
            SampleColumn::Split => set(&mut out, strings(batch, name, path, first_row)?, |r, v| {
                r.split = v
            }),
            SampleColumn::WindowIndex => {
                set(&mut out, u32s(batch, name, path, first_row)?, |r, v| {
                    r.window_index = v
                })
            }
            SampleColumn::PromptLen => {
                set(&mut out, u32s(batch, name, path, first_row)?, |r, v| {
                    r.prompt_len = v
                })
            }
            SampleColumn::NumPositions => {
                set(&mut out, u32s(batch, name, path, first_row)?, |r, v| {
                    r.num_positions = v
                })
            }
            SampleColumn::InputIds => {
                let col = column(batch, name, path, first_row)?;
                let list = col
                    .as_list_opt::<i32>()
                    .ok_or_else(|| mistyped(name, col, path, first_row))?;
                let values = list
                    .values()
                    .as_primitive_opt::<UInt32Type>()
                    .ok_or_else(|| mistyped(name, col, path, first_row))?;
                if values.null_count() > 0 {
                    return Err(corrupt(path, first_row, format!("{name} has null items")));
                }
                let values = values.values();
                for (i, r) in out.iter_mut().enumerate() {
                    let (start, end) = (list.value_offsets()[i], list.value_offsets()[i + 1]);
                    let ids = usize::try_from(start)
                        .ok()
                        .zip(usize::try_from(end).ok())
                        .and_then(|(s, e)| values.get(s..e))
                        .ok_or_else(|| {
                            corrupt(path, r.row, format!("{name} offsets out of range"))
                        })?;
                    r.input_ids = ids.to_vec();
                }
            }
        }
    }
    Ok(out)
}
