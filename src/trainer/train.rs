//! Training settings, what a step reports, and the loss of a batch (forward pass + loss); the
//! loop itself is [`super::Trainer`].

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::data::{Batch, BatchStream, DataOptions};
use super::loss::{
    full_kl_rows, loss_rows, mask_padding, student_rows, KdKind, LossKind, LossSpec, PAD_LOGPROB,
};
use super::model::Student;
use super::optim::AdamWParams;
use crate::calibration::TemperatureMode;
use crate::error::{Error, Result};
use crate::store::StoreReader;
use crate::teacher::TeacherModel;
use crate::temperature::Temperature;

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Loss.
    pub loss: LossKind,
    /// Teacher temperature for `first`; None = the store's fitted temperature.
    pub temperature: Option<Temperature>,
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
    /// The teacher model for `--loss online` (GGUF or Hugging Face directory): run in the
    /// loop on the store's sequences.
    #[serde(default)]
    pub teacher: Option<PathBuf>,
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
            teacher: None,
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
        if let Some(t) = &self.teacher {
            let name = t.file_name().map(|n| n.to_string_lossy().into_owned());
            f["teacher"] = serde_json::json!(name);
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

/// Outcome of a training run ([`super::train`], [`super::Trainer::finish`]).
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
    teacher: Option<&TeacherModel>,
) -> Result<(Tensor, usize)> {
    let dev = student.device();
    let n = batch.loss_positions();
    let ids = Tensor::from_slice(&batch.input_ids, (batch.rows, batch.seq_len), dev)?;
    let hidden = student.hidden_states_packed(&ids, &batch.segments)?;
    let rows = Tensor::from_slice(&batch.loss_rows, n, dev)?;
    let h = hidden.index_select(&rows, 0)?;
    if spec.kind == LossKind::Online {
        let teacher = teacher.ok_or_else(|| {
            Error::InvalidArgument(
                "the online loss needs a teacher model to run in the loop".into(),
            )
        })?;
        return Ok((
            online_loss(teacher, student, &ids, &h, &rows, chunk_rows)?,
            n,
        ));
    }
    let topk_ids = Tensor::from_slice(&batch.topk_ids, (n, k), dev)?;
    let topk_lps = Tensor::from_slice(&batch.topk_logprobs, (n, k), dev)?;
    let targets = Tensor::from_slice(&batch.targets, n, dev)?;
    let mut stats = student_rows(
        &h,
        student.output_weight(),
        &topk_ids,
        &targets,
        spec,
        chunk_rows,
    )?;
    // Lists shorter than k (top-p, sample stores) are padded: mask the student there too.
    if batch.topk_logprobs.iter().any(|&l| l <= PAD_LOGPROB / 2.0) {
        stats.topk_logits = mask_padding(&stats.topk_logits, &topk_lps)?;
    }
    let per_row = loss_rows(&stats, &topk_lps, spec)?;
    Ok((per_row.sum_all()?, n))
}

/// Summed online full-KD loss of the in-loss rows `rows` (flat indices into `ids`), whose
/// student hidden states are `h`: the teacher runs on the same right-padded rows, then
/// teacher and student logits are compared `chunk_rows` positions at a time.
fn online_loss(
    teacher: &TeacherModel,
    student: &Student,
    ids: &Tensor,
    h: &Tensor,
    rows: &Tensor,
    chunk_rows: usize,
) -> Result<Tensor> {
    let (b, s) = ids.dims2()?;
    let th = teacher.hidden_states(ids)?;
    let th = th
        .reshape((b * s, teacher.config().hidden_size))?
        .index_select(rows, 0)?;
    let n = h.dim(0)?;
    let chunk = chunk_rows.max(1);
    let output = student.output_weight();
    let fused = h.device().is_cpu() && h.dtype() == DType::F32;
    let output_t = output.t()?.to_dtype(h.dtype())?;
    let mut total: Option<Tensor> = None;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let t_logits = teacher.logits(&th.narrow(0, start, len)?)?.detach();
        let s_rows = h.narrow(0, start, len)?;
        // The student's logits as `student_rows` computes them (fused kernel on the CPU).
        let s_logits = if fused {
            super::fused::linear(&s_rows, output)?
        } else {
            s_rows.matmul(&output_t)?
        };
        let part = full_kl_rows(
            &t_logits.to_dtype(DType::F32)?,
            &s_logits.to_dtype(DType::F32)?,
        )?
        .sum_all()?;
        total = Some(match total {
            Some(t) => (t + part)?,
            None => part,
        });
        start += len;
    }
    total.ok_or_else(|| Error::Internal("no in-loss rows".into()))
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
    teacher: Option<&TeacherModel>,
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
        let (loss, count) = batch_loss(student, &batch, spec, k, chunk_rows, teacher)?;
        sum += loss.to_scalar::<f32>()? as f64;
        n += count;
    }
    Ok((n > 0).then(|| sum / n as f64))
}

pub(super) fn resolve_spec(opts: &TrainOptions, reader: &StoreReader) -> Result<LossSpec> {
    let uses_first = opts.loss == LossKind::First
        || (opts.loss == LossKind::Mix && opts.mix_kd == KdKind::First);
    let temperature = match (opts.temperature, &reader.manifest().temperature) {
        (Some(t), _) => t,
        (None, Some(info)) => {
            if uses_first && info.mode() != TemperatureMode::Renormalized {
                return Err(Error::InvalidArgument(format!(
                    "{}: its temperature {} was fitted with the {} renormalisation, but the \
                     first loss renormalises over the stored entries; refit it with the \
                     renormalized mode or give a temperature",
                    reader.dir().display(),
                    info.value,
                    info.mode(),
                )));
            }
            Temperature::new(info.value).map_err(|e| Error::InvalidManifest {
                path: reader.dir().join(crate::store::MANIFEST_FILE),
                reason: format!("fitted {e}"),
            })?
        }
        (None, None) if uses_first => {
            return Err(Error::InvalidArgument(format!(
                "loss first needs a teacher temperature but {} has none fitted: run \
                 `firstkd calibrate` on it or give a temperature",
                reader.dir().display()
            )))
        }
        (None, None) => Temperature::ONE,
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

pub(super) fn check_tokenizer(
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
                    "tokenizer sha256 {sha} (the hash check can be turned off if the ids agree)"
                ),
            });
        }
    }
    Ok(())
}
