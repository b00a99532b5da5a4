use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use firstkd::calibration::TemperatureMode;
use firstkd::query::stats::{self, CalibrationStats, CoverageReport, StatsOptions};
use firstkd::query::{QueryOptions, QuerySession};

/// Arguments of `firstkd stats`.
/// Which reports `stats` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Report {
    All,
    Coverage,
    Calibration,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Store directory.
    pub store: PathBuf,
    /// Which report: coverage, calibration or all.
    #[arg(long, value_enum, default_value_t = Report::All)]
    pub report: Report,
    /// Temperature applied to the stored log-probs before the reports (1 = as stored).
    #[arg(long, default_value_t = firstkd::Temperature::ONE)]
    pub temperature: firstkd::Temperature,
    /// Calibration renormalisation at the temperature: uniform-tail (exact at T = 1:
    /// full-vocabulary confidence and NLL) or renormalized (over the top-k, as FIRST).
    #[arg(long, value_enum, default_value_t = TemperatureMode::UniformTail)]
    pub mode: TemperatureMode,
    /// Equal-width bins of the calibration report.
    #[arg(long, default_value_t = 15)]
    pub bins: usize,
    /// Print the SQL each report runs.
    #[arg(long)]
    pub show_sql: bool,
    /// Print the reports as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write reliability.svg (teacher next-token calibration, all and in-loss positions) and
    /// coverage.svg (histogram of the top-k probability mass of in-loss positions) into DIR.
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
    /// Query the committed parts of a store whose writer has not finished.
    #[arg(long)]
    pub allow_incomplete: bool,
    /// Memory for sorts, aggregates and joins (bytes, or with K, M, G); past it they spill
    /// to the temporary folder or the query fails with a clear error. Default: half the
    /// machine's (or the cgroup's) memory.
    #[arg(long, value_parser = super::parse_bytes)]
    pub memory_limit: Option<usize>,
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let store = super::StoreDir::open(&args.store)?;
    let mode = args.mode;
    let (want_coverage, want_calibration) = match args.report {
        Report::All => (true, true),
        Report::Coverage => (true, false),
        Report::Calibration => (false, true),
    };
    let opts = StatsOptions {
        temperature: args.temperature,
        mode,
        n_bins: args.bins,
    };
    let query_options = QueryOptions {
        allow_incomplete: args.allow_incomplete,
        memory_limit: args.memory_limit,
        ..QueryOptions::default()
    };
    let session = QuerySession::open(&store.dir, &query_options)
        .with_context(|| format!("opening {}", args.store.display()))?;
    let coverage = want_coverage
        .then(|| stats::coverage(&session, &opts))
        .transpose()
        .map_err(super::sql::query_error)
        .context("coverage report")?;
    let calibration = want_calibration
        .then(|| stats::calibration(&session, &opts))
        .transpose()
        .map_err(super::sql::query_error)
        .context("calibration report")?;
    if let Some(dir) = &args.plot {
        stats::write_plots(dir, &session, calibration.as_ref(), &opts)
            .map_err(super::sql::query_error)
            .with_context(|| format!("writing the plots into {}", dir.display()))?;
    }
    if args.json {
        let mut value = serde_json::json!({
            "store": args.store.display().to_string(),
            "coverage": coverage,
            "calibration": calibration,
        });
        if !args.show_sql {
            for key in ["coverage", "calibration"] {
                if let Some(report) = value.get_mut(key).and_then(|v| v.as_object_mut()) {
                    report.remove("sql");
                }
            }
        }
        serde_json::to_writer_pretty(&mut *out, &value)?;
        writeln!(out)?;
        return Ok(0);
    }
    if let Some(report) = &coverage {
        print_coverage(report, args.show_sql, out)?;
    }
    if let Some(report) = &calibration {
        if coverage.is_some() {
            writeln!(out)?;
        }
        print_calibration(report, args.show_sql, out)?;
    }
    Ok(0)
}

fn group_name(value: &Option<String>) -> String {
    value.clone().unwrap_or_else(|| "(all)".into())
}

fn print_coverage(
    report: &CoverageReport,
    show_sql: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "coverage: cumulative probability mass of the top-1..top-{} entries (temperature {})",
        report.k, report.temperature
    )?;
    if show_sql {
        writeln!(out, "-- SQL:\n{};\n", report.sql)?;
    }
    let mut header: Vec<String> = ["positions", "source", "split", "n"]
        .map(String::from)
        .to_vec();
    for j in 1..=report.k {
        header.push(format!("mean@{j}"));
    }
    for q in &report.quantile_levels {
        header.push(format!("p{}@{}", (q * 100.0).round(), report.k));
    }
    header.push(format!("frac@{}>=0.95", report.k));
    let rows: Vec<Vec<String>> = report
        .rows
        .iter()
        .map(|r| {
            let mut row = vec![
                r.positions.clone(),
                group_name(&r.source),
                group_name(&r.split),
                r.n.to_string(),
            ];
            row.extend(r.mean_mass.iter().map(|m| format!("{m:.4}")));
            row.extend(
                r.quantiles
                    .iter()
                    .map(|q| format!("{:.4}", q.last().copied().unwrap_or(f64::NAN))),
            );
            row.push(format!("{:.4}", r.frac_topk_mass_ge_095));
            row
        })
        .collect();
    super::print_table(&header, &rows, 3, out)
}

fn print_calibration(
    report: &CalibrationStats,
    show_sql: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "calibration: confidence = top-1 probability, correct = target is top-1 (temperature {}, mode {:?}, {} bins)",
        report.temperature, report.mode, report.n_bins
    )?;
    if show_sql {
        writeln!(
            out,
            "-- SQL (metrics computed by firstkd::calibration from these rows):\n{};\n",
            report.sql
        )?;
    }
    let header: Vec<String> = [
        "positions",
        "source",
        "split",
        "n",
        "accuracy",
        "confidence",
        "ECE",
        "adaptive ECE",
        "MCE",
        "Brier",
        "NLL",
        "n NLL",
    ]
    .map(String::from)
    .to_vec();
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
    let rows: Vec<Vec<String>> = report
        .groups
        .iter()
        .map(|g| {
            let r = &g.report;
            vec![
                g.positions.clone(),
                group_name(&g.source),
                group_name(&g.split),
                r.n.to_string(),
                fmt(Some(r.accuracy)),
                fmt(Some(r.mean_confidence)),
                fmt(Some(r.ece)),
                fmt(r.adaptive_ece),
                fmt(Some(r.mce)),
                fmt(Some(r.brier)),
                fmt(r.nll),
                r.n_nll.to_string(),
            ]
        })
        .collect();
    super::print_table(&header, &rows, 3, out)?;
    // Reliability table of the in-loss total (the last group), or the last group there is.
    if let Some(g) = report.groups.last() {
        writeln!(
            out,
            "\nreliability ({} positions, {} / {}):",
            g.positions,
            group_name(&g.source),
            group_name(&g.split)
        )?;
        let header: Vec<String> = ["bin", "count", "confidence", "accuracy", "gap"]
            .map(String::from)
            .to_vec();
        let rows: Vec<Vec<String>> = g
            .report
            .bins
            .iter()
            .map(|b| {
                vec![
                    format!("[{:.3}, {:.3})", b.lower, b.upper),
                    b.count.to_string(),
                    format!("{:.4}", b.mean_confidence),
                    format!("{:.4}", b.accuracy),
                    format!("{:.4}", b.gap),
                ]
            })
            .collect();
        super::print_table(&header, &rows, 1, out)?;
    }
    Ok(())
}
