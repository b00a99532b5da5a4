use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use firstkd::schema::LogprobDtype;

/// Arguments of `firstkd convert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The complete store to read.
    pub store: PathBuf,
    /// Output store directory (new, or an interrupted conversion to resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Layout to write: quantized (format 2.0), float32 or float16 (format 1.0).
    #[arg(long, value_enum, default_value_t = LogprobDtype::Quantized)]
    pub dtype: LogprobDtype,
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let bar = super::parts_bar("converting");
    let report = firstkd::store::convert(&args.store, &args.out, args.dtype, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| {
        format!(
            "converting {} into {}",
            args.store.display(),
            args.out.display()
        )
    })?;
    bar.finish_and_clear();
    if report.already_complete {
        writeln!(out, "{}: already complete", args.out.display())?;
    } else {
        let m = firstkd::store::Manifest::load(&args.out)?;
        writeln!(
            out,
            "wrote {} ({} {}): {} part(s), {} samples this run; labels {} bytes ({:.3} bytes/token)",
            args.out.display(),
            m.logprob_dtype.name(),
            m.schema_version,
            report.parts_written,
            report.samples_written,
            m.bytes(firstkd::schema::Table::Labels),
            m.bytes(firstkd::schema::Table::Labels) as f64
                / m.rows(firstkd::schema::Table::Labels).max(1) as f64
        )?;
    }
    Ok(0)
}
