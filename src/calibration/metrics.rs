//! Top-label calibration metrics on `(confidence, correct)` pairs.
//!
//! Everything is computed by [`CalibrationAccumulator`], which can be fed one
//! pair at a time, in slices, or merged from several partial accumulators;
//! the one-shot functions ([`ece`], [`mce`], [`adaptive_ece`], ...) are thin
//! wrappers around it, so they agree with a streamed [`CalibrationReport`]
//! by construction.
//!
//! Binning: bin `i` of `n` equal-width bins covers `[i/n, (i+1)/n)`, except
//! that a confidence of exactly `1.0` goes in the last bin `n - 1` (there is
//! no extra bin for it). Bin edges are the `f64` values `i as f64 / n as f64`
//! and membership is decided against exactly those edges, so a confidence
//! equal to an edge lands in the bin that edge opens.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The number of equal-width bins used for ECE unless told otherwise.
pub const DEFAULT_N_BINS: usize = 15;

/// How far above zero a log-probability may be (float rounding in a
/// log-softmax) before it is rejected; values in `(0, tolerance]` count as 0.
pub(crate) const LOGPROB_TOLERANCE: f64 = 1e-4;

/// How far a probability vector's sum may be from 1 in [`multiclass_brier`].
const PROBABILITY_SUM_TOLERANCE: f64 = 1e-4;

/// One equal-width reliability bin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// Inclusive lower edge, `i / n_bins`.
    pub lower: f64,
    /// Upper edge, `(i + 1) / n_bins`; exclusive, except for the last bin,
    /// which also holds confidences of exactly 1.0.
    pub upper: f64,
    /// Number of pairs in the bin.
    pub count: u64,
    /// Mean confidence of the pairs in the bin (0 when `count` is 0).
    pub mean_confidence: f64,
    /// Fraction of the pairs in the bin that are correct (0 when `count` is 0).
    pub accuracy: f64,
    /// `|accuracy - mean_confidence|` (0 when `count` is 0).
    pub gap: f64,
}

/// Summary of top-label calibration over a set of `(confidence, correct)` pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationReport {
    /// Number of pairs.
    pub n: u64,
    /// Number of equal-width (and equal-mass) bins.
    pub n_bins: usize,
    /// Fraction of pairs that are correct.
    pub accuracy: f64,
    /// Mean confidence.
    pub mean_confidence: f64,
    /// Expected calibration error over equal-width bins:
    /// `sum_b count_b / n * |accuracy_b - mean_confidence_b|`.
    pub ece: f64,
    /// ECE over `n_bins` equal-mass bins (see [`adaptive_ece`]); `None` when
    /// the accumulator was built with [`CalibrationAccumulator::fixed_memory`].
    pub adaptive_ece: Option<f64>,
    /// Maximum calibration error: the largest `gap` over non-empty bins.
    pub mce: f64,
    /// Top-label Brier score: mean of `(confidence - correct)^2`.
    pub brier: f64,
    /// Mean of `-log p(true outcome)` over the pairs that carried a
    /// log-probability; `None` when none did.
    pub nll: Option<f64>,
    /// Number of pairs that carried a log-probability (the NLL's denominator).
    pub n_nll: u64,
    /// The equal-width reliability table, `n_bins` rows in order.
    pub bins: Vec<ReliabilityBin>,
}

/// Streaming accumulator of top-label calibration statistics.
///
/// Memory: the equal-width bins, Brier and NLL sums take `O(n_bins)`. For
/// the adaptive (equal-mass) ECE the accumulator built by [`Self::new`] also
/// keeps every pair, with the confidence rounded to `f32` and packed with its
/// correctness into 4 bytes (about 40 MB per 10 million pairs);
/// [`Self::finish`] sorts them in place, [`Self::report`] sorts a copy. An
/// accumulator built by [`Self::fixed_memory`] keeps nothing per pair and
/// reports `adaptive_ece: None`.
///
/// Results do not depend on the order of pushes or merges beyond float
/// rounding of the sums (the equal-mass bins sort by a total order).
#[derive(Debug, Clone)]
pub struct CalibrationAccumulator {
    n_bins: usize,
    bin_count: Vec<u64>,
    bin_confidence_sum: Vec<f64>,
    bin_correct: Vec<u64>,
    squared_error_sum: f64,
    neg_logprob_sum: f64,
    n_logprob: u64,
    /// Packed `(f32 confidence bits << 1) | correct`, when adaptive ECE is on.
    kept: Option<Vec<u32>>,
}

impl CalibrationAccumulator {
    /// An empty accumulator with `n_bins` bins that keeps pairs for the
    /// adaptive ECE. Errors if `n_bins` is 0.
    pub fn new(n_bins: usize) -> Result<Self> {
        Self::with_storage(n_bins, true)
    }

    /// An empty accumulator with `n_bins` bins that keeps no per-pair data;
    /// its report has `adaptive_ece: None`. Errors if `n_bins` is 0.
    pub fn fixed_memory(n_bins: usize) -> Result<Self> {
        Self::with_storage(n_bins, false)
    }

    fn with_storage(n_bins: usize, keep_pairs: bool) -> Result<Self> {
        if n_bins == 0 {
            return Err(Error::InvalidArgument(
                "number of calibration bins must be at least 1".into(),
            ));
        }
        Ok(Self {
            n_bins,
            bin_count: vec![0; n_bins],
            bin_confidence_sum: vec![0.0; n_bins],
            bin_correct: vec![0; n_bins],
            squared_error_sum: 0.0,
            neg_logprob_sum: 0.0,
            n_logprob: 0,
            kept: keep_pairs.then(Vec::new),
        })
    }

    /// The number of equal-width bins.
    pub fn n_bins(&self) -> usize {
        self.n_bins
    }

    /// The number of pairs pushed so far.
    pub fn len(&self) -> u64 {
        self.bin_count.iter().sum()
    }

    /// Whether no pair has been pushed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds one pair. Errors if `confidence` is NaN or outside `[0, 1]`.
    pub fn push(&mut self, confidence: f64, correct: bool) -> Result<()> {
        check_confidence(confidence)?;
        self.push_checked(confidence, correct);
        Ok(())
    }

    /// Adds one pair together with the log-probability the predictor gave the
    /// true outcome (for the NLL). Errors if `confidence` is outside `[0, 1]`
    /// or `target_logprob` is not finite or is positive.
    pub fn push_with_logprob(
        &mut self,
        confidence: f64,
        correct: bool,
        target_logprob: f64,
    ) -> Result<()> {
        check_confidence(confidence)?;
        let logprob = check_logprob(target_logprob)?;
        self.push_checked(confidence, correct);
        self.push_logprob_checked(logprob);
        Ok(())
    }

    /// Adds the pairs `(confidence[i], correct[i])`. Errors (having added
    /// nothing) if the lengths differ or any confidence is invalid.
    pub fn push_slice(&mut self, confidence: &[f64], correct: &[bool]) -> Result<()> {
        check_same_len("correct", confidence.len(), correct.len())?;
        check_confidences(confidence)?;
        for (&c, &y) in confidence.iter().zip(correct) {
            self.push_checked(c, y);
        }
        Ok(())
    }

    /// Adds the triples `(confidence[i], correct[i], target_logprobs[i])`.
    /// Errors (having added nothing) if the lengths differ or any value is
    /// invalid.
    pub fn push_slice_with_logprobs(
        &mut self,
        confidence: &[f64],
        correct: &[bool],
        target_logprobs: &[f64],
    ) -> Result<()> {
        check_same_len("correct", confidence.len(), correct.len())?;
        check_same_len("target_logprobs", confidence.len(), target_logprobs.len())?;
        check_confidences(confidence)?;
        let logprobs = target_logprobs
            .iter()
            .enumerate()
            .map(|(i, &lp)| check_logprob(lp).map_err(|e| at_index(i, e)))
            .collect::<Result<Vec<f64>>>()?;
        for ((&c, &y), &lp) in confidence.iter().zip(correct).zip(&logprobs) {
            self.push_checked(c, y);
            self.push_logprob_checked(lp);
        }
        Ok(())
    }

    /// Adds everything `other` holds. Errors if the two have a different
    /// number of bins or one keeps pairs for the adaptive ECE and the other
    /// does not.
    pub fn merge(&mut self, other: CalibrationAccumulator) -> Result<()> {
        if self.n_bins != other.n_bins || self.kept.is_some() != other.kept.is_some() {
            return Err(Error::InvalidArgument(format!(
                "cannot merge calibration accumulators with different settings \
                 ({} bins, adaptive {} vs {} bins, adaptive {})",
                self.n_bins,
                self.kept.is_some(),
                other.n_bins,
                other.kept.is_some()
            )));
        }
        self.merge_same_settings(other);
        Ok(())
    }

    /// [`Self::merge`] for accumulators known to share their settings.
    pub(crate) fn merge_same_settings(&mut self, other: CalibrationAccumulator) {
        for b in 0..self.n_bins {
            self.bin_count[b] += other.bin_count[b];
            self.bin_confidence_sum[b] += other.bin_confidence_sum[b];
            self.bin_correct[b] += other.bin_correct[b];
        }
        self.squared_error_sum += other.squared_error_sum;
        self.neg_logprob_sum += other.neg_logprob_sum;
        self.n_logprob += other.n_logprob;
        if let (Some(kept), Some(other_kept)) = (self.kept.as_mut(), other.kept) {
            kept.extend(other_kept);
        }
    }

    /// The report for everything pushed so far, leaving the accumulator
    /// usable (the adaptive ECE sorts a copy of the kept pairs). Errors if
    /// nothing was pushed.
    pub fn report(&self) -> Result<CalibrationReport> {
        self.clone().finish()
    }

    /// Consumes the accumulator into its report (sorting the kept pairs in
    /// place). Errors if nothing was pushed.
    pub fn finish(mut self) -> Result<CalibrationReport> {
        let n = self.len();
        if n == 0 {
            return Err(Error::InvalidArgument(
                "no (confidence, correct) pairs to report on".into(),
            ));
        }
        let adaptive_ece = self.kept.as_mut().map(|kept| {
            kept.sort_unstable();
            adaptive_ece_sorted(kept, self.n_bins)
        });
        let nf = n as f64;
        let bins: Vec<ReliabilityBin> = (0..self.n_bins).map(|b| self.bin(b)).collect();
        let ece = bins.iter().map(|bin| bin.count as f64 / nf * bin.gap).sum();
        let mce = bins
            .iter()
            .filter(|bin| bin.count > 0)
            .map(|bin| bin.gap)
            .fold(0.0, f64::max);
        let n_correct: u64 = self.bin_correct.iter().sum();
        let confidence_sum: f64 = self.bin_confidence_sum.iter().sum();
        Ok(CalibrationReport {
            n,
            n_bins: self.n_bins,
            accuracy: n_correct as f64 / nf,
            mean_confidence: confidence_sum / nf,
            ece,
            adaptive_ece,
            mce,
            brier: self.squared_error_sum / nf,
            nll: (self.n_logprob > 0).then(|| self.neg_logprob_sum / self.n_logprob as f64),
            n_nll: self.n_logprob,
            bins,
        })
    }

    fn bin(&self, b: usize) -> ReliabilityBin {
        let count = self.bin_count[b];
        let (mean_confidence, accuracy) = if count == 0 {
            (0.0, 0.0)
        } else {
            (
                self.bin_confidence_sum[b] / count as f64,
                self.bin_correct[b] as f64 / count as f64,
            )
        };
        ReliabilityBin {
            lower: bin_edge(b, self.n_bins),
            upper: bin_edge(b + 1, self.n_bins),
            count,
            mean_confidence,
            accuracy,
            gap: (accuracy - mean_confidence).abs(),
        }
    }

    /// Adds a pair whose confidence is known to lie in `[0, 1]`.
    pub(crate) fn push_checked(&mut self, confidence: f64, correct: bool) {
        let b = bin_index(confidence, self.n_bins);
        self.bin_count[b] += 1;
        self.bin_confidence_sum[b] += confidence;
        self.bin_correct[b] += u64::from(correct);
        let y = if correct { 1.0 } else { 0.0 };
        self.squared_error_sum += (confidence - y) * (confidence - y);
        if let Some(kept) = self.kept.as_mut() {
            kept.push(pack(confidence, correct));
        }
    }

    /// Adds the NLL term of a log-probability known to be finite and `<= 0`.
    pub(crate) fn push_logprob_checked(&mut self, logprob: f64) {
        self.neg_logprob_sum -= logprob;
        self.n_logprob += 1;
    }
}

/// Edge `i` of `n_bins` equal-width bins: `i / n_bins` (exactly 1.0 for `i == n_bins`).
fn bin_edge(i: usize, n_bins: usize) -> f64 {
    i as f64 / n_bins as f64
}

/// The equal-width bin of a confidence in `[0, 1]`; 1.0 goes in the last bin.
///
/// `floor(c * n)` can be off by one next to an edge because of rounding in
/// the product, so the result is corrected against the exact edges.
fn bin_index(confidence: f64, n_bins: usize) -> usize {
    let mut b = ((confidence * n_bins as f64).floor() as usize).min(n_bins - 1);
    if b > 0 && confidence < bin_edge(b, n_bins) {
        b -= 1;
    } else if b + 1 < n_bins && confidence >= bin_edge(b + 1, n_bins) {
        b += 1;
    }
    b
}

/// Packs a confidence in `[0, 1]` (rounded to `f32`) and its correctness so
/// that integer order is (confidence, correct) order: a non-negative `f32`'s
/// bits are monotone and at most `0x3F80_0000`, so one shift leaves room.
fn pack(confidence: f64, correct: bool) -> u32 {
    // `+ 0.0` turns -0.0 into +0.0, whose bits sort first.
    let c = confidence as f32 + 0.0;
    (c.to_bits() << 1) | u32::from(correct)
}

fn unpack(packed: u32) -> (f64, bool) {
    (f64::from(f32::from_bits(packed >> 1)), packed & 1 == 1)
}

/// Adaptive ECE over pairs sorted by (confidence, correct).
///
/// `numpy.array_split` semantics: with `n` pairs and `b` bins, the first
/// `n % b` bins take `n / b + 1` consecutive pairs and the rest `n / b`;
/// when `n < b` the trailing bins are empty and contribute nothing.
fn adaptive_ece_sorted(sorted: &[u32], n_bins: usize) -> f64 {
    let n = sorted.len();
    let (base, remainder) = (n / n_bins, n % n_bins);
    let mut start = 0;
    let mut total = 0.0;
    for b in 0..n_bins {
        let size = base + usize::from(b < remainder);
        if size == 0 {
            break;
        }
        let (mut confidence_sum, mut n_correct) = (0.0, 0u64);
        for &packed in &sorted[start..start + size] {
            let (c, y) = unpack(packed);
            confidence_sum += c;
            n_correct += u64::from(y);
        }
        let gap = (n_correct as f64 / size as f64 - confidence_sum / size as f64).abs();
        total += size as f64 / n as f64 * gap;
        start += size;
    }
    total
}

fn check_confidence(confidence: f64) -> Result<()> {
    if (0.0..=1.0).contains(&confidence) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "confidence must be in [0, 1], got {confidence}"
        )))
    }
}

fn check_confidences(confidence: &[f64]) -> Result<()> {
    confidence
        .iter()
        .enumerate()
        .try_for_each(|(i, &c)| check_confidence(c).map_err(|e| at_index(i, e)))
}

/// Validates a log-probability of the true outcome; returns it clamped to `<= 0`.
pub(crate) fn check_logprob(logprob: f64) -> Result<f64> {
    if logprob.is_finite() && logprob <= LOGPROB_TOLERANCE {
        Ok(logprob.min(0.0))
    } else {
        Err(Error::InvalidArgument(format!(
            "log-probability must be finite and <= 0, got {logprob}"
        )))
    }
}

fn check_same_len(what: &str, expected: usize, found: usize) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} has {found} entries but confidence has {expected}"
        )))
    }
}

/// Prefixes an `InvalidArgument` message with the index it concerns.
pub(crate) fn at_index(index: usize, error: Error) -> Error {
    match error {
        Error::InvalidArgument(reason) => Error::InvalidArgument(format!("at {index}: {reason}")),
        other => other,
    }
}

/// The full report for `(confidence[i], correct[i])`, with the NLL when
/// `target_logprobs` (the log-probability given to the true outcome) is
/// supplied. Errors on empty or mismatched inputs, confidences outside
/// `[0, 1]`, NaN, or `n_bins == 0`.
pub fn calibration_report(
    confidence: &[f64],
    correct: &[bool],
    target_logprobs: Option<&[f64]>,
    n_bins: usize,
) -> Result<CalibrationReport> {
    let mut acc = CalibrationAccumulator::new(n_bins)?;
    match target_logprobs {
        Some(logprobs) => acc.push_slice_with_logprobs(confidence, correct, logprobs)?,
        None => acc.push_slice(confidence, correct)?,
    }
    acc.finish()
}

fn fixed_memory_report(
    confidence: &[f64],
    correct: &[bool],
    n_bins: usize,
) -> Result<CalibrationReport> {
    let mut acc = CalibrationAccumulator::fixed_memory(n_bins)?;
    acc.push_slice(confidence, correct)?;
    acc.finish()
}

/// The `n_bins` equal-width reliability bins (see the module docs for edges).
pub fn reliability_bins(
    confidence: &[f64],
    correct: &[bool],
    n_bins: usize,
) -> Result<Vec<ReliabilityBin>> {
    Ok(fixed_memory_report(confidence, correct, n_bins)?.bins)
}

/// Expected calibration error over `n_bins` equal-width bins:
/// `sum_b count_b / n * |accuracy_b - mean_confidence_b|`.
pub fn ece(confidence: &[f64], correct: &[bool], n_bins: usize) -> Result<f64> {
    Ok(fixed_memory_report(confidence, correct, n_bins)?.ece)
}

/// Maximum calibration error: the largest `|accuracy_b - mean_confidence_b|`
/// over the non-empty equal-width bins.
pub fn mce(confidence: &[f64], correct: &[bool], n_bins: usize) -> Result<f64> {
    Ok(fixed_memory_report(confidence, correct, n_bins)?.mce)
}

/// Adaptive (equal-mass) ECE.
///
/// The pairs are sorted by confidence (rounded to `f32`), ties broken by
/// putting incorrect before correct, and cut into `n_bins` consecutive runs
/// as `numpy.array_split` does: with `n` pairs the first `n % n_bins` runs
/// hold `n / n_bins + 1` pairs and the others `n / n_bins` (when
/// `n < n_bins` the last runs are empty and contribute nothing). The result
/// is `sum_runs size / n * |accuracy_run - mean_confidence_run|`.
pub fn adaptive_ece(confidence: &[f64], correct: &[bool], n_bins: usize) -> Result<f64> {
    calibration_report(confidence, correct, None, n_bins)?
        .adaptive_ece
        .ok_or_else(|| Error::Internal("adaptive ECE was not computed".into()))
}

/// Top-label Brier score: the mean of `(confidence - correct)^2`, with
/// `correct` as 0 or 1.
pub fn brier_top_label(confidence: &[f64], correct: &[bool]) -> Result<f64> {
    Ok(fixed_memory_report(confidence, correct, 1)?.brier)
}

/// Negative log-likelihood: the mean of `-target_logprobs[i]`, where each
/// entry is the natural-log probability given to the true outcome. Errors
/// on an empty slice or a non-finite or positive entry.
pub fn nll(target_logprobs: &[f64]) -> Result<f64> {
    if target_logprobs.is_empty() {
        return Err(Error::InvalidArgument(
            "no log-probabilities to average".into(),
        ));
    }
    let mut sum = 0.0;
    for (i, &lp) in target_logprobs.iter().enumerate() {
        sum -= check_logprob(lp).map_err(|e| at_index(i, e))?;
    }
    Ok(sum / target_logprobs.len() as f64)
}

/// Multi-class Brier score of one item: `sum_j (p_j - [j == gold])^2`
/// (not divided by the number of classes, so it lies in `[0, 2]`).
///
/// Errors if `probabilities` is empty, has an entry outside `[0, 1]` or NaN,
/// does not sum to 1 within 1e-4, or `gold` is out of range.
pub fn multiclass_brier_item(probabilities: &[f64], gold: usize) -> Result<f64> {
    if gold >= probabilities.len() {
        return Err(Error::InvalidArgument(format!(
            "gold index {gold} out of range for {} options",
            probabilities.len()
        )));
    }
    if let Some(p) = probabilities.iter().find(|p| !(0.0..=1.0).contains(*p)) {
        return Err(Error::InvalidArgument(format!(
            "probability must be in [0, 1], got {p}"
        )));
    }
    let total: f64 = probabilities.iter().sum();
    if (total - 1.0).abs() > PROBABILITY_SUM_TOLERANCE {
        return Err(Error::InvalidArgument(format!(
            "probabilities must sum to 1, got {total}"
        )));
    }
    Ok(probabilities
        .iter()
        .enumerate()
        .map(|(j, &p)| {
            let y = if j == gold { 1.0 } else { 0.0 };
            (p - y) * (p - y)
        })
        .sum())
}

/// Multi-class Brier score: the mean over items of
/// [`multiclass_brier_item`]`(probabilities[i], gold[i])`. Items may have
/// different numbers of options. Errors on empty or mismatched inputs or
/// any invalid item.
pub fn multiclass_brier<P: AsRef<[f64]>>(probabilities: &[P], gold: &[usize]) -> Result<f64> {
    if probabilities.is_empty() {
        return Err(Error::InvalidArgument(
            "no items for the multi-class Brier score".into(),
        ));
    }
    if probabilities.len() != gold.len() {
        return Err(Error::InvalidArgument(format!(
            "{} probability vectors but {} gold indices",
            probabilities.len(),
            gold.len()
        )));
    }
    let mut sum = 0.0;
    for (i, (p, &g)) in probabilities.iter().zip(gold).enumerate() {
        sum += multiclass_brier_item(p.as_ref(), g).map_err(|e| at_index(i, e))?;
    }
    Ok(sum / probabilities.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    // Fixture of 32 pairs: includes a confidence of exactly 1.0, one exactly
    // on an interior edge (0.80 = 12/15, which opens bin 12), and empty bins
    // 1 and 2.
    const CONFIDENCE: [f64; 32] = [
        1.0, 0.97, 0.93, 0.91, 0.88, 0.85, 0.82, 0.80, 0.77, 0.74, 0.72, 0.70, 0.66, 0.64, 0.61,
        0.58, 0.55, 0.52, 0.49, 0.47, 0.44, 0.41, 0.38, 0.36, 0.31, 0.29, 0.25, 0.22, 0.05, 0.03,
        0.97, 0.70,
    ];
    const CORRECT: [u8; 32] = [
        1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0,
        0, 1,
    ];
    const TARGET_LOGPROBS: [f64; 32] = [
        0.0,
        -0.030459207484708574,
        -0.07257069283483537,
        -3.5065578973199822,
        -0.12783337150988489,
        -0.16251892949777494,
        -2.813410716760036,
        -0.2231435513142097,
        -0.2613647641344075,
        -2.445685936634719,
        -0.3285040669720361,
        -2.3025850929940455,
        -0.4155154439616658,
        -0.4462871026284195,
        -2.0402208285265546,
        -0.5447271754416722,
        -1.8971199848858813,
        -1.8325814637483102,
        -0.7133498878774648,
        -1.7334905611040792,
        -1.6784307839210517,
        -0.8915981192837836,
        -1.5766480896111095,
        -1.5448993912965292,
        -1.4696759700589417,
        -1.2378743560016174,
        -1.3862943611198906,
        -1.3470736479666092,
        -1.1499055830556604,
        -1.1290714961528183,
        -4.605170185988091,
        -0.35667494393873245,
    ];

    fn correct() -> Vec<bool> {
        CORRECT.iter().map(|&y| y == 1).collect()
    }

    // Expected values printed by this independent numpy computation
    // (numpy 2.4.6):
    //
    // ```python
    // import numpy as np
    // conf = np.array([1.0, 0.97, 0.93, 0.91, 0.88, 0.85, 0.82, 0.80, 0.77, 0.74,
    //                  0.72, 0.70, 0.66, 0.64, 0.61, 0.58, 0.55, 0.52, 0.49, 0.47,
    //                  0.44, 0.41, 0.38, 0.36, 0.31, 0.29, 0.25, 0.22, 0.05, 0.03,
    //                  0.97, 0.70])
    // correct = np.array([1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0,
    //                     0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1], dtype=float)
    // n_bins = 15
    // edges = np.linspace(0.0, 1.0, n_bins + 1)          # equal to i/15 exactly
    // idx = np.digitize(conf, edges[1:-1], right=False)   # 1.0 -> bin 14
    // ece = 0.0; mce = 0.0
    // for b in range(n_bins):
    //     m = idx == b
    //     if m.sum() == 0:
    //         print("empty bin", b); continue
    //     gap = abs(correct[m].mean() - conf[m].mean())
    //     ece += m.sum() / len(conf) * gap
    //     mce = max(mce, gap)
    //     print("bin", b, int(m.sum()), repr(conf[m].mean()), repr(correct[m].mean()))
    // print("ece", repr(ece)); print("mce", repr(mce))
    // order = np.lexsort((correct, conf))                 # by conf, then correct
    // aece = 0.0
    // for part in np.array_split(order, n_bins):
    //     if len(part) == 0: continue
    //     aece += len(part) / len(conf) * abs(correct[part].mean() - conf[part].mean())
    // print("adaptive_ece", repr(aece))
    // print("brier", repr(np.mean((conf - correct) ** 2)))
    // print("accuracy", repr(correct.mean()), "mean_conf", repr(conf.mean()))
    // target_logprobs = np.log(np.where(correct == 1, conf, (1 - conf) / 3).clip(1e-3, 1.0))
    // print("nll", repr(np.mean(-target_logprobs)))
    // ```
    //
    // Output:
    // bin 0 2 0.04 0.0 / empty bin 1 / empty bin 2 / bin 3 2 0.235 0.0 /
    // bin 4 2 0.3 0.5 / bin 5 2 0.37 0.0 / bin 6 2 0.425 0.5 /
    // bin 7 3 0.49333333333333335 0.3333333333333333 / bin 8 2 0.565 0.5 /
    // bin 9 3 0.6366666666666667 0.6666666666666666 /
    // bin 10 3 0.7066666666666667 0.6666666666666666 / bin 11 2 0.755 0.5 /
    // bin 12 3 0.8233333333333333 0.6666666666666666 /
    // bin 13 3 0.9066666666666667 0.6666666666666666 /
    // bin 14 3 0.98 0.6666666666666666
    // ece 0.16562500000000002
    // mce 0.37
    // adaptive_ece 0.21937499999999996
    // brier 0.223775
    // accuracy 0.46875 mean_conf 0.594375
    // nll 1.2584763626257975
    #[test]
    fn fixture_matches_numpy() {
        let correct = correct();
        let report = calibration_report(&CONFIDENCE, &correct, Some(&TARGET_LOGPROBS), 15).unwrap();
        let expected_bins: [(u64, f64, f64); 15] = [
            (2, 0.04, 0.0),
            (0, 0.0, 0.0),
            (0, 0.0, 0.0),
            (2, 0.235, 0.0),
            (2, 0.3, 0.5),
            (2, 0.37, 0.0),
            (2, 0.425, 0.5),
            (3, 0.49333333333333335, 0.3333333333333333),
            (2, 0.565, 0.5),
            (3, 0.6366666666666667, 0.6666666666666666),
            (3, 0.7066666666666667, 0.6666666666666666),
            (2, 0.755, 0.5),
            (3, 0.8233333333333333, 0.6666666666666666),
            (3, 0.9066666666666667, 0.6666666666666666),
            (3, 0.98, 0.6666666666666666),
        ];
        assert_eq!(report.n, 32);
        assert_eq!(report.bins.len(), 15);
        for (i, (bin, &(count, conf, acc))) in report.bins.iter().zip(&expected_bins).enumerate() {
            assert_eq!(bin.count, count, "bin {i}");
            assert!(close(bin.mean_confidence, conf, 1e-12), "bin {i}: {bin:?}");
            assert!(close(bin.accuracy, acc, 1e-12), "bin {i}: {bin:?}");
            assert!(close(bin.lower, i as f64 / 15.0, 0.0));
            assert!(close(bin.upper, (i + 1) as f64 / 15.0, 0.0));
        }
        assert!(close(report.ece, 0.16562500000000002, 1e-12), "{report:?}");
        assert!(close(report.mce, 0.37, 1e-12), "{report:?}");
        // Adaptive ECE sees confidences rounded to f32.
        assert!(close(
            report.adaptive_ece.unwrap(),
            0.21937499999999996,
            1e-7
        ));
        assert!(close(report.brier, 0.223775, 1e-12));
        assert!(close(report.accuracy, 0.46875, 1e-12));
        assert!(close(report.mean_confidence, 0.594375, 1e-12));
        assert!(close(report.nll.unwrap(), 1.2584763626257975, 1e-12));
        assert_eq!(report.n_nll, 32);

        // The one-shot functions agree.
        assert!(close(
            ece(&CONFIDENCE, &correct, 15).unwrap(),
            report.ece,
            0.0
        ));
        assert!(close(
            mce(&CONFIDENCE, &correct, 15).unwrap(),
            report.mce,
            0.0
        ));
        assert!(close(
            adaptive_ece(&CONFIDENCE, &correct, 15).unwrap(),
            report.adaptive_ece.unwrap(),
            0.0
        ));
        assert!(close(
            brier_top_label(&CONFIDENCE, &correct).unwrap(),
            0.223775,
            1e-12
        ));
        assert!(close(
            nll(&TARGET_LOGPROBS).unwrap(),
            1.2584763626257975,
            1e-12
        ));
        assert_eq!(
            reliability_bins(&CONFIDENCE, &correct, 15).unwrap(),
            report.bins
        );
    }

    // ```python
    // probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0],
    //                   [0.05, 0.15, 0.6, 0.2], [0.4, 0.4, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])
    // gold = np.array([0, 2, 1, 3, 1, 0])
    // onehot = np.eye(4)[gold]
    // print("multiclass_brier", repr(np.mean(np.sum((probs - onehot) ** 2, axis=1))))
    // ```
    // Output: multiclass_brier 0.5891666666666667
    #[test]
    fn multiclass_brier_matches_numpy() {
        let probs = [
            vec![0.7, 0.1, 0.1, 0.1],
            vec![0.25, 0.25, 0.25, 0.25],
            vec![0.0, 1.0, 0.0, 0.0],
            vec![0.05, 0.15, 0.6, 0.2],
            vec![0.4, 0.4, 0.1, 0.1],
            vec![0.1, 0.2, 0.3, 0.4],
        ];
        let gold = [0, 2, 1, 3, 1, 0];
        let brier = multiclass_brier(&probs, &gold).unwrap();
        assert!(close(brier, 0.5891666666666667, 1e-12), "{brier}");
        assert!(close(
            multiclass_brier_item(&probs[2], 1).unwrap(),
            0.0,
            0.0
        ));
        assert!(close(
            multiclass_brier_item(&[0.0, 1.0], 0).unwrap(),
            2.0,
            0.0
        ));
    }

    /// torchmetrics' binning puts 1.0 in an extra bin `n`; here it must be in bin `n - 1`.
    #[test]
    fn confidence_one_goes_in_last_bin() {
        for n_bins in [1, 2, 10, 15, 20] {
            let bins = reliability_bins(&[1.0], &[true], n_bins).unwrap();
            assert_eq!(bins.len(), n_bins);
            assert_eq!(bins[n_bins - 1].count, 1);
            assert_eq!(bins[n_bins - 1].upper, 1.0);
            assert_eq!(bins.iter().map(|b| b.count).sum::<u64>(), 1);
        }
        let report = calibration_report(&[1.0, 1.0], &[true, true], None, 15).unwrap();
        assert_eq!(report.ece, 0.0);
        assert_eq!(report.mce, 0.0);
        assert_eq!(report.adaptive_ece, Some(0.0));
        assert_eq!(report.bins[14].count, 2);
    }

    #[test]
    fn edges_open_their_bin() {
        for n_bins in [3, 7, 10, 15, 30, 100] {
            for i in 0..n_bins {
                let edge = i as f64 / n_bins as f64;
                assert_eq!(bin_index(edge, n_bins), i, "edge {i}/{n_bins}");
                let below = f64::from_bits(edge.to_bits().saturating_sub(1));
                if i > 0 {
                    assert_eq!(bin_index(below, n_bins), i - 1, "below {i}/{n_bins}");
                }
            }
            assert_eq!(bin_index(0.0, n_bins), 0);
            assert_eq!(bin_index(-0.0, n_bins), 0);
            assert_eq!(bin_index(1.0, n_bins), n_bins - 1);
            assert_eq!(bin_index(0.999_999_999, n_bins), n_bins - 1);
        }
    }

    #[test]
    fn streaming_chunks_and_merge_match_one_shot() {
        let correct = correct();
        let one_shot =
            calibration_report(&CONFIDENCE, &correct, Some(&TARGET_LOGPROBS), 15).unwrap();

        // One pair at a time.
        let mut single = CalibrationAccumulator::new(15).unwrap();
        for ((&c, &y), &lp) in CONFIDENCE.iter().zip(&correct).zip(&TARGET_LOGPROBS) {
            single.push_with_logprob(c, y, lp).unwrap();
        }
        // Uneven chunks into three accumulators, merged out of order.
        let mut parts: Vec<CalibrationAccumulator> = [0..5, 5..19, 19..32]
            .into_iter()
            .map(|range| {
                let mut acc = CalibrationAccumulator::new(15).unwrap();
                acc.push_slice_with_logprobs(
                    &CONFIDENCE[range.clone()],
                    &correct[range.clone()],
                    &TARGET_LOGPROBS[range],
                )
                .unwrap();
                acc
            })
            .collect();
        let mut merged = parts.pop().unwrap();
        merged.merge(parts.remove(0)).unwrap();
        merged.merge(parts.remove(0)).unwrap();
        assert_eq!(merged.len(), 32);

        for report in [single.report().unwrap(), merged.finish().unwrap()] {
            assert_eq!(report.n, one_shot.n);
            assert_eq!(report.n_nll, one_shot.n_nll);
            assert_eq!(report.adaptive_ece, one_shot.adaptive_ece);
            for (field, a, b) in [
                ("ece", report.ece, one_shot.ece),
                ("mce", report.mce, one_shot.mce),
                ("brier", report.brier, one_shot.brier),
                ("accuracy", report.accuracy, one_shot.accuracy),
                (
                    "mean_confidence",
                    report.mean_confidence,
                    one_shot.mean_confidence,
                ),
                ("nll", report.nll.unwrap(), one_shot.nll.unwrap()),
            ] {
                assert!(close(a, b, 1e-12), "{field}: {a} vs {b}");
            }
            for (a, b) in report.bins.iter().zip(&one_shot.bins) {
                assert_eq!(a.count, b.count);
                assert!(close(a.mean_confidence, b.mean_confidence, 1e-12));
                assert_eq!(a.accuracy, b.accuracy);
            }
        }
        // `report` leaves the accumulator usable.
        single.push(0.5, true).unwrap();
        assert_eq!(single.finish().unwrap().n, 33);

        // Fixed-memory accumulators agree except for the adaptive ECE.
        let mut fixed = CalibrationAccumulator::fixed_memory(15).unwrap();
        fixed.push_slice(&CONFIDENCE, &correct).unwrap();
        let fixed = fixed.finish().unwrap();
        assert_eq!(fixed.adaptive_ece, None);
        assert_eq!(fixed.nll, None);
        assert_eq!(fixed.n_nll, 0);
        assert_eq!(fixed.ece, one_shot.ece);
    }

    #[test]
    fn adaptive_ece_splits_like_array_split() {
        // 3 pairs, 15 bins: three singleton runs, twelve empty ones.
        let value = adaptive_ece(&[0.9, 0.2, 0.6], &[true, true, false], 15).unwrap();
        let expected = (0.8 + 0.1 + 0.6) / 3.0;
        assert!(close(value, expected, 1e-7), "{value}");
        // 5 pairs, 2 bins: runs of 3 and 2 on the sorted order
        // [0.1 F, 0.3 T, 0.3 F] -> sorted (0.1 F), (0.3 F), (0.3 T) | (0.7 T), (0.8 F).
        let value = adaptive_ece(
            &[0.3, 0.8, 0.1, 0.7, 0.3],
            &[true, false, false, true, false],
            2,
        )
        .unwrap();
        let first = (1.0f64 / 3.0 - (0.1 + 0.3 + 0.3) / 3.0).abs();
        let second = (0.5f64 - 0.75).abs();
        let expected = 3.0 / 5.0 * first + 2.0 / 5.0 * second;
        assert!(close(value, expected, 1e-7), "{value} vs {expected}");
        // Ties between correct and incorrect: order of input does not matter.
        let a = adaptive_ece(&[0.5, 0.5, 0.5, 0.9], &[true, false, true, false], 2).unwrap();
        let b = adaptive_ece(&[0.9, 0.5, 0.5, 0.5], &[false, true, true, false], 2).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let invalid = |r: Result<f64>| matches!(r, Err(Error::InvalidArgument(_)));
        assert!(invalid(ece(&[], &[], 15)));
        assert!(invalid(mce(&[], &[], 15)));
        assert!(invalid(adaptive_ece(&[], &[], 15)));
        assert!(invalid(brier_top_label(&[], &[])));
        assert!(invalid(nll(&[])));
        assert!(invalid(ece(&[f64::NAN], &[true], 15)));
        assert!(invalid(ece(&[1.5], &[true], 15)));
        assert!(invalid(ece(&[-0.1], &[true], 15)));
        assert!(invalid(ece(&[f64::INFINITY], &[true], 15)));
        assert!(invalid(ece(&[0.5, 0.5], &[true], 15)));
        assert!(invalid(ece(&[0.5], &[true], 0)));
        assert!(invalid(nll(&[f64::NAN])));
        assert!(invalid(nll(&[f64::NEG_INFINITY])));
        assert!(invalid(nll(&[0.5])));
        assert!(close(nll(&[1e-6, -1.0]).unwrap(), 0.5, 0.0));
        assert!(calibration_report(&[0.5], &[true], Some(&[]), 15).is_err());
        assert!(calibration_report(&[0.5], &[true], Some(&[f64::NAN]), 15).is_err());
        assert!(invalid(multiclass_brier::<Vec<f64>>(&[], &[])));
        assert!(invalid(multiclass_brier(&[vec![0.5, 0.5]], &[])));
        assert!(invalid(multiclass_brier(&[vec![0.5, 0.5]], &[2])));
        assert!(invalid(multiclass_brier(&[vec![0.5, 0.6]], &[0])));
        assert!(invalid(multiclass_brier(&[vec![f64::NAN, 1.0]], &[0])));
        assert!(invalid(multiclass_brier(&[Vec::<f64>::new()], &[0])));

        let mut acc = CalibrationAccumulator::new(15).unwrap();
        assert!(CalibrationAccumulator::new(0).is_err());
        assert!(acc.push(f64::NAN, true).is_err());
        assert!(acc.push_with_logprob(0.5, true, f64::NAN).is_err());
        assert!(acc.push_slice(&[0.5, f64::NAN], &[true, true]).is_err());
        assert!(acc.is_empty(), "failed pushes must add nothing");
        assert!(acc.report().is_err());
        assert!(acc.clone().finish().is_err());
        assert!(acc.merge(CalibrationAccumulator::new(10).unwrap()).is_err());
        assert!(acc
            .merge(CalibrationAccumulator::fixed_memory(15).unwrap())
            .is_err());
    }

    #[test]
    fn report_serializes_to_json() {
        let report = calibration_report(&CONFIDENCE, &correct(), None, 15).unwrap();
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["n"], 32);
        assert_eq!(json["nll"], serde_json::Value::Null);
        assert_eq!(json["bins"].as_array().unwrap().len(), 15);
        // serde_json may round a parsed float by an ulp, so compare loosely.
        let back: CalibrationReport = serde_json::from_value(json).unwrap();
        assert_eq!(back.n, report.n);
        assert_eq!(back.bins.len(), report.bins.len());
        assert!(close(back.ece, report.ece, 1e-15));
    }
}
