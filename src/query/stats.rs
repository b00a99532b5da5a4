//! Built-in reports over a store: SQL selects the positions, Rust accumulates the metrics.
//!
//! * [`coverage`]: how much of the teacher's probability the stored top-k keeps: mean and
//!   quantiles of the cumulative mass of the top-1 .. top-k entries, and the fraction of
//!   positions whose top-k mass is at least 0.95; by source and split and overall, over all
//!   positions and over in-loss positions. SQL selects the positions; one streaming pass in
//!   Rust accumulates every group (quantiles from fine histograms, exact to 1/8192).
//! * [`calibration`]: the teacher's next-token calibration (confidence = top-1 probability,
//!   correct = the target is the top-1 token): ECE, adaptive ECE, MCE, Brier, NLL of the
//!   target and the reliability table, computed by [`crate::calibration`] from the rows a SQL
//!   query selects.
//!
//! Both take a temperature; see [`StatsOptions`].

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::buffer::ScalarBuffer;
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
    /// Quantiles (from histograms of [`COVERAGE_BINS`] bins) of the cumulative mass of the
    /// top-1 .. top-k entries:
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

/// Equal-width bins over [0, 1] of the histograms the coverage quantiles are read from: a
/// quantile is exact to within `1 / COVERAGE_BINS` (masses a hair above 1 from float16
/// rounding count in the last bin).
pub const COVERAGE_BINS: usize = 8192;

/// The SQL of the coverage report: the positions with their source, split, in-loss flag and
/// top-k log-probs (rescaled when the temperature is not 1). `samples` comes first so the
/// hash join builds on the small table (see [`calibration_sql`]).
pub fn coverage_sql(vocab: u32, opts: &StatsOptions) -> String {
    let lp = logprob_expr(opts, TemperatureMode::UniformTail, vocab);
    format!(
        "SELECT s.source, s.split, l.in_loss, {lp} AS lp\n\
         FROM samples s JOIN labels l ON l.sample_id = s.sample_id"
    )
}

/// Running coverage statistics of one group: count, sums of the top-1 .. top-k masses, one
/// histogram per j for the quantiles, and the count at or above [`MASS_THRESHOLD`].
#[derive(Clone)]
struct CoverageAccumulator {
    k: usize,
    n: u64,
    sums: Vec<f64>,
    /// `hist[j * COVERAGE_BINS + b]`: positions whose top-(j+1) mass is in bin `b`.
    hist: Vec<u64>,
    at_threshold: u64,
}

impl CoverageAccumulator {
    fn new(k: usize) -> Self {
        CoverageAccumulator {
            k,
            n: 0,
            sums: vec![0.0; k],
            hist: vec![0; k * COVERAGE_BINS],
            at_threshold: 0,
        }
    }

    /// Adds one position given its cumulative masses (top-1 .. top-k; a shorter list, as in a
    /// top-p store, repeats its total for the missing entries).
    fn push(&mut self, cumulative: &[f64]) {
        self.n += 1;
        let last = cumulative.last().copied().unwrap_or(0.0);
        for j in 0..self.k {
            let m = cumulative.get(j).copied().unwrap_or(last);
            self.sums[j] += m;
            // `as` saturates: negative (and NaN) to bin 0, above 1 to the last bin.
            let bin = ((m * COVERAGE_BINS as f64) as usize).min(COVERAGE_BINS - 1);
            self.hist[j * COVERAGE_BINS + bin] += 1;
        }
        if last >= MASS_THRESHOLD {
            self.at_threshold += 1;
        }
    }

    fn merge(&mut self, other: &Self) {
        self.n += other.n;
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            *a += b;
        }
        for (a, b) in self.hist.iter_mut().zip(&other.hist) {
            *a += b;
        }
        self.at_threshold += other.at_threshold;
    }

    /// Quantile `q` of the top-(j+1) mass: the value at rank `q (n - 1)` (as
    /// `percentile_cont`), placed inside its bin as if the bin's values were evenly spread.
    fn quantile(&self, j: usize, q: f64) -> f64 {
        if self.n == 0 {
            return f64::NAN;
        }
        let rank = q * (self.n - 1) as f64;
        let hist = &self.hist[j * COVERAGE_BINS..(j + 1) * COVERAGE_BINS];
        let mut before = 0u64;
        for (b, &count) in hist.iter().enumerate() {
            if count > 0 && rank < (before + count) as f64 {
                let within = (rank - before as f64 + 0.5) / count as f64;
                return (b as f64 + within.clamp(0.0, 1.0)) / COVERAGE_BINS as f64;
            }
            before += count;
        }
        1.0
    }

    fn row(&self, positions: &str, source: Option<String>, split: Option<String>) -> CoverageRow {
        let n = self.n as f64;
        CoverageRow {
            positions: positions.to_string(),
            source,
            split,
            n: self.n,
            mean_mass: self.sums.iter().map(|s| s / n).collect(),
            quantiles: COVERAGE_QUANTILES
                .iter()
                .map(|&q| (0..self.k).map(|j| self.quantile(j, q)).collect())
                .collect(),
            frac_topk_mass_ge_095: self.at_threshold as f64 / n,
        }
    }
}

/// Runs the coverage report: SQL selects the positions ([`coverage_sql`]), and one streaming
/// pass accumulates every group (by source and split, over all and in-loss positions) in
/// bounded memory; the totals are the merged groups.
pub fn coverage(session: &QuerySession, opts: &StatsOptions) -> Result<CoverageReport> {
    opts.check()?;
    let k = session.manifest().k;
    let sql = coverage_sql(session.manifest().tokenizer.vocab_size, opts);
    let mut groups: Vec<((bool, String, String), CoverageAccumulator)> = Vec::new();
    let mut cumulative = Vec::with_capacity(k);
    session.for_each_batch(&sql, |batch| {
        let (source, split, in_loss) = group_columns(batch)?;
        let (source, split) = (source.as_string::<i32>(), split.as_string::<i32>());
        let lists = column(batch, "lp")?;
        let (values, ranges) = list_ranges(lists)?;
        // Consecutive rows mostly share a sample, so the last group found is tried first.
        let mut last: [Option<usize>; 2] = [None, None];
        for (i, range) in ranges.into_iter().enumerate() {
            cumulative.clear();
            let mut total = 0.0;
            for lp in &values[range] {
                total += lp.exp();
                cumulative.push(total);
            }
            let (so, sp) = (source.value(i), split.value(i));
            for loss in [false, true] {
                if loss && !in_loss.value(i) {
                    continue;
                }
                let hit = last[usize::from(loss)].filter(|&g| {
                    let (l, gso, gsp) = &groups[g].0;
                    *l == loss && gso == so && gsp == sp
                });
                let g = match hit.or_else(|| {
                    groups
                        .iter()
                        .position(|((l, gso, gsp), _)| *l == loss && gso == so && gsp == sp)
                }) {
                    Some(g) => g,
                    None => {
                        groups.push((
                            (loss, so.to_string(), sp.to_string()),
                            CoverageAccumulator::new(k),
                        ));
                        groups.len() - 1
                    }
                };
                last[usize::from(loss)] = Some(g);
                groups[g].1.push(&cumulative);
            }
        }
        Ok(())
    })?;
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rows = Vec::new();
    for in_loss in [false, true] {
        let positions = if in_loss { "in_loss" } else { "all" };
        let mut total = CoverageAccumulator::new(k);
        for ((_, source, split), acc) in groups.iter().filter(|g| g.0 .0 == in_loss) {
            rows.push(acc.row(positions, Some(source.clone()), Some(split.clone())));
            total.merge(acc);
        }
        if total.n > 0 {
            rows.push(total.row(positions, None, None));
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

/// The `source` and `split` columns of a report's batch as Utf8, and its `in_loss` flags.
fn group_columns(batch: &RecordBatch) -> Result<(ArrayRef, ArrayRef, BooleanArray)> {
    let text =
        |name: &str| -> Result<ArrayRef> { Ok(cast(column(batch, name)?, &DataType::Utf8)?) };
    let in_loss = column(batch, "in_loss")?.as_boolean().clone();
    Ok((text("source")?, text("split")?, in_loss))
}

/// The float64 values of a list column and each row's range into them (fixed-size lists of
/// 1.0 stores and rescaled log-probs, variable lists of top-p / sampled stores). A null list is
/// an error: the store's schema has none.
type ListRanges = (ScalarBuffer<f64>, Vec<std::ops::Range<usize>>);

fn list_ranges(array: &ArrayRef) -> Result<ListRanges> {
    // The cast's buffer itself (shared, not copied again).
    let widen = |values: &ArrayRef| -> Result<ScalarBuffer<f64>> {
        let v = cast(values, &DataType::Float64)?;
        Ok(v.as_primitive::<Float64Type>().values().clone())
    };
    if array.null_count() > 0 {
        return Err(Error::Internal(
            "coverage: a log-prob list in the query result is null".into(),
        ));
    }
    match array.data_type() {
        DataType::FixedSizeList(_, k) => {
            let list = array.as_fixed_size_list();
            let k = usize::try_from(*k).unwrap_or(0);
            let start = if list.is_empty() {
                0
            } else {
                usize::try_from(list.value_offset(0)).unwrap_or(0)
            };
            let values = widen(&list.values().slice(start, list.len() * k))?;
            Ok((
                values,
                (0..list.len()).map(|row| row * k..(row + 1) * k).collect(),
            ))
        }
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            let values = widen(list.values())?;
            let ranges = list
                .offsets()
                .windows(2)
                .map(|w| {
                    let start = usize::try_from(w[0]).unwrap_or(0);
                    start..usize::try_from(w[1]).unwrap_or(start)
                })
                .collect();
            Ok((values, ranges))
        }
        other => Err(Error::Internal(format!(
            "coverage: expected a list of log-probs, got {other}"
        ))),
    }
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
        let (source, split, in_loss) = group_columns(batch)?;
        let (source, split) = (source.as_string::<i32>(), split.as_string::<i32>());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_a_bin_and_merging_equals_one_pass() {
        // 10,001 evenly spaced masses in [0, 1]: percentile_cont of q is q itself.
        let n = 10_001;
        let mut one = CoverageAccumulator::new(2);
        let (mut a, mut b) = (CoverageAccumulator::new(2), CoverageAccumulator::new(2));
        for i in 0..n {
            let m = i as f64 / (n - 1) as f64;
            let cumulative = [m / 2.0, m];
            one.push(&cumulative);
            if i % 3 == 0 {
                a.push(&cumulative)
            } else {
                b.push(&cumulative)
            }
        }
        a.merge(&b);
        let bin = 1.0 / COVERAGE_BINS as f64;
        for q in [0.0, 0.1, 0.5, 0.9, 1.0] {
            assert!(
                (one.quantile(1, q) - q).abs() <= bin,
                "{q}: {}",
                one.quantile(1, q)
            );
            assert!((one.quantile(0, q) - q / 2.0).abs() <= bin);
            assert_eq!(one.quantile(1, q), a.quantile(1, q));
        }
        let row = one.row("all", None, None);
        assert_eq!(row.n, n as u64);
        assert!((row.mean_mass[1] - 0.5).abs() < 1e-12);
        // m >= 0.95 for i >= 9500.
        assert!((row.frac_topk_mass_ge_095 - 501.0 / n as f64).abs() < 1e-12);
        assert!(CoverageAccumulator::new(1).quantile(0, 0.5).is_nan());
    }

    #[test]
    fn short_lists_repeat_their_total_and_masses_above_one_count_in_the_last_bin() {
        let mut acc = CoverageAccumulator::new(3);
        acc.push(&[0.5, 1.0004]);
        let row = acc.row("all", None, None);
        assert_eq!(row.mean_mass, vec![0.5, 1.0004, 1.0004]);
        assert_eq!(acc.hist[3 * COVERAGE_BINS - 1], 1);
        assert!(row.quantiles[1][2] <= 1.0 && row.quantiles[1][2] > 1.0 - 1.0 / 8192.0);
        assert_eq!(row.frac_topk_mass_ge_095, 1.0);
    }
}
