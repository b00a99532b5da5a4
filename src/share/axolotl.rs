//! axolotl's offline KD dataset layout (axolotl-ai-cloud/axolotl, src/axolotl/integrations/kd):
//! export of a store into it and import of such a dataset into a store.
//!
//! One row per sequence of length `L`, pre-tokenized (axolotl uses such rows as they are):
//! `input_ids`, `attention_mask` (ones), `labels` (`input_ids[i]`, or -100 where not trained;
//! unshifted, as Hugging Face expects), and per position lists of `k`: `target_token_ids`,
//! `target_logprobs`, `target_mask`. Row `i` of the targets is the teacher's distribution of
//! the token **after** `input_ids[i]` (axolotl's KD loss pairs the student's hidden state `i`
//! with target row `i`, unshifted; only the CE labels are shifted), so `target_mask[i]` is 1
//! exactly where `labels[i + 1] != -100`, and the last row is padding (id 0, log-prob -1e9,
//! mask 0: the values axolotl's collator pads with). Rows of a selection with fewer than `k`
//! entries are padded the same way.
//!
//! axolotl's loss takes `target_logprobs` as already scaled to its `kd_temperature` and
//! normalised over the top-k, so the export bakes a temperature in: the store's fitted T by
//! default (FIRST), any given T, or `raw` (the stored full-vocabulary log-probs at T = 1,
//! not renormalised: exact, for round trips and for axolotl's own rescaling). The choice is
//! recorded in each file's key-value metadata (`firstkd.export`) and in
//! `firstkd_export.json`.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Builder, Int32Builder, ListBuilder, RecordBatch};
use arrow::datatypes::{DataType, Field};

use super::files::{kd_schema, tmp_path, FileFormat, OutFile};
use crate::error::{Error, Result};
use crate::schema::Selection;
use crate::store::join::LabelledSample;
use crate::store::{LabelColumn, StoreReader};

/// Log-prob written for padding entries (axolotl's collator pads with the same).
pub const PAD_LOGPROB: f32 = -1e9;
/// Sequences per written batch.
const BATCH_ROWS: usize = 64;
/// Name of the export's description, written last.
pub const EXPORT_FILE: &str = "firstkd_export.json";
const PROGRESS_FILE: &str = ".firstkd_export_progress.json";

/// Which temperature the exported log-probs are at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExportTemperature {
    /// The store's fitted temperature (T = 1 when it has none), normalised over the top-k.
    Fitted,
    /// This temperature, normalised over the top-k.
    Value(f64),
    /// The stored log-probs as they are (full-vocabulary, T = 1, not renormalised).
    Raw,
}

impl ExportTemperature {
    /// Parses `fitted`, `raw` or a positive number.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "fitted" => Ok(ExportTemperature::Fitted),
            "raw" => Ok(ExportTemperature::Raw),
            _ => match s.parse::<f64>() {
                Ok(t) if t.is_finite() && t > 0.0 => Ok(ExportTemperature::Value(t)),
                _ => Err(Error::InvalidArgument(format!(
                    "temperature {s:?}: expected fitted, raw or a positive number"
                ))),
            },
        }
    }
}

/// Options of [`export_axolotl`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExportOptions {
    pub file_format: FileFormat,
    pub temperature: ExportTemperature,
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    /// Temperature baked in (`None`: raw log-probs).
    pub temperature: Option<f64>,
    /// Where the temperature came from (`fitted`, `given`, `no fitted temperature: T = 1`,
    /// `raw`).
    pub temperature_source: String,
    /// Files of the export, relative to its directory, with their sequences.
    pub files: Vec<(String, u64)>,
    /// The export was already complete: nothing written.
    pub already_complete: bool,
}

/// Per split: a file being written and its pending rows.
struct SplitFile {
    split: String,
    file: OutFile,
    relative: String,
    rows: u64,
    batch: KdBatch,
}

/// Builders of one batch of exported rows.
struct KdBatch {
    input_ids: ListBuilder<Int32Builder>,
    attention_mask: ListBuilder<Int32Builder>,
    labels: ListBuilder<Int32Builder>,
    ids: ListBuilder<ListBuilder<Int32Builder>>,
    logprobs: ListBuilder<ListBuilder<Float32Builder>>,
    mask: ListBuilder<ListBuilder<Int32Builder>>,
    json: Vec<serde_json::Value>,
    rows: usize,
}

fn item(t: DataType) -> Arc<Field> {
    Arc::new(Field::new("item", t, false))
}

fn ints() -> ListBuilder<Int32Builder> {
    ListBuilder::new(Int32Builder::new()).with_field(item(DataType::Int32))
}

fn nested_ints() -> ListBuilder<ListBuilder<Int32Builder>> {
    ListBuilder::new(ints()).with_field(item(DataType::List(item(DataType::Int32))))
}

impl KdBatch {
    fn new() -> Self {
        KdBatch {
            input_ids: ints(),
            attention_mask: ints(),
            labels: ints(),
            ids: nested_ints(),
            logprobs: ListBuilder::new(
                ListBuilder::new(Float32Builder::new()).with_field(item(DataType::Float32)),
            )
            .with_field(item(DataType::List(item(DataType::Float32)))),
            mask: nested_ints(),
            json: Vec::new(),
            rows: 0,
        }
    }

    fn push(&mut self, row: &ExportRow, json: bool) {
        self.input_ids.values().append_slice(&row.input_ids);
        self.input_ids.append(true);
        self.attention_mask
            .values()
            .append_slice(&vec![1; row.input_ids.len()]);
        self.attention_mask.append(true);
        self.labels.values().append_slice(&row.labels);
        self.labels.append(true);
        for i in 0..row.ids.len() {
            self.ids.values().values().append_slice(&row.ids[i]);
            self.ids.values().append(true);
            self.logprobs
                .values()
                .values()
                .append_slice(&row.logprobs[i]);
            self.logprobs.values().append(true);
            self.mask.values().values().append_slice(&row.mask[i]);
            self.mask.values().append(true);
        }
        self.ids.append(true);
        self.logprobs.append(true);
        self.mask.append(true);
        if json {
            self.json.push(serde_json::json!({
                "input_ids": row.input_ids,
                "attention_mask": vec![1; row.input_ids.len()],
                "labels": row.labels,
                "target_token_ids": row.ids,
                "target_logprobs": row.logprobs,
                "target_mask": row.mask,
            }));
        }
        self.rows += 1;
    }

    fn take(&mut self) -> Result<(RecordBatch, Vec<serde_json::Value>)> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.input_ids.finish()),
            Arc::new(self.attention_mask.finish()),
            Arc::new(self.labels.finish()),
            Arc::new(self.ids.finish()),
            Arc::new(self.logprobs.finish()),
            Arc::new(self.mask.finish()),
        ];
        self.rows = 0;
        let batch = RecordBatch::try_new(kd_schema(), columns)?;
        Ok((batch, std::mem::take(&mut self.json)))
    }
}

/// One exported sequence.
struct ExportRow {
    input_ids: Vec<i32>,
    labels: Vec<i32>,
    ids: Vec<Vec<i32>>,
    logprobs: Vec<Vec<f32>>,
    mask: Vec<Vec<i32>>,
}

/// `lps / T` normalised over the entries (log-softmax), in f64.
pub fn rescaled(lps: &[f32], temperature: f64) -> Vec<f32> {
    let scaled: Vec<f64> = lps.iter().map(|&l| f64::from(l) / temperature).collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + scaled.iter().map(|s| (s - max).exp()).sum::<f64>().ln();
    scaled.iter().map(|s| (s - lse) as f32).collect()
}

fn to_i32(id: u32, what: &str) -> Result<i32> {
    i32::try_from(id).map_err(|_| Error::InvalidArgument(format!("{what} {id} does not fit int32")))
}

fn export_row(s: &LabelledSample, k: usize, temperature: Option<f64>) -> Result<ExportRow> {
    let n = s.labels.len();
    let input_ids = s
        .sample
        .input_ids
        .iter()
        .map(|&id| to_i32(id, "token id"))
        .collect::<Result<Vec<_>>>()?;
    let mut labels = vec![-100i32; n + 1];
    for p in 0..n {
        if s.labels.in_loss[p] {
            labels[p + 1] = input_ids[p + 1];
        }
    }
    let (mut ids, mut logprobs, mut mask) = (
        Vec::with_capacity(n + 1),
        Vec::with_capacity(n + 1),
        Vec::with_capacity(n + 1),
    );
    for p in 0..=n {
        let (mut row_ids, mut row_lps) = if p < n {
            let lps = s.labels.logprobs(p);
            (
                s.labels
                    .ids(p)
                    .iter()
                    .map(|&id| to_i32(id, "token id"))
                    .collect::<Result<Vec<_>>>()?,
                match temperature {
                    Some(t) => rescaled(lps, t),
                    None => lps.to_vec(),
                },
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let on = i32::from(p < n && s.labels.in_loss[p]);
        let mut row_mask = vec![on; row_ids.len()];
        row_ids.resize(k, 0);
        row_lps.resize(k, PAD_LOGPROB);
        row_mask.resize(k, 0);
        ids.push(row_ids);
        logprobs.push(row_lps);
        mask.push(row_mask);
    }
    Ok(ExportRow {
        input_ids,
        labels,
        ids,
        logprobs,
        mask,
    })
}

/// Exports the complete store `store` into the directory `out` in axolotl's layout:
/// `data/<split>-<part>.<ext>`, one file per split and store part, then `firstkd_export.json`.
/// Rerunning the same export after an interruption continues after the last finished part.
pub fn export_axolotl(
    store: &Path,
    out: &Path,
    opts: ExportOptions,
    progress: impl FnMut(usize, usize),
) -> Result<ExportReport> {
    export_axolotl_reader(&StoreReader::open(store)?, out, opts, progress)
}

/// [`export_axolotl`] of a store already opened (for example one streamed from object
/// storage).
pub fn export_axolotl_reader(
    reader: &StoreReader,
    out: &Path,
    opts: ExportOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<ExportReport> {
    let store = reader.name();
    let m = reader.manifest().clone();
    if matches!(m.selection(), Selection::Sample { .. }) {
        return Err(Error::InvalidArgument(format!(
            "{}: selection {} stores draw counts, which axolotl's top-k targets cannot carry; \
             export a top-k or top-p store",
            store.display(),
            m.selection()
        )));
    }
    let (temperature, temperature_source) = match opts.temperature {
        ExportTemperature::Raw => (None, "raw".to_string()),
        ExportTemperature::Value(t) => (Some(t), "given".to_string()),
        ExportTemperature::Fitted => match &m.temperature {
            Some(t) => (Some(t.value), format!("fitted ({})", t.objective)),
            None => (Some(1.0), "no fitted temperature: T = 1".to_string()),
        },
    };
    let description = serde_json::json!({
        "format": "axolotl-kd",
        "layout": "pre-tokenized rows: input_ids, attention_mask, labels, target_token_ids, target_logprobs, target_mask; target row i is the distribution of input_ids[i + 1]",
        "file_format": opts.file_format,
        "store": store.display().to_string(),
        "store_schema_version": m.schema_version,
        "teacher": m.teacher,
        "tokenizer": m.tokenizer,
        "k": m.k,
        "selection": m.selection().to_string(),
        "temperature": temperature,
        "temperature_source": temperature_source,
        "normalized_over_topk": temperature.is_some(),
        "pad": {"token_id": 0, "logprob": PAD_LOGPROB, "mask": 0},
        "exported_by": format!("firstkd {}", crate::VERSION),
    });
    let done_path = out.join(EXPORT_FILE);
    if done_path.exists() {
        let text = std::fs::read_to_string(&done_path).map_err(|e| Error::io(&done_path, e))?;
        let old: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
            path: done_path.clone(),
            row: None,
            reason: e.to_string(),
        })?;
        if old.get("options") != Some(&description) {
            return Err(Error::OutputInUse {
                path: out.to_path_buf(),
                reason: "holds an export with other settings; use a new output directory"
                    .to_string(),
            });
        }
        let files = files_of(&old);
        return Ok(ExportReport {
            temperature,
            temperature_source,
            files,
            already_complete: true,
        });
    }
    let progress_path = out.join(PROGRESS_FILE);
    let (start, mut files) = resume_point(out, &progress_path, &description)?;
    let data = out.join("data");
    std::fs::create_dir_all(&data).map_err(|e| Error::io(&data, e))?;
    remove_tmp_files(&data)?;
    let k = m.k;
    let json = opts.file_format == FileFormat::Jsonl;
    let metadata = vec![(
        "firstkd.export".to_string(),
        serde_json::to_string(&description)?,
    )];
    let columns = [
        LabelColumn::InLoss,
        LabelColumn::TopkIds,
        LabelColumn::TopkLogprobs,
    ];
    let total = m.parts.len();
    for part in start..total {
        let mut open: Vec<SplitFile> = Vec::new();
        for s in reader.part_labelled_samples(part..part + 1, &columns, |_| true) {
            let s = s?;
            let row = export_row(&s, k, temperature)?;
            let at = match open.iter().position(|f| f.split == s.sample.split) {
                Some(i) => i,
                None => {
                    let name = format!(
                        "{}-{part:05}.{}",
                        file_safe(&s.sample.split),
                        opts.file_format.extension()
                    );
                    let path = data.join(&name);
                    open.push(SplitFile {
                        split: s.sample.split.clone(),
                        file: OutFile::create(
                            &path,
                            opts.file_format,
                            &kd_schema(),
                            metadata.clone(),
                            256,
                        )?,
                        relative: format!("data/{name}"),
                        rows: 0,
                        batch: KdBatch::new(),
                    });
                    open.len() - 1
                }
            };
            let f = &mut open[at];
            f.batch.push(&row, json);
            f.rows += 1;
            if f.batch.rows >= BATCH_ROWS {
                let (batch, rows) = f.batch.take()?;
                f.file.write(&batch, &rows)?;
            }
        }
        for mut f in open {
            if f.batch.rows > 0 {
                let (batch, rows) = f.batch.take()?;
                f.file.write(&batch, &rows)?;
            }
            f.file.finish()?;
            files.push((f.relative, f.rows));
        }
        save_json(
            &progress_path,
            &serde_json::json!({ "options": description, "parts_done": part + 1, "files": files_json(&files) }),
        )?;
        progress(part + 1, total);
    }
    super::card::write_export_card(out, &description, &files)?;
    save_json(
        &done_path,
        &serde_json::json!({ "options": description, "files": files_json(&files) }),
    )?;
    let _ = std::fs::remove_file(&progress_path);
    Ok(ExportReport {
        temperature,
        temperature_source,
        files,
        already_complete: false,
    })
}

/// The `files` list of an export description: (file, rows).
fn files_of(description: &serde_json::Value) -> Vec<(String, u64)> {
    let Some(files) = description["files"].as_array() else {
        return Vec::new();
    };
    files
        .iter()
        .map(|f| {
            let file = f["file"].as_str().unwrap_or_default().to_string();
            (file, f["rows"].as_u64().unwrap_or(0))
        })
        .collect()
}

fn files_json(files: &[(String, u64)]) -> serde_json::Value {
    files
        .iter()
        .map(|(f, r)| serde_json::json!({"file": f, "rows": r}))
        .collect()
}

/// A split name as a file name part (anything but letters, digits, `_`, `-` becomes `_`).
fn file_safe(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() {
        "unsplit".to_string()
    } else {
        t
    }
}

/// Where an interrupted export with the same settings stopped (0 for a new one), and the
/// files it finished.
fn resume_point(
    out: &Path,
    progress_path: &Path,
    description: &serde_json::Value,
) -> Result<(usize, Vec<(String, u64)>)> {
    if progress_path.exists() {
        let text =
            std::fs::read_to_string(progress_path).map_err(|e| Error::io(progress_path, e))?;
        let old: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
            path: progress_path.to_path_buf(),
            row: None,
            reason: e.to_string(),
        })?;
        if old.get("options") != Some(description) {
            return Err(Error::OutputInUse {
                path: out.to_path_buf(),
                reason:
                    "holds an interrupted export with other settings; use a new output directory"
                        .to_string(),
            });
        }
        let files: Vec<(String, u64)> = files_of(&old);
        // Files of a part that was being written when the export stopped are rewritten.
        let listed: std::collections::HashSet<&str> = files.iter().map(|f| f.0.as_str()).collect();
        let data = out.join("data");
        if let Ok(entries) = std::fs::read_dir(&data) {
            for e in entries.flatten() {
                let rel = format!("data/{}", e.file_name().to_string_lossy());
                if !listed.contains(rel.as_str()) {
                    let p = e.path();
                    std::fs::remove_file(&p).map_err(|err| Error::io(&p, err))?;
                }
            }
        }
        let done = old["parts_done"].as_u64().unwrap_or(0) as usize;
        return Ok((done, files));
    }
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
        if entries.next().is_some() {
            return Err(Error::OutputInUse {
                path: out.to_path_buf(),
                reason: "output directory exists and is not empty".to_string(),
            });
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    Ok((0, Vec::new()))
}

fn remove_tmp_files(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            let p = e.path();
            std::fs::remove_file(&p).map_err(|err| Error::io(&p, err))?;
        }
    }
    Ok(())
}

/// Writes `value` to `path` atomically (temporary file, then rename).
pub(crate) fn save_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let tmp = tmp_path(path);
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperatures_parse() {
        assert_eq!(
            ExportTemperature::parse("fitted").unwrap(),
            ExportTemperature::Fitted
        );
        assert_eq!(
            ExportTemperature::parse("raw").unwrap(),
            ExportTemperature::Raw
        );
        assert_eq!(
            ExportTemperature::parse("1.5").unwrap(),
            ExportTemperature::Value(1.5)
        );
        for bad in ["0", "-1", "nan", "warm"] {
            assert!(ExportTemperature::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rescaling_is_a_log_softmax_of_the_scaled_values() {
        let r = rescaled(&[-0.1, -2.0, -3.0], 2.0);
        let z: f64 = r.iter().map(|&x| f64::from(x).exp()).sum();
        assert!((z - 1.0).abs() < 1e-6);
        assert!(
            ((r[0] - r[1]) as f64 - 0.95).abs() < 1e-6,
            "differences divided by T"
        );
    }
}
