use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `firstkd verify`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Store directory.
    pub store: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let store = super::StoreDir::open(&args.store)?;
    let report = firstkd::store::verify(&store.dir)
        .with_context(|| format!("verifying {}", args.store.display()))?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
    } else if report.is_clean() {
        writeln!(
            out,
            "ok: {} part(s), {} label rows, {} samples checked",
            report.parts, report.label_rows_checked, report.sample_rows_checked
        )?;
    } else {
        for problem in &report.problems {
            writeln!(out, "{}: {problem}", args.store.display())?;
        }
        writeln!(out, "{} problem(s) found", report.problems.len())?;
    }
    Ok(if report.is_clean() { 0 } else { 1 })
}
