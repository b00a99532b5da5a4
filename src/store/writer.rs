//! Streaming store writer: bounded memory, atomic parts, resumable.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float16Array, Float32Array, ListArray, StringArray,
    UInt16Array, UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use half::f16;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::manifest::{sync_dir, Manifest, PartEntry, PartFile, TeacherInfo, TokenizerInfo};
use super::sha256_file;
use crate::error::{Error, Result};
use crate::schema::{self, labels_v2, meta_keys, LogprobDtype, Quantization, Selection, Table};

/// What a new store records about itself; fixed for the store's lifetime.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreMeta {
    /// Longest list per position (for top-k, every list's length).
    pub k: usize,
    pub logprob_dtype: LogprobDtype,
    /// How the tokens are chosen; anything but top-k needs the quantized layout.
    pub selection: Selection,
    pub teacher: TeacherInfo,
    pub tokenizer: TokenizerInfo,
    /// How the labels are produced; a resumed run must pass the same value.
    pub labeling: serde_json::Value,
}

/// Tuning knobs of the writer.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Label rows buffered in memory before they are encoded into the open part.
    pub batch_rows: usize,
    /// Maximum rows per Parquet row group.
    pub row_group_rows: usize,
    /// zstd level of every column (19 by default: the labels are written far slower than
    /// zstd compresses, and level 19 finds repeated top-k lists that level 3 misses).
    pub zstd_level: i32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            batch_rows: 64 * 1024,
            row_group_rows: 128 * 1024,
            zstd_level: 19,
        }
    }
}

/// One input sample as the teacher saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRecord {
    pub sample_id: u64,
    pub source: String,
    pub split: String,
    pub record_index: u64,
    pub window_index: u32,
    pub input_ids: Vec<u32>,
    pub prompt_len: u32,
}

/// The teacher's labels for every position of one sample: n = len(input_ids) - 1 positions,
/// position p predicting input_ids[p + 1]. `topk_*` are row-major: `n * k` for top-k, else
/// `lengths[p]` entries for position p.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SampleLabels {
    pub topk_ids: Vec<u32>,
    pub topk_logprobs: Vec<f32>,
    /// Entries per position (empty: `k` each; required for top-p and sample selections).
    pub lengths: Vec<u32>,
    /// Draws per entry (`--select sample:N` only, else empty).
    pub counts: Vec<u16>,
    pub target_logprobs: Vec<f32>,
    pub entropy: Vec<f32>,
}

/// Result of opening a store directory for writing.
pub enum Opened {
    /// A new, empty store.
    Fresh(StoreWriter),
    /// An interrupted store; continue after `cursor` (the value given to the last commit).
    Resumed {
        writer: StoreWriter,
        cursor: serde_json::Value,
    },
    /// The store is already complete; nothing to write.
    Complete(Manifest),
}

#[derive(Default)]
struct Buffers {
    sample_id: Vec<u64>,
    position: Vec<u32>,
    target_id: Vec<u32>,
    in_loss: Vec<bool>,
    topk_ids: Vec<u32>,
    topk_logprobs: Vec<f32>,
    target_logprob: Vec<f32>,
    entropy: Vec<f32>,
    /// 2.0 layout: probabilities, target log-prob (None when in the list), entropy.
    topk_q: Vec<u16>,
    target_q: Vec<Option<u16>>,
    entropy_q: Vec<u16>,
    lengths: Vec<usize>,
    topk_counts: Vec<u16>,
    s_sample_id: Vec<u64>,
    s_source: Vec<String>,
    s_split: Vec<String>,
    s_record_index: Vec<u64>,
    s_window_index: Vec<u32>,
    s_offsets: Vec<i32>,
    s_input_ids: Vec<u32>,
    s_prompt_len: Vec<u32>,
    s_num_positions: Vec<u32>,
}

impl Buffers {
    fn label_rows(&self) -> usize {
        self.sample_id.len()
    }
}

struct OpenPart {
    index: u32,
    labels: ArrowWriter<File>,
    samples: ArrowWriter<File>,
    labels_tmp: PathBuf,
    samples_tmp: PathBuf,
    label_rows: u64,
    sample_rows: u64,
    in_loss_rows: u64,
}

/// Writes a store part by part. Memory is bounded by `WriterOptions::batch_rows` plus one
/// encoded row group, whatever the input size.
pub struct StoreWriter {
    dir: PathBuf,
    manifest: Manifest,
    labels_schema: SchemaRef,
    samples_schema: SchemaRef,
    opts: WriterOptions,
    buffers: Buffers,
    open_part: Option<OpenPart>,
}

/// File name of part `index` (inside the table's folder).
pub fn part_file_name(index: u32) -> String {
    format!("part-{index:05}.parquet")
}

fn tmp_file_name(index: u32) -> String {
    format!(".part-{index:05}.parquet.tmp")
}

impl StoreWriter {
    /// Creates a new store at `dir`, which must not exist or be empty.
    pub fn create(dir: &Path, meta: StoreMeta, opts: WriterOptions) -> Result<Self> {
        if meta.k == 0 {
            return Err(Error::InvalidArgument("k must be at least 1".into()));
        }
        if meta.selection.max_len() != meta.k {
            return Err(Error::Internal(format!(
                "selection {} with k {}",
                meta.selection, meta.k
            )));
        }
        if !meta.selection.fixed_len() && meta.logprob_dtype != LogprobDtype::Quantized {
            return Err(Error::InvalidArgument(format!(
                "selection {} needs the quantized layout (--dtype quantized): format 1.0 stores fixed-length lists",
                meta.selection
            )));
        }
        if dir.exists() {
            let mut entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            if entries.next().is_some() {
                return Err(Error::InvalidArgument(format!(
                    "{}: output directory exists and is not empty",
                    dir.display()
                )));
            }
        }
        for table in Table::ALL {
            let sub = dir.join(table.name());
            std::fs::create_dir_all(&sub).map_err(|e| Error::io(&sub, e))?;
        }
        let manifest = Manifest {
            format: schema::FORMAT_NAME.into(),
            schema_version: meta.logprob_dtype.schema_version().into(),
            k: meta.k,
            logprob_dtype: meta.logprob_dtype,
            quantization: (meta.logprob_dtype == LogprobDtype::Quantized)
                .then_some(Quantization::V2),
            selection: (meta.logprob_dtype == LogprobDtype::Quantized).then_some(meta.selection),
            complete: false,
            created_by: format!("firstkd {}", crate::VERSION),
            teacher: meta.teacher,
            tokenizer: meta.tokenizer,
            temperature: None,
            labeling: meta.labeling,
            cursor: serde_json::Value::Null,
            parts: Vec::new(),
        };
        manifest.save(dir)?;
        Ok(Self::with_manifest(dir, manifest, opts))
    }

    /// Opens `dir` for writing: creates a new store, resumes an interrupted one written with
    /// the same `meta` (removing any part that was not committed), or reports it complete.
    pub fn open(dir: &Path, meta: StoreMeta, opts: WriterOptions) -> Result<Opened> {
        let Some(manifest) = Self::existing(dir, &meta)? else {
            return Ok(Opened::Fresh(Self::create(dir, meta, opts)?));
        };
        if manifest.complete {
            return Ok(Opened::Complete(manifest));
        }
        remove_uncommitted(dir, &manifest)?;
        let cursor = manifest.cursor.clone();
        Ok(Opened::Resumed {
            writer: Self::with_manifest(dir, manifest, opts),
            cursor,
        })
    }

    /// The manifest of an existing store at `dir` written with the same `meta`; `None` when
    /// there is no store; an error when the store was written with different settings.
    pub fn existing(dir: &Path, meta: &StoreMeta) -> Result<Option<Manifest>> {
        if !Manifest::path(dir).exists() {
            return Ok(None);
        }
        let manifest = Manifest::load(dir)?;
        let mut diffs = Vec::new();
        if manifest.k != meta.k {
            diffs.push(format!("k {} vs {}", manifest.k, meta.k));
        }
        if manifest.logprob_dtype != meta.logprob_dtype {
            diffs.push(format!(
                "logprob dtype {} vs {}",
                manifest.logprob_dtype.name(),
                meta.logprob_dtype.name()
            ));
        }
        if manifest.selection() != meta.selection {
            diffs.push(format!(
                "selection {} vs {}",
                manifest.selection(),
                meta.selection
            ));
        }
        if manifest.teacher != meta.teacher {
            let (a, b) = (&manifest.teacher, &meta.teacher);
            let mut what = Vec::new();
            if a.sha256 != b.sha256 || a.file_name != b.file_name {
                what.push(format!("model {} vs {}", a.file_name, b.file_name));
            }
            if a.compute_dtype != b.compute_dtype || a.compute_mode != b.compute_mode {
                what.push(format!("compute {} vs {}", a.compute_mode, b.compute_mode));
            }
            if what.is_empty() {
                what.push("model description".to_string());
            }
            diffs.push(format!("teacher: {}", what.join(", ")));
        }
        if manifest.tokenizer != meta.tokenizer {
            diffs.push("tokenizer".into());
        }
        if manifest.labeling != meta.labeling {
            diffs.push(format!(
                "labelling settings {} vs {}",
                manifest.labeling, meta.labeling
            ));
        }
        if !diffs.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{}: existing store was written with different settings ({}); use a new output directory",
                dir.display(),
                diffs.join("; ")
            )));
        }
        Ok(Some(manifest))
    }

    fn with_manifest(dir: &Path, manifest: Manifest, opts: WriterOptions) -> Self {
        StoreWriter {
            dir: dir.to_path_buf(),
            labels_schema: manifest.table_schema(Table::Labels),
            samples_schema: schema::samples_schema(),
            manifest,
            opts,
            buffers: Buffers::default(),
            open_part: None,
        }
    }

    /// The manifest as committed so far.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Label rows pushed since the last commit.
    pub fn pending_rows(&self) -> u64 {
        self.open_part.as_ref().map_or(0, |p| p.label_rows) + self.buffers.label_rows() as u64
    }

    /// Adds one sample and its labels to the open part.
    pub fn push(&mut self, sample: &SampleRecord, labels: &SampleLabels) -> Result<()> {
        validate(
            sample,
            labels,
            self.manifest.k,
            self.manifest.selection(),
            self.manifest.tokenizer.vocab_size,
        )?;
        let k = self.manifest.k;
        let n = sample.input_ids.len() - 1;
        let b = &mut self.buffers;
        for p in 0..n {
            b.sample_id.push(sample.sample_id);
            b.position.push(p as u32);
            b.target_id.push(sample.input_ids[p + 1]);
            b.in_loss.push(p as u64 + 1 >= u64::from(sample.prompt_len));
        }
        let start = b.topk_ids.len();
        let entries = labels.topk_ids.len();
        b.topk_ids.extend_from_slice(&labels.topk_ids);
        if let Some(q) = self.manifest.quantization {
            b.topk_q.resize(b.topk_ids.len(), 0);
            let sampled = !labels.counts.is_empty();
            if sampled {
                b.topk_counts.extend_from_slice(&labels.counts);
            }
            let mut at = 0usize;
            for p in 0..n {
                let len = labels.lengths.get(p).map_or(k, |&l| l as usize);
                let row = start + at..start + at + len;
                q.quantize_row(
                    &labels.topk_logprobs[at..at + len],
                    &mut b.topk_q[row.clone()],
                );
                if sampled {
                    let counts = &mut b.topk_counts[row.clone()];
                    sort_quantized_with(
                        &mut b.topk_ids[row.clone()],
                        &mut b.topk_q[row.clone()],
                        counts,
                    );
                } else {
                    sort_quantized(&mut b.topk_ids[row.clone()], &mut b.topk_q[row.clone()]);
                }
                let target = sample.input_ids[p + 1];
                let in_list = b.topk_ids[row].contains(&target);
                b.target_q
                    .push((!in_list).then(|| q.target_q(labels.target_logprobs[p])));
                b.entropy_q.push(q.entropy_q(labels.entropy[p]));
                b.lengths.push(len);
                at += len;
            }
            debug_assert_eq!(at, entries);
        } else {
            b.topk_logprobs
                .extend_from_slice(&labels.topk_logprobs[..n * k]);
            canonicalize(
                &mut b.topk_ids[start..],
                &mut b.topk_logprobs[start..],
                k,
                self.manifest.logprob_dtype,
            );
            b.target_logprob
                .extend_from_slice(&labels.target_logprobs[..n]);
            b.entropy.extend_from_slice(&labels.entropy[..n]);
        }
        b.s_sample_id.push(sample.sample_id);
        b.s_source.push(sample.source.clone());
        b.s_split.push(sample.split.clone());
        b.s_record_index.push(sample.record_index);
        b.s_window_index.push(sample.window_index);
        if b.s_offsets.is_empty() {
            b.s_offsets.push(0);
        }
        b.s_input_ids.extend_from_slice(&sample.input_ids);
        let end = i32::try_from(b.s_input_ids.len()).map_err(|_| {
            Error::InvalidArgument("too many buffered input ids; lower batch_rows".into())
        })?;
        b.s_offsets.push(end);
        b.s_prompt_len.push(sample.prompt_len);
        b.s_num_positions.push(n as u32);
        if b.label_rows() >= self.opts.batch_rows {
            self.flush()?;
        }
        Ok(())
    }

    fn open_part(&mut self) -> Result<&mut OpenPart> {
        if self.open_part.is_none() {
            let index = self.manifest.parts.last().map_or(0, |p| p.index + 1);
            let labels_tmp = self.dir.join("labels").join(tmp_file_name(index));
            let samples_tmp = self.dir.join("samples").join(tmp_file_name(index));
            let labels = self.arrow_writer(&labels_tmp, Table::Labels, index)?;
            let samples = self.arrow_writer(&samples_tmp, Table::Samples, index)?;
            self.open_part = Some(OpenPart {
                index,
                labels,
                samples,
                labels_tmp,
                samples_tmp,
                label_rows: 0,
                sample_rows: 0,
                in_loss_rows: 0,
            });
        }
        self.open_part
            .as_mut()
            .ok_or_else(|| Error::Internal("no open part".into()))
    }

    fn arrow_writer(&self, path: &Path, table: Table, index: u32) -> Result<ArrowWriter<File>> {
        let m = &self.manifest;
        let kv = |key: &str, value: String| KeyValue::new(key.to_string(), value);
        let metadata = vec![
            kv(meta_keys::SCHEMA_VERSION, m.schema_version.clone()),
            kv(meta_keys::TABLE, table.name().to_string()),
            kv(meta_keys::K, m.k.to_string()),
            kv(meta_keys::LOGPROB_DTYPE, m.logprob_dtype.name().to_string()),
            kv(meta_keys::TEACHER, serde_json::to_string(&m.teacher)?),
            kv(meta_keys::TOKENIZER, serde_json::to_string(&m.tokenizer)?),
            kv(
                meta_keys::WRITER_VERSION,
                format!("firstkd {}", crate::VERSION),
            ),
            kv(meta_keys::PART_INDEX, index.to_string()),
        ];
        let mut metadata = metadata;
        if let Some(q) = m.quantization {
            metadata.push(kv(meta_keys::QUANTIZATION, serde_json::to_string(&q)?));
        }
        let level =
            ZstdLevel::try_new(self.opts.zstd_level).map_err(|e| Error::parquet(path, e))?;
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_max_row_group_row_count(Some(self.opts.row_group_rows.max(1)))
            .set_key_value_metadata(Some(metadata))
            .set_created_by(format!("firstkd {}", crate::VERSION));
        if m.quantization.is_some() && table == Table::Labels {
            // Measured on real labels (docs/format.md): plain values + zstd beat dictionary
            // pages for the lists and the sparse target column.
            for column in [
                vec![schema::labels::TOPK_IDS, "list", "item"],
                vec![labels_v2::TOPK_PROBS_Q, "list", "item"],
                vec![labels_v2::TARGET_LOGPROB_Q],
            ] {
                let path = ColumnPath::new(column.into_iter().map(String::from).collect());
                props = props.set_column_dictionary_enabled(path, false);
            }
        }
        let props = props.build();
        let schema = match table {
            Table::Labels => self.labels_schema.clone(),
            Table::Samples => self.samples_schema.clone(),
        };
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        ArrowWriter::try_new(file, schema, Some(props)).map_err(|e| Error::parquet(path, e))
    }

    /// Encodes the buffered rows into the open part.
    fn flush(&mut self) -> Result<()> {
        if self.buffers.s_sample_id.is_empty() {
            return Ok(());
        }
        let mut buffers = std::mem::take(&mut self.buffers);
        let labels = labels_batch(&mut buffers, &self.labels_schema, &self.manifest)?;
        let samples = samples_batch(buffers, &self.samples_schema)?;
        let in_loss = labels
            .column_by_name(schema::labels::IN_LOSS)
            .and_then(|c| c.as_any().downcast_ref::<BooleanArray>())
            .map_or(0, |a| a.true_count() as u64);
        let part = self.open_part()?;
        part.labels
            .write(&labels)
            .map_err(|e| Error::parquet(&part.labels_tmp, e))?;
        part.samples
            .write(&samples)
            .map_err(|e| Error::parquet(&part.samples_tmp, e))?;
        part.label_rows += labels.num_rows() as u64;
        part.sample_rows += samples.num_rows() as u64;
        part.in_loss_rows += in_loss;
        Ok(())
    }

    /// Closes the open part, renames its files into place and records it in the manifest
    /// together with `cursor` (the caller's resume position after this part).
    /// A commit with no pending rows only updates the cursor.
    pub fn commit(&mut self, cursor: serde_json::Value) -> Result<()> {
        self.flush()?;
        if let Some(part) = self.open_part.take() {
            let labels = finish_file(part.labels, &part.labels_tmp, part.index, &self.dir)?;
            let samples = finish_file(part.samples, &part.samples_tmp, part.index, &self.dir)?;
            self.manifest.parts.push(PartEntry {
                index: part.index,
                labels: PartFile {
                    rows: part.label_rows,
                    ..labels
                },
                samples: PartFile {
                    rows: part.sample_rows,
                    ..samples
                },
                in_loss_rows: part.in_loss_rows,
            });
        }
        self.manifest.cursor = cursor;
        self.manifest.save(&self.dir)
    }

    /// Commits what is pending and marks the store complete.
    pub fn finish(mut self, cursor: serde_json::Value) -> Result<Manifest> {
        self.commit(cursor)?;
        self.manifest.complete = true;
        self.manifest.save(&self.dir)?;
        Ok(self.manifest)
    }
}

fn finish_file(writer: ArrowWriter<File>, tmp: &Path, index: u32, dir: &Path) -> Result<PartFile> {
    let file = writer.into_inner().map_err(|e| Error::parquet(tmp, e))?;
    file.sync_all().map_err(|e| Error::io(tmp, e))?;
    drop(file);
    let folder = tmp.parent().unwrap_or(dir);
    let final_path = folder.join(part_file_name(index));
    std::fs::rename(tmp, &final_path).map_err(|e| Error::io(&final_path, e))?;
    sync_dir(folder);
    let bytes = std::fs::metadata(&final_path)
        .map_err(|e| Error::io(&final_path, e))?
        .len();
    let relative = final_path
        .strip_prefix(dir)
        .unwrap_or(&final_path)
        .to_string_lossy()
        .replace('\\', "/");
    Ok(PartFile {
        file: relative,
        rows: 0,
        bytes,
        sha256: sha256_file(&final_path)?,
    })
}

/// Removes files in the table folders that the manifest does not list (temporary files of an
/// interrupted part, or a part renamed but never recorded).
fn remove_uncommitted(dir: &Path, manifest: &Manifest) -> Result<()> {
    let listed: std::collections::HashSet<&str> = manifest
        .parts
        .iter()
        .flat_map(|p| [p.labels.file.as_str(), p.samples.file.as_str()])
        .collect();
    for table in Table::ALL {
        let sub = dir.join(table.name());
        std::fs::create_dir_all(&sub).map_err(|e| Error::io(&sub, e))?;
        for entry in std::fs::read_dir(&sub).map_err(|e| Error::io(&sub, e))? {
            let entry = entry.map_err(|e| Error::io(&sub, e))?;
            let name = format!("{}/{}", table.name(), entry.file_name().to_string_lossy());
            if !listed.contains(name.as_str()) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
    }
    Ok(())
}

/// Rounds log-probs to the stored dtype and orders each row by descending log-prob, ties by
/// smaller id, so rounding can never break the store's ordering invariant.
fn canonicalize(ids: &mut [u32], lps: &mut [f32], k: usize, dtype: LogprobDtype) {
    if dtype == LogprobDtype::Float16 {
        for lp in lps.iter_mut() {
            *lp = f16::from_f32(*lp).to_f32();
        }
    }
    for (row_ids, row_lps) in ids.chunks_mut(k).zip(lps.chunks_mut(k)) {
        for i in 1..k {
            let mut j = i;
            while j > 0
                && (row_lps[j] > row_lps[j - 1]
                    || (row_lps[j] == row_lps[j - 1] && row_ids[j] < row_ids[j - 1]))
            {
                row_lps.swap(j, j - 1);
                row_ids.swap(j, j - 1);
                j -= 1;
            }
        }
    }
}

/// [`sort_quantized`] carrying each entry's draw count along.
fn sort_quantized_with(ids: &mut [u32], qs: &mut [u16], counts: &mut [u16]) {
    let mut row: Vec<(u16, u32, u16)> =
        (0..ids.len()).map(|j| (qs[j], ids[j], counts[j])).collect();
    row.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (j, (q, id, c)) in row.into_iter().enumerate() {
        qs[j] = q;
        ids[j] = id;
        counts[j] = c;
    }
}

/// Orders a quantized row by descending stored probability, ties by smaller id.
fn sort_quantized(ids: &mut [u32], qs: &mut [u16]) {
    let mut row: Vec<(u16, u32)> = qs.iter().copied().zip(ids.iter().copied()).collect();
    row.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (j, (q, id)) in row.into_iter().enumerate() {
        qs[j] = q;
        ids[j] = id;
    }
}

fn validate(
    sample: &SampleRecord,
    labels: &SampleLabels,
    k: usize,
    selection: Selection,
    vocab: u32,
) -> Result<()> {
    let bad = |reason: String| {
        Err(Error::InvalidArgument(format!(
            "sample {} (source {}, record {}): {reason}",
            sample.sample_id, sample.source, sample.record_index
        )))
    };
    let len = sample.input_ids.len();
    if len < 2 {
        return bad(format!("needs at least 2 tokens, has {len}"));
    }
    let n = len - 1;
    if sample.prompt_len as usize > len {
        return bad(format!("prompt_len {} > length {len}", sample.prompt_len));
    }
    let entries = if labels.lengths.is_empty() {
        if !selection.fixed_len() {
            return bad(format!(
                "selection {selection} needs a list length per position"
            ));
        }
        n * k
    } else {
        if labels.lengths.len() != n {
            return bad(format!(
                "{} list lengths for {n} positions",
                labels.lengths.len()
            ));
        }
        if let Some(l) = labels.lengths.iter().find(|&&l| l == 0 || l as usize > k) {
            return bad(format!("a list of {l} entries (1..={k} allowed)"));
        }
        if selection.fixed_len() && labels.lengths.iter().any(|&l| l as usize != k) {
            return bad(format!("top-k lists must have {k} entries"));
        }
        labels.lengths.iter().map(|&l| l as usize).sum()
    };
    if labels.topk_ids.len() != entries || labels.topk_logprobs.len() != entries {
        return bad(format!(
            "top-k arrays have {} ids / {} log-probs, expected {entries} ({n} positions, k={k})",
            labels.topk_ids.len(),
            labels.topk_logprobs.len(),
        ));
    }
    match selection {
        Selection::Sample { draws, .. } => {
            if labels.counts.len() != entries {
                return bad(format!(
                    "{} draw counts for {entries} entries",
                    labels.counts.len()
                ));
            }
            let mut at = 0;
            for &l in &labels.lengths {
                let row = &labels.counts[at..at + l as usize];
                let total: u32 = row.iter().map(|&c| u32::from(c)).sum();
                if total != draws || row.contains(&0) {
                    return bad(format!("draw counts {row:?} do not add up to {draws}"));
                }
                at += l as usize;
            }
        }
        _ if !labels.counts.is_empty() => {
            return bad("draw counts given for a selection that does not sample".into());
        }
        _ => {}
    }
    if labels.target_logprobs.len() != n || labels.entropy.len() != n {
        return bad(format!(
            "{} target log-probs / {} entropies for {n} positions",
            labels.target_logprobs.len(),
            labels.entropy.len()
        ));
    }
    if vocab > 0 {
        if let Some(id) = sample
            .input_ids
            .iter()
            .chain(&labels.topk_ids)
            .find(|&&id| id >= vocab)
        {
            return bad(format!("token id {id} outside vocabulary of {vocab}"));
        }
    }
    let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
    if !finite(&labels.topk_logprobs)
        || !finite(&labels.target_logprobs)
        || !finite(&labels.entropy)
    {
        return bad("non-finite (NaN or infinite) log-prob or entropy".into());
    }
    Ok(())
}

fn fixed_list(values: ArrayRef, k: usize) -> Result<ArrayRef> {
    let field = Arc::new(Field::new("item", values.data_type().clone(), false));
    let size = i32::try_from(k).map_err(|_| Error::InvalidArgument(format!("k {k} too large")))?;
    Ok(Arc::new(FixedSizeListArray::try_new(
        field, size, values, None,
    )?))
}

fn logprob_array(values: &[f32], dtype: LogprobDtype) -> ArrayRef {
    match dtype {
        LogprobDtype::Float32 | LogprobDtype::Quantized => {
            Arc::new(Float32Array::from(values.to_vec()))
        }
        LogprobDtype::Float16 => Arc::new(Float16Array::from(
            values.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(),
        )),
    }
}

/// A list column whose row `i` has `lengths[i]` values.
fn var_list(values: ArrayRef, lengths: &[usize]) -> Result<ArrayRef> {
    let field = Arc::new(Field::new("item", values.data_type().clone(), false));
    let offsets = OffsetBuffer::from_lengths(lengths.iter().copied());
    Ok(Arc::new(ListArray::try_new(field, offsets, values, None)?))
}

fn labels_batch(b: &mut Buffers, schema: &SchemaRef, m: &Manifest) -> Result<RecordBatch> {
    if m.quantization.is_some() {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(std::mem::take(&mut b.sample_id))),
            Arc::new(UInt32Array::from(std::mem::take(&mut b.position))),
            Arc::new(BooleanArray::from(std::mem::take(&mut b.in_loss))),
            var_list(
                Arc::new(UInt32Array::from(std::mem::take(&mut b.topk_ids))),
                &b.lengths,
            )?,
            var_list(
                Arc::new(UInt16Array::from(std::mem::take(&mut b.topk_q))),
                &b.lengths,
            )?,
            Arc::new(UInt16Array::from(std::mem::take(&mut b.target_q))),
            Arc::new(UInt16Array::from(std::mem::take(&mut b.entropy_q))),
        ];
        let mut columns = columns;
        if matches!(m.selection(), Selection::Sample { .. }) {
            columns.push(var_list(
                Arc::new(UInt16Array::from(std::mem::take(&mut b.topk_counts))),
                &b.lengths,
            )?);
        }
        b.lengths.clear();
        b.target_id.clear();
        return Ok(RecordBatch::try_new(schema.clone(), columns)?);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(std::mem::take(&mut b.sample_id))),
        Arc::new(UInt32Array::from(std::mem::take(&mut b.position))),
        Arc::new(UInt32Array::from(std::mem::take(&mut b.target_id))),
        Arc::new(BooleanArray::from(std::mem::take(&mut b.in_loss))),
        fixed_list(
            Arc::new(UInt32Array::from(std::mem::take(&mut b.topk_ids))),
            m.k,
        )?,
        fixed_list(logprob_array(&b.topk_logprobs, m.logprob_dtype), m.k)?,
        logprob_array(&b.target_logprob, m.logprob_dtype),
        Arc::new(Float32Array::from(std::mem::take(&mut b.entropy))),
    ];
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

fn samples_batch(b: Buffers, schema: &SchemaRef) -> Result<RecordBatch> {
    let item = Arc::new(Field::new(
        "item",
        arrow::datatypes::DataType::UInt32,
        false,
    ));
    let offsets = OffsetBuffer::new(b.s_offsets.into());
    let input_ids = ListArray::try_new(
        item,
        offsets,
        Arc::new(UInt32Array::from(b.s_input_ids)),
        None,
    )?;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(b.s_sample_id)),
        Arc::new(StringArray::from(b.s_source)),
        Arc::new(StringArray::from(b.s_split)),
        Arc::new(UInt64Array::from(b.s_record_index)),
        Arc::new(UInt32Array::from(b.s_window_index)),
        Arc::new(input_ids),
        Arc::new(UInt32Array::from(b.s_prompt_len)),
        Arc::new(UInt32Array::from(b.s_num_positions)),
    ];
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}
