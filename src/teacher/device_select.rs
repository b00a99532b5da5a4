//! Top-k selection computed where the logits are (an accelerator): log-softmax, top-k, entropy
//! and the target's log-prob as tensor operations, so only `k` ids and values plus two floats
//! per position cross to the host instead of the whole row (600 KB per position for a
//! 151,936-token vocabulary).
//!
//! Same quantities as [`super::select::select_row`]: with `lse = logsumexp(x)`,
//! `logp_i = x_i - lse` and `H = lse - Σ p_i x_i`. The top-k is `k` rounds of argmax, each
//! followed by setting the winner to `-inf`. Ties between equal logits may resolve to either
//! id (the host path keeps the smaller one); logits are f32 and ties are rare.

use candle_core::{DType, Tensor};

use super::select::RowSelection;
use crate::error::{Error, Result};

/// Selects top-`k`, entropy and the target log-prob of every row of `logits` (`[rows, vocab]`,
/// any float dtype, already divided by the temperature) with tensor operations on its device.
/// `targets` holds one token id per row. Errors, naming the row, when a row has no finite
/// log-sum-exp (all `-inf`, a `+inf` or a NaN).
pub fn select_top_k(logits: &Tensor, k: usize, targets: &[u32]) -> Result<Vec<RowSelection>> {
    let (rows, vocab) = logits.dims2()?;
    if k == 0 || k > vocab {
        return Err(Error::Internal(format!(
            "top-k of {k} over rows of {vocab} logits"
        )));
    }
    if targets.len() != rows {
        return Err(Error::Internal(format!(
            "{} targets for {rows} rows of logits",
            targets.len()
        )));
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Internal(format!(
            "target id {t} outside a vocabulary of {vocab}"
        )));
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    let device = logits.device();
    let x = logits.to_dtype(DType::F32)?.contiguous()?;
    let max = x.max_keepdim(1)?;
    let shifted = x.broadcast_sub(&max)?;
    let sum = shifted.exp()?.sum_keepdim(1)?;
    let lse = (sum.log()? + &max)?; // [rows, 1]
                                    // H = lse - Σ p_i x_i; -inf logits are clamped so that p_i x_i is 0, not NaN.
    let p = x.broadcast_sub(&lse)?.exp()?;
    let px = (p * x.maximum(-1e30f32)?)?.sum_keepdim(1)?;
    let entropy = (&lse - px)?.maximum(0f32)?;
    let target_ids = Tensor::from_slice(targets, (rows, 1), device)?;
    let target = x.gather(&target_ids, 1)?.broadcast_sub(&lse)?;

    let neg_inf = Tensor::full(f32::NEG_INFINITY, (rows, 1), device)?;
    let mut rest = x;
    let mut ids = Vec::with_capacity(k);
    let mut vals = Vec::with_capacity(k);
    for round in 0..k {
        let id = rest.argmax_keepdim(1)?; // [rows, 1] u32
        vals.push(rest.gather(&id, 1)?);
        if round + 1 < k {
            rest = rest.scatter(&id, &neg_inf, 1)?;
        }
        ids.push(id);
    }
    let ids = Tensor::cat(&ids, 1)?; // [rows, k]
    let vals = Tensor::cat(&vals, 1)?.broadcast_sub(&lse)?;
    // One small copy of each to the host.
    let ids: Vec<Vec<u32>> = ids.to_vec2()?;
    let vals: Vec<Vec<f32>> = vals.to_vec2()?;
    let lse: Vec<f32> = lse.flatten_all()?.to_vec1()?;
    let entropy: Vec<f32> = entropy.flatten_all()?.to_vec1()?;
    let target: Vec<f32> = target.flatten_all()?.to_vec1()?;
    let mut out = Vec::with_capacity(rows);
    for (r, (ids, vals)) in ids.into_iter().zip(vals).enumerate() {
        if !lse[r].is_finite() || vals.iter().any(|v| v.is_nan()) {
            return Err(Error::InvalidArgument(format!(
                "logits row {r} has no finite log-sum-exp ({}): NaN, +inf or all -inf",
                lse[r]
            )));
        }
        out.push(RowSelection {
            topk_ids: ids,
            topk_logprobs: vals.into_iter().map(|v| v.min(0.0)).collect(),
            target_logprob: Some(target[r]),
            entropy: entropy[r],
            counts: Vec::new(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::teacher::select::select_row;
    use candle_core::Device;

    fn rows(n: usize, vocab: usize) -> Vec<f32> {
        // Deterministic pseudo-random logits with a spread like a language model's.
        let mut s = 0x1234_5678_u64;
        (0..n * vocab)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                (u * u * u) * 30.0 - 10.0
            })
            .collect()
    }

    #[test]
    fn device_selection_matches_the_host_selection() {
        let (n, vocab, k) = (37, 5003, 5);
        let mut data = rows(n, vocab);
        // A row with -inf entries (masked vocabulary) and one with a single finite logit.
        for v in data[vocab..2 * vocab].iter_mut().step_by(3) {
            *v = f32::NEG_INFINITY;
        }
        for (i, v) in data[2 * vocab..3 * vocab].iter_mut().enumerate() {
            *v = if i == 17 { 4.0 } else { f32::NEG_INFINITY };
        }
        let targets: Vec<u32> = (0..n as u32).map(|r| (r * 131) % vocab as u32).collect();
        let t = Tensor::from_slice(&data, (n, vocab), &Device::Cpu).unwrap();
        let got = select_top_k(&t, k, &targets).unwrap();
        assert_eq!(got.len(), n);
        for (r, g) in got.iter().enumerate() {
            let row = &data[r * vocab..(r + 1) * vocab];
            let want = select_row(row, k, Some(targets[r])).unwrap();
            if r == 2 {
                // One finite logit: it is the top-1 with log-prob 0; the rest are -inf.
                assert_eq!(g.topk_ids[0], 17);
                assert_eq!(g.topk_logprobs[0], 0.0);
                assert!(g.topk_logprobs[1..].iter().all(|v| *v == f32::NEG_INFINITY));
                assert_eq!(g.entropy, 0.0);
                continue;
            }
            assert_eq!(g.topk_ids, want.topk_ids, "row {r}");
            for (a, b) in g.topk_logprobs.iter().zip(&want.topk_logprobs) {
                assert!((a - b).abs() < 1e-4, "row {r}: {a} vs {b}");
            }
            let (a, b) = (g.target_logprob.unwrap(), want.target_logprob.unwrap());
            assert!(
                (a - b).abs() < 1e-4 || (a == b),
                "row {r} target: {a} vs {b}"
            );
            assert!(
                (g.entropy - want.entropy).abs() < 1e-3,
                "row {r} entropy: {} vs {}",
                g.entropy,
                want.entropy
            );
        }
    }

    #[test]
    fn device_selection_refuses_bad_rows() {
        let mut data = rows(3, 64);
        data[64 + 5] = f32::NAN;
        let t = Tensor::from_slice(&data, (3, 64), &Device::Cpu).unwrap();
        let err = select_top_k(&t, 5, &[0, 1, 2]).unwrap_err().to_string();
        assert!(err.contains("row 1"), "{err}");
        let all_neg = vec![f32::NEG_INFINITY; 64];
        let t = Tensor::from_slice(&all_neg, (1, 64), &Device::Cpu).unwrap();
        assert!(select_top_k(&t, 5, &[0]).is_err());
        let t = Tensor::from_slice(&data[..64], (1, 64), &Device::Cpu).unwrap();
        assert!(select_top_k(&t, 0, &[0]).is_err());
        assert!(select_top_k(&t, 65, &[0]).is_err());
        assert!(select_top_k(&t, 5, &[64]).is_err());
        assert!(select_top_k(&t, 5, &[0, 1]).is_err());
    }
}
