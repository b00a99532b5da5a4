//! Temperature scaling of stored top-k log-probabilities, and fitting the
//! temperature on held-out positions.
//!
//! The store keeps, per position, the `k` largest full-vocabulary
//! log-probabilities at temperature 1 (`lp_0 >= lp_1 >= ... >= lp_{k-1}`),
//! where `lp_i = z_i - log Z` for logits `z`. Dividing logits by `T` and
//! renormalising is the same as dividing the log-probabilities by `T` and
//! renormalising, because `log Z / T` is a constant shift. Two ways to
//! renormalise are offered ([`TemperatureMode`]):
//!
//! * [`TemperatureMode::Renormalized`] (what FIRST teaches): over the `k`
//!   stored entries only, `q_i(T) = exp(lp_i / T) / sum_j exp(lp_j / T)`.
//!   This is exactly logit temperature scaling restricted to (and
//!   renormalised over) the top-k.
//! * [`TemperatureMode::UniformTail`]: the tail mass `m = 1 - sum_i exp(lp_i)`
//!   is spread evenly over the `V - k` other tokens, each with log-probability
//!   `lt = log(m / (V - k))`, and those are scaled too:
//!   `q_i(T) = exp(lp_i / T) / S(T)` with
//!   `S(T) = sum_i exp(lp_i / T) + (V - k) exp(lt / T)`. This is exact at
//!   `T = 1` (`S(1) = 1`) and an approximation otherwise, because the real
//!   tail is not uniform and `sum_tail exp(lp / T)` depends on its shape. When
//!   `m <= 0` (float rounding of a near-certain top-k) or `V == k` there is no
//!   tail and the mode equals `Renormalized`.
//!
//! Top-1 confidence at `T` is `q_0(T)`; a position is correct when its target
//! is the top-1 token (`target_rank == Some(0)`), whatever `T` is.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::temperature::{FitObjective, TemperatureMode};

mod scaling;
use scaling::{log_normaliser, tail_of, target_logprob, top1_confidence, Tail};

use super::metrics::{
    at_index, check_logprob, CalibrationAccumulator, CalibrationReport, LOGPROB_TOLERANCE,
};

/// Smallest temperature any function here accepts.
pub const MIN_TEMPERATURE: f64 = 1e-6;
/// Largest temperature any function here accepts.
pub const MAX_TEMPERATURE: f64 = 1e6;

/// Positions per work unit when a fit or report is spread over threads. The
/// partial results are merged in unit order, so results do not depend on the
/// number of threads.
const CHUNK_POSITIONS: usize = 1 << 14;

/// One stored position: what the temperature functions read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopKPosition<'a> {
    /// The `k >= 1` largest full-vocabulary natural-log probabilities at
    /// temperature 1, in non-increasing order.
    pub logprobs: &'a [f32],
    /// Where the target token sits in `logprobs`, or `None` if it is not in
    /// the top-k.
    pub target_rank: Option<usize>,
    /// The target's full-vocabulary log-probability at temperature 1 (equal
    /// to `logprobs[rank]` when the target is in the top-k).
    pub target_logprob: f32,
    /// The vocabulary size `V` (at least `k`).
    pub vocab_size: usize,
}

impl TopKPosition<'_> {
    /// Checks the invariants listed on the fields: `k >= 1`, finite
    /// log-probabilities `<= 0` (up to a float-rounding tolerance of 1e-4),
    /// non-increasing order, `target_rank < k`, `vocab_size >= k`.
    pub fn validate(&self) -> Result<()> {
        check_topk(self.logprobs, self.vocab_size)?;
        if let Some(rank) = self.target_rank {
            if rank >= self.logprobs.len() {
                return Err(Error::InvalidArgument(format!(
                    "target rank {rank} out of range for k = {}",
                    self.logprobs.len()
                )));
            }
        }
        check_logprob(f64::from(self.target_logprob))?;
        Ok(())
    }
}

/// Top-k log-probabilities after temperature scaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RescaledTopK {
    /// The `k` rescaled log-probabilities, in the input's order.
    pub logprobs: Vec<f64>,
    /// Log of the total probability left outside the top-k at this
    /// temperature ([`TemperatureMode::UniformTail`] with a positive tail
    /// mass only; `None` otherwise).
    pub tail_logprob: Option<f64>,
}

/// Settings of [`fit_temperature`]; `FitOptions::default()` is the documented
/// procedure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitOptions {
    /// How the top-k is renormalised (default [`TemperatureMode::Renormalized`]).
    pub mode: TemperatureMode,
    /// Equal-width bins for the ECE objective and the reports (default 15).
    pub n_bins: usize,
    /// Smallest temperature searched (default 0.05).
    pub min_temperature: f64,
    /// Largest temperature searched (default 10).
    pub max_temperature: f64,
    /// Log-spaced points of the coarse grid, endpoints included (default 64).
    /// `T = 1` is always evaluated as well when it lies in the range.
    pub grid_points: usize,
    /// Rounds of refinement around the best point so far (default 3).
    pub refine_rounds: usize,
    /// Log-spaced points per refinement round across the bracket formed by
    /// the best point's two neighbours (default 17).
    pub refine_points: usize,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            mode: TemperatureMode::Renormalized,
            n_bins: super::DEFAULT_N_BINS,
            min_temperature: 0.05,
            max_temperature: 10.0,
            grid_points: 64,
            refine_rounds: 3,
            refine_points: 17,
        }
    }
}

/// The result of [`fit_temperature`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemperatureFit {
    /// The fitted temperature.
    pub temperature: f64,
    /// The renormalisation mode it was fitted for.
    pub mode: TemperatureMode,
    /// What was minimised.
    pub objective: FitObjective,
    /// The objective at the fitted temperature (equals `after.ece` or
    /// `after.nll`).
    pub objective_value: f64,
    /// Whether the fit ended on `min_temperature` or `max_temperature`, in
    /// which case the true optimum may lie outside the searched range.
    pub at_boundary: bool,
    /// Calibration of the fitting positions at `T = 1`.
    pub before: CalibrationReport,
    /// Calibration of the fitting positions at the fitted temperature.
    pub after: CalibrationReport,
    /// Number of positions the fit used.
    pub n_positions: u64,
}

/// The top-k log-probabilities rescaled to `temperature` under `mode`.
///
/// Errors if `logprobs` is empty, not finite, positive, not non-increasing,
/// longer than `vocab_size`, or `temperature` is not in
/// `[MIN_TEMPERATURE, MAX_TEMPERATURE]`.
pub fn rescaled_topk_logprobs(
    logprobs: &[f32],
    vocab_size: usize,
    temperature: f64,
    mode: TemperatureMode,
) -> Result<RescaledTopK> {
    check_topk(logprobs, vocab_size)?;
    let inv_t = inverse_temperature(temperature)?;
    let tail = tail_of(logprobs, vocab_size, mode);
    let log_z = log_normaliser(logprobs, tail, inv_t);
    Ok(RescaledTopK {
        logprobs: logprobs
            .iter()
            .map(|&lp| (f64::from(lp) * inv_t - log_z).min(0.0))
            .collect(),
        tail_logprob: tail.map(|t| (t.term(inv_t) - log_z).min(0.0)),
    })
}

/// The top-1 confidence `q_0(T)` at `temperature` under `mode`. Errors as
/// [`rescaled_topk_logprobs`].
pub fn top1_confidence_at(
    logprobs: &[f32],
    vocab_size: usize,
    temperature: f64,
    mode: TemperatureMode,
) -> Result<f64> {
    check_topk(logprobs, vocab_size)?;
    let inv_t = inverse_temperature(temperature)?;
    let tail = tail_of(logprobs, vocab_size, mode);
    Ok(top1_confidence(
        logprobs,
        inv_t,
        log_normaliser(logprobs, tail, inv_t),
    ))
}

/// The log-probability of the position's target at `temperature` under
/// `mode`; the target NLL is its negation.
///
/// * `Renormalized`: `lp_rank / T - log sum_j exp(lp_j / T)`, or `None` when
///   the target is not in the top-k (it has probability 0).
/// * `UniformTail`: `target_logprob / T - log S(T)`, always `Some`; exact at
///   `T = 1`, where it returns the stored `target_logprob`.
///
/// Errors if the position is invalid (see [`TopKPosition::validate`]) or the
/// temperature is out of range.
pub fn target_logprob_at(
    position: &TopKPosition<'_>,
    temperature: f64,
    mode: TemperatureMode,
) -> Result<Option<f64>> {
    position.validate()?;
    let inv_t = inverse_temperature(temperature)?;
    let tail = tail_of(position.logprobs, position.vocab_size, mode);
    let log_z = log_normaliser(position.logprobs, tail, inv_t);
    Ok(target_logprob(position, mode, inv_t, log_z))
}

/// The calibration report of `positions` rescaled to `temperature`:
/// confidence is the top-1 probability, correct means the target is the
/// top-1 token, and the NLL uses [`target_logprob_at`] (so under
/// `Renormalized` it covers only positions whose target is in the top-k;
/// `n_nll` says how many). Errors on empty input or any invalid position.
pub fn topk_calibration_report(
    positions: &[TopKPosition<'_>],
    temperature: f64,
    mode: TemperatureMode,
    n_bins: usize,
) -> Result<CalibrationReport> {
    let inv_t = inverse_temperature(temperature)?;
    let prototype = CalibrationAccumulator::new(n_bins)?;
    let prepared = prepare(positions, mode)?;
    accumulate(&prepared, mode, inv_t, &prototype, available_threads()).finish()
}

impl CalibrationAccumulator {
    /// Adds one stored position rescaled to `temperature`, as
    /// [`topk_calibration_report`] does, for reports over more positions than
    /// fit in memory. Errors (adding nothing) if the position or the
    /// temperature is invalid.
    pub fn push_topk(
        &mut self,
        position: &TopKPosition<'_>,
        temperature: f64,
        mode: TemperatureMode,
    ) -> Result<()> {
        position.validate()?;
        let inv_t = inverse_temperature(temperature)?;
        let prepared = Prepared {
            position: *position,
            tail: tail_of(position.logprobs, position.vocab_size, mode),
        };
        observe(self, &prepared, mode, inv_t);
        Ok(())
    }
}

/// Fits a temperature on held-out `positions` by minimising `objective`.
///
/// Procedure (deterministic): evaluate the objective on `grid_points`
/// log-spaced temperatures from `min_temperature` to `max_temperature`
/// plus `T = 1`; then `refine_rounds` times, take the bracket between the
/// best point's two neighbours and evaluate `refine_points` log-spaced
/// temperatures across it (plus the best point). Ties go to the temperature
/// closest to 1 in log scale. The result is never worse on `positions` than
/// `T = 1` when 1 lies in the range. Cost: about
/// `(grid_points + refine_rounds * refine_points) * n * k` exponentials,
/// spread over the available threads.
///
/// Errors on empty input, any invalid position (the message names its
/// index), invalid options, or the NLL objective in `Renormalized` mode when
/// no target is in the top-k.
pub fn fit_temperature(
    positions: &[TopKPosition<'_>],
    objective: FitObjective,
    options: &FitOptions,
) -> Result<TemperatureFit> {
    fit_temperature_with_threads(positions, objective, options, available_threads())
}

fn fit_temperature_with_threads(
    positions: &[TopKPosition<'_>],
    objective: FitObjective,
    options: &FitOptions,
    threads: usize,
) -> Result<TemperatureFit> {
    check_options(options)?;
    let mode = options.mode;
    let prepared = prepare(positions, mode)?;
    let full = CalibrationAccumulator::new(options.n_bins)?;
    let before = accumulate(&prepared, mode, 1.0, &full, threads).finish()?;
    if objective == FitObjective::Nll && before.nll.is_none() {
        return Err(Error::InvalidArgument(
            "the NLL objective needs at least one position whose target is in the top-k \
             (renormalized mode)"
                .into(),
        ));
    }
    let cheap = CalibrationAccumulator::fixed_memory(options.n_bins)?;
    let evaluate = |temperature: f64| -> Result<Candidate> {
        let report = accumulate(&prepared, mode, 1.0 / temperature, &cheap, threads).finish()?;
        Ok(Candidate {
            temperature,
            value: objective_value(&report, objective)?,
        })
    };
    let (lo, hi) = (options.min_temperature, options.max_temperature);
    let mut grid = log_grid(lo, hi, options.grid_points);
    if lo < 1.0 && 1.0 < hi {
        grid.push(1.0);
    }
    let mut candidates = evaluate_all(&grid, &evaluate)?;
    let mut best = best_of(&candidates);
    for _ in 0..options.refine_rounds {
        let (left, right) = bracket(&candidates, best);
        let mut grid = log_grid(left, right, options.refine_points);
        grid.push(best.temperature);
        candidates = evaluate_all(&grid, &evaluate)?;
        best = best_of(&candidates);
    }
    let after = accumulate(&prepared, mode, 1.0 / best.temperature, &full, threads).finish()?;
    let width = (hi / lo).ln();
    let at_boundary = [lo, hi]
        .iter()
        .any(|edge| (best.temperature / edge).ln().abs() <= 1e-9 * width);
    Ok(TemperatureFit {
        temperature: best.temperature,
        mode,
        objective,
        objective_value: objective_value(&after, objective)?,
        at_boundary,
        before,
        after,
        n_positions: positions.len() as u64,
    })
}

/// One evaluated temperature.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    temperature: f64,
    value: f64,
}

impl Candidate {
    /// Strictly better: lower objective, ties to the temperature closest to 1.
    fn beats(&self, other: &Candidate) -> bool {
        match self.value.total_cmp(&other.value) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Greater => false,
            std::cmp::Ordering::Equal => self.temperature.ln().abs() < other.temperature.ln().abs(),
        }
    }
}

/// Evaluates every temperature of `grid`, returned sorted by temperature.
fn evaluate_all(
    grid: &[f64],
    evaluate: &impl Fn(f64) -> Result<Candidate>,
) -> Result<Vec<Candidate>> {
    let mut temperatures = grid.to_vec();
    temperatures.sort_by(f64::total_cmp);
    temperatures.dedup();
    temperatures.into_iter().map(evaluate).collect()
}

/// The best candidate of a non-empty list.
fn best_of(candidates: &[Candidate]) -> Candidate {
    candidates.iter().skip(1).fold(
        candidates[0],
        |best, c| if c.beats(&best) { *c } else { best },
    )
}

/// The temperatures just below and above `best` in the sorted candidates
/// (`best` itself at either end of the range).
fn bracket(candidates: &[Candidate], best: Candidate) -> (f64, f64) {
    let i = candidates
        .iter()
        .position(|c| c.temperature == best.temperature)
        .unwrap_or(0);
    let left = candidates[i.saturating_sub(1)].temperature;
    let right = candidates[(i + 1).min(candidates.len() - 1)].temperature;
    (left, right)
}

/// `n >= 2` log-spaced points from `lo` to `hi`, both included exactly.
fn log_grid(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let (a, b) = (lo.ln(), hi.ln());
    (0..n)
        .map(|i| match i {
            0 => lo,
            _ if i == n - 1 => hi,
            _ => (a + (b - a) * i as f64 / (n - 1) as f64).exp(),
        })
        .collect()
}

fn objective_value(report: &CalibrationReport, objective: FitObjective) -> Result<f64> {
    match objective {
        FitObjective::Ece => Ok(report.ece),
        FitObjective::Nll => report.nll.ok_or_else(|| {
            Error::InvalidArgument("no position has a target log-probability".into())
        }),
    }
}

fn check_options(options: &FitOptions) -> Result<()> {
    let (lo, hi) = (options.min_temperature, options.max_temperature);
    if !(MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&lo)
        || !(MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&hi)
        || lo >= hi
    {
        return Err(Error::InvalidArgument(format!(
            "temperature range must satisfy {MIN_TEMPERATURE} <= min < max <= \
             {MAX_TEMPERATURE}, got [{lo}, {hi}]"
        )));
    }
    if options.grid_points < 2 || options.refine_points < 2 {
        return Err(Error::InvalidArgument(format!(
            "grid_points and refine_points must be at least 2, got {} and {}",
            options.grid_points, options.refine_points
        )));
    }
    if options.n_bins == 0 {
        return Err(Error::InvalidArgument(
            "number of calibration bins must be at least 1".into(),
        ));
    }
    Ok(())
}

/// `1 / temperature`, after checking the temperature's range.
fn inverse_temperature(temperature: f64) -> Result<f64> {
    if (MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&temperature) {
        Ok(1.0 / temperature)
    } else {
        Err(Error::InvalidArgument(format!(
            "temperature must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {temperature}"
        )))
    }
}

fn check_topk(logprobs: &[f32], vocab_size: usize) -> Result<()> {
    if logprobs.is_empty() {
        return Err(Error::InvalidArgument(
            "a position needs at least one top-k log-probability".into(),
        ));
    }
    if vocab_size < logprobs.len() {
        return Err(Error::InvalidArgument(format!(
            "vocabulary size {vocab_size} is smaller than k = {}",
            logprobs.len()
        )));
    }
    for (i, &lp) in logprobs.iter().enumerate() {
        let lp = f64::from(lp);
        if !lp.is_finite() || lp > LOGPROB_TOLERANCE {
            return Err(Error::InvalidArgument(format!(
                "top-k log-probability {i} must be finite and <= 0, got {lp}"
            )));
        }
    }
    if let Some(i) = logprobs.windows(2).position(|w| w[1] > w[0]) {
        return Err(Error::InvalidArgument(format!(
            "top-k log-probabilities must be non-increasing, but entry {} ({}) > entry {i} ({})",
            i + 1,
            logprobs[i + 1],
            logprobs[i]
        )));
    }
    Ok(())
}

/// A validated position with its tail precomputed.
#[derive(Debug, Clone, Copy)]
struct Prepared<'a> {
    position: TopKPosition<'a>,
    tail: Option<Tail>,
}

fn prepare<'a>(positions: &[TopKPosition<'a>], mode: TemperatureMode) -> Result<Vec<Prepared<'a>>> {
    if positions.is_empty() {
        return Err(Error::InvalidArgument("no positions to calibrate".into()));
    }
    positions
        .iter()
        .enumerate()
        .map(|(i, position)| {
            position.validate().map_err(|e| at_index(i, e))?;
            Ok(Prepared {
                position: *position,
                tail: tail_of(position.logprobs, position.vocab_size, mode),
            })
        })
        .collect()
}

/// Adds a prepared position's confidence, correctness and (when defined)
/// target log-probability at `1 / inv_t`.
fn observe(acc: &mut CalibrationAccumulator, p: &Prepared<'_>, mode: TemperatureMode, inv_t: f64) {
    let log_z = log_normaliser(p.position.logprobs, p.tail, inv_t);
    let confidence = top1_confidence(p.position.logprobs, inv_t, log_z);
    acc.push_checked(confidence, p.position.target_rank == Some(0));
    if let Some(lp) = target_logprob(&p.position, mode, inv_t, log_z) {
        acc.push_logprob_checked(lp);
    }
}

fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Accumulates all positions at `1 / inv_t` into a copy of `prototype` (an
/// empty accumulator), in chunks of `CHUNK_POSITIONS` spread over up to
/// `threads` threads and merged in chunk order.
fn accumulate(
    prepared: &[Prepared<'_>],
    mode: TemperatureMode,
    inv_t: f64,
    prototype: &CalibrationAccumulator,
    threads: usize,
) -> CalibrationAccumulator {
    let chunks: Vec<&[Prepared<'_>]> = prepared.chunks(CHUNK_POSITIONS).collect();
    let accumulate_chunk = |chunk: &[Prepared<'_>]| {
        let mut acc = prototype.clone();
        for p in chunk {
            observe(&mut acc, p, mode, inv_t);
        }
        acc
    };
    let mut partials = vec![prototype.clone(); chunks.len()];
    let threads = threads.clamp(1, chunks.len().max(1));
    if threads == 1 {
        for (slot, &chunk) in partials.iter_mut().zip(&chunks) {
            *slot = accumulate_chunk(chunk);
        }
    } else {
        let per_thread = chunks.len().div_ceil(threads);
        std::thread::scope(|scope| {
            for (slots, group) in partials
                .chunks_mut(per_thread)
                .zip(chunks.chunks(per_thread))
            {
                let accumulate_chunk = &accumulate_chunk;
                scope.spawn(move || {
                    for (slot, &chunk) in slots.iter_mut().zip(group) {
                        *slot = accumulate_chunk(chunk);
                    }
                });
            }
        });
    }
    let mut total = prototype.clone();
    for partial in partials {
        total.merge_same_settings(partial);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// SplitMix64: a small, seeded, dependency-free generator for fixtures.
    struct SplitMix64(u64);

    impl SplitMix64 {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in `[0, 1)`.
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }

        /// Standard normal (Box-Muller).
        fn normal(&mut self) -> f64 {
            let u1 = 1.0 - self.uniform();
            let u2 = self.uniform();
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        }
    }

    struct OwnedPosition {
        logprobs: Vec<f32>,
        target_rank: Option<usize>,
        target_logprob: f32,
        vocab_size: usize,
    }

    impl OwnedPosition {
        fn view(&self) -> TopKPosition<'_> {
            TopKPosition {
                logprobs: &self.logprobs,
                target_rank: self.target_rank,
                target_logprob: self.target_logprob,
                vocab_size: self.vocab_size,
            }
        }
    }

    fn log_softmax(z: &[f64]) -> Vec<f64> {
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_sum = z.iter().map(|x| (x - max).exp()).sum::<f64>().ln() + max;
        z.iter().map(|x| x - log_sum).collect()
    }

    /// A synthetic teacher: true next-token distribution `softmax(z)` with
    /// `z ~ 1.5 N(0, 1)`, target sampled from it, but stored log-probs
    /// `log_softmax(sharpness * z)` (over-confident when `sharpness > 1`).
    fn synthetic(
        seed: u64,
        n: usize,
        vocab: usize,
        k: usize,
        sharpness: f64,
    ) -> Vec<OwnedPosition> {
        let mut rng = SplitMix64(seed);
        (0..n)
            .map(|_| {
                let z: Vec<f64> = (0..vocab).map(|_| 1.5 * rng.normal()).collect();
                let truth: Vec<f64> = log_softmax(&z).iter().map(|lp| lp.exp()).collect();
                let sharp: Vec<f64> = z.iter().map(|x| x * sharpness).collect();
                let stored: Vec<f32> = log_softmax(&sharp).iter().map(|&lp| lp as f32).collect();
                let mut order: Vec<usize> = (0..vocab).collect();
                order.sort_by(|&a, &b| stored[b].total_cmp(&stored[a]));
                let u = rng.uniform();
                let mut cumulative = 0.0;
                let target = truth
                    .iter()
                    .position(|p| {
                        cumulative += p;
                        u < cumulative
                    })
                    .unwrap_or(vocab - 1);
                OwnedPosition {
                    logprobs: order[..k].iter().map(|&i| stored[i]).collect(),
                    target_rank: order[..k].iter().position(|&i| i == target),
                    target_logprob: stored[target],
                    vocab_size: vocab,
                }
            })
            .collect()
    }

    fn views(positions: &[OwnedPosition]) -> Vec<TopKPosition<'_>> {
        positions.iter().map(OwnedPosition::view).collect()
    }

    const FIXTURE: [f32; 4] = [-0.5, -1.6, -2.4, -3.2];

    // ```python
    // import numpy as np
    // lp = np.array([-0.5, -1.6, -2.4, -3.2], dtype=np.float32).astype(np.float64)
    // V = 10
    // def lse(x): m = x.max(); return m + np.log(np.exp(x - m).sum())
    // for T in (2.0, 0.5):
    //     r = lp / T - lse(lp / T)
    //     print("renorm T", T, ",".join(repr(float(x)) for x in r))
    //     m = 1 - np.exp(lp).sum(); n = V - len(lp); lt = np.log(m / n)
    //     terms = np.concatenate([lp / T, [np.log(n) + lt / T]])
    //     logz = lse(terms)
    //     u = lp / T - logz
    //     print("tail T", T, ",".join(repr(float(x)) for x in u),
    //           "tail_logmass", repr(float(np.log(n) + lt / T - logz)))
    //     tgt = np.float64(np.float32(-4.0))  # a target outside the top-k
    //     print("tail target lp T", T, repr(float(tgt / T - logz)))
    // ```
    // Output:
    // renorm T 2.0 -0.7988266236964839,-1.3488266356174128,-1.7488266713801996,-2.1488266475383417
    // tail T 2.0 -1.096590614312911,-1.64659062623384,-2.0465906619966265,-2.4465906381547686
    //   tail_logmass -1.3566444970217748
    // tail target lp T 2.0 -2.8465906143129107
    // renorm T 0.5 -0.1290003313856588,-2.3290003790693747,-3.929000522120522,-5.529000426753091
    // tail T 0.5 -0.13043730958199906,-2.3304373572657147,-3.930437500316862,-5.5304374049494305
    //   tail_logmass -6.54593124810162
    // tail target lp T 0.5 -7.130437309581999
    #[test]
    fn rescaling_matches_numpy() {
        /// (T, mode, rescaled top-k, tail log-mass, log-prob of a target at -4.0)
        type Case = (f64, TemperatureMode, [f64; 4], Option<f64>, Option<f64>);
        let cases: [Case; 4] = [
            (
                2.0,
                TemperatureMode::Renormalized,
                [
                    -0.7988266236964839,
                    -1.3488266356174128,
                    -1.7488266713801996,
                    -2.1488266475383417,
                ],
                None,
                None,
            ),
            (
                0.5,
                TemperatureMode::Renormalized,
                [
                    -0.1290003313856588,
                    -2.3290003790693747,
                    -3.929000522120522,
                    -5.529000426753091,
                ],
                None,
                None,
            ),
            (
                2.0,
                TemperatureMode::UniformTail,
                [
                    -1.096590614312911,
                    -1.64659062623384,
                    -2.0465906619966265,
                    -2.4465906381547686,
                ],
                Some(-1.3566444970217748),
                Some(-2.8465906143129107),
            ),
            (
                0.5,
                TemperatureMode::UniformTail,
                [
                    -0.13043730958199906,
                    -2.3304373572657147,
                    -3.930437500316862,
                    -5.5304374049494305,
                ],
                Some(-6.54593124810162),
                Some(-7.130437309581999),
            ),
        ];
        for (t, mode, expected, tail, target) in cases {
            let rescaled = rescaled_topk_logprobs(&FIXTURE, 10, t, mode).unwrap();
            for (a, b) in rescaled.logprobs.iter().zip(expected) {
                assert!(close(*a, b, 1e-12), "{mode:?} T={t}: {a} vs {b}");
            }
            assert_eq!(rescaled.tail_logprob.is_some(), tail.is_some());
            if let (Some(a), Some(b)) = (rescaled.tail_logprob, tail) {
                assert!(close(a, b, 1e-12), "{mode:?} T={t}: tail {a} vs {b}");
            }
            let confidence = top1_confidence_at(&FIXTURE, 10, t, mode).unwrap();
            assert!(close(confidence, expected[0].exp(), 1e-12));
            let position = TopKPosition {
                logprobs: &FIXTURE,
                target_rank: None,
                target_logprob: -4.0,
                vocab_size: 10,
            };
            let target_lp = target_logprob_at(&position, t, mode).unwrap();
            match (target_lp, target) {
                (Some(a), Some(b)) => assert!(close(a, b, 1e-12), "target {a} vs {b}"),
                (None, None) => {}
                other => panic!("{mode:?} T={t}: {other:?}"),
            }
        }
    }

    #[test]
    fn renormalized_at_one_is_plain_renormalisation() {
        let mass: f64 = FIXTURE.iter().map(|&lp| f64::from(lp).exp()).sum();
        let rescaled =
            rescaled_topk_logprobs(&FIXTURE, 10, 1.0, TemperatureMode::Renormalized).unwrap();
        assert_eq!(rescaled.tail_logprob, None);
        for (q, &lp) in rescaled.logprobs.iter().zip(&FIXTURE) {
            assert!(close(q.exp(), f64::from(lp).exp() / mass, 1e-12));
        }
        for position in &synthetic(7, 50, 40, 5, 1.0) {
            let mass: f64 = position
                .logprobs
                .iter()
                .map(|&lp| f64::from(lp).exp())
                .sum();
            let confidence = top1_confidence_at(&position.logprobs, 40, 1.0, Default::default());
            let expected = f64::from(position.logprobs[0]).exp() / mass;
            assert!(close(confidence.unwrap(), expected, 1e-12));
        }
    }

    /// Renormalized mode is logit temperature restricted to the top-k.
    #[test]
    fn renormalized_is_logit_temperature_on_topk() {
        let logits = [2.0, 1.0, 0.5, -0.3, -1.0, -2.5];
        let stored: Vec<f32> = log_softmax(&logits).iter().map(|&lp| lp as f32).collect();
        for t in [0.3, 1.0, 2.7] {
            let scaled: Vec<f64> = logits.iter().map(|z| z / t).collect();
            let full: Vec<f64> = log_softmax(&scaled).iter().map(|lp| lp.exp()).collect();
            let top_mass: f64 = full[..3].iter().sum();
            let rescaled =
                rescaled_topk_logprobs(&stored[..3], 6, t, TemperatureMode::Renormalized).unwrap();
            for (q, p) in rescaled.logprobs.iter().zip(&full[..3]) {
                assert!(close(q.exp(), p / top_mass, 1e-6), "T={t}: {q} vs {p}");
            }
        }
    }

    #[test]
    fn uniform_tail_at_one_returns_stored_logprobs() {
        for position in &synthetic(11, 200, 64, 8, 2.5) {
            let rescaled = rescaled_topk_logprobs(
                &position.logprobs,
                position.vocab_size,
                1.0,
                TemperatureMode::UniformTail,
            )
            .unwrap();
            for (a, &b) in rescaled.logprobs.iter().zip(&position.logprobs) {
                assert!(close(*a, f64::from(b), 1e-6), "{a} vs {b}");
            }
            let target =
                target_logprob_at(&position.view(), 1.0, TemperatureMode::UniformTail).unwrap();
            assert!(close(
                target.unwrap(),
                f64::from(position.target_logprob),
                1e-6
            ));
            let top: f64 = position
                .logprobs
                .iter()
                .map(|&lp| f64::from(lp).exp())
                .sum();
            if let Some(tail) = rescaled.tail_logprob {
                assert!(close(tail.exp(), 1.0 - top, 1e-6));
            }
        }
    }

    #[test]
    fn uniform_tail_without_tail_mass_is_renormalized() {
        // exp(-0.51) + exp(-0.91) = 1.0030 > 1: rounding left no tail mass.
        let no_mass = [-0.51f32, -0.91];
        // V == k: no tail tokens at all.
        let full_vocab = [-0.2f32, -1.9, -3.0];
        for (logprobs, vocab) in [(&no_mass[..], 1000), (&full_vocab[..], 3)] {
            for t in [0.05, 1.0, 10.0] {
                let tail = rescaled_topk_logprobs(logprobs, vocab, t, TemperatureMode::UniformTail)
                    .unwrap();
                let renorm =
                    rescaled_topk_logprobs(logprobs, vocab, t, TemperatureMode::Renormalized)
                        .unwrap();
                assert_eq!(tail, renorm);
                assert!(tail.logprobs.iter().all(|lp| lp.is_finite() && *lp <= 0.0));
            }
        }
    }

    #[test]
    fn overconfident_teacher_fits_temperature_above_one() {
        for (k, objective, mode) in [
            (32, FitObjective::Ece, TemperatureMode::Renormalized),
            (32, FitObjective::Nll, TemperatureMode::Renormalized),
            (8, FitObjective::Ece, TemperatureMode::Renormalized),
            (8, FitObjective::Ece, TemperatureMode::UniformTail),
            (8, FitObjective::Nll, TemperatureMode::UniformTail),
        ] {
            let fit_set = synthetic(1, 3000, 32, k, 2.5);
            let held_out = synthetic(2, 3000, 32, k, 2.5);
            let options = FitOptions {
                mode,
                ..FitOptions::default()
            };
            let fit = fit_temperature(&views(&fit_set), objective, &options).unwrap();
            let case = format!("k={k} {objective:?} {mode:?}: T={}", fit.temperature);
            assert!(fit.temperature > 1.5, "{case}");
            assert!(!fit.at_boundary, "{case}");
            assert!(fit.after.ece < fit.before.ece, "{case}");
            let before = topk_calibration_report(&views(&held_out), 1.0, mode, 15).unwrap();
            let after =
                topk_calibration_report(&views(&held_out), fit.temperature, mode, 15).unwrap();
            assert!(
                after.ece < 0.5 * before.ece,
                "{case}: {before:?} -> {after:?}"
            );
            assert!(after.nll.unwrap() < before.nll.unwrap(), "{case}");
            if k == 32 {
                // Full vocabulary stored: the true temperature 2.5 is recoverable.
                assert!((2.0..3.0).contains(&fit.temperature), "{case}");
            }
        }
    }

    #[test]
    fn calibrated_teacher_fits_temperature_near_one() {
        for (k, objective, mode, range) in [
            (
                32,
                FitObjective::Ece,
                TemperatureMode::Renormalized,
                0.8..1.25,
            ),
            (
                32,
                FitObjective::Nll,
                TemperatureMode::Renormalized,
                0.9..1.1,
            ),
            // NLL over positions whose target is in the top-k is unbiased too.
            (
                8,
                FitObjective::Nll,
                TemperatureMode::Renormalized,
                0.9..1.1,
            ),
            // The uniform tail is flatter than the real one, which biases T
            // slightly below 1 (see docs/calibration.md).
            (
                8,
                FitObjective::Nll,
                TemperatureMode::UniformTail,
                0.85..1.05,
            ),
        ] {
            let positions = synthetic(3, 3000, 32, k, 1.0);
            let options = FitOptions {
                mode,
                ..FitOptions::default()
            };
            let fit = fit_temperature(&views(&positions), objective, &options).unwrap();
            assert!(
                range.contains(&fit.temperature),
                "k={k} {objective:?} {mode:?}: T={}",
                fit.temperature
            );
            let before = match objective {
                FitObjective::Ece => fit.before.ece,
                FitObjective::Nll => fit.before.nll.unwrap(),
            };
            assert!(fit.objective_value <= before, "never worse than T = 1");
        }
    }

    #[test]
    fn fit_is_deterministic_across_thread_counts() {
        // More than two chunks of positions, so the threaded path runs.
        let positions = synthetic(5, 2 * CHUNK_POSITIONS + 1000, 16, 4, 2.0);
        let views = views(&positions);
        let options = FitOptions {
            mode: TemperatureMode::UniformTail,
            ..FitOptions::default()
        };
        let one = fit_temperature_with_threads(&views, FitObjective::Ece, &options, 1).unwrap();
        let three = fit_temperature_with_threads(&views, FitObjective::Ece, &options, 3).unwrap();
        assert_eq!(one, three);
        assert_eq!(one.n_positions, views.len() as u64);
    }

    #[test]
    fn streamed_topk_report_matches_batch() {
        let positions = synthetic(9, 500, 50, 10, 1.7);
        let views = views(&positions);
        for mode in [TemperatureMode::Renormalized, TemperatureMode::UniformTail] {
            let batch = topk_calibration_report(&views, 1.3, mode, 15).unwrap();
            let mut acc = CalibrationAccumulator::new(15).unwrap();
            for position in &views {
                acc.push_topk(position, 1.3, mode).unwrap();
            }
            assert_eq!(acc.finish().unwrap(), batch);
            let in_top_k = views.iter().filter(|p| p.target_rank.is_some()).count();
            let expected_nll = match mode {
                TemperatureMode::Renormalized => in_top_k,
                TemperatureMode::UniformTail => views.len(),
            };
            assert_eq!(batch.n_nll, expected_nll as u64);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        fn invalid(r: Result<TemperatureFit>) -> bool {
            matches!(r, Err(Error::InvalidArgument(_)))
        }
        fn position(
            logprobs: &[f32],
            rank: Option<usize>,
            target: f32,
            vocab: usize,
        ) -> TopKPosition<'_> {
            TopKPosition {
                logprobs,
                target_rank: rank,
                target_logprob: target,
                vocab_size: vocab,
            }
        }
        fn fit(positions: &[TopKPosition<'_>]) -> Result<TemperatureFit> {
            fit_temperature(positions, FitObjective::Ece, &FitOptions::default())
        }
        let ok = [-0.1f32, -2.0, -3.0];
        let options = FitOptions::default();
        assert!(invalid(fit(&[])));
        for bad in [
            position(&[], None, -1.0, 10),
            position(&[-0.1, f32::NAN], Some(0), -0.1, 10),
            position(&[-0.1, f32::NEG_INFINITY], Some(0), -0.1, 10),
            position(&[0.5, -1.0], Some(0), 0.5, 10),
            position(&[-2.0, -1.0], Some(0), -2.0, 10),
            position(&ok, Some(3), -0.1, 10),
            position(&ok, Some(0), f32::NAN, 10),
            position(&ok, Some(0), -0.1, 2),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
            let good = position(&ok, Some(0), -0.1, 10);
            assert!(invalid(fit(&[good, bad])), "{bad:?}");
        }
        let good = [position(&ok, Some(0), -0.1, 10)];
        for bad_options in [
            FitOptions {
                min_temperature: 2.0,
                max_temperature: 1.0,
                ..FitOptions::default()
            },
            FitOptions {
                min_temperature: 0.0,
                ..FitOptions::default()
            },
            FitOptions {
                max_temperature: f64::INFINITY,
                ..FitOptions::default()
            },
            FitOptions {
                n_bins: 0,
                ..FitOptions::default()
            },
            FitOptions {
                grid_points: 1,
                ..FitOptions::default()
            },
        ] {
            assert!(invalid(fit_temperature(
                &good,
                FitObjective::Ece,
                &bad_options
            )));
        }
        // NLL under Renormalized needs a target inside the top-k.
        let outside = [position(&ok, None, -5.0, 10)];
        assert!(invalid(fit_temperature(
            &outside,
            FitObjective::Nll,
            &options
        )));
        assert!(fit_temperature(&outside, FitObjective::Ece, &options).is_ok());

        for t in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-9] {
            let mode = TemperatureMode::UniformTail;
            assert!(rescaled_topk_logprobs(&ok, 10, t, mode).is_err());
            assert!(top1_confidence_at(&ok, 10, t, mode).is_err());
            assert!(target_logprob_at(&good[0], t, mode).is_err());
            assert!(topk_calibration_report(&good, t, mode, 15).is_err());
            let mut acc = CalibrationAccumulator::new(15).unwrap();
            assert!(acc.push_topk(&good[0], t, mode).is_err());
        }
        assert!(rescaled_topk_logprobs(&[], 10, 1.0, TemperatureMode::Renormalized).is_err());
        assert!(topk_calibration_report(&[], 1.0, TemperatureMode::Renormalized, 15).is_err());
        assert!(topk_calibration_report(&good, 1.0, TemperatureMode::Renormalized, 0).is_err());
    }

    #[test]
    fn fit_serializes_to_json() {
        let positions = synthetic(13, 200, 16, 4, 1.0);
        let fit = fit_temperature(
            &views(&positions),
            FitObjective::Ece,
            &FitOptions::default(),
        )
        .unwrap();
        let json = serde_json::to_value(&fit).unwrap();
        assert_eq!(json["mode"], "renormalized");
        assert_eq!(json["objective"], "ece");
        assert_eq!(json["n_positions"], 200);
    }
}
