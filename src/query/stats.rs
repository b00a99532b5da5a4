//! Built-in reports over a store, each defined by the SQL it runs.
//!
//! * [`coverage`]: how much of the teacher's probability the stored top-k keeps: mean and
//!   quantiles of the cumulative mass of the top-1 .. top-k entries, and the fraction of
//!   positions whose top-k mass is at least 0.95; by source and split and overall, over all
//!   positions and over in-loss positions. All in one SQL aggregate.
//! * [`calibration`]: the teacher's next-token calibration (confidence = top-1 probability,
//!   correct = the target is the top-1 token): ECE, adaptive ECE, MCE, Brier, NLL of the
//!   target and the reliability table, computed by [`crate::calibration`] from the rows a SQL
//!   query selects.
//!
//! Both take a temperature; see [`StatsOptions`].

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float32Type, Float64Type, Int64Type, UInt32Type};
use serde::{Deserialize, Serialize};

use super::QuerySession;
use crate::calibration::{
    CalibrationAccumulator, CalibrationReport, TemperatureMode, TopKPosition,
};
use crate::error::{Error, Result};
use crate::temperature::Temperature;

/// Quantiles reported by the coverage report.
pub const COVERAGE_QUANTILES: [f64; 3] = [0.1, 0.5, 0.9];
/// Top-k mass threshold of the coverage report's fraction column.
pub const MASS_THRESHOLD: f64 = 0.95;

/// Settings shared by the reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsOptions {
    /// Temperature applied to the stored log-probabilities (1 = as stored).
    pub temperature: Temperature,
    /// How calibration renormalises at the temperature. The default, `UniformTail`, is exact
    /// at `T = 1`: confidence is the full-vocabulary top-1 probability and the NLL uses the
    /// stored full-vocabulary target log-prob. `Renormalized` (FIRST) renormalises over the
    /// top-k. Coverage always uses the uniform tail (renormalised top-k mass would be 1).
    pub mode: TemperatureMode,
    /// Equal-width bins of the calibration report.
    pub n_bins: usize,
}

impl Default for StatsOptions {
    fn default() -> Self {
        StatsOptions {
            temperature: Temperature::ONE,
            mode: TemperatureMode::UniformTail,
            n_bins: crate::calibration::DEFAULT_N_BINS,
        }
    }
}

impl StatsOptions {
    fn check(&self) -> Result<()> {
        if self.n_bins == 0 {
            return Err(Error::InvalidArgument(
                "number of bins must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// One group of the coverage report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoverageRow {
    /// `all` or `in_loss`.
    pub positions: String,
    /// Source, or None for the total over all sources and splits.
    pub source: Option<String>,
    /// Split, or None for the total.
    pub split: Option<String>,
    /// Positions in the group.
    pub n: u64,
    /// Mean cumulative mass of the top-1 .. top-k entries (k values).
    pub mean_mass: Vec<f64>,
    /// Approximate (t-digest) quantiles of the cumulative mass of the top-1 .. top-k entries:
    /// `quantiles[q][j]` is quantile `COVERAGE_QUANTILES[q]` of the top-(j+1) mass.
    pub quantiles: Vec<Vec<f64>>,
    /// Fraction of positions whose top-k mass is at least [`MASS_THRESHOLD`].
    pub frac_topk_mass_ge_095: f64,
}

/// The coverage report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoverageReport {
    pub k: usize,
    pub temperature: f64,
    pub quantile_levels: Vec<f64>,
    pub rows: Vec<CoverageRow>,
    /// The SQL that computed the rows.
    pub sql: String,
}

/// The log-prob expression the reports read: the stored column at `T = 1`, else the
/// uniform-tail (or renormalised) rescaling.
fn logprob_expr(opts: &StatsOptions, mode: TemperatureMode, vocab: u32) -> String {
    let lp = "l.topk_logprobs";
    match mode {
        TemperatureMode::UniformTail if opts.temperature.is_one() => lp.to_string(),
        TemperatureMode::UniformTail => {
            format!(
                "topk_logprobs_at({lp}, {:?}, {vocab})",
                opts.temperature.get()
            )
        }
        TemperatureMode::Renormalized => {
            format!("topk_logprobs_at({lp}, {:?})", opts.temperature.get())
        }
    }
}

/// The SQL of the coverage report for a store with `k` entries per position.
pub fn coverage_sql(k: usize, vocab: u32, opts: &StatsOptions) -> String {
    let lp = logprob_expr(opts, TemperatureMode::UniformTail, vocab);
    let masses: Vec<String> = (1..=k)
        .map(|j| format!("topk_mass(lp, {j}) AS m{j}"))
        .collect();
    let mut aggregates = vec!["count(*) AS n".to_string()];
    for j in 1..=k {
        aggregates.push(format!("avg(m{j}) AS mean_m{j}"));
    }
    for (qi, q) in COVERAGE_QUANTILES.iter().enumerate() {
        for j in 1..=k {
            aggregates.push(format!(
                "approx_percentile_cont({q:?}) WITHIN GROUP (ORDER BY m{j}) AS q{qi}_m{j}"
            ));
        }
    }
    aggregates.push(format!(
        "avg(CASE WHEN m{k} >= {MASS_THRESHOLD:?} THEN 1.0 ELSE 0.0 END) AS frac_ge"
    ));
    let aggregates = aggregates.join(",\n    ");
    let select = |positions: &str, filter: &str| {
        format!(
            "  SELECT '{positions}' AS positions, source, split,\n    {aggregates}\n  \
             FROM t{filter}\n  GROUP BY GROUPING SETS ((source, split), ())"
        )
    };
    format!(
        "WITH t AS (\n  SELECT s.source, s.split, l.in_loss, {masses}\n  \
         FROM samples s\n  \
         JOIN (SELECT sample_id, in_loss, {lp} AS lp FROM labels l) l ON l.sample_id = s.sample_id\n)\n\
         SELECT * FROM (\n{all}\n  UNION ALL\n{in_loss}\n)\n\
         ORDER BY positions, source NULLS LAST, split NULLS LAST",
        masses = masses.join(", "),
        all = select("all", ""),
        in_loss = select("in_loss", " WHERE in_loss"),
    )
}

/// Runs the coverage report.
pub fn coverage(session: &QuerySession, opts: &StatsOptions) -> Result<CoverageReport> {
    opts.check()?;
    let k = session.manifest().k;
    let sql = coverage_sql(k, session.manifest().tokenizer.vocab_size, opts);
    let result = session.sql(&sql)?;
    let mut rows = Vec::new();
    for batch in &result.batches {
        let text = |name: &str| -> Result<StringArray> {
            let col = column(batch, name)?;
            Ok(cast(col, &DataType::Utf8)?.as_string::<i32>().clone())
        };
        let float = |name: &str| -> Result<Vec<Option<f64>>> {
            let col = cast(column(batch, name)?, &DataType::Float64)?;
            Ok(col.as_primitive::<Float64Type>().iter().collect())
        };
        let (positions, source, split) = (text("positions")?, text("source")?, text("split")?);
        let n = float("n")?;
        let means: Vec<Vec<Option<f64>>> = (1..=k)
            .map(|j| float(&format!("mean_m{j}")))
            .collect::<Result<_>>()?;
        let quantiles: Vec<Vec<Vec<Option<f64>>>> = (0..COVERAGE_QUANTILES.len())
            .map(|qi| (1..=k).map(|j| float(&format!("q{qi}_m{j}"))).collect())
            .collect::<Result<_>>()?;
        let frac = float("frac_ge")?;
        let opt_text = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_string());
        for i in 0..batch.num_rows() {
            rows.push(CoverageRow {
                positions: positions.value(i).to_string(),
                source: opt_text(&source, i),
                split: opt_text(&split, i),
                n: n[i].unwrap_or(0.0) as u64,
                mean_mass: means.iter().map(|m| m[i].unwrap_or(f64::NAN)).collect(),
                quantiles: quantiles
                    .iter()
                    .map(|q| q.iter().map(|m| m[i].unwrap_or(f64::NAN)).collect())
                    .collect(),
                frac_topk_mass_ge_095: frac[i].unwrap_or(f64::NAN),
            });
        }
    }
    Ok(CoverageReport {
        k,
        temperature: opts.temperature.get(),
        quantile_levels: COVERAGE_QUANTILES.to_vec(),
        rows,
        sql,
    })
}

/// Counts of in-loss positions by top-k probability mass, in `bins` equal-width bins over
/// [0, 1] (stored masses a hair above 1 from float16 rounding go to the last bin).
pub fn coverage_histogram(session: &QuerySession, bins: usize) -> Result<Vec<u64>> {
    if bins == 0 {
        return Err(Error::InvalidArgument(
            "a histogram needs at least one bin".into(),
        ));
    }
    let sql = format!(
        "SELECT CAST(floor(topk_mass(topk_logprobs) * {bins}) AS BIGINT) AS bin, count(*) AS n \
         FROM labels WHERE in_loss GROUP BY 1"
    );
    let result = session.sql(&sql)?;
    let mut counts = vec![0u64; bins];
    for batch in &result.batches {
        let bin = cast(column(batch, "bin")?, &DataType::Int64)?;
        let n = cast(column(batch, "n")?, &DataType::Int64)?;
        let (bin, n) = (
            bin.as_primitive::<Int64Type>(),
            n.as_primitive::<Int64Type>(),
        );
        for i in 0..batch.num_rows() {
            let b = bin.value(i).clamp(0, bins as i64 - 1) as usize;
            counts[b] += n.value(i).max(0) as u64;
        }
    }
    Ok(counts)
}

fn column<'b>(batch: &'b RecordBatch, name: &str) -> Result<&'b std::sync::Arc<dyn Array>> {
    batch
        .column_by_name(name)
        .ok_or_else(|| Error::InvalidArgument(format!("query result has no column {name:?}")))
}

/// One group of the calibration report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationGroup {
    /// `all` or `in_loss`.
    pub positions: String,
    /// Source, or None for the total.
    pub source: Option<String>,
    /// Split, or None for the total.
    pub split: Option<String>,
    /// Metrics and reliability table from [`crate::calibration`].
    pub report: CalibrationReport,
}

/// The calibration report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationStats {
    pub temperature: f64,
    pub mode: TemperatureMode,
    pub n_bins: usize,
    pub groups: Vec<CalibrationGroup>,
    /// The SQL that selected the positions.
    pub sql: String,
}

/// The SQL of the calibration report: the positions with what
/// [`crate::calibration::TopKPosition`] needs.
///
/// `samples` comes first: a hash join builds its table from the left side, and the decoded
/// labels table reports no row count the planner could use to swap the sides, so `labels`
/// on the left made a 10^8-row store's report take 14 GB (docs/reliability.md, "Load").
pub fn calibration_sql() -> String {
    "SELECT s.source, s.split, l.in_loss, l.topk_logprobs,\n  \
     target_rank(l.topk_ids, l.target_id) AS target_rank, l.target_logprob\n\
     FROM samples s JOIN labels l ON l.sample_id = s.sample_id"
        .to_string()
}

struct Groups {
    n_bins: usize,
    groups: Vec<((bool, String, String), CalibrationAccumulator)>,
}

impl Groups {
    fn get(
        &mut self,
        in_loss: bool,
        source: &str,
        split: &str,
    ) -> Result<&mut CalibrationAccumulator> {
        let found = self
            .groups
            .iter()
            .position(|((l, so, sp), _)| *l == in_loss && so == source && sp == split);
        let i = match found {
            Some(i) => i,
            None => {
                let acc = CalibrationAccumulator::new(self.n_bins)?;
                self.groups
                    .push(((in_loss, source.to_string(), split.to_string()), acc));
                self.groups.len() - 1
            }
        };
        Ok(&mut self.groups[i].1)
    }
}

/// Runs the calibration report: groups by (positions, source, split) plus a total per
/// positions set.
pub fn calibration(session: &QuerySession, opts: &StatsOptions) -> Result<CalibrationStats> {
    opts.check()?;
    let sql = calibration_sql();
    let vocab = session.manifest().tokenizer.vocab_size as usize;
    let mut groups = Groups {
        n_bins: opts.n_bins,
        groups: Vec::new(),
    };
    session.for_each_batch(&sql, |batch| {
        let source = cast(column(batch, "source")?, &DataType::Utf8)?;
        let source = source.as_string::<i32>();
        let split = cast(column(batch, "split")?, &DataType::Utf8)?;
        let split = split.as_string::<i32>();
        let in_loss: &BooleanArray = column(batch, "in_loss")?.as_boolean();
        let lists = column(batch, "topk_logprobs")?.as_fixed_size_list();
        let k = usize::try_from(lists.value_length()).unwrap_or(0);
        let start = if lists.is_empty() {
            0
        } else {
            usize::try_from(lists.value_offset(0)).unwrap_or(0)
        };
        let values = cast(
            &lists.values().slice(start, lists.len() * k),
            &DataType::Float32,
        )?;
        let values = values.as_primitive::<Float32Type>().values();
        let rank = column(batch, "target_rank")?.as_primitive::<UInt32Type>();
        let target_lp = cast(column(batch, "target_logprob")?, &DataType::Float32)?;
        let target_lp = target_lp.as_primitive::<Float32Type>();
        for i in 0..batch.num_rows() {
            let position = TopKPosition {
                logprobs: &values[i * k..(i + 1) * k],
                target_rank: (!rank.is_null(i)).then(|| (rank.value(i) as usize).saturating_sub(1)),
                target_logprob: target_lp.value(i),
                vocab_size: vocab,
            };
            let (so, sp) = (source.value(i), split.value(i));
            groups
                .get(false, so, sp)?
                .push_topk(&position, opts.temperature.get(), opts.mode)?;
            if in_loss.value(i) {
                groups.get(true, so, sp)?.push_topk(
                    &position,
                    opts.temperature.get(),
                    opts.mode,
                )?;
            }
        }
        Ok(())
    })?;
    let mut groups = groups.groups;
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    for in_loss in [false, true] {
        let positions = if in_loss { "in_loss" } else { "all" };
        let mut total = CalibrationAccumulator::new(opts.n_bins)?;
        for ((_, source, split), acc) in groups.iter().filter(|g| g.0 .0 == in_loss) {
            out.push(CalibrationGroup {
                positions: positions.into(),
                source: Some(source.clone()),
                split: Some(split.clone()),
                report: acc.report()?,
            });
            total.merge(acc.clone())?;
        }
        if !total.is_empty() {
            out.push(CalibrationGroup {
                positions: positions.into(),
                source: None,
                split: None,
                report: total.finish()?,
            });
        }
    }
    Ok(CalibrationStats {
        temperature: opts.temperature.get(),
        mode: opts.mode,
        n_bins: opts.n_bins,
        groups: out,
        sql,
    })
}

/// Writes `reliability.svg` (teacher next-token calibration, all and in-loss positions, from
/// `calibration` or computed) and `coverage.svg` (histogram of the top-k probability mass of
/// in-loss positions, 20 bins) into `dir`; returns their paths.
pub fn write_plots(
    dir: &std::path::Path,
    session: &QuerySession,
    calibration: Option<&CalibrationStats>,
    opts: &StatsOptions,
) -> Result<Vec<std::path::PathBuf>> {
    use crate::plot::{histogram_svg, reliability_svg, Panel};

    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let computed;
    let calibration = match calibration {
        Some(c) => c,
        None => {
            computed = self::calibration(session, opts)?;
            &computed
        }
    };
    let panels: Vec<Panel<'_>> = calibration
        .groups
        .iter()
        .filter(|g| g.source.is_none() && g.split.is_none())
        .map(|g| Panel {
            label: if g.positions == "in_loss" {
                "in-loss positions"
            } else {
                "all positions"
            },
            report: &g.report,
        })
        .collect();
    let title = format!(
        "teacher next-token reliability (T = {}, {} bins)",
        calibration.temperature, calibration.n_bins
    );
    let reliability = dir.join("reliability.svg");
    std::fs::write(&reliability, reliability_svg(&title, &panels))
        .map_err(|e| Error::io(&reliability, e))?;
    let k = session.manifest().k;
    let counts = coverage_histogram(session, 20)?;
    let coverage = dir.join("coverage.svg");
    let svg = histogram_svg(
        &format!("top-{k} probability mass, in-loss positions"),
        &format!("sum of the top-{k} probabilities"),
        0.0,
        1.0,
        &counts,
    );
    std::fs::write(&coverage, svg).map_err(|e| Error::io(&coverage, e))?;
    Ok(vec![reliability, coverage])
}
