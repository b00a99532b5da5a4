//! Per-position selection over one row of logits: log-softmax, top-k, entropy and the
//! log-prob of the target token, in two passes over the vocabulary and without
//! materialising a log-prob copy of the row.
//!
//! With `m = max_i x_i`, `s = Σ exp(x_i - m)` and `t = Σ exp(x_i - m)(x_i - m)`:
//! `lse = m + ln s`, `logp_i = x_i - lse` and the entropy
//! `H = -Σ p_i logp_i = ln s - t / s` (since `logp_i = (x_i - m) - ln s` and `Σ p_i = 1`).
//!
//! Pass 1 keeps a running top-k (which also yields `m`); pass 2 accumulates `s` and `t` with a
//! vectorisable `exp` over lanes of 16. `-inf` logits contribute exactly nothing.

use super::kernels::{exp_approx, LANES};
use crate::error::{Error, Result};

/// What [`select_row`] computes for one position.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSelection {
    /// Top-k token ids, by descending log-prob; ties broken by the smaller id first.
    pub topk_ids: Vec<u32>,
    /// Full-vocabulary log-probs of `topk_ids`, descending.
    pub topk_logprobs: Vec<f32>,
    /// Log-prob of the target token, when one was given.
    pub target_logprob: Option<f32>,
    /// Entropy of the full distribution, in nats.
    pub entropy: f32,
}

/// Selects top-`k`, entropy and the target's log-prob from one row of logits
/// (already divided by the temperature, if any).
///
/// Errors when `k` is 0 or larger than the row, the target is out of range, or the row has no
/// finite maximum (all `-inf`, a `+inf`, or NaN).
pub fn select_row(logits: &[f32], k: usize, target: Option<u32>) -> Result<RowSelection> {
    let mut out = RowSelection {
        topk_ids: Vec::with_capacity(k),
        topk_logprobs: Vec::with_capacity(k),
        target_logprob: None,
        entropy: 0.0,
    };
    select_row_into(logits, k, target, &mut out)?;
    Ok(out)
}

/// [`select_row`] writing into an existing value (its vectors are cleared and reused).
pub fn select_row_into(
    logits: &[f32],
    k: usize,
    target: Option<u32>,
    out: &mut RowSelection,
) -> Result<()> {
    if k == 0 || k > logits.len() {
        return Err(Error::InvalidArgument(format!(
            "top-k of {k} over a row of {} logits",
            logits.len()
        )));
    }
    if let Some(t) = target {
        if t as usize >= logits.len() {
            return Err(Error::InvalidArgument(format!(
                "target id {t} outside a vocabulary of {}",
                logits.len()
            )));
        }
    }
    top_k(logits, k, &mut out.topk_ids, &mut out.topk_logprobs);
    let max = out.topk_logprobs[0];
    if !max.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "logits row has no finite maximum (max = {max})"
        )));
    }
    let (sum, weighted) = exp_sums(logits, max);
    if !(sum.is_finite() && weighted.is_finite()) {
        return Err(Error::InvalidArgument(
            "logits row contains NaN or +inf".to_string(),
        ));
    }
    let ln_sum = sum.ln();
    let lse = max as f64 + ln_sum;
    for v in out.topk_logprobs.iter_mut() {
        *v = (*v as f64 - lse) as f32;
    }
    out.target_logprob = target.map(|t| (logits[t as usize] as f64 - lse) as f32);
    out.entropy = (ln_sum - weighted / sum).max(0.0) as f32;
    Ok(())
}

/// Running top-k by value (descending), ids ascending among equal values. Leaves the raw
/// values (not yet normalised) in `vals`.
fn top_k(row: &[f32], k: usize, ids: &mut Vec<u32>, vals: &mut Vec<f32>) {
    ids.clear();
    vals.clear();
    // Seed with the first k entries, sorted (stable sort keeps smaller ids first on ties).
    let mut seed: Vec<(u32, f32)> = row[..k]
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v))
        .collect();
    seed.sort_by(|a, b| desc(a.1, b.1));
    for (i, v) in seed {
        ids.push(i);
        vals.push(v);
    }
    let start = k;
    let rest = &row[start..];
    let chunks = rest.chunks_exact(LANES);
    let tail = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        // Cheap vectorised screen: most chunks hold nothing above the current k-th value.
        // (NaN is skipped here; the sums in pass 2 report it.)
        let mut m = f32::NEG_INFINITY;
        for &v in chunk {
            m = if v > m { v } else { m };
        }
        if m > vals[k - 1] {
            for (j, &v) in chunk.iter().enumerate() {
                insert_sorted(ids, vals, (start + c * LANES + j) as u32, v);
            }
        }
    }
    let tail_start = row.len() - tail.len();
    for (j, &v) in tail.iter().enumerate() {
        insert_sorted(ids, vals, (tail_start + j) as u32, v);
    }
}

/// Inserts `(id, v)` into the sorted top-k arrays if `v` beats the current k-th value. Strictly
/// greater only: an equal value at a larger id never displaces a smaller id (ids arrive in
/// increasing order).
#[inline]
fn insert_sorted(ids: &mut Vec<u32>, vals: &mut Vec<f32>, id: u32, v: f32) {
    let k = vals.len();
    if greater(v, vals[k - 1]) {
        let pos = vals.iter().position(|&w| greater(v, w)).unwrap_or(k - 1);
        vals.pop();
        ids.pop();
        vals.insert(pos, v);
        ids.insert(pos, id);
    }
}

/// `a > b` where NaN counts as larger than everything (so a NaN row is reported, not hidden).
#[inline]
fn greater(a: f32, b: f32) -> bool {
    if a.is_nan() {
        !b.is_nan()
    } else {
        a > b
    }
}

fn desc(a: f32, b: f32) -> std::cmp::Ordering {
    if greater(a, b) {
        std::cmp::Ordering::Less
    } else if greater(b, a) {
        std::cmp::Ordering::Greater
    } else {
        std::cmp::Ordering::Equal
    }
}

/// Returns `(Σ exp(x - max), Σ exp(x - max)(x - max))` accumulated in f32 lanes, summed in f64.
fn exp_sums(row: &[f32], max: f32) -> (f64, f64) {
    let mut s = [0f32; LANES];
    let mut t = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for l in 0..LANES {
            let d = chunk[l] - max;
            let e = exp_approx(d);
            s[l] += e;
            // -inf logits: d = -inf, e = tiny; clamp d so that e * d stays finite and ~0.
            t[l] += e * d.max(-88.0);
        }
    }
    let mut sum: f64 = s.iter().map(|&v| v as f64).sum();
    let mut weighted: f64 = t.iter().map(|&v| v as f64).sum();
    for &x in tail {
        let d = (x - max) as f64;
        let e = d.exp();
        sum += e;
        if e > 0.0 {
            weighted += e * d;
        }
    }
    // A NaN anywhere has poisoned the sums (clamp and max propagate it), so the caller reports it.
    (sum, weighted)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference in f64 the slow way.
    fn naive(row: &[f32], k: usize, target: u32) -> (Vec<u32>, Vec<f64>, f64, f64) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        let lse = m + s.ln();
        let lp: Vec<f64> = row.iter().map(|&x| x as f64 - lse).collect();
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        idx.sort_by(|&a, &b| {
            lp[b as usize]
                .partial_cmp(&lp[a as usize])
                .unwrap()
                .then(a.cmp(&b))
        });
        idx.truncate(k);
        let vals = idx.iter().map(|&i| lp[i as usize]).collect();
        let h: f64 = lp
            .iter()
            .filter(|v| v.is_finite())
            .map(|&v| -v.exp() * v)
            .sum();
        (idx, vals, h, lp[target as usize])
    }

    #[test]
    fn hand_made_row_with_ties_and_neg_inf() {
        // ids:        0    1     2    3     4     5    6
        let row = [1.0f32, 3.0, 3.0, f32::NEG_INFINITY, 2.0, 3.0, 0.5];
        let sel = select_row(&row, 4, Some(3)).unwrap();
        // Three-way tie at 3.0: smaller ids first.
        assert_eq!(sel.topk_ids, vec![1, 2, 5, 4]);
        // python: x = [1, 3, 3, 2, 3, .5]; math.log(sum(math.exp(v) for v in x)) = 4.276842075...
        let lse = 4.276_842_f32;
        assert!((sel.topk_logprobs[0] - (3.0 - lse)).abs() < 1e-6);
        assert!((sel.topk_logprobs[3] - (2.0 - lse)).abs() < 1e-6);
        assert_eq!(sel.target_logprob, Some(f32::NEG_INFINITY));
        let (_, _, h, _) = naive(&row, 4, 0);
        assert!(
            (sel.entropy as f64 - h).abs() < 1e-6,
            "{} vs {h}",
            sel.entropy
        );
        assert!(sel.entropy.is_finite());
    }

    #[test]
    fn tie_across_chunk_boundary_keeps_smaller_id() {
        let mut row = vec![0.0f32; 100];
        row[70] = 5.0;
        row[3] = 5.0;
        row[40] = 5.0;
        let sel = select_row(&row, 2, None).unwrap();
        assert_eq!(sel.topk_ids, vec![3, 40]);
    }

    #[test]
    fn matches_naive_on_a_long_pseudo_random_row() {
        let mut state = 12345u64;
        let row: Vec<f32> = (0..49_157)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 30.0 - 20.0
            })
            .collect();
        let sel = select_row(&row, 5, Some(777)).unwrap();
        let (ids, vals, h, t) = naive(&row, 5, 777);
        assert_eq!(sel.topk_ids, ids);
        for (a, b) in sel.topk_logprobs.iter().zip(&vals) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(
            (sel.entropy as f64 - h).abs() < 1e-4,
            "{} vs {h}",
            sel.entropy
        );
        assert!((sel.target_logprob.unwrap() as f64 - t).abs() < 1e-5);
    }

    #[test]
    fn rejects_bad_rows_and_arguments() {
        assert!(select_row(&[f32::NEG_INFINITY; 3], 1, None).is_err());
        assert!(select_row(&[0.0, f32::NAN, 1.0], 1, None).is_err());
        assert!(select_row(&[0.0; 40], 1, None).is_ok());
        let mut with_nan = vec![0.0f32; 40];
        with_nan[33] = f32::NAN;
        assert!(select_row(&with_nan, 2, None).is_err());
        assert!(select_row(&[0.0, 1.0], 3, None).is_err());
        assert!(select_row(&[0.0, 1.0], 0, None).is_err());
        assert!(select_row(&[0.0, 1.0], 1, Some(2)).is_err());
    }
}
