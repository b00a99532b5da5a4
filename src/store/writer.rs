//! Streaming store writer: bounded memory, atomic parts, resumable.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::BooleanArray;
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::encode::{
    canonicalize, labels_batch, samples_batch, sort_quantized, sort_quantized_with, validate,
};
use super::manifest::{
    sync_dir, Manifest, PartEntry, PartFile, TeacherInfo, TokenizerInfo, MANIFEST_FILE,
};
use super::shards::{manifest_rel, Slot};

pub(crate) mod files;
use crate::error::{Error, Result};
use crate::schema::{self, labels_v2, meta_keys, LogprobDtype, Quantization, Selection, Table};
pub(crate) use files::remove_dead_manifest_temporaries;
use files::{check_same_settings, finish_file, remove_uncommitted};

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

impl From<crate::teacher::SequenceLabels> for SampleLabels {
    fn from(l: crate::teacher::SequenceLabels) -> Self {
        SampleLabels {
            topk_ids: l.topk_ids,
            topk_logprobs: l.topk_logprobs,
            target_logprobs: l.target_logprobs,
            entropy: l.entropy,
            lengths: l.lengths,
            counts: l.counts,
        }
    }
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
pub(super) struct Buffers {
    pub(super) sample_id: Vec<u64>,
    pub(super) position: Vec<u32>,
    pub(super) target_id: Vec<u32>,
    pub(super) in_loss: Vec<bool>,
    pub(super) topk_ids: Vec<u32>,
    pub(super) topk_logprobs: Vec<f32>,
    pub(super) target_logprob: Vec<f32>,
    pub(super) entropy: Vec<f32>,
    /// 2.0 layout: probabilities, target log-prob (None when in the list), entropy.
    pub(super) topk_q: Vec<u16>,
    pub(super) target_q: Vec<Option<u16>>,
    pub(super) entropy_q: Vec<u16>,
    pub(super) lengths: Vec<usize>,
    pub(super) topk_counts: Vec<u16>,
    pub(super) s_sample_id: Vec<u64>,
    pub(super) s_source: Vec<String>,
    pub(super) s_split: Vec<String>,
    pub(super) s_record_index: Vec<u64>,
    pub(super) s_window_index: Vec<u32>,
    pub(super) s_offsets: Vec<i32>,
    pub(super) s_input_ids: Vec<u32>,
    pub(super) s_prompt_len: Vec<u32>,
    pub(super) s_num_positions: Vec<u32>,
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
    /// The shard this writer owns in a sharded store (`None`: the whole store).
    slot: Option<Slot>,
}

impl Drop for StoreWriter {
    /// A writer dropped with a part still open (its commit never came: an error while the
    /// part was written) removes that part's temporary files; they would only be deleted by
    /// the resume otherwise.
    fn drop(&mut self) {
        if let Some(part) = self.open_part.take() {
            let paths = [part.labels_tmp.clone(), part.samples_tmp.clone()];
            drop(part);
            for path in paths {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// File name of part `index` (inside the table's folder).
pub fn part_file_name(index: u32) -> String {
    format!("part-{index:05}.parquet")
}

fn slot_prefix(slot: Option<Slot>) -> String {
    slot.map(|s| s.file_prefix()).unwrap_or_default()
}

impl StoreWriter {
    /// Creates a new store at `dir`, which must not exist or be empty.
    pub fn create(dir: &Path, meta: StoreMeta, opts: WriterOptions) -> Result<Self> {
        Self::create_slot(dir, meta, opts, None)
    }

    /// Creates a new store, or with `slot` one shard of a sharded store at `dir` (the folder
    /// may hold the other shards' files, but no store manifest).
    pub fn create_slot(
        dir: &Path,
        meta: StoreMeta,
        opts: WriterOptions,
        slot: Option<Slot>,
    ) -> Result<Self> {
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
                "selection {} needs the quantized log-prob layout: format 1.0 stores fixed-length lists",
                meta.selection
            )));
        }
        if slot.is_some() && Manifest::path(dir).exists() {
            return Err(Error::OutputInUse {
                path: dir.to_path_buf(),
                reason: format!("holds a store manifest ({MANIFEST_FILE}), so it is not a sharded store being written; a sharded run needs a new output directory"),
            });
        }
        if dir.exists() && slot.is_none() {
            // What a create killed before its first manifest leaves (empty table folders, a
            // dead process's temporary manifest) does not make the folder a user's.
            remove_dead_manifest_temporaries(dir)?;
            let leftover = |e: &std::fs::DirEntry| {
                let name = e.file_name();
                name == super::lock::WRITER_LOCK
                    || (Table::ALL.iter().any(|t| name == t.name())
                        && std::fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_none()))
            };
            let mut entries = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter(|e| !matches!(e, Ok(e) if leftover(e)));
            if entries.next().is_some() {
                return Err(Error::OutputInUse {
                    path: dir.to_path_buf(),
                    reason: "output directory exists and is not empty".to_string(),
                });
            }
        }
        for table in Table::ALL {
            let sub = dir.join(table.name());
            std::fs::create_dir_all(&sub).map_err(|e| Error::io(&sub, e))?;
        }
        if slot.is_some() {
            let sub = dir.join(super::shards::SHARDS_DIR);
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
        manifest.save_file(dir, &manifest_rel(slot))?;
        // The store folder's own entry in its parent (the manifest's rename made its
        // contents durable, not the folder itself).
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent);
        }
        Ok(Self::with_manifest(dir, manifest, opts, slot))
    }

    /// Opens `dir` for writing: creates a new store, resumes an interrupted one written with
    /// the same `meta` (removing any part that was not committed), or reports it complete.
    pub fn open(dir: &Path, meta: StoreMeta, opts: WriterOptions) -> Result<Opened> {
        Self::open_slot(dir, meta, opts, None)
    }

    /// [`StoreWriter::open`] for one shard of a sharded store (`slot`), or the whole store.
    pub fn open_slot(
        dir: &Path,
        meta: StoreMeta,
        opts: WriterOptions,
        slot: Option<Slot>,
    ) -> Result<Opened> {
        let Some(manifest) = Self::existing_slot(dir, &meta, slot)? else {
            return Ok(Opened::Fresh(Self::create_slot(dir, meta, opts, slot)?));
        };
        if manifest.complete {
            return Ok(Opened::Complete(manifest));
        }
        remove_uncommitted(dir, &manifest, slot)?;
        let cursor = manifest.cursor.clone();
        Ok(Opened::Resumed {
            writer: Self::with_manifest(dir, manifest, opts, slot),
            cursor,
        })
    }

    /// The manifest of an existing store at `dir` written with the same `meta`; `None` when
    /// there is no store; an error when the store was written with different settings.
    pub fn existing(dir: &Path, meta: &StoreMeta) -> Result<Option<Manifest>> {
        Self::existing_slot(dir, meta, None)
    }

    /// [`StoreWriter::existing`] for one shard's manifest (`slot`) or the store's.
    pub fn existing_slot(
        dir: &Path,
        meta: &StoreMeta,
        slot: Option<Slot>,
    ) -> Result<Option<Manifest>> {
        let rel = manifest_rel(slot);
        if !dir.join(&rel).exists() {
            return Ok(None);
        }
        let manifest = Manifest::load_file(dir, &rel)?;
        check_same_settings(dir, &manifest, meta)?;
        Ok(Some(manifest))
    }

    fn with_manifest(
        dir: &Path,
        manifest: Manifest,
        opts: WriterOptions,
        slot: Option<Slot>,
    ) -> Self {
        StoreWriter {
            dir: dir.to_path_buf(),
            labels_schema: manifest.table_schema(Table::Labels),
            samples_schema: schema::samples_schema(),
            manifest,
            opts,
            buffers: Buffers::default(),
            open_part: None,
            slot,
        }
    }

    /// The folder the store is written in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path, relative to the store folder, of the manifest this writer commits to.
    pub fn manifest_rel(&self) -> String {
        manifest_rel(self.slot)
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
            let tmp = format!(".{}{}.tmp", slot_prefix(self.slot), part_file_name(index));
            let labels_tmp = self.dir.join("labels").join(&tmp);
            let samples_tmp = self.dir.join("samples").join(&tmp);
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
        super::fault::point("part-write");
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
        let Some(part) = self.open_part.take() else {
            self.manifest.cursor = cursor;
            return self.manifest.save_file(&self.dir, &manifest_rel(self.slot));
        };
        let name = format!("{}{}", slot_prefix(self.slot), part_file_name(part.index));
        // What this commit may leave behind when it fails (a full disk, say): its temporary
        // files and the renamed files the manifest does not list yet.
        let mut leftovers = vec![part.labels_tmp.clone(), part.samples_tmp.clone()];
        for tmp in [&part.labels_tmp, &part.samples_tmp] {
            leftovers.push(tmp.parent().unwrap_or(&self.dir).join(&name));
        }
        let listed = self.manifest.parts.len();
        let previous_cursor = self.manifest.cursor.clone();
        let result = self.commit_part(part, &name, cursor);
        if result.is_err() {
            for path in &leftovers {
                let _ = std::fs::remove_file(path);
            }
            self.manifest.parts.truncate(listed);
            self.manifest.cursor = previous_cursor;
        }
        result
    }

    fn commit_part(&mut self, part: OpenPart, name: &str, cursor: serde_json::Value) -> Result<()> {
        let labels = finish_file(part.labels, &part.labels_tmp, name, &self.dir)?;
        super::fault::point("part-renamed");
        let samples = finish_file(part.samples, &part.samples_tmp, name, &self.dir)?;
        super::fault::point("manifest-pending");
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
        self.manifest.cursor = cursor;
        self.manifest.save_file(&self.dir, &manifest_rel(self.slot))
    }

    /// Commits what is pending and marks the store complete.
    pub fn finish(mut self, cursor: serde_json::Value) -> Result<Manifest> {
        self.commit(cursor)?;
        self.manifest.complete = true;
        self.manifest
            .save_file(&self.dir, &manifest_rel(self.slot))?;
        Ok(self.manifest.clone())
    }
}
