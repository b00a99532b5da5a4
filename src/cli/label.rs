use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use firstkd::input::{InputFormat, InputOptions, McResponse};
use firstkd::label::{label, label_with, InputSpec, LabelConfig};
use firstkd::schema::LogprobDtype;
use firstkd::teacher::{Compute, Teacher};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `firstkd label`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Teacher: a GGUF file (llama/qwen2) or a Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// tokenizer.json overriding the GGUF's own tokenizer.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Input file (JSONL, JSON array or .txt); repeat for several. See docs/inputs.md.
    #[arg(long = "input", required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output store: a directory, or `s3://bucket/prefix` (created; an interrupted store is
    /// resumed). With `--shard i/n` every shard writes into the same store.
    #[arg(long)]
    pub out: PathBuf,
    /// Split recorded for every input's samples.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Record shape: auto, text, prompt, messages, alpaca, mc.
    #[arg(long, value_enum, default_value_t = InputFormat::Auto)]
    pub format: InputFormat,
    /// Window length for plain text, in tokens.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Longest accepted sequence (default and maximum: the model's context length).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Response of multiple-choice records: letter (" B") or text (" the answer").
    #[arg(long, value_enum, default_value_t = McResponse::Letter)]
    pub mc_response: McResponse,
    /// Longest JSONL line accepted, in bytes; a longer line is an invalid record, skipped
    /// without being read whole.
    #[arg(long, default_value_t = firstkd::input::DEFAULT_MAX_RECORD_BYTES)]
    pub max_record_bytes: usize,
    /// Teacher tokens kept per position (top-k; see --select for other selections).
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// Knowledge selection: top-k:K (as --k), top-p:P,max=K (smallest set reaching mass P, at
    /// most K) or sample:N[,t=T][,seed=S] (N draws from the teacher at temperature T, stored
    /// as ids with counts). Top-p and sample need the quantized layout. See docs/format.md.
    #[arg(long, value_parser = parse_selection)]
    pub select: Option<firstkd::schema::Selection>,
    /// Log-prob storage: quantized (format 2.0, the default), float32 or float16 (format 1.0).
    #[arg(long, value_enum, default_value_t = LogprobDtype::Quantized)]
    pub dtype: LogprobDtype,
    /// Padded tokens per forward pass.
    #[arg(long, default_value_t = 2048)]
    pub batch_tokens: usize,
    /// Pack several sequences into each row of a forward pass (each attends only to itself):
    /// no padding waste. `--pack` alone uses rows of each part's longest sequence; `--pack N`
    /// rows of N tokens. The default on an accelerator; `--pack off` turns it off.
    #[arg(long, num_args = 0..=1, default_missing_value = "0", value_parser = parse_pack)]
    pub pack: Option<PackArg>,
    /// Sequences per committed part (the resume granularity).
    #[arg(long, default_value_t = 256)]
    pub part_sequences: usize,
    /// Accept inputs with no sequence to label and write an empty (complete) store; without
    /// it that is an error and nothing is written.
    #[arg(long)]
    pub allow_empty: bool,
    /// Label only shard i of n (`i/n`): sequences whose number modulo n is i. The n shards may
    /// run at the same time (other processes or machines) into one store, which is committed
    /// when the last one finishes (docs/scale-out.md).
    #[arg(long, default_value = "0/1")]
    pub shard: String,
    /// Skip invalid records (counted and reported) instead of stopping at the first.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Read at most N records of each input (quick runs).
    #[arg(long)]
    pub limit: Option<u64>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// cpu, or cuda[:N] (needs the `cuda` cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Matrix products: f32 (the reference), int16 (12-bit weights, 13-bit activations in
    /// blocks of 64, CPU only: faster, labels within f32 noise), int8 (W8A8, CPU only: the
    /// fastest, labels measurably different) or bf16 (bf16 weights and product inputs with f32
    /// accumulation, for GPUs; on the CPU slower than f32). Measured in docs/benchmarks.md.
    #[arg(long, value_enum, default_value_t = Compute::F32)]
    pub compute: Compute,
}

/// `--pack`'s value: off, or a row length (0: each part's longest sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackArg {
    Off,
    Rows(usize),
}

fn parse_pack(s: &str) -> Result<PackArg, String> {
    match s {
        "off" | "no" | "false" => Ok(PackArg::Off),
        n => n
            .parse()
            .map(PackArg::Rows)
            .map_err(|_| format!("--pack takes a row length in tokens or `off`, not {n:?}")),
    }
}

fn parse_shard(s: &str) -> anyhow::Result<(u64, u64)> {
    let (i, n) = s
        .split_once('/')
        .context("--shard must look like i/n, e.g. 0/4")?;
    let (i, n): (u64, u64) = (i.trim().parse()?, n.trim().parse()?);
    anyhow::ensure!(n > 0 && i < n, "--shard {s}: need 0 <= i < n");
    Ok((i, n))
}

/// The flags that fix `label`'s errors (library messages name no flags).
const HINTS: &[(&str, &str)] = &[
    (
        "allow empty input",
        "pass --allow-empty to write an empty store",
    ),
    ("quantized log-prob layout", "pass --dtype quantized"),
    ("as one of its shards", "pass --shard i/n"),
    ("bytes for one record", "raise it with --max-record-bytes"),
];

fn flag_hint(err: firstkd::Error) -> anyhow::Error {
    super::flag_hint(err, HINTS)
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let device = super::device(&args.device)?;
    let mut teacher = Teacher::load_with_tokenizer(&args.model, args.tokenizer.as_deref(), &device)
        .with_context(|| format!("loading teacher {}", args.model.display()))?;
    teacher
        .set_compute(args.compute)
        .with_context(|| format!("--compute {}", args.compute.as_str()))?;
    let context = teacher.identity().context_length as usize;
    let mc_response = args.mc_response;
    let mut inputs: Vec<InputSpec> = args
        .inputs
        .iter()
        .map(|p| InputSpec::new(p, &args.split))
        .collect();
    InputSpec::distinct_sources(&mut inputs);
    if let Some(sel) = args.select {
        if args.k != 5 && args.k != sel.max_len() {
            anyhow::bail!("--k {} and --select {sel} disagree; give one", args.k);
        }
    }
    let cfg = LabelConfig {
        select: args.select,
        inputs,
        input: InputOptions {
            format: args.format,
            seq_len: args.seq_len,
            max_len: match args.max_len {
                Some(n) if n > context => {
                    anyhow::bail!("--max-len {n} exceeds the model's context of {context}")
                }
                Some(n) => n,
                None => context.max(2),
            },
            mc_response,
            max_record_bytes: args.max_record_bytes,
        },
        k: args.k,
        logprob_dtype: args.dtype,
        batch_tokens: args.batch_tokens,
        pack: match args.pack {
            Some(PackArg::Off) => None,
            Some(PackArg::Rows(n)) => Some(n),
            None if matches!(device, candle_core::Device::Cpu) => None,
            None => Some(0),
        },
        part_sequences: args.part_sequences,
        shard: parse_shard(&args.shard)?,
        skip_invalid: args.skip_invalid,
        limit_records: args.limit,
        allow_empty: args.allow_empty,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} labelling [{elapsed_precise}] {wide_bar} {pos}/{len} tokens ({per_sec}, ETA {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let mut on_progress = |p: &firstkd::label::LabelProgress| {
        bar.set_length(p.tokens_total);
        bar.set_position(p.tokens_done);
        bar.set_message(format!(
            "{}/{} sequences",
            p.sequences_done, p.sequences_total
        ));
    };
    let summary = match firstkd::store::remote::Location::parse(&args.out)? {
        firstkd::store::remote::Location::Local(dir) => {
            label(&teacher, &cfg, &dir, &mut on_progress)
        }
        firstkd::store::remote::Location::Remote(remote) => {
            firstkd::store::shards::Slot::of(cfg.shard.0, cfg.shard.1)
                .and_then(|slot| remote.prepare_write(slot))
                .and_then(|(dir, mut sink)| {
                    label_with(&teacher, &cfg, &dir, &mut on_progress, &mut sink)
                })
        }
    }
    .map_err(flag_hint)
    .with_context(|| format!("labelling into {}", args.out.display()))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        let mut v = serde_json::to_value(&summary)?;
        v["seconds"] = serde_json::json!(seconds);
        serde_json::to_writer_pretty(&mut *out, &v)?;
        writeln!(out)?;
        return Ok(0);
    }
    if summary.already_complete {
        match summary.shards {
            Some((done, n)) if done < n => writeln!(
                out,
                "shard {} of {} is already complete; {done} of {n} shards complete (`firstkd status {}`)",
                args.shard,
                args.out.display(),
                args.out.display()
            )?,
            _ => writeln!(
                out,
                "{} is already complete; nothing to do",
                args.out.display()
            )?,
        }
        return Ok(0);
    }
    let m = &summary.manifest;
    writeln!(
        out,
        "labelled {} sequences, {} tokens in {:.1} s ({:.0} tokens/s){}",
        summary.sequences_labelled,
        summary.tokens_labelled,
        seconds,
        summary.tokens_labelled as f64 / seconds.max(1e-9),
        if summary.sequences_resumed > 0 {
            format!(
                "; {} sequences were already labelled (resumed)",
                summary.sequences_resumed
            )
        } else {
            String::new()
        }
    )?;
    let peak = firstkd::runtime::peak_rss_line();
    if !peak.is_empty() {
        writeln!(out, "{peak}")?;
    }
    if summary.records_skipped > 0 {
        writeln!(
            out,
            "skipped {} invalid records, e.g.:",
            summary.records_skipped
        )?;
        for e in &summary.skipped_examples {
            writeln!(out, "  {e}")?;
        }
    }
    if let Some((done, n)) = summary.shards {
        if done == n {
            writeln!(
                out,
                "all {n} shards complete: the store is committed ({}/manifest.json lists every shard's parts)",
                args.out.display()
            )?;
        } else {
            writeln!(
                out,
                "shard {} complete; {done} of {n} shards complete: the store is committed when the last one finishes",
                args.shard
            )?;
        }
    }
    let what = match summary.shards {
        Some((done, n)) if done < n => "shard",
        _ => "store",
    };
    writeln!(
        out,
        "{what} {}: {} parts, {} label rows ({} in loss)",
        args.out.display(),
        m.parts.len(),
        m.rows(firstkd::schema::Table::Labels),
        m.in_loss_rows()
    )?;
    Ok(0)
}

fn parse_selection(s: &str) -> Result<firstkd::schema::Selection, String> {
    firstkd::schema::Selection::parse(s).map_err(|e| e.to_string())
}
