//! The training loop.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, TrainerState};
use super::data::{spawn_prefetch, Batch, BatchStream, DataOptions};
use super::init::{initialise, Init};
use super::loss::{loss_rows, student_rows, KdKind, LossKind, LossSpec};
use super::model::Student;
use super::optim::{clip_scale, global_norm, AdamW, AdamWParams, Schedule};
use crate::error::{Error, Result};
use crate::store::StoreReader;

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Loss.
    pub loss: LossKind,
    /// Teacher temperature for `first`; None = the store's fitted temperature.
    pub temperature: Option<f64>,
    /// Weight of the kd part in `mix`.
    pub alpha: f64,
    /// The kd part of `mix`.
    pub mix_kd: KdKind,
    /// Label smoothing of the ce part.
    pub label_smoothing: f64,
    /// Smoothing of the teacher's top-k target towards uniform over the k ids (first/kd).
    #[serde(default)]
    pub teacher_smoothing: f64,
    /// Optimizer steps (also the length of the LR schedule).
    pub steps: u64,
    /// Padded tokens per micro-batch.
    pub batch_tokens: usize,
    /// Longest window fed to the student (default: batch tokens, capped by the model).
    pub max_seq_len: Option<usize>,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final LR as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// AdamW settings.
    pub adamw: AdamWParams,
    /// Clip the global gradient norm to this value.
    pub clip_grad_norm: Option<f64>,
    /// Seed of the data shuffle (and of random init via [`Init`]).
    pub seed: u64,
    /// Sequences in the shuffle buffer (1 = store order).
    pub shuffle_buffer: usize,
    /// Stop after this many passes over the data.
    pub epochs: Option<u64>,
    /// Split trained on.
    pub train_split: String,
    /// Split for validation loss.
    pub valid_split: String,
    /// Validate every N steps (and at the end); None = never.
    pub valid_every: Option<u64>,
    /// Micro-batches of the validation split evaluated (0 = all).
    pub valid_batches: usize,
    /// Save a resumable checkpoint every N steps (and at the end).
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Positions per chunk of full-vocabulary logits (kd-tail, ce).
    pub logits_chunk_rows: usize,
    /// Batches the reader thread prepares ahead.
    pub prefetch: usize,
    /// Accept a student whose tokenizer hash differs from the store's (vocab size must match).
    pub ignore_tokenizer_hash: bool,
    /// Stop (with a checkpoint) after this many total steps, as if interrupted.
    pub stop_after: Option<u64>,
    /// Type of the blocks' matrix products (f32, or bf16 on a GPU); weights, gradients and
    /// the optimizer state are f32 either way. See `Student::set_compute_dtype`.
    #[serde(default)]
    pub precision: Precision,
    /// Pack several sequences into each row (see `DataOptions::pack`).
    #[serde(default)]
    pub pack: bool,
}

/// Type of the student's matrix products during training (mixed precision).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything f32 (the CPU default).
    #[default]
    F32,
    /// bf16 products on f32 master weights (the GPU default of `firstkd distill`).
    Bf16,
}

impl Precision {
    /// The candle type of the products.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            loss: LossKind::First,
            temperature: None,
            alpha: 0.5,
            mix_kd: KdKind::First,
            label_smoothing: 0.0,
            teacher_smoothing: 0.0,
            steps: 1000,
            batch_tokens: 4096,
            max_seq_len: None,
            grad_accum: 1,
            lr: 3e-4,
            min_lr_ratio: 0.1,
            warmup_steps: 0,
            adamw: AdamWParams::default(),
            clip_grad_norm: Some(1.0),
            seed: 0,
            shuffle_buffer: 1024,
            epochs: None,
            train_split: "train".into(),
            valid_split: "valid".into(),
            valid_every: None,
            valid_batches: 0,
            checkpoint_every: None,
            keep_checkpoints: 2,
            logits_chunk_rows: 256,
            prefetch: 4,
            ignore_tokenizer_hash: false,
            stop_after: None,
            precision: Precision::F32,
            pack: false,
        }
    }
}

impl TrainOptions {
    /// The settings that determine the arithmetic of a run (compared on resume).
    pub fn fingerprint(&self) -> serde_json::Value {
        let mut f = serde_json::json!({
            "loss": self.loss, "temperature": self.temperature, "alpha": self.alpha,
            "mix_kd": self.mix_kd, "label_smoothing": self.label_smoothing, "steps": self.steps,
            "batch_tokens": self.batch_tokens, "max_seq_len": self.max_seq_len,
            "grad_accum": self.grad_accum, "lr": self.lr, "min_lr_ratio": self.min_lr_ratio,
            "warmup_steps": self.warmup_steps, "adamw": self.adamw,
            "clip_grad_norm": self.clip_grad_norm, "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer, "epochs": self.epochs,
            "train_split": self.train_split, "logits_chunk_rows": self.logits_chunk_rows,
            "precision": self.precision,
        });
        // Only when on, so runs checkpointed before packing existed still resume.
        if self.pack {
            f["pack"] = serde_json::Value::Bool(true);
        }
        if self.teacher_smoothing != 0.0 {
            f["teacher_smoothing"] = serde_json::json!(self.teacher_smoothing);
        }
        f
    }
}

/// What one optimizer step did, passed to the observer and written to `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Steps completed (1-based).
    pub step: u64,
    /// Total steps of the run.
    pub steps: u64,
    /// Mean loss per in-loss token.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Input tokens this step.
    pub tokens: u64,
    /// In-loss positions this step.
    pub loss_tokens: u64,
    /// Input tokens per second of this step.
    pub tokens_per_s: f64,
    /// Epoch of the last micro-batch.
    pub epoch: u64,
    /// Validation loss, on steps where it was computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_loss: Option<f64>,
}

/// Outcome of [`train`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Steps completed in total (including those before a resume).
    pub steps_done: u64,
    /// Step the run resumed from, if it did.
    pub resumed_from: Option<u64>,
    /// Loss of every completed step since the start of the run (across resumes).
    pub losses: Vec<f64>,
    /// Final validation loss, if validation ran.
    pub valid_loss: Option<f64>,
    /// Where the final model was written.
    pub final_dir: PathBuf,
    /// Input tokens trained on in total.
    pub tokens_seen: u64,
    /// Whether the data ran out (epochs limit) before `steps`.
    pub data_exhausted: bool,
}

/// Summed loss (not yet divided) and in-loss positions of one batch. The sum is a graph
/// node: call `backward` on it (scaled) to get gradients.
pub fn batch_loss(
    student: &Student,
    batch: &Batch,
    spec: &LossSpec,
    k: usize,
    chunk_rows: usize,
) -> Result<(Tensor, usize)> {
    let dev = student.device();
    let n = batch.loss_positions();
    let ids = Tensor::from_slice(&batch.input_ids, (batch.rows, batch.seq_len), dev)?;
    let hidden = student.hidden_states_packed(&ids, &batch.segments)?;
    let rows = Tensor::from_slice(&batch.loss_rows, n, dev)?;
    let h = hidden.index_select(&rows, 0)?;
    let topk_ids = Tensor::from_slice(&batch.topk_ids, (n, k), dev)?;
    let topk_lps = Tensor::from_slice(&batch.topk_logprobs, (n, k), dev)?;
    let targets = Tensor::from_slice(&batch.targets, n, dev)?;
    let stats = student_rows(
        &h,
        student.output_weight(),
        &topk_ids,
        &targets,
        spec,
        chunk_rows,
    )?;
    let per_row = loss_rows(&stats, &topk_lps, spec)?;
    Ok((per_row.sum_all()?, n))
}

/// Mean loss per in-loss token over `split` (at most `max_batches` batches, 0 = all), in
/// store order. None when the split has no in-loss positions.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    student: &Student,
    reader: &StoreReader,
    split: &str,
    spec: &LossSpec,
    batch_tokens: usize,
    max_positions: usize,
    max_batches: usize,
    chunk_rows: usize,
) -> Result<Option<f64>> {
    let opts = DataOptions {
        split: split.to_string(),
        batch_tokens,
        max_positions,
        shuffle_buffer: 1,
        seed: 0,
        epochs: Some(1),
        pack: false,
    };
    let k = reader.manifest().k;
    let (mut sum, mut n) = (0f64, 0usize);
    for (i, batch) in BatchStream::new(reader.clone(), opts)?.enumerate() {
        if max_batches > 0 && i >= max_batches {
            break;
        }
        let batch = match batch {
            Ok(b) => b,
            Err(Error::NoTrainingData(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let (loss, count) = batch_loss(student, &batch, spec, k, chunk_rows)?;
        sum += loss.to_scalar::<f32>()? as f64;
        n += count;
    }
    Ok((n > 0).then(|| sum / n as f64))
}

fn resolve_spec(opts: &TrainOptions, reader: &StoreReader) -> Result<LossSpec> {
    let uses_first = opts.loss == LossKind::First
        || (opts.loss == LossKind::Mix && opts.mix_kd == KdKind::First);
    let temperature = match (opts.temperature, &reader.manifest().temperature) {
        (Some(t), _) => t,
        (None, Some(info)) => info.value,
        (None, None) if uses_first => {
            return Err(Error::InvalidArgument(format!(
                "loss first needs a teacher temperature but {} has none fitted: run \
                 `firstkd calibrate` on it or pass --temperature",
                reader.dir().display()
            )))
        }
        (None, None) => 1.0,
    };
    let spec = LossSpec {
        kind: opts.loss,
        temperature,
        alpha: opts.alpha,
        mix_kd: opts.mix_kd,
        label_smoothing: opts.label_smoothing,
        teacher_smoothing: opts.teacher_smoothing,
    };
    spec.validate()?;
    Ok(spec)
}

fn check_tokenizer(
    student: &Student,
    tokenizer_sha256: Option<&str>,
    reader: &StoreReader,
    ignore_hash: bool,
) -> Result<()> {
    let tok = &reader.manifest().tokenizer;
    let vocab = student.config().vocab_size;
    if vocab != tok.vocab_size as usize {
        return Err(Error::TokenizerMismatch {
            store: format!(
                "vocabulary of {} ids (tokenizer {})",
                tok.vocab_size, tok.sha256
            ),
            model: format!("vocabulary of {vocab} ids"),
        });
    }
    if let Some(sha) = tokenizer_sha256 {
        if sha != tok.sha256 && !ignore_hash {
            return Err(Error::TokenizerMismatch {
                store: format!("tokenizer sha256 {}", tok.sha256),
                model: format!(
                    "tokenizer sha256 {sha} (pass --ignore-tokenizer-hash if the ids agree)"
                ),
            });
        }
    }
    Ok(())
}

fn append_json(file: &mut File, path: &Path, value: &impl Serialize) -> Result<()> {
    let line = serde_json::to_string(value)?;
    writeln!(file, "{line}").map_err(|e| Error::io(path, e))
}

/// Trains a student on `store`, writing checkpoints, `metrics.jsonl` and the final model
/// (`final/`) under `out`. With `resume`, continues from the newest checkpoint in `out`
/// (which must have been written with the same settings) and reproduces the uninterrupted
/// run exactly; without one it starts from `init`. `observer` sees every step.
pub fn train(
    store: &Path,
    init: &Init,
    out: &Path,
    opts: &TrainOptions,
    resume: bool,
    device: &Device,
    observer: &mut dyn FnMut(&StepReport),
) -> Result<TrainSummary> {
    let reader = StoreReader::open(store)?;
    let manifest = reader.manifest();
    if manifest.parts.is_empty() || manifest.rows(crate::schema::Table::Labels) == 0 {
        return Err(Error::NoTrainingData(format!(
            "{} holds no labels",
            store.display()
        )));
    }
    if manifest.in_loss_rows() == 0 {
        return Err(Error::NoTrainingData(format!(
            "{} has no in-loss positions (every label is a prompt position)",
            store.display()
        )));
    }
    if opts.steps == 0 || opts.grad_accum == 0 {
        return Err(Error::InvalidArgument(
            "steps and grad accumulation must be positive".into(),
        ));
    }
    let spec = resolve_spec(opts, &reader)?;
    let k = manifest.k;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    // Model and state: newest checkpoint when resuming, else the initialiser.
    let latest = if resume {
        checkpoint::list_checkpoints(out)?.pop()
    } else {
        None
    };
    let (mut student, state) = match &latest {
        Some((_, dir)) => {
            let (state, moments) = checkpoint::load_state(dir)?;
            if !checkpoint::same_fingerprint(&state.fingerprint, &opts.fingerprint()) {
                return Err(Error::InvalidArgument(format!(
                    "cannot resume from {}: it was trained with different settings \
                     ({} there, {} now)",
                    dir.display(),
                    state.fingerprint,
                    opts.fingerprint()
                )));
            }
            let student = checkpoint::load_model(dir, device)?;
            check_tokenizer(&student, None, &reader, opts.ignore_tokenizer_hash)?;
            (student, Some((state, moments)))
        }
        None => {
            let made = initialise(init, device)?;
            check_tokenizer(
                &made.student,
                made.tokenizer_sha256.as_deref(),
                &reader,
                opts.ignore_tokenizer_hash,
            )?;
            checkpoint::stash_tokenizer_files(out, &made.tokenizer_files)?;
            (made.student, None)
        }
    };
    student.set_compute_dtype(opts.precision.dtype())?;
    let mut optimizer = AdamW::new(student.vars(), opts.adamw)?;
    let (mut step, mut consumed, mut tokens_seen, mut losses) = (0u64, 0u64, 0u64, Vec::new());
    let resumed_from = match state {
        Some((state, moments)) => {
            optimizer.load_state(moments, state.optimizer_steps)?;
            step = state.step;
            consumed = state.batches_consumed;
            tokens_seen = state.tokens_seen;
            losses = state.losses;
            Some(step)
        }
        None => None,
    };

    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed_from.is_some())
        .truncate(resumed_from.is_none())
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;

    let max_positions = opts
        .max_seq_len
        .unwrap_or(opts.batch_tokens)
        .min(opts.batch_tokens)
        .min(student.config().max_position_embeddings)
        .max(1);
    let data = DataOptions {
        split: opts.train_split.clone(),
        batch_tokens: opts.batch_tokens,
        max_positions,
        shuffle_buffer: opts.shuffle_buffer,
        seed: opts.seed,
        epochs: opts.epochs,
        pack: opts.pack,
    };
    let rx = spawn_prefetch(BatchStream::new(reader.clone(), data)?, opts.prefetch);
    // Replay the stream up to the resume position (reads, no compute).
    let mut data_exhausted = false;
    for _ in 0..consumed {
        match rx.recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                data_exhausted = true;
                break;
            }
        }
    }

    let schedule = Schedule {
        lr: opts.lr,
        warmup: opts.warmup_steps,
        total: opts.steps,
        min_ratio: opts.min_lr_ratio,
    };
    let vars = student.vars().to_vec();
    let mut last_checkpoint: Option<PathBuf> = latest.map(|(_, d)| d);
    let mut valid_loss = None;
    let stop_at = opts.stop_after.unwrap_or(opts.steps).min(opts.steps);
    let save = |step: u64,
                consumed: u64,
                tokens_seen: u64,
                losses: &[f64],
                optimizer: &AdamW|
     -> Result<PathBuf> {
        let dir = checkpoint::checkpoint_dir(out, step);
        let state = TrainerState {
            version: checkpoint::STATE_VERSION,
            step,
            batches_consumed: consumed,
            tokens_seen,
            optimizer_steps: optimizer.steps_done(),
            fingerprint: opts.fingerprint(),
            losses: losses.to_vec(),
        };
        checkpoint::save_checkpoint(out, &dir, &student, &optimizer.state_tensors()?, &state)?;
        checkpoint::prune_checkpoints(out, opts.keep_checkpoints)?;
        Ok(dir)
    };

    while step < stop_at && !data_exhausted {
        let started = Instant::now();
        let mut micro = Vec::with_capacity(opts.grad_accum);
        while micro.len() < opts.grad_accum {
            match rx.recv() {
                Ok(Ok(b)) => micro.push(b),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    data_exhausted = true;
                    break;
                }
            }
        }
        if micro.is_empty() {
            break;
        }
        let n_total: usize = micro.iter().map(Batch::loss_positions).sum();
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0f64;
        for batch in &micro {
            let (sum, _) = batch_loss(&student, batch, &spec, k, opts.logits_chunk_rows)?;
            loss_sum += sum.to_scalar::<f32>()? as f64;
            let store = (sum / n_total as f64)?.backward()?;
            for (slot, (_, var)) in acc.iter_mut().zip(&vars) {
                if let Some(part) = store.get(var.as_tensor()) {
                    let part = part.detach();
                    *slot = Some(match slot.take() {
                        Some(g) => (g + part)?,
                        None => part,
                    });
                }
            }
        }
        let grads: Vec<Tensor> = acc
            .into_iter()
            .zip(&vars)
            .map(|(g, (_, var))| match g {
                Some(g) => Ok(g),
                None => var.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        let loss = loss_sum / n_total.max(1) as f64;
        let diverged = |what: &str, value: f64| Error::NonFiniteLoss {
            step: step + 1,
            what: what.to_string(),
            value,
            last_checkpoint: last_checkpoint
                .as_ref()
                .map(|p| format!("last good checkpoint: {}", p.display()))
                .unwrap_or_else(|| "no checkpoint was written".to_string()),
        };
        if !loss.is_finite() {
            return Err(diverged("loss", loss));
        }
        let grad_norm = global_norm(&grads)?;
        if !grad_norm.is_finite() {
            return Err(diverged("gradient norm", grad_norm));
        }
        let lr = schedule.lr_at(step);
        optimizer.step_scaled(&grads, lr, clip_scale(grad_norm, opts.clip_grad_norm))?;
        step += 1;
        consumed += micro.len() as u64;
        let tokens: u64 = micro.iter().map(|b| b.tokens() as u64).sum();
        tokens_seen += tokens;
        losses.push(loss);
        let secs = started.elapsed().as_secs_f64();
        let mut report = StepReport {
            step,
            steps: opts.steps,
            loss,
            lr,
            grad_norm,
            tokens,
            loss_tokens: n_total as u64,
            tokens_per_s: tokens as f64 / secs.max(1e-9),
            epoch: micro.last().map(|b| b.epoch).unwrap_or(0),
            valid_loss: None,
        };
        let last = step == stop_at;
        if opts
            .valid_every
            .is_some_and(|e| e > 0 && (step % e == 0 || last))
        {
            report.valid_loss = evaluate(
                &student,
                &reader,
                &opts.valid_split,
                &spec,
                opts.batch_tokens,
                max_positions,
                opts.valid_batches,
                opts.logits_chunk_rows,
            )?;
            valid_loss = report.valid_loss.or(valid_loss);
        }
        append_json(&mut metrics, &metrics_path, &report)?;
        observer(&report);
        if opts
            .checkpoint_every
            .is_some_and(|e| e > 0 && step % e == 0)
            && !last
        {
            last_checkpoint = Some(save(step, consumed, tokens_seen, &losses, &optimizer)?);
        }
    }
    // Final resumable checkpoint, and the model alone under final/ once the run is complete.
    save(step, consumed, tokens_seen, &losses, &optimizer)?;
    let final_dir = out.join("final");
    if step >= opts.steps || data_exhausted {
        checkpoint::write_atomically(&final_dir, |tmp| {
            checkpoint::write_model_files(&student, tmp)?;
            checkpoint::copy_tokenizer_files(out, tmp)
        })?;
    }
    Ok(TrainSummary {
        steps_done: step,
        resumed_from,
        losses,
        valid_loss,
        final_dir,
        tokens_seen,
        data_exhausted,
    })
}
