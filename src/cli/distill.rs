//! `firstkd distill`: train a student on a store's soft labels.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use firstkd::trainer::{
    train_reader, AdamWParams, Init, KdKind, LossKind, Precision, StepReport, TrainOptions,
};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `firstkd distill`.
/// `--precision`: a [`Precision`], or auto (bf16 on a GPU, f32 on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    Auto,
    F32,
    Bf16,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The labelled store to train on.
    #[arg(long)]
    pub store: PathBuf,
    /// Student initialisation: random:CONFIG.json | gguf:PATH | hf:DIR | teacher-layers:PATH:0,2,4
    #[arg(long)]
    pub init: String,
    /// Loss: first (top-k KL at the store's fitted T), kd (T = 1), kd-tail (k ids + tail
    /// bucket), ce (next-token cross-entropy), mix (alpha * kd + (1 - alpha) * ce) or
    /// sampled (Sparse Logit Sampling, for stores labelled with --select sample:N) or online
    /// (full-distribution KL to --teacher, run in the loop).
    #[arg(long, value_enum, default_value_t = LossKind::First)]
    pub loss: LossKind,
    /// Teacher temperature for `first`, overriding the store's fitted one.
    #[arg(long)]
    pub temperature: Option<firstkd::Temperature>,
    /// Weight of the kd part of `mix`.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// kd part of `mix`: first, kd, kd-tail or sampled.
    #[arg(long, value_enum, default_value_t = KdKind::First)]
    pub mix_kd: KdKind,
    /// Label smoothing of the ce part.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Smooth the teacher's renormalised top-k target towards uniform over the same k ids
    /// (`(1 - b) t + b / k`, the paper's "Distill w/ LS"; first and kd losses).
    #[arg(long, default_value_t = 0.0)]
    pub teacher_smoothing: f64,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: u64,
    /// Padded tokens per micro-batch (rows x longest sequence).
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
    /// Longest window fed to the student (longer samples are cut into windows).
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// Final learning rate as a fraction of the peak (cosine decay).
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// AdamW weight decay (matrices only).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// AdamW beta1.
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    /// AdamW beta2.
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,
    /// Clip the global gradient norm (0 = no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Seed of the data shuffle and of random initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences in the shuffle buffer (1 = store order).
    #[arg(long, default_value_t = 1024)]
    pub shuffle_buffer: usize,
    /// Stop after this many passes over the data.
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Pack several sequences into each row of --max-seq-len tokens (each attends only to
    /// itself, positions restart) instead of padding one sequence per row.
    #[arg(long)]
    pub pack: bool,
    /// The teacher (GGUF or Hugging Face directory) for --loss online: run in the loop on the
    /// store's sequences, matching its full distribution (the upper bound of offline KD).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Split to train on.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Split for the validation loss.
    #[arg(long, default_value = "valid")]
    pub valid_split: String,
    /// Compute the validation loss every N steps (and at the end).
    #[arg(long)]
    pub valid_every: Option<u64>,
    /// Micro-batches of the validation split per evaluation (0 = all).
    #[arg(long, default_value_t = 0)]
    pub valid_batches: usize,
    /// Save a resumable checkpoint every N steps (one is always saved at the end).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Continue from the newest checkpoint in --out (same settings required).
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many total steps with a checkpoint, as if interrupted (resume later).
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Positions per chunk of full-vocabulary logits (kd-tail, ce).
    #[arg(long, default_value_t = 256)]
    pub logits_chunk: usize,
    /// Accept a student whose tokenizer hash differs from the store's (vocab must match).
    #[arg(long)]
    pub ignore_tokenizer_hash: bool,
    /// cpu, or cuda[:N] (needs the `cuda` cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Matrix products of the transformer blocks: auto (bf16 on a GPU, f32 on the CPU), f32 or
    /// bf16. Weights, gradients and optimizer state are f32 either way.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
    pub precision: PrecisionArg,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Run directory: checkpoints/, final/, metrics.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub stream: super::StreamArgs,
}

/// The flags that fix `distill`'s errors (library messages name no flags).
const HINTS: &[(&str, &str)] = &[
    ("needs a teacher temperature", "or pass --temperature T"),
    (
        "train with the sampled loss",
        "pass --loss sampled (or --loss ce, or --loss mix --mix-kd sampled)",
    ),
    (
        "the online loss and a teacher",
        "--loss online needs --teacher MODEL, and --teacher is only for it",
    ),
    ("train without packing", "drop --pack"),
];

fn flag_hint(err: firstkd::Error) -> anyhow::Error {
    match &err {
        firstkd::Error::TokenizerMismatch { store, .. } if store.contains("sha256") => {
            anyhow::anyhow!(
                "{err}; pass --ignore-tokenizer-hash if the two tokenizers give the same ids"
            )
        }
        _ => super::flag_hint(err, HINTS),
    }
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let (reader, streamed) = super::open_streamed(&args.store, &args.stream)
        .with_context(|| format!("distilling from {}", args.store.display()))?;
    let mut opts = TrainOptions {
        loss: args.loss,
        temperature: args.temperature,
        alpha: args.alpha,
        mix_kd: args.mix_kd,
        label_smoothing: args.label_smoothing,
        teacher_smoothing: args.teacher_smoothing,
        steps: args.steps,
        batch_tokens: args.batch_tokens,
        max_seq_len: args.max_seq_len,
        grad_accum: args.grad_accum,
        lr: args.lr,
        min_lr_ratio: args.min_lr_ratio,
        warmup_steps: args.warmup,
        adamw: AdamWParams {
            beta1: args.beta1,
            beta2: args.beta2,
            weight_decay: args.weight_decay,
            ..AdamWParams::default()
        },
        clip_grad_norm: (args.clip > 0.0).then_some(args.clip),
        seed: args.seed,
        shuffle_buffer: args.shuffle_buffer,
        epochs: args.epochs,
        train_split: args.split.clone(),
        valid_split: args.valid_split.clone(),
        valid_every: args.valid_every,
        valid_batches: args.valid_batches,
        checkpoint_every: args.checkpoint_every,
        keep_checkpoints: args.keep_checkpoints,
        logits_chunk_rows: args.logits_chunk,
        prefetch: 4,
        ignore_tokenizer_hash: args.ignore_tokenizer_hash,
        stop_after: args.stop_after,
        precision: Precision::F32,
        pack: args.pack,
        teacher: args.teacher.clone(),
    };
    let init = Init::parse(&args.init, args.seed)?;
    let device = super::device(&args.device)?;
    opts.precision = match (args.precision, device.is_cuda()) {
        (PrecisionArg::Auto, true) | (PrecisionArg::Bf16, _) => Precision::Bf16,
        (PrecisionArg::Auto, false) | (PrecisionArg::F32, _) => Precision::F32,
    };
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(args.steps);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}",
            )
            .context("progress bar template")?
            .progress_chars("=> "),
        );
        bar
    };
    let mut observer = |r: &StepReport| {
        bar.set_position(r.step);
        let valid = r
            .valid_loss
            .map(|v| format!("  valid {v:.4}"))
            .unwrap_or_default();
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  |g| {:.3}  {:.0} tok/s{valid}",
            r.loss, r.lr, r.grad_norm, r.tokens_per_s
        ));
    };
    let summary = train_reader(
        reader,
        &init,
        &args.out,
        &opts,
        args.resume,
        &device,
        &mut observer,
    )
    .map_err(flag_hint)
    .with_context(|| format!("distilling from {}", args.store.display()))?;
    bar.finish_and_clear();
    if let Some(from) = summary.resumed_from {
        writeln!(out, "resumed from step {from}")?;
    }
    let first = summary.losses.first().copied().unwrap_or(f64::NAN);
    let last = summary.losses.last().copied().unwrap_or(f64::NAN);
    writeln!(
        out,
        "trained {} step(s) on {} tokens: loss {first:.4} -> {last:.4}",
        summary.steps_done, summary.tokens_seen
    )?;
    if let Some(v) = summary.valid_loss {
        writeln!(out, "validation loss {v:.4}")?;
    }
    if summary.data_exhausted {
        writeln!(out, "stopped early: the data ran out (--epochs)")?;
    }
    let peak = firstkd::runtime::peak_rss_line();
    if !peak.is_empty() {
        writeln!(out, "{peak}")?;
    }
    if let Some(parts) = &streamed {
        writeln!(out, "{}", super::stream_report(parts, &args.stream))?;
        parts.close();
    }
    if summary.steps_done >= args.steps || summary.data_exhausted {
        writeln!(out, "final model: {}", summary.final_dir.display())?;
    } else {
        writeln!(
            out,
            "stopped at step {}; continue with --resume",
            summary.steps_done
        )?;
    }
    Ok(0)
}
