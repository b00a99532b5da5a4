use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use firstkd::calibration::store_fit::{fit_store, record_fit, HeldOut};
use firstkd::calibration::{CalibrationReport, FitObjective, FitOptions, TemperatureMode};

/// Arguments of `firstkd calibrate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Store directory.
    pub store: PathBuf,
    /// What to minimise: ece (15 equal-width bins) or nll (of the target token).
    #[arg(long, value_enum, default_value_t = FitObjective::Ece)]
    pub objective: FitObjective,
    /// Held-out split to fit on, when the store has samples in it.
    #[arg(long, default_value = "valid")]
    pub split: String,
    /// Otherwise, this fraction of samples, chosen by a hash of the sample id.
    #[arg(long, default_value_t = 0.1)]
    pub held_out_fraction: f64,
    /// Fit on every position, prompt tokens included (default: in-loss positions only).
    #[arg(long)]
    pub all_positions: bool,
    /// At most this many held-out positions.
    #[arg(long, default_value_t = 2_000_000)]
    pub max_positions: usize,
    /// How the top-k is renormalised under T: renormalized (what FIRST teaches) or uniform-tail.
    #[arg(long, value_enum, default_value_t = TemperatureMode::Renormalized)]
    pub mode: TemperatureMode,
    /// Fit and print, but do not write the manifest.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the fit as JSON.
    #[arg(long)]
    pub json: bool,
}

fn line(out: &mut dyn Write, label: &str, r: &CalibrationReport) -> std::io::Result<()> {
    writeln!(
        out,
        "{label:<8} ECE {:.4}  adaptive ECE {}  MCE {:.4}  Brier {:.4}  NLL {}  accuracy {:.4}  confidence {:.4}",
        r.ece,
        r.adaptive_ece.map_or("-".into(), |v| format!("{v:.4}")),
        r.mce,
        r.brier,
        r.nll.map_or("-".into(), |v| format!("{v:.4}")),
        r.accuracy,
        r.mean_confidence
    )
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let store = super::StoreDir::open(&args.store)?;
    let (objective, mode) = (args.objective, args.mode);
    let held_out = HeldOut {
        split: args.split.clone(),
        fraction: args.held_out_fraction,
        in_loss_only: !args.all_positions,
        max_positions: args.max_positions,
    };
    let options = FitOptions {
        mode,
        ..FitOptions::default()
    };
    let fit = fit_store(&store.dir, &held_out, objective, &options)
        .with_context(|| format!("fitting the temperature of {}", args.store.display()))?;
    if !args.dry_run {
        record_fit(&store.dir, &fit)
            .with_context(|| format!("writing {}/manifest.json", args.store.display()))?;
        store.push_manifest()?;
    }
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &fit)?;
        writeln!(out)?;
        return Ok(0);
    }
    let f = &fit.fit;
    writeln!(out, "fitted on {}", fit.fitted_on)?;
    line(out, "T = 1", &f.before)?;
    line(out, &format!("T = {:.3}", f.temperature), &f.after)?;
    if f.at_boundary {
        writeln!(out, "warning: the fit ended on the edge of the searched range; the optimum may lie outside it")?;
    }
    if args.dry_run {
        writeln!(out, "dry run: manifest not changed")?;
    } else {
        writeln!(
            out,
            "temperature {:.4} written to {}/manifest.json",
            f.temperature,
            args.store.display()
        )?;
    }
    Ok(0)
}
