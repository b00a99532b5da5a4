//! `firstkd copy`: a committed store copied between a local folder and object storage.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use firstkd::store::remote::{copy_store, Location};

/// Arguments of `firstkd copy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The complete store to copy: a directory or `s3://bucket/prefix`.
    pub src: PathBuf,
    /// Where to: a new (or empty) directory or `s3://bucket/prefix`; rerun the same copy to
    /// resume an interrupted one.
    pub dst: PathBuf,
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let context = || format!("copying {} to {}", args.src.display(), args.dst.display());
    let src = Location::parse(&args.src).with_context(context)?;
    let dst = Location::parse(&args.dst).with_context(context)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("copying {bar:30} {pos}/{len} part files")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report = copy_store(&src, &dst, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(context)?;
    bar.finish_and_clear();
    if report.already_complete {
        writeln!(
            out,
            "{}: already holds this store ({} parts)",
            args.dst.display(),
            report.parts
        )?;
    } else {
        writeln!(
            out,
            "{}: {} parts; {} part file(s) copied ({} bytes), {} already there",
            args.dst.display(),
            report.parts,
            report.copied,
            report.bytes,
            report.skipped
        )?;
    }
    Ok(0)
}
