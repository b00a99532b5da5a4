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
use crate::schema::Selection;

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
    /// Draws of each id (sample selection only, else empty).
    pub counts: Vec<u16>,
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
        counts: Vec::new(),
    };
    select_row_into(logits, k, target, &mut out)?;
    Ok(out)
}

/// SplitMix64: the seeded, platform-independent generator of the sample selection's draws.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of one position's draws: a function of the selection's seed, the sample id and
/// the position only, so a resumed or sharded run draws the same tokens.
pub fn position_seed(select: &Selection, sample_id: u64, position: u64) -> u64 {
    let seed = match select {
        Selection::Sample { seed, .. } => *seed,
        _ => 0,
    };
    let mut s = seed;
    let a = splitmix64(&mut s);
    let mut s = a ^ sample_id;
    let b = splitmix64(&mut s);
    let mut s = b ^ position;
    splitmix64(&mut s)
}

/// One row's selection in any mode (`seed` from [`position_seed`]; used by sample only).
pub fn select_row_with(
    logits: &[f32],
    select: &Selection,
    target: Option<u32>,
    seed: u64,
) -> Result<RowSelection> {
    match *select {
        Selection::TopK { k } => select_row(logits, k, target),
        Selection::TopP { p, max } => {
            let mut out = select_row(logits, max, target)?;
            let mut mass = 0.0f64;
            let mut keep = out.topk_ids.len();
            for (j, &lp) in out.topk_logprobs.iter().enumerate() {
                mass += f64::from(lp).exp();
                if mass >= p {
                    keep = j + 1;
                    break;
                }
            }
            out.topk_ids.truncate(keep);
            out.topk_logprobs.truncate(keep);
            Ok(out)
        }
        Selection::Sample {
            draws, temperature, ..
        } => sample_row(logits, draws, temperature, target, seed),
    }
}

/// Sparse Logit Sampling for one row: `draws` draws with replacement from
/// `softmax(logits / temperature)`, returned as the distinct ids (by descending
/// full-vocabulary log-prob at temperature 1, ties by id) with their counts.
fn sample_row(
    logits: &[f32],
    draws: u32,
    temperature: f64,
    target: Option<u32>,
    seed: u64,
) -> Result<RowSelection> {
    // Entropy, target log-prob and the normaliser come from the top-1 pass.
    let mut out = select_row(logits, 1, target)?;
    let max = f64::from(logits[out.topk_ids[0] as usize]);
    let lse = max - f64::from(out.topk_logprobs[0]);
    let inv_t = 1.0 / temperature;
    let weight = |x: f32| {
        let x = f64::from(x);
        if x.is_finite() {
            ((x - max) * inv_t).exp()
        } else {
            0.0
        }
    };
    // One exp per logit: the weights are kept for the walk below.
    let weights: Vec<f64> = logits.iter().map(|&x| weight(x)).collect();
    let total: f64 = weights.iter().sum();
    let mut state = seed;
    let mut u: Vec<f64> = (0..draws)
        .map(|_| (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64 * total)
        .collect();
    u.sort_by(f64::total_cmp);
    let mut picked: Vec<(u32, u16)> = Vec::new();
    let (mut cum, mut next) = (0.0f64, 0usize);
    for (i, &w) in weights.iter().enumerate() {
        if next == u.len() {
            break;
        }
        cum += w;
        let mut c = 0u16;
        while next < u.len() && u[next] < cum {
            next += 1;
            c += 1;
        }
        if c > 0 {
            picked.push((i as u32, c));
        }
    }
    // Rounding can leave the last draws above the accumulated total: they go to the last
    // token with weight.
    if next < u.len() {
        let last = weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32;
        let rest = (u.len() - next) as u16;
        match picked.last_mut() {
            Some(p) if p.0 == last => p.1 += rest,
            _ => picked.push((last, rest)),
        }
    }
    let mut rows: Vec<(f32, u32, u16)> = picked
        .into_iter()
        .map(|(id, c)| ((f64::from(logits[id as usize]) - lse) as f32, id, c))
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    out.topk_ids = rows.iter().map(|r| r.1).collect();
    out.topk_logprobs = rows.iter().map(|r| r.0.min(0.0)).collect();
    out.counts = rows.iter().map(|r| r.2).collect();
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
        return Err(Error::Internal(format!(
            "top-k of {k} over a row of {} logits",
            logits.len()
        )));
    }
    if let Some(t) = target {
        if t as usize >= logits.len() {
            return Err(Error::Internal(format!(
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

    fn softmax(row: &[f32], t: f64) -> Vec<f64> {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let w: Vec<f64> = row.iter().map(|&x| ((x as f64 - m) / t).exp()).collect();
        let s: f64 = w.iter().sum();
        w.into_iter().map(|x| x / s).collect()
    }

    /// The sampled estimate count / N is unbiased: averaged over many positions (seeds), each
    /// token's estimate matches its probability at the sampling temperature within 5 standard
    /// errors, and the stored log-probs are the full-vocabulary ones at temperature 1.
    #[test]
    fn sampled_estimates_are_unbiased_and_deterministic() {
        let row: Vec<f32> = vec![2.0, 1.5, 0.3, -0.2, -1.0, -3.0, -4.5, f32::NEG_INFINITY];
        for (t, draws) in [(1.0, 12u32), (2.0, 12), (0.7, 50)] {
            let select = Selection::Sample {
                draws,
                temperature: t,
                seed: 11,
            };
            let p = softmax(&row, t);
            let p1 = softmax(&row, 1.0);
            let positions = 4000u64;
            let mut mean = vec![0f64; row.len()];
            for pos in 0..positions {
                let seed = position_seed(&select, 7, pos);
                let sel = select_row_with(&row, &select, Some(0), seed).unwrap();
                assert_eq!(sel.counts.iter().map(|&c| u32::from(c)).sum::<u32>(), draws);
                assert_eq!(sel.counts.len(), sel.topk_ids.len());
                for w in sel.topk_logprobs.windows(2) {
                    assert!(w[0] >= w[1]);
                }
                for ((&id, &c), &lp) in sel.topk_ids.iter().zip(&sel.counts).zip(&sel.topk_logprobs)
                {
                    assert!(id != 7, "a -inf logit is never drawn");
                    assert!((f64::from(lp) - p1[id as usize].ln()).abs() < 1e-4);
                    mean[id as usize] += f64::from(c) / f64::from(draws) / positions as f64;
                }
                // Same seed, same draws.
                assert_eq!(sel, select_row_with(&row, &select, Some(0), seed).unwrap());
            }
            for (i, (&m, &q)) in mean.iter().zip(&p).enumerate() {
                let se = (q * (1.0 - q) / (f64::from(draws) * positions as f64)).sqrt();
                assert!(
                    (m - q).abs() <= 5.0 * se + 1e-12,
                    "t {t} token {i}: {m} vs {q} (se {se})"
                );
            }
        }
        // Different positions and sample ids draw differently.
        let s = Selection::Sample {
            draws: 4,
            temperature: 1.0,
            seed: 0,
        };
        assert_ne!(position_seed(&s, 1, 2), position_seed(&s, 2, 1));
        assert_ne!(
            position_seed(&s, 1, 2),
            position_seed(
                &Selection::Sample {
                    draws: 4,
                    temperature: 1.0,
                    seed: 1
                },
                1,
                2
            )
        );
    }

    /// Top-p keeps the smallest prefix of the top-`max` reaching the mass `p`.
    #[test]
    fn top_p_lists_are_the_smallest_prefix_reaching_p() {
        let mut state = 3u64;
        for case in 0..500 {
            let scale = 0.2 + (case % 10) as f32;
            let row: Vec<f32> = (0..64)
                .map(|_| (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32 * scale)
                .collect();
            for (p, max) in [(0.5, 8usize), (0.9, 20), (0.99, 5), (1.0, 64)] {
                let sel = select_row_with(&row, &Selection::TopP { p, max }, Some(3), 0).unwrap();
                let full = select_row(&row, max, Some(3)).unwrap();
                let n = sel.topk_ids.len();
                assert!(n >= 1 && n <= max);
                assert_eq!(sel.topk_ids[..], full.topk_ids[..n]);
                let mass: f64 = sel.topk_logprobs.iter().map(|&l| f64::from(l).exp()).sum();
                let before = mass - f64::from(sel.topk_logprobs[n - 1]).exp();
                assert!(
                    mass >= p - 1e-9 || n == max,
                    "case {case}: {mass} < {p} with {n}"
                );
                assert!(
                    before < p,
                    "case {case}: a shorter list already reached {p}"
                );
                assert_eq!(sel.entropy, full.entropy);
                assert_eq!(sel.target_logprob, full.target_logprob);
            }
        }
        assert!(Selection::parse("top-p:0.9").is_err());
        assert!(Selection::parse("top-p:1.5,max=4").is_err());
        assert!(Selection::parse("sample:12,x=1").is_err());
        assert_eq!(
            Selection::parse("top-p:0.9,max=20").unwrap(),
            Selection::TopP { p: 0.9, max: 20 }
        );
        assert_eq!(
            Selection::parse("sample:12,t=2,seed=5").unwrap(),
            Selection::Sample {
                draws: 12,
                temperature: 2.0,
                seed: 5
            }
        );
        assert_eq!(Selection::parse("top-k:5").unwrap().to_string(), "top-k:5");
    }

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
