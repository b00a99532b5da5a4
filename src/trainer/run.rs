//! The training loop as a [`Trainer`]: start (or resume), step, evaluate, save, finish.
//! [`train`] drives one from start to end.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use serde::Serialize;

use super::checkpoint::{self, TrainerState};
use super::data::{spawn_prefetch, Batch, BatchStream, DataOptions};
use super::init::{initialise, Init};
use super::loss::{KdKind, LossKind, LossSpec};
use super::model::Student;
use super::optim::{clip_scale, global_norm, AdamW, Schedule};
use super::train::{
    batch_loss, check_tokenizer, evaluate, resolve_spec, StepReport, TrainOptions, TrainSummary,
};
use crate::error::{Error, Result};
use crate::schema::{Selection, Table};
use crate::store::StoreReader;

/// A training run in progress: the student, its optimizer, the data stream and the counters
/// a checkpoint records.
pub struct Trainer {
    reader: StoreReader,
    out: PathBuf,
    opts: TrainOptions,
    spec: LossSpec,
    student: Student,
    /// The teacher of `--loss online`.
    teacher: Option<crate::teacher::Teacher>,
    vars: Vec<(String, Var)>,
    optimizer: AdamW,
    schedule: Schedule,
    batches: Receiver<Result<Batch>>,
    metrics: File,
    metrics_path: PathBuf,
    max_positions: usize,
    stop_at: u64,
    step: u64,
    consumed: u64,
    tokens_seen: u64,
    losses: Vec<f64>,
    resumed_from: Option<u64>,
    last_checkpoint: Option<PathBuf>,
    valid_loss: Option<f64>,
    data_exhausted: bool,
}

fn append_json(file: &mut File, path: &Path, value: &impl Serialize) -> Result<()> {
    let line = serde_json::to_string(value)?;
    writeln!(file, "{line}").map_err(|e| Error::io(path, e))
}

/// Drops the lines of `metrics.jsonl` that a killed run wrote after its last checkpoint
/// (steps after `step`, and a line cut short by the kill), so a resumed run's metrics have
/// each step once. The file is replaced atomically.
fn keep_metrics_up_to(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut kept = String::new();
    for line in text.split(|&b| b == b'\n') {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if value
            .get("step")
            .and_then(serde_json::Value::as_u64)
            .is_some_and(|s| s <= step)
        {
            kept.push_str(&String::from_utf8_lossy(line));
            kept.push('\n');
        }
    }
    if kept.len() == text.len() {
        return Ok(());
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Refuses a store the trainer cannot learn from, and settings that make no run.
fn check_store(reader: &StoreReader, opts: &TrainOptions) -> Result<()> {
    let store = reader.name();
    let manifest = reader.manifest();
    let sampled_store = matches!(manifest.selection(), Selection::Sample { .. });
    let kd = match opts.loss {
        LossKind::Ce => None,
        LossKind::Mix => Some(opts.mix_kd),
        LossKind::First => Some(KdKind::First),
        LossKind::Kd => Some(KdKind::Kd),
        LossKind::KdTail => Some(KdKind::KdTail),
        LossKind::Sampled => Some(KdKind::Sampled),
        LossKind::Online => None,
    };
    if (opts.loss == LossKind::Online) != opts.teacher.is_some() {
        return Err(Error::InvalidArgument(
            "the online loss and a teacher model go together: the teacher runs in the loop".into(),
        ));
    }
    if opts.loss == LossKind::Online && opts.pack {
        return Err(Error::InvalidArgument(
            "the online loss does not pack sequences (the teacher would attend across a packed \
             row); train without packing"
                .into(),
        ));
    }
    match (sampled_store, kd) {
        (true, Some(kd)) if kd != KdKind::Sampled => {
            return Err(Error::InvalidArgument(format!(
                "{} was labelled with selection {}: its lists are draws, not the teacher's top \
                 tokens; train with the sampled loss (or ce, or mix with sampled as its kd part)",
                store.display(),
                manifest.selection()
            )))
        }
        (false, Some(KdKind::Sampled)) => {
            return Err(Error::InvalidArgument(format!(
                "{}: the sampled loss needs a store labelled with selection sample:N (this one \
                 has {})",
                store.display(),
                manifest.selection()
            )))
        }
        _ => {}
    }
    if manifest.parts.is_empty() || manifest.rows(Table::Labels) == 0 {
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
    Ok(())
}

/// The teacher of an online run, checked to share the store's tokenizer.
fn load_teacher(
    path: &Path,
    reader: &StoreReader,
    ignore_hash: bool,
    device: &Device,
) -> Result<crate::teacher::Teacher> {
    let teacher = crate::teacher::Teacher::load(path, device)?;
    let (ours, theirs) = (
        &reader.manifest().tokenizer.sha256,
        &teacher.tokenizer().identity().sha256,
    );
    if ours != theirs && !ignore_hash {
        return Err(Error::InvalidArgument(format!(
            "{}: its tokenizer ({theirs}) is not the store's ({ours}); the online teacher must \
             read the store's token ids",
            path.display()
        )));
    }
    Ok(teacher)
}

impl Trainer {
    /// Opens a run on `store` writing under `out`. With `resume`, continues from the newest
    /// checkpoint in `out` (which must have been written with the same settings) and
    /// reproduces the uninterrupted run exactly; otherwise (or when there is none) starts
    /// from `init`.
    pub fn open(
        store: &Path,
        init: &Init,
        out: &Path,
        opts: &TrainOptions,
        resume: bool,
        device: &Device,
    ) -> Result<Self> {
        Self::open_reader(StoreReader::open(store)?, init, out, opts, resume, device)
    }

    /// [`Trainer::open`] on a store already opened (for example one streamed from object
    /// storage, [`StoreReader::open_with_source`]).
    pub fn open_reader(
        reader: StoreReader,
        init: &Init,
        out: &Path,
        opts: &TrainOptions,
        resume: bool,
        device: &Device,
    ) -> Result<Self> {
        check_store(&reader, opts)?;
        let spec = resolve_spec(opts, &reader)?;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let latest = if resume {
            checkpoint::recover_interrupted(out)?;
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
                let optimizer_file = dir.join(checkpoint::OPTIMIZER_FILE);
                (student, Some((state, moments, optimizer_file)))
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
        let teacher = match &opts.teacher {
            Some(path) => Some(load_teacher(
                path,
                &reader,
                opts.ignore_tokenizer_hash,
                device,
            )?),
            None => None,
        };
        let mut optimizer = AdamW::new(student.vars(), opts.adamw)?;
        let (mut step, mut consumed, mut tokens_seen, mut losses) = (0, 0, 0, Vec::new());
        let resumed_from = match state {
            Some((state, moments, optimizer_file)) => {
                // A state that does not fit the model is a damaged checkpoint.
                optimizer
                    .load_state(moments, state.optimizer_steps)
                    .map_err(|e| match e {
                        Error::InvalidArgument(reason) => Error::Corrupt {
                            path: optimizer_file,
                            row: None,
                            reason,
                        },
                        other => other,
                    })?;
                step = state.step;
                consumed = state.batches_consumed;
                tokens_seen = state.tokens_seen;
                losses = state.losses;
                Some(step)
            }
            None => None,
        };
        let metrics_path = out.join("metrics.jsonl");
        if let Some(step) = resumed_from {
            keep_metrics_up_to(&metrics_path, step)?;
        }
        let metrics = OpenOptions::new()
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
        let batches = spawn_prefetch(BatchStream::new(reader.clone(), data)?, opts.prefetch);
        let mut trainer = Trainer {
            teacher,
            vars: student.vars().to_vec(),
            schedule: Schedule {
                lr: opts.lr,
                warmup: opts.warmup_steps,
                total: opts.steps,
                min_ratio: opts.min_lr_ratio,
            },
            stop_at: opts.stop_after.unwrap_or(opts.steps).min(opts.steps),
            reader,
            out: out.to_path_buf(),
            opts: opts.clone(),
            spec,
            student,
            optimizer,
            batches,
            metrics,
            metrics_path,
            max_positions,
            step,
            consumed,
            tokens_seen,
            losses,
            resumed_from,
            last_checkpoint: latest.map(|(_, d)| d),
            valid_loss: None,
            data_exhausted: false,
        };
        trainer.replay()?;
        Ok(trainer)
    }

    /// Replays the stream up to the resume position (reads, no compute).
    fn replay(&mut self) -> Result<()> {
        for _ in 0..self.consumed {
            match self.batches.recv() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    self.data_exhausted = true;
                    break;
                }
            }
        }
        Ok(())
    }

    /// The student being trained.
    pub fn student(&self) -> &Student {
        &self.student
    }

    /// Steps completed so far (including those before a resume).
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Whether another step would run: below the step limit (or `stop_after`) and data left.
    pub fn has_next(&self) -> bool {
        self.step < self.stop_at && !self.data_exhausted
    }

    /// The next `grad_accum` micro-batches (fewer, or none, when the data ends).
    fn next_micro_batches(&mut self) -> Result<Vec<Batch>> {
        let mut micro = Vec::with_capacity(self.opts.grad_accum);
        while micro.len() < self.opts.grad_accum {
            match self.batches.recv() {
                Ok(Ok(b)) => micro.push(b),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    self.data_exhausted = true;
                    break;
                }
            }
        }
        Ok(micro)
    }

    /// Summed gradients of the micro-batches' mean loss, and that loss.
    fn gradients(&self, micro: &[Batch], n_total: usize) -> Result<(Vec<Tensor>, f64)> {
        let k = self.reader.manifest().k;
        let mut acc: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut loss_sum = 0f64;
        for batch in micro {
            let chunk = self.opts.logits_chunk_rows;
            let teacher = self.teacher.as_ref().map(|t| t.model());
            let (sum, _) = batch_loss(&self.student, batch, &self.spec, k, chunk, teacher)?;
            loss_sum += sum.to_scalar::<f32>()? as f64;
            let store = (sum / n_total as f64)?.backward()?;
            for (slot, (_, var)) in acc.iter_mut().zip(&self.vars) {
                if let Some(part) = store.get(var.as_tensor()) {
                    let part = part.detach();
                    *slot = Some(match slot.take() {
                        Some(g) => (g + part)?,
                        None => part,
                    });
                }
            }
        }
        let grads = acc
            .into_iter()
            .zip(&self.vars)
            .map(|(g, (_, var))| match g {
                Some(g) => Ok(g),
                None => var.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        Ok((grads, loss_sum / n_total.max(1) as f64))
    }

    fn diverged(&self, what: &str, value: f64) -> Error {
        Error::NonFiniteLoss {
            step: self.step + 1,
            what: what.to_string(),
            value,
            last_checkpoint: self
                .last_checkpoint
                .as_ref()
                .map(|p| format!("last good checkpoint: {}", p.display()))
                .unwrap_or_else(|| "no checkpoint was written".to_string()),
        }
    }

    /// One optimizer step over `grad_accum` micro-batches, with validation and a checkpoint
    /// when they are due. None when no step was left to run.
    pub fn step(&mut self) -> Result<Option<StepReport>> {
        if !self.has_next() {
            return Ok(None);
        }
        let started = Instant::now();
        let micro = self.next_micro_batches()?;
        if micro.is_empty() {
            return Ok(None);
        }
        let n_total: usize = micro.iter().map(Batch::loss_positions).sum();
        let (grads, loss) = self.gradients(&micro, n_total)?;
        if !loss.is_finite() {
            return Err(self.diverged("loss", loss));
        }
        let grad_norm = global_norm(&grads)?;
        if !grad_norm.is_finite() {
            return Err(self.diverged("gradient norm", grad_norm));
        }
        let lr = self.schedule.lr_at(self.step);
        let scale = clip_scale(grad_norm, self.opts.clip_grad_norm);
        self.optimizer.step_scaled(&grads, lr, scale)?;
        crate::store::fault::point("train-step");
        self.step += 1;
        self.consumed += micro.len() as u64;
        let tokens: u64 = micro.iter().map(|b| b.tokens() as u64).sum();
        self.tokens_seen += tokens;
        self.losses.push(loss);
        let secs = started.elapsed().as_secs_f64();
        let mut report = StepReport {
            step: self.step,
            steps: self.opts.steps,
            loss,
            lr,
            grad_norm,
            tokens,
            loss_tokens: n_total as u64,
            tokens_per_s: tokens as f64 / secs.max(1e-9),
            epoch: micro.last().map(|b| b.epoch).unwrap_or(0),
            valid_loss: None,
        };
        let last = self.step == self.stop_at;
        let due = |every: Option<u64>| every.is_some_and(|e| e > 0 && self.step.is_multiple_of(e));
        if due(self.opts.valid_every) || (last && self.opts.valid_every.is_some_and(|e| e > 0)) {
            report.valid_loss = self.evaluate()?;
            self.valid_loss = report.valid_loss.or(self.valid_loss);
        }
        append_json(&mut self.metrics, &self.metrics_path, &report)?;
        if due(self.opts.checkpoint_every) && !last {
            self.last_checkpoint = Some(self.save()?);
        }
        Ok(Some(report))
    }

    /// Mean loss per in-loss token on the validation split (None when it has none).
    pub fn evaluate(&self) -> Result<Option<f64>> {
        evaluate(
            &self.student,
            &self.reader,
            &self.opts.valid_split,
            &self.spec,
            self.opts.batch_tokens,
            self.max_positions,
            self.opts.valid_batches,
            self.opts.logits_chunk_rows,
            self.teacher.as_ref().map(|t| t.model()),
        )
    }

    /// Writes a resumable checkpoint of the current step (pruning old ones) and returns it.
    pub fn save(&self) -> Result<PathBuf> {
        let dir = checkpoint::checkpoint_dir(&self.out, self.step);
        let state = TrainerState {
            version: checkpoint::STATE_VERSION,
            step: self.step,
            batches_consumed: self.consumed,
            tokens_seen: self.tokens_seen,
            optimizer_steps: self.optimizer.steps_done(),
            fingerprint: self.opts.fingerprint(),
            losses: self.losses.clone(),
        };
        let moments = self.optimizer.state_tensors()?;
        checkpoint::save_checkpoint(&self.out, &dir, &self.student, &moments, &state)?;
        checkpoint::prune_checkpoints(&self.out, self.opts.keep_checkpoints)?;
        Ok(dir)
    }

    /// Saves a final resumable checkpoint and, when the run is complete (all steps, or the
    /// data ran out), the model alone under `final/`.
    pub fn finish(self) -> Result<TrainSummary> {
        // A resumed run with no step left already has this step's checkpoint.
        let dir = checkpoint::checkpoint_dir(&self.out, self.step);
        if self.last_checkpoint.as_deref() != Some(dir.as_path()) {
            self.save()?;
        }
        let final_dir = self.out.join("final");
        if self.step >= self.opts.steps || self.data_exhausted {
            checkpoint::write_atomically(&final_dir, |tmp| {
                checkpoint::write_model_files(&self.student, tmp)?;
                checkpoint::copy_tokenizer_files(&self.out, tmp)
            })?;
        }
        Ok(TrainSummary {
            steps_done: self.step,
            resumed_from: self.resumed_from,
            losses: self.losses,
            valid_loss: self.valid_loss,
            final_dir,
            tokens_seen: self.tokens_seen,
            data_exhausted: self.data_exhausted,
        })
    }
}

/// Trains a student on `store`, writing checkpoints, `metrics.jsonl` and the final model
/// (`final/`) under `out` (see [`Trainer::open`] for `resume`). `observer` sees every step.
pub fn train(
    store: &Path,
    init: &Init,
    out: &Path,
    opts: &TrainOptions,
    resume: bool,
    device: &Device,
    observer: &mut dyn FnMut(&StepReport),
) -> Result<TrainSummary> {
    train_reader(
        StoreReader::open(store)?,
        init,
        out,
        opts,
        resume,
        device,
        observer,
    )
}

/// [`train`] on a store already opened.
pub fn train_reader(
    reader: StoreReader,
    init: &Init,
    out: &Path,
    opts: &TrainOptions,
    resume: bool,
    device: &Device,
    observer: &mut dyn FnMut(&StepReport),
) -> Result<TrainSummary> {
    let mut trainer = Trainer::open_reader(reader, init, out, opts, resume, device)?;
    while let Some(report) = trainer.step()? {
        observer(&report);
    }
    trainer.finish()
}
