use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use firstkd::schema::{LogprobDtype, Table};
use firstkd::store::merge::{merge, IdPlan};

/// Arguments of `firstkd merge`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Complete stores labelled by the same teacher and tokenizer, in output order.
    #[arg(required = true, num_args = 2..)]
    pub stores: Vec<PathBuf>,
    /// Output store directory (new, or an interrupted merge to resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Layout to write (default: the first input's).
    #[arg(long, value_enum)]
    pub dtype: Option<LogprobDtype>,
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let bar = super::parts_bar("merging");
    let report = merge(&args.stores, &args.out, args.dtype, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("merging into {}", args.out.display()))?;
    bar.finish_and_clear();
    if report.already_complete {
        writeln!(out, "{}: already complete", args.out.display())?;
        return Ok(0);
    }
    let m = firstkd::store::Manifest::load(&args.out)?;
    writeln!(
        out,
        "wrote {}: {} stores, {} samples, {} label rows in {} part(s); {} samples this run",
        args.out.display(),
        args.stores.len(),
        m.rows(Table::Samples),
        m.rows(Table::Labels),
        m.parts.len(),
        report.samples_written
    )?;
    match report.ids {
        IdPlan::Kept => writeln!(out, "sample ids: kept (the inputs' ids are disjoint)")?,
        IdPlan::Offset => {
            for (store, off) in args.stores.iter().zip(&report.offsets) {
                writeln!(out, "sample ids of {}: + {off}", store.display())?;
            }
        }
    }
    match (&report.temperature_dropped, &m.temperature) {
        (Some(why), _) => writeln!(out, "temperature: not kept: {why}")?,
        (None, Some(t)) => writeln!(out, "temperature: {:.4} (the same in every input)", t.value)?,
        (None, None) => {}
    }
    Ok(0)
}
