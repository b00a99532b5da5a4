use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use firstkd::share::{export_axolotl_reader, ExportOptions, ExportTemperature, FileFormat};

/// Export layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// axolotl's KD dataset: input_ids, labels, target_token_ids / target_logprobs /
    /// target_mask per position (docs/sharing.md).
    Axolotl,
}

/// Arguments of `firstkd export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The complete store to export.
    pub store: PathBuf,
    /// Output directory (new, or an interrupted export to resume).
    pub out: PathBuf,
    /// Layout of the export.
    #[arg(long, value_enum, default_value_t = Format::Axolotl)]
    pub format: Format,
    /// File format: parquet (zstd) or jsonl.
    #[arg(long, value_enum, default_value_t = FileFormat::Parquet)]
    pub file_format: FileFormat,
    /// Temperature baked into the log-probs, normalised over each position's entries:
    /// `fitted` (the store's, T = 1 without one), a number, or `raw` (the stored
    /// full-vocabulary log-probs at T = 1, unchanged).
    #[arg(long, default_value = "fitted")]
    pub temperature: String,
    #[command(flatten)]
    pub stream: super::StreamArgs,
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let (reader, streamed) = super::open_streamed(&args.store, &args.stream)
        .with_context(|| format!("exporting {}", args.store.display()))?;
    let opts = ExportOptions {
        file_format: args.file_format,
        temperature: ExportTemperature::parse(&args.temperature)?,
    };
    let Format::Axolotl = args.format;
    let bar = super::parts_bar("exporting");
    let report = export_axolotl_reader(&reader, &args.out, opts, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| {
        format!(
            "exporting {} to {}",
            args.store.display(),
            args.out.display()
        )
    })?;
    bar.finish_and_clear();
    let rows: u64 = report.files.iter().map(|f| f.1).sum();
    let t = match report.temperature {
        Some(t) => format!(
            "T = {t} ({}), normalised over each position's entries",
            report.temperature_source
        ),
        None => "raw log-probs (T = 1, as stored)".to_string(),
    };
    writeln!(
        out,
        "{} {}: {rows} sequences in {} file(s); {t}",
        args.out.display(),
        if report.already_complete {
            "already complete"
        } else {
            "written"
        },
        report.files.len()
    )?;
    if let Some(parts) = &streamed {
        writeln!(out, "{}", super::stream_report(parts, &args.stream))?;
        parts.close();
    }
    Ok(0)
}
