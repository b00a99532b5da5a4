use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use firstkd::store::split::{split, SplitKey, SplitLayout, SplitSpec};

/// Arguments of `firstkd split`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The complete store to split.
    pub store: PathBuf,
    /// Output directory: one store per split in OUT/<name> (or one store, with --layout column).
    #[arg(long)]
    pub out: PathBuf,
    /// Split names and fractions, in the order they take [0, 1) (docs/sharing.md).
    #[arg(long, default_value = "train=0.9,valid=0.05,test=0.05")]
    pub splits: String,
    /// What each sample is hashed by: its tokens, or its source file and record (keeps the
    /// windows of a long record together).
    #[arg(long, value_enum, default_value_t = SplitKey::Tokens)]
    pub key: SplitKey,
    /// stores: a store per split; column: one store with the `split` column rewritten.
    #[arg(long, value_enum, default_value_t = SplitLayout::Stores)]
    pub layout: SplitLayout,
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let spec = SplitSpec::parse(&args.splits)?;
    let bar = super::parts_bar("splitting");
    let report = split(
        &args.store,
        &args.out,
        &spec,
        args.key,
        args.layout,
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )
    .with_context(|| {
        format!(
            "splitting {} into {}",
            args.store.display(),
            args.out.display()
        )
    })?;
    bar.finish_and_clear();
    for (name, path, written) in &report.outputs {
        let m = firstkd::store::Manifest::load(path)?;
        writeln!(
            out,
            "{name}: {} ({} samples, {} label rows; {written} samples this run)",
            path.display(),
            m.rows(firstkd::schema::Table::Samples),
            m.rows(firstkd::schema::Table::Labels),
        )?;
    }
    Ok(0)
}
