//! Accuracy and calibration of one scoring mode, from the per-option scores.

use serde::{Deserialize, Serialize};

use super::score::ItemScores;
use super::Mode;
use crate::calibration::{calibration_report, multiclass_brier, CalibrationReport};
use crate::error::{Error, Result};

/// Accuracy and calibration of one mode over a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeReport {
    /// `letter` or `cloze`.
    pub mode: String,
    /// Number of items.
    pub n: u64,
    /// Temperature the option scores were divided by before the softmax over options.
    pub temperature: f64,
    /// Fraction of items whose highest-scoring option is the gold one.
    pub accuracy: f64,
    /// Cloze only: accuracy when options are ranked by summed log-prob per UTF-8 byte of the
    /// continuation (lm-evaluation-harness `acc_norm`).
    pub acc_norm: Option<f64>,
    /// Multi-class Brier score over the options, `sum_j (p_j - [j = gold])^2`, averaged.
    pub brier_multiclass: f64,
    /// Letter only: mean full-vocabulary probability of the chosen letter (before
    /// renormalising over the options); low values mean the model mostly wants to say something
    /// other than a letter.
    pub mean_letter_mass: Option<f64>,
    /// Top-label calibration: confidence = the chosen option's probability over the options,
    /// correct = chosen is gold; NLL is of the gold option. ECE over 15 equal-width bins.
    pub calibration: CalibrationReport,
}

/// Softmax of `scores / temperature`.
pub fn option_probabilities(scores: &[f64], temperature: f64) -> Vec<f64> {
    let max = scores
        .iter()
        .map(|s| s / temperature)
        .fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = scores
        .iter()
        .map(|s| (s / temperature - max).exp())
        .collect();
    let total: f64 = exps.iter().sum();
    exps.iter().map(|e| e / total).collect()
}

/// Index of the largest value (the first one on ties).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

impl ModeReport {
    /// Computes the report of `mode` (letter or cloze) from the scores of every item.
    /// `temperature` divides the option scores before the softmax over options (for letter
    /// scores it was already applied to the logits; pass 1.0 there).
    pub fn from_scores(
        mode: Mode,
        scores: &[ItemScores],
        temperature: f64,
        n_bins: usize,
    ) -> Result<Self> {
        let n = scores.len();
        let mut confidence = Vec::with_capacity(n);
        let mut correct = Vec::with_capacity(n);
        let mut gold_logprob = Vec::with_capacity(n);
        let mut probabilities = Vec::with_capacity(n);
        let mut golds = Vec::with_capacity(n);
        let mut norm_correct = 0usize;
        let mut letter_mass = 0.0;
        for item in scores {
            let (option_scores, option_temperature) = match mode {
                Mode::Letter => (item.letter_logprobs.as_ref(), 1.0),
                Mode::Cloze => (item.cloze_logprobs.as_ref(), temperature),
                Mode::Both => return Err(Error::Internal("a report covers one mode".to_string())),
            };
            let option_scores = option_scores.ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "item at line {} has no {} scores",
                    item.line,
                    mode.as_str()
                ))
            })?;
            if item.gold >= option_scores.len() {
                return Err(Error::InvalidArgument(format!(
                    "item at line {}: gold {} out of range",
                    item.line, item.gold
                )));
            }
            let p = option_probabilities(option_scores, option_temperature);
            let chosen = argmax(option_scores);
            confidence.push(p[chosen]);
            correct.push(chosen == item.gold);
            gold_logprob.push(p[item.gold].max(f64::MIN_POSITIVE).ln());
            if mode == Mode::Letter {
                letter_mass += option_scores[chosen].exp();
            }
            if let (Mode::Cloze, Some(bytes)) = (mode, &item.cloze_bytes) {
                let per_byte: Vec<f64> = option_scores
                    .iter()
                    .zip(bytes)
                    .map(|(s, &b)| s / b.max(1) as f64)
                    .collect();
                norm_correct += usize::from(argmax(&per_byte) == item.gold);
            }
            probabilities.push(p);
            golds.push(item.gold);
        }
        let calibration = calibration_report(&confidence, &correct, Some(&gold_logprob), n_bins)?;
        Ok(Self {
            mode: mode.as_str().to_string(),
            n: n as u64,
            temperature,
            accuracy: calibration.accuracy,
            acc_norm: (mode == Mode::Cloze).then(|| norm_correct as f64 / n.max(1) as f64),
            brier_multiclass: multiclass_brier(&probabilities, &golds)?,
            mean_letter_mass: (mode == Mode::Letter).then(|| letter_mass / n.max(1) as f64),
            calibration,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(gold: usize, cloze: Vec<f64>, bytes: Vec<usize>) -> ItemScores {
        ItemScores {
            line: 1,
            gold,
            letter_logprobs: None,
            cloze_logprobs: Some(cloze),
            cloze_bytes: Some(bytes),
        }
    }

    // numpy:
    //   s = np.array([[-1.0, -2.0, -6.0], [-4.0, -3.0, -9.0]]); gold = [0, 2]
    //   b = np.array([[3, 2, 12], [2, 2, 30]])
    //   p = np.exp(s) / np.exp(s).sum(1, keepdims=True)
    //   conf = p.max(1) -> [0.72747516, 0.72973621] (one bin); acc 0.5
    //   ((p - np.eye(3)[gold])**2).sum(1).mean() -> 0.8734422867529432
    //   -np.log(p[[0, 1], gold]).mean()          -> 3.316623794956352
    //   abs(0.5 - conf.mean())                    -> 0.22860568545944004 (ECE)
    //   ((s / b).argmax(1) == gold).mean()        -> 1.0 (acc_norm)
    #[test]
    fn cloze_report_by_hand() {
        let scores = vec![
            item(0, vec![-1.0, -2.0, -6.0], vec![3, 2, 12]),
            item(2, vec![-4.0, -3.0, -9.0], vec![2, 2, 30]),
        ];
        let r = ModeReport::from_scores(Mode::Cloze, &scores, 1.0, 15).unwrap();
        assert_eq!(r.accuracy, 0.5);
        assert_eq!(r.acc_norm, Some(1.0));
        assert!((r.brier_multiclass - 0.873_442_286_752_943_2).abs() < 1e-12);
        assert!((r.calibration.nll.unwrap() - 3.316_623_794_956_352).abs() < 1e-12);
        assert!((r.calibration.ece - 0.228_605_685_459_440_04).abs() < 1e-7);
        // Temperature flattens the distribution but keeps the ranking.
        let hot = ModeReport::from_scores(Mode::Cloze, &scores, 4.0, 15).unwrap();
        assert_eq!(hot.accuracy, r.accuracy);
        assert!(hot.calibration.mean_confidence < r.calibration.mean_confidence);
    }
}
