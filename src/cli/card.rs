use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use firstkd::share::{write_card, CardOptions};

/// Arguments of `firstkd card`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The complete store to describe.
    pub store: PathBuf,
    /// SPDX licence id of the labels (default: other).
    #[arg(long)]
    pub license: Option<String>,
    /// Title of the card.
    #[arg(long)]
    pub title: Option<String>,
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let opts = CardOptions {
        license: args.license,
        title: args.title,
    };
    let path = write_card(&args.store, &opts)
        .map_err(super::sql::query_error)
        .with_context(|| format!("writing the card of {}", args.store.display()))?;
    writeln!(
        out,
        "wrote {} (plots in {})",
        path.display(),
        args.store.join("card").display()
    )?;
    Ok(0)
}
