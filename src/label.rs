//! Labelling: input files -> teacher -> store. FIRST's "efficient knowledge selection".
//!
//! Every input file is read into token sequences (see [`crate::input`]); sequences are
//! numbered in input order over all files (`seq_no`, which becomes the store's `sample_id`),
//! so the numbering does not depend on sharding. Shard `i/n` labels the sequences with
//! `seq_no % n == i`. Sequences are labelled in buffers of `part_sequences`; each buffer is
//! one committed store part, with the cursor `next_seq` (every sequence of this shard below
//! it is in the store). Rerunning the same command after an interruption, even `kill -9`,
//! continues after the last committed part.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::input::{InputOptions, SampleReader};
use crate::schema::LogprobDtype;
use crate::store::manifest::{SpecialToken, TokenizerInfo};
use crate::store::shards::{self, Slot};
use crate::store::writer::Opened;
use crate::store::{
    Manifest, SampleLabels, SampleRecord, StoreMeta, StoreWriter, TeacherInfo, WriterOptions,
};
use crate::teacher::{plan_batches, plan_packed_batches, LabelInput, LabelOptions, Teacher};

/// One input file and how its samples are tagged in the store.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InputSpec {
    pub path: PathBuf,
    /// `source` column (default: the file stem).
    pub source: String,
    /// `split` column.
    pub split: String,
}

impl InputSpec {
    /// An input tagged with its file stem as source.
    pub fn new(path: &Path, split: &str) -> Self {
        let source = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "input".into());
        InputSpec {
            path: path.to_path_buf(),
            source,
            split: split.to_string(),
        }
    }

    /// Makes sources unique: inputs whose file stems collide (`openbookqa/train.json`,
    /// `arc_easy/train.json`) are tagged `parent/stem` (`openbookqa/train`, `arc_easy/train`).
    pub fn distinct_sources(specs: &mut [InputSpec]) {
        let count = |specs: &[InputSpec], s: &str| specs.iter().filter(|x| x.source == s).count();
        let clashing: Vec<bool> = specs.iter().map(|s| count(specs, &s.source) > 1).collect();
        for (spec, clash) in specs.iter_mut().zip(clashing) {
            if let (true, Some(parent)) = (clash, spec.path.parent().and_then(Path::file_name)) {
                spec.source = format!("{}/{}", parent.to_string_lossy(), spec.source);
            }
        }
    }
}

/// Settings of a labelling run.
#[derive(Debug, Clone)]
pub struct LabelConfig {
    pub inputs: Vec<InputSpec>,
    pub input: InputOptions,
    /// Tokens kept per position when `select` is None (top-k).
    pub k: usize,
    /// Knowledge selection (None: top-k with `k`).
    pub select: Option<crate::schema::Selection>,
    pub logprob_dtype: LogprobDtype,
    /// Padded tokens per forward pass.
    pub batch_tokens: usize,
    /// Sequences per committed part.
    pub part_sequences: usize,
    /// `(index, count)`: label only sequences with `seq_no % count == index`.
    pub shard: (u64, u64),
    /// Skip (and count) invalid records instead of stopping at the first one.
    pub skip_invalid: bool,
    /// Read at most this many records of each input (for quick runs).
    pub limit_records: Option<u64>,
    /// Accept inputs holding no sequence (an empty store); otherwise that is an error.
    pub allow_empty: bool,
    /// Pack sequences into rows of this many tokens (0: the longest sequence of each part)
    /// instead of padding each to its batch's longest; `None`: padded batches.
    pub pack: Option<usize>,
}

impl LabelConfig {
    /// The selection this run labels with.
    pub fn selection(&self) -> crate::schema::Selection {
        self.select
            .unwrap_or(crate::schema::Selection::TopK { k: self.k })
    }
}

impl Default for LabelConfig {
    fn default() -> Self {
        LabelConfig {
            inputs: Vec::new(),
            input: InputOptions::default(),
            k: 5,
            select: None,
            logprob_dtype: LogprobDtype::Quantized,
            batch_tokens: 2048,
            part_sequences: 256,
            shard: (0, 1),
            skip_invalid: false,
            limit_records: None,
            allow_empty: false,
            pack: None,
        }
    }
}

/// Progress of a run, reported after every forward pass.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LabelProgress {
    pub sequences_total: u64,
    pub sequences_done: u64,
    pub tokens_total: u64,
    pub tokens_done: u64,
    /// Sequences already in the store when the run started (resume).
    pub sequences_resumed: u64,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct LabelSummary {
    pub manifest: Manifest,
    /// Sequences labelled by this run (not counting resumed ones).
    pub sequences_labelled: u64,
    pub tokens_labelled: u64,
    pub sequences_resumed: u64,
    pub records_skipped: u64,
    /// First few skipped records, `path:line: reason`.
    pub skipped_examples: Vec<String>,
    pub already_complete: bool,
    /// A sharded run: `(shards complete, shard count)` after this run; the store manifest is
    /// written (the store committed) once the two are equal.
    pub shards: Option<(u64, u64)>,
}

/// Where a labelling run's commits go beyond the local folder (object storage: see
/// [`crate::store::remote`]). Called after every commit of the writer.
pub trait CommitSink {
    /// The writer committed `manifest` to `dir/rel` (its parts are in `dir`).
    fn committed(&mut self, dir: &Path, rel: &str, manifest: &Manifest) -> Result<()>;
    /// The commit step of a sharded store of `count` shards (see [`shards::combine`]).
    fn combine(&mut self, dir: &Path, count: u64) -> Result<Option<Manifest>> {
        shards::combine(dir, count)
    }
    /// How many of the `count` shards are complete.
    fn shards_complete(&mut self, dir: &Path, count: u64) -> Result<u64> {
        Ok(shards::scan(dir)?
            .iter()
            .filter(|s| s.slot.count == count && s.manifest.as_ref().is_ok_and(|m| m.complete))
            .count() as u64)
    }
}

/// Commits stay in the local folder.
pub struct LocalSink;

impl CommitSink for LocalSink {
    fn committed(&mut self, _: &Path, _: &str, _: &Manifest) -> Result<()> {
        Ok(())
    }
}

/// What [`plan`] found in the inputs.
struct Plan {
    /// This shard's sequences still to label.
    planned: Vec<Planned>,
    progress: LabelProgress,
    skipped_examples: Vec<String>,
    records_skipped: u64,
    /// Sequences in all inputs, every shard's.
    sequences: u64,
}

struct Planned {
    seq_no: u64,
    input: usize,
    record: u64,
    segment: u32,
    input_ids: Vec<u32>,
    prompt_len: u32,
}

/// Store metadata for `teacher` and `cfg`.
pub fn store_meta(teacher: &Teacher, cfg: &LabelConfig) -> Result<StoreMeta> {
    let id = teacher.identity();
    let tok = teacher.tokenizer().identity();
    let mut special_tokens = std::collections::BTreeMap::new();
    for (role, t) in [("bos", &tok.bos), ("eos", &tok.eos), ("pad", &tok.pad)] {
        if let Some(t) = t {
            special_tokens.insert(
                role.to_string(),
                SpecialToken {
                    id: t.id,
                    text: t.text.clone(),
                },
            );
        }
    }
    let mut inputs = Vec::new();
    for spec in &cfg.inputs {
        inputs.push(serde_json::json!({
            "file": spec.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "sha256": crate::store::sha256_file(&spec.path)?,
            "source": spec.source,
            "split": spec.split,
        }));
    }
    let fmt = format!("{:?}", cfg.input.format);
    let mc = format!("{:?}", cfg.input.mc_response);
    let selection = cfg.selection();
    Ok(StoreMeta {
        k: selection.max_len(),
        selection,
        logprob_dtype: cfg.logprob_dtype,
        teacher: TeacherInfo {
            file_name: id.file_name.clone(),
            sha256: id.sha256.clone(),
            architecture: id.architecture.clone(),
            quantization: id.quantization.clone(),
            compute_dtype: teacher.model().compute().as_str().into(),
            compute_mode: id.compute.clone(),
        },
        tokenizer: TokenizerInfo {
            sha256: tok.sha256.clone(),
            vocab_size: tok.vocab_size,
            special_tokens,
        },
        labeling: serde_json::json!({
            "inputs": inputs,
            "format": fmt,
            "seq_len": cfg.input.seq_len,
            "max_len": cfg.input.max_len,
            "mc_response": mc,
            "shard": format!("{}/{}", cfg.shard.0, cfg.shard.1),
            "skip_invalid": cfg.skip_invalid,
            "limit_records": cfg.limit_records,
            "part_sequences": cfg.part_sequences,
            "chat_template_sha256": teacher.chat_template().map(|t| {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(t.source().as_bytes()))
            }),
        }),
    })
}

/// Reads every input once: validates every record, returns the sequences of this shard with
/// `seq_no >= start` (tokens only), the totals, and the skipped records.
fn plan(teacher: &Teacher, cfg: &LabelConfig, start: u64) -> Result<Plan> {
    let encoder = teacher.encoder();
    let (index, count) = cfg.shard;
    let mut planned = Vec::new();
    let mut progress = LabelProgress::default();
    let (mut skipped, mut examples) = (0u64, Vec::new());
    let mut seq_no = 0u64;
    for (input, spec) in cfg.inputs.iter().enumerate() {
        let reader = SampleReader::open(&spec.path, encoder, cfg.input.clone())?;
        for sample in reader {
            if let (Some(limit), Ok(s)) = (cfg.limit_records, &sample) {
                if s.record >= limit {
                    break;
                }
            }
            let sample = match sample {
                Ok(s) => s,
                Err(e @ Error::InvalidRecord { .. }) if cfg.skip_invalid => {
                    skipped += 1;
                    if examples.len() < 10 {
                        examples.push(e.to_string());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let this = seq_no;
            seq_no += 1;
            if this % count != index || sample.input_ids.len() < 2 {
                continue;
            }
            let tokens = sample.input_ids.len() as u64;
            progress.sequences_total += 1;
            progress.tokens_total += tokens;
            if this < start {
                progress.sequences_resumed += 1;
                progress.sequences_done += 1;
                progress.tokens_done += tokens;
                continue;
            }
            planned.push(Planned {
                seq_no: this,
                input,
                record: sample.record,
                segment: sample.segment,
                input_ids: sample.input_ids,
                prompt_len: sample.prompt_len,
            });
        }
    }
    Ok(Plan {
        planned,
        progress,
        skipped_examples: examples,
        records_skipped: skipped,
        sequences: seq_no,
    })
}

/// Labels `cfg.inputs` with `teacher` into the store at `out`, resuming an interrupted run.
/// `on_progress` is called after every forward pass.
pub fn label(
    teacher: &Teacher,
    cfg: &LabelConfig,
    out: &Path,
    on_progress: &mut dyn FnMut(&LabelProgress),
) -> Result<LabelSummary> {
    label_with(teacher, cfg, out, on_progress, &mut LocalSink)
}

/// [`label`] with every commit also given to `sink`.
pub fn label_with(
    teacher: &Teacher,
    cfg: &LabelConfig,
    out: &Path,
    on_progress: &mut dyn FnMut(&LabelProgress),
    sink: &mut dyn CommitSink,
) -> Result<LabelSummary> {
    if cfg.inputs.is_empty() {
        return Err(Error::InvalidArgument("no input files".into()));
    }
    let (index, count) = cfg.shard;
    if count == 0 || index >= count {
        return Err(Error::InvalidArgument(format!(
            "shard {index}/{count}: need 0 <= i < n"
        )));
    }
    if cfg.part_sequences == 0 || cfg.batch_tokens == 0 {
        return Err(Error::InvalidArgument(
            "part_sequences and batch_tokens must be > 0".into(),
        ));
    }
    let meta = store_meta(teacher, cfg)?;
    let slot = Slot::of(index, count)?;
    let done = |manifest: &Manifest, shards: Option<(u64, u64)>| LabelSummary {
        manifest: manifest.clone(),
        sequences_labelled: 0,
        tokens_labelled: 0,
        sequences_resumed: manifest.rows(crate::schema::Table::Samples),
        records_skipped: manifest.cursor["records_skipped"].as_u64().unwrap_or(0),
        skipped_examples: Vec::new(),
        already_complete: true,
        shards,
    };
    if let Some(slot) = slot {
        if Manifest::path(out).exists() {
            // Committed: every shard is done. Only a store of the same settings counts.
            let m = Manifest::load(out)?;
            let same = m.labeling["shards"].as_u64() == Some(count)
                && shards::unsharded_labeling(&m.labeling)
                    == shards::unsharded_labeling(&meta.labeling);
            if !same {
                return Err(Error::OutputInUse {
                    path: out.to_path_buf(),
                    reason: format!("holds a store that is not a {count}-way sharded run with these settings; use a new output directory"),
                });
            }
            return Ok(done(&m, Some((count, count))));
        }
        shards::check_count(out, slot)?;
    } else if Manifest::path(out).exists() {
        // A store committed by a sharded run of the same settings is complete for this one too.
        let m = Manifest::load(out)?;
        if let Some(n) = m.labeling["shards"].as_u64() {
            if m.complete
                && shards::unsharded_labeling(&m.labeling)
                    == shards::unsharded_labeling(&meta.labeling)
            {
                return Ok(done(&m, None));
            }
            return Err(Error::OutputInUse {
                path: out.to_path_buf(),
                reason: format!("a store labelled by a {n}-way sharded run with other settings; use a new output directory"),
            });
        }
    }
    let existing = StoreWriter::existing_slot(out, &meta, slot)?;
    if let Some(manifest) = existing.as_ref().filter(|m| m.complete) {
        // A shard done earlier whose commit step may not have run (killed just after).
        return Ok(match slot {
            Some(_) => {
                let store = sink.combine(out, count)?;
                let complete = sink.shards_complete(out, count)?;
                done(store.as_ref().unwrap_or(manifest), Some((complete, count)))
            }
            None => done(manifest, None),
        });
    }
    let resume_from = existing
        .and_then(|m| m.cursor["next_seq"].as_u64())
        .unwrap_or(0);
    // Every input is read and validated before anything is written.
    let Plan {
        planned,
        mut progress,
        skipped_examples,
        records_skipped,
        sequences,
    } = plan(teacher, cfg, resume_from)?;
    if sequences == 0 && !cfg.allow_empty {
        let files: Vec<String> = cfg
            .inputs
            .iter()
            .map(|i| i.path.display().to_string())
            .collect();
        return Err(Error::InvalidArgument(format!(
            "{}: no sequence to label (empty input{}); nothing was written (allow empty input to write an empty store)",
            files.join(", "),
            if records_skipped > 0 {
                format!(", or all {records_skipped} records skipped as invalid")
            } else {
                String::new()
            }
        )));
    }
    // Packed rows must hold every sequence: refused here, before anything is written.
    if let Some(row_len) = cfg.pack.filter(|&n| n > 0) {
        if let Some(p) = planned.iter().find(|p| p.input_ids.len() > row_len) {
            return Err(Error::InvalidArgument(format!(
                "{}: record {} (window {}) has {} tokens, more than packed rows of {row_len} tokens hold (raise the row length or cut the input into shorter windows)",
                cfg.inputs[p.input].path.display(),
                p.record,
                p.segment,
                p.input_ids.len()
            )));
        }
    }
    // One writer per store (per shard): a second run of the same command is refused while
    // this one runs; the lock dies with the process, so a kill never blocks the resume.
    let _lock = crate::store::lock::lock(
        &crate::store::lock::lock_path(out, slot),
        &out.display().to_string(),
    )?;
    let mut writer = match StoreWriter::open_slot(out, meta, WriterOptions::default(), slot)? {
        Opened::Complete(manifest) => {
            return Ok(LabelSummary {
                manifest,
                sequences_labelled: 0,
                tokens_labelled: 0,
                sequences_resumed: progress.sequences_resumed,
                records_skipped,
                skipped_examples,
                already_complete: true,
                shards: None,
            })
        }
        Opened::Fresh(w) => w,
        Opened::Resumed { writer, .. } => writer,
    };
    on_progress(&progress);
    let on_cpu = matches!(teacher.model().device(), candle_core::Device::Cpu);
    let opts = LabelOptions {
        k: cfg.k,
        select: Some(cfg.selection()),
        pack: cfg.pack,
        // On an accelerator larger logits chunks keep it busy (the selection runs there too).
        chunk_rows: if on_cpu { 64 } else { 512 },
        ..LabelOptions::default()
    };
    let (mut labelled, mut tokens) = (0u64, 0u64);
    let parts: Vec<&[Planned]> = planned.chunks(cfg.part_sequences).collect();
    // The teacher labels part i + 1 on a worker thread while this thread encodes, writes and
    // commits part i (the channel holds at most one finished part, so memory stays bounded).
    let seqs_done = AtomicU64::new(progress.sequences_done);
    let tokens_done = AtomicU64::new(progress.tokens_done);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<SampleLabels>>>(1);
        let (parts_ref, opts_ref) = (&parts, &opts);
        let (seqs_ref, tokens_ref, stop_ref) = (&seqs_done, &tokens_done, &stop);
        scope.spawn(move || {
            for chunk in parts_ref.iter() {
                let labelled = label_part(teacher, chunk, cfg, opts_ref, stop_ref, |n, t| {
                    seqs_ref.fetch_add(n, Ordering::Relaxed);
                    tokens_ref.fetch_add(t, Ordering::Relaxed);
                });
                let failed = labelled.is_err();
                if tx.send(labelled).is_err() || failed || stop_ref.load(Ordering::Relaxed) {
                    return;
                }
            }
        });
        let report = |progress: &mut LabelProgress, on_progress: &mut dyn FnMut(&LabelProgress)| {
            progress.sequences_done = seqs_done.load(Ordering::Relaxed);
            progress.tokens_done = tokens_done.load(Ordering::Relaxed);
            on_progress(progress);
        };
        let result = (|| -> Result<()> {
            for chunk in parts.iter() {
                let results = loop {
                    match rx.recv_timeout(std::time::Duration::from_millis(200)) {
                        Ok(r) => break r?,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            report(&mut progress, on_progress)
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                            return Err(Error::Internal(
                                "the labelling thread stopped without a result".into(),
                            ))
                        }
                    }
                };
                report(&mut progress, on_progress);
                for (p, labels) in chunk.iter().zip(results) {
                    let spec = &cfg.inputs[p.input];
                    let record = SampleRecord {
                        sample_id: p.seq_no,
                        source: spec.source.clone(),
                        split: spec.split.clone(),
                        record_index: p.record,
                        window_index: p.segment,
                        input_ids: p.input_ids.clone(),
                        prompt_len: p.prompt_len,
                    };
                    writer.push(&record, &labels)?;
                    labelled += 1;
                    tokens += p.input_ids.len() as u64;
                }
                let next = chunk.last().map_or(resume_from, |p| p.seq_no + 1);
                writer.commit(serde_json::json!({ "next_seq": next }))?;
                sink.committed(out, &writer.manifest_rel(), writer.manifest())?;
            }
            Ok(())
        })();
        // On an error here the worker stops after its current batch.
        stop.store(true, Ordering::Relaxed);
        drop(rx);
        result
    })?;
    let rel = writer.manifest_rel();
    let mut manifest = writer
        .finish(serde_json::json!({ "next_seq": u64::MAX, "records_skipped": records_skipped }))?;
    sink.committed(out, &rel, &manifest)?;
    let mut shards_done = None;
    if slot.is_some() {
        if let Some(store) = sink.combine(out, count)? {
            manifest = store;
        }
        shards_done = Some((sink.shards_complete(out, count)?, count));
    }
    Ok(LabelSummary {
        shards: shards_done,
        manifest,
        sequences_labelled: labelled,
        tokens_labelled: tokens,
        sequences_resumed: progress.sequences_resumed,
        records_skipped,
        skipped_examples,
        already_complete: false,
    })
}

/// Labels one part's sequences (in batches of `cfg.batch_tokens`, packed when `cfg.pack` is
/// set), calling `done(sequences, tokens)` after each batch; results in the part's order.
/// Stops early (with an error nobody reads) once `stop` is set.
fn label_part(
    teacher: &Teacher,
    chunk: &[Planned],
    cfg: &LabelConfig,
    opts: &LabelOptions,
    stop: &AtomicBool,
    mut done: impl FnMut(u64, u64),
) -> Result<Vec<SampleLabels>> {
    let lengths: Vec<usize> = chunk.iter().map(|p| p.input_ids.len()).collect();
    let batches = match cfg.pack {
        None => plan_batches(&lengths, cfg.batch_tokens),
        Some(row_len) => {
            // Every sequence fits (checked before the run started).
            let longest = lengths.iter().copied().max().unwrap_or(1);
            let row_len = if row_len == 0 { longest } else { row_len };
            plan_packed_batches(&lengths, row_len, cfg.batch_tokens)
        }
    };
    let mut results: Vec<Option<SampleLabels>> = vec![None; chunk.len()];
    for batch in batches {
        if stop.load(Ordering::Relaxed) {
            return Err(Error::Internal("labelling stopped".into()));
        }
        let inputs: Vec<LabelInput<'_>> = batch
            .iter()
            .map(|&i| LabelInput {
                input_ids: &chunk[i].input_ids,
                prompt_len: chunk[i].prompt_len,
            })
            .collect();
        let ids: Vec<u64> = batch.iter().map(|&i| chunk[i].seq_no).collect();
        let labels = teacher.label_batch_seeded(&inputs, opts, &ids)?;
        let mut batch_tokens = 0u64;
        for (&i, l) in batch.iter().zip(labels) {
            batch_tokens += chunk[i].input_ids.len() as u64;
            results[i] = Some(SampleLabels::from(l));
        }
        done(batch.len() as u64, batch_tokens);
    }
    results
        .into_iter()
        .map(|r| r.ok_or_else(|| Error::Internal("sequence left unlabelled".into())))
        .collect()
}

#[cfg(test)]
mod input_spec_tests {
    use super::*;

    #[test]
    fn colliding_stems_get_their_directory() {
        let mut specs = vec![
            InputSpec::new(Path::new("d/openbookqa/train.json"), "train"),
            InputSpec::new(Path::new("d/arc_easy/train.json"), "train"),
            InputSpec::new(Path::new("d/csqa/train_rand_split.jsonl"), "train"),
        ];
        InputSpec::distinct_sources(&mut specs);
        let sources: Vec<&str> = specs.iter().map(|s| s.source.as_str()).collect();
        assert_eq!(
            sources,
            ["openbookqa/train", "arc_easy/train", "train_rand_split"]
        );
    }
}
