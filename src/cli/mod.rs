//! Command-line interface: clap types and one file per subcommand. The only place that prints.

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod calibrate;
mod card;
mod compare;
mod convert;
mod copy;
mod distill;
mod eval;
mod export;
mod import;
mod inspect;
mod label;
mod merge;
mod split;
mod sql;
mod stats;
mod status;
mod synth;
mod verify;

/// firstkd: FIRST knowledge distillation for LLMs. Teacher top-k soft labels in a versioned
/// Parquet store, SQL over them, temperature calibration, and a streaming trainer.
#[derive(Debug, Parser)]
#[command(name = "firstkd", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fit the teacher temperature on held-out positions and record it in the manifest.
    Calibrate(calibrate::Args),
    /// Label input files with a teacher into a soft-label store (top-k ids and log-probs).
    Label(label::Args),
    /// Accuracy and calibration (ECE, Brier, NLL) of a model on a multiple-choice task.
    Eval(eval::Args),
    /// Accuracy and ECE of several models on several tasks, as one table.
    Compare(compare::Args),
    /// Check a store: manifest vs files, checksums, schema, row invariants.
    Verify(verify::Args),
    /// Show a store's manifest, provenance, counts and size on disk.
    Inspect(inspect::Args),
    /// Write a seeded synthetic store (for tests and benchmarks).
    Synth(synth::Args),
    /// Rewrite a store into another layout (quantized 2.0 <-> float32 / float16 1.0).
    Convert(convert::Args),
    /// Copy a complete store between a local folder and object storage (s3://), resumable.
    Copy(copy::Args),
    /// Merge stores labelled by the same teacher and tokenizer into one.
    Merge(merge::Args),
    /// Split a store into train / valid / test by a hash of each sample.
    Split(split::Args),
    /// Export a store for another trainer (axolotl's KD dataset layout).
    Export(export::Args),
    /// Import another tool's soft labels (axolotl KD dataset, DistillKit) into a new store.
    Import(import::Args),
    /// Write a Hugging Face dataset card (README.md and plots) into a store.
    Card(card::Args),
    /// Run SQL over a store (tables labels, samples; view tokens; see docs/sql.md).
    Sql(sql::Args),
    /// Built-in reports: top-k coverage and teacher calibration.
    Stats(stats::Args),
    /// Train a student on a store: FIRST / KD / CE losses, checkpoints, resume.
    Distill(distill::Args),
    /// Progress of a store being written: each shard's rows, parts and last commit.
    Status(status::Args),
}

/// Appends to an `InvalidArgument` the command-line flag that fixes it: the first of
/// `hints` (message fragment, hint) whose fragment the message contains.
pub(crate) fn flag_hint(err: firstkd::Error, hints: &[(&str, &str)]) -> anyhow::Error {
    let hint = match &err {
        firstkd::Error::InvalidArgument(m) | firstkd::Error::InvalidRecord { reason: m, .. } => {
            hints
                .iter()
                .find(|(fragment, _)| m.contains(fragment))
                .map(|(_, hint)| *hint)
        }
        _ => None,
    };
    match hint {
        Some(hint) => anyhow::anyhow!("{err}; {hint}"),
        None => err.into(),
    }
}

/// Runs a parsed command line, writing its output to `out`. Returns the process exit code.
pub fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<u8> {
    match cli.command {
        Command::Calibrate(args) => calibrate::run(args, out),
        Command::Label(args) => label::run(args, out),
        Command::Eval(args) => eval::run(args, out),
        Command::Compare(args) => compare::run(args, out),
        Command::Verify(args) => verify::run(args, out),
        Command::Inspect(args) => inspect::run(args, out),
        Command::Synth(args) => synth::run(args, out),
        Command::Convert(args) => convert::run(args, out),
        Command::Copy(args) => copy::run(args, out),
        Command::Merge(args) => merge::run(args, out),
        Command::Split(args) => split::run(args, out),
        Command::Export(args) => export::run(args, out),
        Command::Import(args) => import::run(args, out),
        Command::Card(args) => card::run(args, out),
        Command::Sql(args) => sql::run(args, out),
        Command::Stats(args) => stats::run(args, out),
        Command::Distill(args) => distill::run(args, out),
        Command::Status(args) => status::run(args, out),
    }
}

/// Left-aligned first columns, right-aligned numbers.
/// A store argument as a local folder: a store on object storage (`s3://...`) is copied into
/// the local cache first (parts checked against the manifest); `remote` is kept for commands
/// that write the manifest back.
pub(crate) struct StoreDir {
    pub dir: std::path::PathBuf,
    pub remote: Option<(firstkd::store::remote::Remote, Option<String>)>,
}

impl StoreDir {
    /// Resolves a store argument for reading.
    pub fn open(arg: &std::path::Path) -> anyhow::Result<StoreDir> {
        use firstkd::store::remote::Location;
        match Location::parse(arg)? {
            Location::Local(dir) => Ok(StoreDir { dir, remote: None }),
            Location::Remote(remote) => {
                let (dir, etag) = remote
                    .pull()
                    .with_context(|| format!("fetching {}", remote.url()))?;
                Ok(StoreDir {
                    dir,
                    remote: Some((remote, etag)),
                })
            }
        }
    }

    /// Puts the local manifest back to object storage (no-op for a local store); fails when
    /// another writer changed the remote manifest since it was read.
    pub fn push_manifest(&self) -> anyhow::Result<()> {
        if let Some((remote, etag)) = &self.remote {
            remote
                .push_manifest(&self.dir, etag.clone())
                .with_context(|| format!("updating {}/manifest.json", remote.url()))?;
        }
        Ok(())
    }
}

/// How a sequential reader (`distill`, `export`) reads a store on object storage.
#[derive(Debug, clap::Args)]
pub(crate) struct StreamArgs {
    /// For a store on object storage: parts fetched ahead of the one being read.
    #[arg(long, default_value_t = 2)]
    pub read_ahead: usize,
    /// For a store on object storage: local disk its fetched parts may take (for example
    /// 512M or 8G); the least recently read parts are deleted first. Parts are fetched as
    /// they are read, never all up front.
    #[arg(long, default_value = "2G", value_parser = parse_bytes)]
    pub stream_disk: usize,
}

/// A store opened for one sequential pass (or several epochs): a local store as it is, a
/// store on object storage streamed part by part (the fetcher is returned for its report).
pub(crate) fn open_streamed(
    arg: &std::path::Path,
    stream: &StreamArgs,
) -> anyhow::Result<(
    firstkd::store::StoreReader,
    Option<std::sync::Arc<firstkd::store::stream::RemoteParts>>,
)> {
    use firstkd::store::remote::Location;
    use firstkd::store::stream::StreamOptions;
    use firstkd::store::StoreReader;
    match Location::parse(arg)? {
        Location::Local(dir) => Ok((StoreReader::open(&dir)?, None)),
        Location::Remote(remote) => {
            let opts = StreamOptions {
                read_ahead: stream.read_ahead,
                disk_limit: stream.stream_disk as u64,
            };
            let (dir, parts) = remote
                .stream(opts)
                .with_context(|| format!("opening {}", remote.url()))?;
            let source: std::sync::Arc<dyn firstkd::store::reader::PartSource> = parts.clone();
            Ok((StoreReader::open_with_source(&dir, source)?, Some(parts)))
        }
    }
}

/// One line on what a streamed read fetched.
pub(crate) fn stream_report(
    parts: &firstkd::store::stream::RemoteParts,
    stream: &StreamArgs,
) -> String {
    use firstkd::store::reader::PartSource;
    let r = parts.report();
    format!(
        "streamed {}: {} part fetch(es), {} bytes; at most {} bytes on local disk (limit {}), {} part(s) deleted to stay under it",
        parts.name(),
        r.fetches,
        r.bytes,
        r.peak_on_disk,
        stream.stream_disk,
        r.evictions
    )
}

pub(crate) fn print_table(
    header: &[String],
    rows: &[Vec<String>],
    text_cols: usize,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].len())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| -> String {
        cells
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c < text_cols {
                    format!("{cell:<w$}", w = widths[c])
                } else {
                    format!("{cell:>w$}", w = widths[c])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    writeln!(out, "{}", line(header))?;
    for row in rows {
        writeln!(out, "{}", line(row))?;
    }
    Ok(())
}

/// A progress bar counting parts, labelled `what`.
pub(crate) fn parts_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} parts"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Parses `--device`: `cpu`, or `cuda[:N]` (needs the `cuda` cargo feature).
pub(crate) fn device(spec: &str) -> anyhow::Result<candle_core::Device> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .unwrap_or("0")
                .parse()
                .context("cuda ordinal")?;
            if cfg!(feature = "cuda") {
                candle_core::Device::new_cuda(ordinal).context("opening the CUDA device")
            } else {
                anyhow::bail!("--device {s}: this firstkd was built without the `cuda` feature")
            }
        }
        other => anyhow::bail!("--device {other:?}: expected cpu or cuda[:N]"),
    }
}

/// A size in bytes: a whole number, optionally followed by K, M, G or T (powers of 1024,
/// with or without a trailing `B` or `iB`).
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{text:?}: unknown unit {c:?} (use K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size (for example 512M or 4G)"))?;
    n.checked_mul(1u64 << shift)
        .and_then(|b| usize::try_from(b).ok())
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("{text:?} is not a size this machine can address"))
}

#[cfg(test)]
mod parse_bytes_tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("64M"), Ok(64 << 20));
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("2 kB"), Ok(2048));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("12Q").is_err());
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }
}
