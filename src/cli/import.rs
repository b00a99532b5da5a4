use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use firstkd::schema::LogprobDtype;
use firstkd::share::{import_axolotl, import_distillkit, ImportOptions};

/// Import layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// axolotl's KD dataset (Parquet or JSON Lines files).
    Axolotl,
    /// DistillKit's compressed logits (a directory of data_*.parquet with
    /// compression_config.yaml, or the files).
    Distillkit,
}

/// Arguments of `firstkd import`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Input files or directories, in order.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// New store directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Layout of the input.
    #[arg(long, value_enum)]
    pub format: Format,
    /// The tokenizer the ids belong to (tokenizer.json or a GGUF file): its hash and vocabulary
    /// go into the manifest (without it the tokenizer is recorded as unknown).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size when no tokenizer is given (default: DistillKit's d, else largest id + 1).
    #[arg(long)]
    pub vocab_size: Option<u32>,
    /// The teacher's name, recorded (its hash stays unknown).
    #[arg(long)]
    pub teacher: Option<String>,
    /// Split of every imported sample.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// DistillKit: the compression config (default: compression_config.yaml next to the data).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Layout of the new store.
    #[arg(long, value_enum, default_value_t = LogprobDtype::Quantized)]
    pub dtype: LogprobDtype,
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let opts = ImportOptions {
        dtype: args.dtype,
        tokenizer: args.tokenizer.clone(),
        vocab_size: args.vocab_size,
        split: args.split.clone(),
        teacher: args.teacher.clone(),
    };
    let report = match args.format {
        Format::Axolotl => import_axolotl(&args.inputs, &args.out, &opts),
        Format::Distillkit => {
            import_distillkit(&args.inputs, args.config.as_deref(), &args.out, &opts)
        }
    }
    .with_context(|| format!("importing into {}", args.out.display()))?;
    writeln!(
        out,
        "{} {}: {} sequences, {} positions, k = {}, vocabulary {}",
        args.out.display(),
        if report.already_complete {
            "already complete"
        } else {
            "written"
        },
        report.sequences,
        report.positions,
        report.k,
        report.vocab_size
    )?;
    Ok(0)
}
