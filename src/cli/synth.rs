use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use firstkd::schema::LogprobDtype;
use firstkd::store::synthetic::{generate, SyntheticConfig};
use firstkd::store::WriterOptions;

/// Arguments of `firstkd synth`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output store directory (must not exist or be empty).
    pub out: PathBuf,
    /// Number of label rows (token positions) to write, at least.
    #[arg(long, default_value_t = 100_000)]
    pub rows: u64,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Teacher tokens kept per position.
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 49152)]
    pub vocab: u32,
    /// Log-prob storage: quantized (format 2.0, the default), float32 or float16 (format 1.0).
    #[arg(long, value_enum, default_value_t = LogprobDtype::Quantized)]
    pub dtype: LogprobDtype,
    /// Sharpening of the stored distribution relative to the truth (1 = calibrated teacher).
    #[arg(long, default_value_t = 1.5)]
    pub overconfidence: f64,
    /// Label rows per part.
    #[arg(long, default_value_t = 1 << 20)]
    pub part_rows: u64,
    /// zstd level of the Parquet columns (19, `label`'s, by default; 1-3 write a large store
    /// for a load test several times faster, at a larger size).
    #[arg(long, default_value_t = WriterOptions::default().zstd_level)]
    pub zstd_level: i32,
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let cfg = SyntheticConfig {
        label_rows: args.rows,
        seed: args.seed,
        k: args.k,
        vocab_size: args.vocab,
        logprob_dtype: args.dtype,
        overconfidence: args.overconfidence,
        part_rows: args.part_rows,
        ..SyntheticConfig::default()
    };
    let opts = WriterOptions {
        zstd_level: args.zstd_level,
        ..WriterOptions::default()
    };
    let manifest = generate(&args.out, &cfg, opts)
        .with_context(|| format!("writing synthetic store {}", args.out.display()))?;
    writeln!(
        out,
        "wrote {}: {} part(s), {} label rows",
        args.out.display(),
        manifest.parts.len(),
        manifest.parts.iter().map(|p| p.labels.rows).sum::<u64>()
    )?;
    Ok(0)
}
