//! CPU kernels for the element-wise parts of the forward pass. candle runs `silu` and
//! `softmax_last_dim` single-threaded with a scalar `exp` (measured here: ~7 ns per element),
//! which made them a third of the block time; these versions use a vectorisable `exp`, skip the
//! masked half of causal attention and split rows across threads. Other devices fall back to
//! candle ops.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Lanes for vectorisable reductions.
pub(crate) const LANES: usize = 16;

/// `exp(x)` with ~2 ulp relative error for `x` in `[-87.3, 88.3]` (inputs are clamped to that
/// range, so `-inf` gives ~1e-38 and large `x` gives ~2e38; NaN propagates). Cephes `expf`
/// range reduction and polynomial, branch-free so that loops over it vectorise.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer that sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let j = x * LOG2E + ROUND;
    let n = j - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from the integer held in j's mantissa: n in [-126, 127] keeps the exponent normal.
    let n_bits = (j.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits((n_bits.wrapping_add(127) << 23) as u32);
    y * scale
}

/// Sum in `LANES` f32 accumulators (vectorisable), combined in f64.
#[inline]
pub(crate) fn sum_lanes(xs: &[f32]) -> f64 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().chain(tail).map(|&v| v as f64).sum()
}

/// Runs `f` on a contiguous f32 CPU tensor's data; `None` for any other tensor.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if t.dtype() != DType::F32 || !matches!(t.device(), Device::Cpu) {
        return None;
    }
    crate::host::with_f32(t, f).ok()
}

/// Calls `f(row_index, row)` for every `row_len`-long row of `out`, split across threads.
fn parallel_rows(out: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / row_len.max(1);
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .min(rows);
    if threads <= 1 || out.len() < 1 << 15 {
        for (r, row) in out.chunks_mut(row_len).enumerate() {
            f(r, row);
        }
        return;
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (t, part) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            scope.spawn(move || {
                for (j, row) in part.chunks_mut(row_len).enumerate() {
                    f(t * per + j, row);
                }
            });
        }
    });
}

/// SwiGLU over a fused `[rows, 2 * inter]` gate/up projection: `silu(gate) * up`, `[rows, inter]`.
pub(crate) fn swiglu(gate_up: &Tensor, inter: usize) -> Result<Tensor> {
    let (rows, width) = gate_up.dims2()?;
    let cpu = with_cpu_f32(gate_up, |src| {
        let mut out = vec![0f32; rows * inter];
        parallel_rows(&mut out, inter, |r, row| {
            let g = &src[r * width..r * width + inter];
            let u = &src[r * width + inter..r * width + 2 * inter];
            for ((o, &g), &u) in row.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + exp_approx(-g)) * u;
            }
        });
        out
    });
    Ok(match cpu {
        Some(out) => Tensor::from_vec(out, (rows, inter), gate_up.device())?,
        None => {
            (candle_nn::ops::silu(&gate_up.narrow(1, 0, inter)?)?
                * gate_up.narrow(1, inter, inter)?)?
        }
    })
}

/// Causal softmax over the last dimension of attention scores whose rows are query positions
/// `0..s` repeated (`[..., s]` with `rows % s` = query index): row of query `i` is normalised
/// over keys `0..=i`; keys after `i` get probability 0. `mask` is the additive `[s, s]` causal
/// mask used by the fallback path on other devices.
pub(crate) fn causal_softmax(scores: &Tensor, s: usize, mask: &Tensor) -> Result<Tensor> {
    let shape = scores.shape().clone();
    let cpu = with_cpu_f32(scores, |src| {
        let mut out = vec![0f32; src.len()];
        parallel_rows(&mut out, s, |r, row| {
            let i = r % s;
            let x = &src[r * s..r * s + i + 1];
            let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let probs = &mut row[..i + 1];
            for (p, &v) in probs.iter_mut().zip(x) {
                *p = exp_approx(v - m);
            }
            let inv = (1.0 / sum_lanes(probs)) as f32;
            for p in probs.iter_mut() {
                *p *= inv;
            }
        });
        out
    });
    Ok(match cpu {
        Some(out) => Tensor::from_vec(out, shape, scores.device())?,
        None => {
            let blocks = shape.elem_count() / (s * s);
            let masked = scores.reshape((blocks, s, s))?.broadcast_add(mask)?;
            candle_nn::ops::softmax_last_dim(&masked)?.reshape(shape)?
        }
    })
}

/// Softmax of attention scores `[b, heads, s, s]`-shaped (any layout whose rows are query
/// positions `0..s` repeated, batch-major) over each query's [`KeySpan`] (`spans[b * s + q]`);
/// keys outside it get probability 0. CPU f32 only (other devices use an additive mask).
pub(crate) fn span_softmax(
    scores: &Tensor,
    s: usize,
    spans: &[super::attention::KeySpan],
) -> Result<Tensor> {
    let shape = scores.shape().clone();
    let rows_total = shape.elem_count() / s.max(1);
    let batch = spans.len() / s.max(1);
    if batch == 0 || spans.len() != batch * s || !rows_total.is_multiple_of(batch) {
        return Err(crate::error::Error::Internal(format!(
            "span softmax: {} spans for scores {shape:?}",
            spans.len()
        )));
    }
    let rows_per_batch = rows_total / batch;
    let out = with_cpu_f32(scores, |src| {
        let mut out = vec![0f32; src.len()];
        parallel_rows(&mut out, s, |r, row| {
            let q = r % s;
            let sp = spans[(r / rows_per_batch) * s + q];
            let x = &src[r * s..(r + 1) * s];
            let shared = sp.shared_start as usize..sp.shared_end as usize;
            let own = sp.own_start as usize..q + 1;
            let m = x[shared.clone()]
                .iter()
                .chain(&x[own.clone()])
                .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            for k in shared.clone().chain(own.clone()) {
                row[k] = exp_approx(x[k] - m);
            }
            let inv =
                (1.0 / (sum_lanes(&row[shared.clone()]) + sum_lanes(&row[own.clone()]))) as f32;
            for k in shared.chain(own) {
                row[k] *= inv;
            }
        });
        out
    })
    .ok_or_else(|| {
        crate::error::Error::Internal(
            "span softmax needs contiguous f32 scores on the CPU".to_string(),
        )
    })?;
    Ok(Tensor::from_vec(out, shape, scores.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let got = exp_approx(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert!(exp_approx(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_approx(f32::INFINITY).is_finite());
        assert!(exp_approx(f32::NAN).is_nan());
        assert_eq!(exp_approx(0.0), 1.0);
    }

    #[test]
    fn kernels_match_candle_ops() {
        let dev = Device::Cpu;
        let s = 37;
        let scores = Tensor::randn(0f32, 3.0, (2, 3, 2 * s, s), &dev).unwrap();
        let mask: Vec<f32> = (0..s)
            .flat_map(|q| (0..s).map(move |k| if k <= q { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (s, s), &dev).unwrap();
        let masked = scores
            .reshape((12, s, s))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let want = candle_nn::ops::softmax_last_dim(&masked)
            .unwrap()
            .reshape(scores.shape())
            .unwrap();
        let got = causal_softmax(&scores, s, &mask).unwrap();
        assert!(crate::testing::max_abs_diff(&want, &got).unwrap() < 1e-6);

        let gu = Tensor::randn(0f32, 4.0, (300, 2 * 70), &dev).unwrap();
        let want = (candle_nn::ops::silu(&gu.narrow(1, 0, 70).unwrap()).unwrap()
            * gu.narrow(1, 70, 70).unwrap())
        .unwrap();
        let got = swiglu(&gu, 70).unwrap();
        assert!(crate::testing::max_abs_diff(&want, &got).unwrap() < 1e-4);
    }

    #[test]
    fn span_softmax_matches_masked_softmax() {
        use super::super::attention::KeySpan;
        let dev = Device::Cpu;
        let (b, heads, s) = (2, 3, 9);
        // Row 0: a prompt of 4 tokens and two branches (4..6, 6..9); row 1: plain causal.
        let mut spans = Vec::new();
        for q in 0..s as u32 {
            spans.push(match q {
                0..=3 => KeySpan::causal(0),
                4..=5 => KeySpan {
                    shared_start: 0,
                    shared_end: 4,
                    own_start: 4,
                },
                _ => KeySpan {
                    shared_start: 0,
                    shared_end: 4,
                    own_start: 6,
                },
            });
        }
        spans.extend((0..s).map(|_| KeySpan::causal(0)));
        let scores = Tensor::randn(0f32, 3.0, (b, heads, s, s), &dev).unwrap();
        let mut mask = vec![f32::NEG_INFINITY; b * s * s];
        for (i, sp) in spans.iter().enumerate() {
            for k in 0..s as u32 {
                if sp.allows((i % s) as u32, k) {
                    mask[i * s + k as usize] = 0.0;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, s, s), &dev).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
        let got = span_softmax(&scores, s, &spans).unwrap();
        assert!(crate::testing::max_abs_diff(&want, &got).unwrap() < 1e-6);
        // A branch token never sees the other branch.
        let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(g[7 * s + 4], 0.0);
        assert_eq!(g[7 * s + 5], 0.0);
        assert!(span_softmax(&scores, s, &spans[..s - 1]).is_err());
    }
}
