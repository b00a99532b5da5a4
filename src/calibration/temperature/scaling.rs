//! The arithmetic of a temperature on a stored top-k list: the uniform tail that stands for
//! the mass outside it, the log-normaliser at `1 / T`, and the top-1 confidence and target
//! log-probability it gives.

use super::{TemperatureMode, TopKPosition};

/// The uniform tail of [`TemperatureMode::UniformTail`]: `count = V - k`
/// tokens of log-probability `logprob` each.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Tail {
    pub(super) ln_count: f64,
    pub(super) logprob: f64,
}

impl Tail {
    /// `log((V - k) exp(lt / T))`: the tail's term in the log-normaliser.
    pub(super) fn term(&self, inv_t: f64) -> f64 {
        self.ln_count + self.logprob * inv_t
    }
}

/// The tail under `mode`: `None` for `Renormalized`, when `V == k`, or when
/// the stored top-k already holds all the mass (`m <= 0` from rounding).
pub(super) fn tail_of(logprobs: &[f32], vocab_size: usize, mode: TemperatureMode) -> Option<Tail> {
    if mode == TemperatureMode::Renormalized || vocab_size <= logprobs.len() {
        return None;
    }
    let top_mass: f64 = logprobs.iter().map(|&lp| f64::from(lp).exp()).sum();
    let mass = 1.0 - top_mass;
    if mass <= 0.0 {
        return None;
    }
    let count = (vocab_size - logprobs.len()) as f64;
    Some(Tail {
        ln_count: count.ln(),
        logprob: mass.ln() - count.ln(),
    })
}

/// `log S(T)`: log-sum-exp of `lp_i / T` over the top-k plus the tail term.
/// Needs `inv_t` in `[1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE]` and finite
/// log-probabilities, which keep every term finite.
pub(super) fn log_normaliser(logprobs: &[f32], tail: Option<Tail>, inv_t: f64) -> f64 {
    let top = f64::from(logprobs[0]) * inv_t;
    let tail_term = tail.map(|t| t.term(inv_t));
    let max = tail_term.map_or(top, |term| term.max(top));
    let mut sum: f64 = logprobs
        .iter()
        .map(|&lp| (f64::from(lp) * inv_t - max).exp())
        .sum();
    if let Some(term) = tail_term {
        sum += (term - max).exp();
    }
    max + sum.ln()
}

pub(super) fn top1_confidence(logprobs: &[f32], inv_t: f64, log_z: f64) -> f64 {
    (f64::from(logprobs[0]) * inv_t - log_z).exp().min(1.0)
}

pub(super) fn target_logprob(
    position: &TopKPosition<'_>,
    mode: TemperatureMode,
    inv_t: f64,
    log_z: f64,
) -> Option<f64> {
    let stored = match mode {
        TemperatureMode::Renormalized => f64::from(position.logprobs[position.target_rank?]),
        TemperatureMode::UniformTail => f64::from(position.target_logprob),
    };
    Some((stored * inv_t - log_z).min(0.0))
}
