//! Fused CPU kernels with hand-written backward passes for the student's hot paths.
//!
//! candle's autograd records one graph node per elementary op and, in the backward pass,
//! accumulates every node's gradient as `zeros_like + add`: RMSNorm written as seven ops costs
//! some thirty passes over its activations, the masked softmax of attention a dozen passes over
//! the `[batch, heads, seq, seq]` scores, and `x @ w.t()` a strided (unvectorised) add of the
//! transposed weight gradient. On the CPU, where a training step is bound by memory traffic as
//! much as by matrix products, these ops are replaced by the [`candle_core::CustomOp1`] /
//! [`candle_core::CustomOp2`] kernels below, each a single pass forward and a single pass
//! backward, parallel over rows (rayon) and deterministic (reductions across rows use a fixed
//! chunking, not the thread count). They compute exactly the functions of the composed ops in
//! `model.rs` (tests compare values and gradients), which remain the path on other devices.
//!
//! * [`linear`]: `x @ w^T` whose weight gradient is produced contiguous, `g^T @ x`.
//! * [`rms_norm`]: RMSNorm with the closed-form backward.
//! * [`split_heads`] / [`merge_heads`]: `[b*s, n*hd] <-> [b, n, s, hd]` in one copy, with the
//!   rotate-half RoPE applied on the way in (its transpose, the rotation by `-sin`, on the way
//!   back).
//! * [`causal_softmax`]: scaled softmax over the keys each query may see (causal and within
//!   the row's length), zero elsewhere, backward from the saved probabilities.
//! * [`flash_attention`]: the whole `softmax(q k^T) v` in blocks of queries, the masked key
//!   blocks skipped and no score matrix kept (AVX-512 CPUs; the three ops above elsewhere).
//! * [`swiglu`]: `silu(a) * b`.

use crate::teacher::sgemm::PackedF32;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

mod attention;
mod flash;
pub use attention::{causal_softmax, merge_heads, split_heads, Rope, RopeTables};
pub use flash::{flash_attention, flash_available};

/// Rows per parallel task (and per partial sum of the cross-row reductions).
const ROWS_PER_TASK: usize = 16;

fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("{op}: expected f32 data, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: expected a contiguous tensor"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_data<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> CResult<R>) -> CResult<R> {
    if !t.device().is_cpu() {
        bail!("{op}: the fused kernels run on the CPU only");
    }
    crate::host::with_f32(t, f)?
}

fn cpu_tensor(data: Vec<f32>, shape: &Shape) -> CResult<Tensor> {
    Tensor::from_vec(data, shape.clone(), &Device::Cpu)
}

fn last_dim(shape: &Shape, op: &str) -> CResult<usize> {
    match shape.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => bail!("{op}: empty or scalar input {shape:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// linear

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "firstkd-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (n, k) = xl.shape().dims2()?;
        let (m, k2) = wl.shape().dims2()?;
        if k != k2 {
            bail!("linear: input width {k} but weight [{m}, {k2}]");
        }
        if PackedF32::available() {
            let (x, w) = (cpu_slice(xs, xl, "linear")?, cpu_slice(ws, wl, "linear")?);
            let out = PackedF32::pack(w, m, k)
                .and_then(|p| p.matmul(x, n))
                .map_err(candle_core::Error::wrap)?;
            return Ok((CpuStorage::F32(out), Shape::from((n, m))));
        }
        let out = xs.matmul(ws, (1, n, m, k), xl, &wl.transpose(0, 1)?)?;
        Ok((out, Shape::from((n, m))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        if grad.device().is_cpu() && PackedF32::available() {
            let (n, m) = grad.dims2()?;
            let (_, k) = w.dims2()?;
            let grad = grad.contiguous()?;
            let (dx, dw) = with_data(&grad, "linear backward", |g| {
                // dX = dY W: W [m, k] is the transposed layout of a packed [k, m] weight.
                let dx = with_data(w, "linear backward", |w| {
                    PackedF32::pack_transposed(w, m, k)
                        .and_then(|p| p.matmul(g, n))
                        .map_err(candle_core::Error::wrap)
                })?;
                // dW = dY^T X: X [n, k] packed transposed, dY read transposed.
                let dw = with_data(x, "linear backward", |x| {
                    PackedF32::pack_transposed(x, n, k)
                        .and_then(|p| p.matmul_transposed(g, m))
                        .map_err(candle_core::Error::wrap)
                })?;
                Ok((dx, dw))
            })?;
            return Ok((
                Some(cpu_tensor(dx, &Shape::from((n, k)))?),
                Some(cpu_tensor(dw, &Shape::from((m, k)))?),
            ));
        }
        let dx = grad.matmul(&w.detach())?;
        let dw = grad.t()?.matmul(&x.detach())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `x @ w^T` for `x: [n, in]`, `w: [out, in]` (CPU, f32).
pub fn linear(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    x.contiguous()?.apply_op2(w, Linear)
}

// ---------------------------------------------------------------------------------------------
// rms_norm

struct RmsNorm {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "firstkd-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = cpu_slice(xs, xl, "rms_norm")?;
        let w = cpu_slice(ws, wl, "rms_norm")?;
        let h = last_dim(xl.shape(), "rms_norm")?;
        if w.len() != h {
            bail!("rms_norm: weight of {} for rows of {h}", w.len());
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h * ROWS_PER_TASK)
            .zip(x.par_chunks(h * ROWS_PER_TASK))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_mut(h).zip(xc.chunks(h)) {
                    let inv = inv_rms(xr, self.eps);
                    for ((y, x), w) in yr.iter_mut().zip(xr).zip(w) {
                        *y = x * inv * w;
                    }
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let h = last_dim(x.shape(), "rms_norm")?;
        let eps = self.eps;
        let (dx, dw) = with_data(x, "rms_norm", |x| {
            with_data(w, "rms_norm", |w| {
                with_data(grad, "rms_norm", |g| {
                    let mut dx = vec![0f32; x.len()];
                    let partials: Vec<Vec<f32>> = dx
                        .par_chunks_mut(h * ROWS_PER_TASK)
                        .zip(x.par_chunks(h * ROWS_PER_TASK))
                        .zip(g.par_chunks(h * ROWS_PER_TASK))
                        .map(|((dxc, xc), gc)| {
                            let mut dw = vec![0f32; h];
                            for ((dxr, xr), gr) in
                                dxc.chunks_mut(h).zip(xc.chunks(h)).zip(gc.chunks(h))
                            {
                                let inv = inv_rms(xr, eps);
                                let mut dot = 0f32;
                                for j in 0..h {
                                    dot += gr[j] * w[j] * xr[j];
                                    dw[j] += gr[j] * xr[j] * inv;
                                }
                                let c = inv * inv * dot / h as f32;
                                for j in 0..h {
                                    dxr[j] = inv * (gr[j] * w[j] - xr[j] * c);
                                }
                            }
                            dw
                        })
                        .collect();
                    // Summed in chunk order: the same result for any number of threads.
                    let mut dw = vec![0f32; h];
                    for p in partials {
                        for (a, b) in dw.iter_mut().zip(p) {
                            *a += b;
                        }
                    }
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((
            Some(cpu_tensor(dx, x.shape())?),
            Some(cpu_tensor(dw, w.shape())?),
        ))
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * w` (CPU, f32).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// swiglu

struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "firstkd-swiglu"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        if al.shape() != bl.shape() {
            bail!("swiglu: shapes {:?} and {:?}", al.shape(), bl.shape());
        }
        let a = cpu_slice(as_, al, "swiglu")?;
        let b = cpu_slice(bs, bl, "swiglu")?;
        let mut y = vec![0f32; a.len()];
        const CHUNK: usize = 16 * 1024;
        y.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(yc, (ac, bc))| {
                for ((y, &a), &b) in yc.iter_mut().zip(ac).zip(bc) {
                    *y = a * sigmoid(a) * b;
                }
            });
        Ok((CpuStorage::F32(y), al.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        const CHUNK: usize = 16 * 1024;
        let (da, db) = with_data(a, "swiglu", |a| {
            with_data(b, "swiglu", |b| {
                with_data(grad, "swiglu", |g| {
                    let mut da = vec![0f32; a.len()];
                    let mut db = vec![0f32; a.len()];
                    da.par_chunks_mut(CHUNK)
                        .zip(db.par_chunks_mut(CHUNK))
                        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                        .zip(g.par_chunks(CHUNK))
                        .for_each(|(((dac, dbc), (ac, bc)), gc)| {
                            for i in 0..ac.len() {
                                let (a, b, g) = (ac[i], bc[i], gc[i]);
                                let sg = sigmoid(a);
                                dac[i] = g * b * sg * (1.0 + a * (1.0 - sg));
                                dbc[i] = g * a * sg;
                            }
                        });
                    Ok((da, db))
                })
            })
        })?;
        Ok((
            Some(cpu_tensor(da, a.shape())?),
            Some(cpu_tensor(db, b.shape())?),
        ))
    }
}

/// `silu(a) * b` (CPU, f32).
pub fn swiglu(a: &Tensor, b: &Tensor) -> CResult<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, SwiGlu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use crate::trainer::model;
    use candle_core::{Var, D};
    use std::sync::Arc;

    fn randn(shape: &[usize], seed: u64) -> Var {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// Values and input gradients (of `sum(out * r)`, `r` random) of `fused` and `composed`
    /// agree within `tol`.
    fn check(
        inputs: &[Var],
        fused: impl Fn(&[Tensor]) -> CResult<Tensor>,
        composed: impl Fn(&[Tensor]) -> CResult<Tensor>,
        tol: f32,
    ) {
        let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let a = fused(&ts).unwrap();
        let b = composed(&ts).unwrap();
        assert_eq!(a.dims(), b.dims());
        let d = max_abs_diff(&a, &b).unwrap();
        assert!(d < tol, "values differ by {d}");
        let r = randn(a.dims(), 99);
        let ga = (a * r.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (b * r.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, v) in inputs.iter().enumerate() {
            let (x, y) = (ga.get(v).unwrap(), gb.get(v).unwrap());
            let scale = crate::testing::max_abs(y).unwrap();
            assert!(scale > 0.0, "input {i}: zero reference gradient");
            let d = max_abs_diff(x, y).unwrap();
            assert!(
                d < tol * scale.max(1.0),
                "input {i}: gradients differ by {d}"
            );
        }
    }

    #[test]
    fn linear_matches_matmul() {
        let (x, w) = (randn(&[37, 24], 1), randn(&[19, 24], 2));
        check(
            &[x, w],
            |t| linear(&t[0], &t[1]),
            |t| t[0].matmul(&t[1].t()?),
            1e-5,
        );
    }

    #[test]
    fn rms_norm_matches_composed() {
        // 3-d input and more rows than one task, so the chunked weight-gradient sum is used.
        let (x, w) = (randn(&[3, 23, 40], 3), randn(&[40], 4));
        check(
            &[x, w],
            |t| rms_norm(&t[0], &t[1], 1e-5),
            |t| {
                model::rms_norm(&t[0], &t[1], 1e-5)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            },
            1e-4,
        );
    }

    fn tables(s: usize, hd: usize) -> (Vec<f32>, Vec<f32>) {
        let inv: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / hd as f64))
            .collect();
        crate::teacher::model::rope_cos_sin(&inv, s, 2)
    }

    #[test]
    fn split_heads_with_rope_matches_transpose_then_rope() {
        let (b, s, n, hd) = (2, 7, 3, 8);
        let (cos, sin) = tables(s, hd);
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..s as u32).collect();
        let rope = (
            Arc::new(RopeTables::new(cos.clone(), sin.clone(), hd)),
            Arc::new(positions),
        );
        let cos_t = Tensor::from_vec(cos, (s, hd), &Device::Cpu).unwrap();
        let sin_t = Tensor::from_vec(sin, (s, hd), &Device::Cpu).unwrap();
        let x = randn(&[b * s, n * hd], 5);
        check(
            std::slice::from_ref(&x),
            |t| split_heads(&t[0], (b, s, n, hd), Some(&rope)),
            |t| {
                let h = t[0].reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()?;
                model::rope(&h, &cos_t, &sin_t).map_err(|e| candle_core::Error::Msg(e.to_string()))
            },
            1e-5,
        );
        check(
            &[x],
            |t| split_heads(&t[0], (b, s, n, hd), None),
            |t| t[0].reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous(),
            1e-6,
        );
    }

    #[test]
    fn merge_heads_matches_transpose() {
        let (b, n, s, hd) = (2, 3, 5, 4);
        check(
            &[randn(&[b, n, s, hd], 6)],
            merge_heads_of,
            |t| t[0].transpose(1, 2)?.reshape((b * s, n * hd)),
            1e-6,
        );
    }

    fn merge_heads_of(t: &[Tensor]) -> CResult<Tensor> {
        merge_heads(&t[0])
    }

    #[test]
    fn causal_softmax_matches_masked_softmax() {
        // Two batch rows (one padded), grouped query heads folded into the rows as the
        // student does; a query past the row's length still sees key 0.
        let (nkv, group, s) = (2, 3, 6);
        let lengths = [6usize, 2];
        let scale = 0.37;
        let segments: Vec<Vec<usize>> = lengths.iter().map(|&l| vec![l]).collect();
        let (windows, _) = model::key_windows(&segments, s).unwrap();
        let windows = Arc::new(windows);
        let mask = model::attention_mask(&windows, 2, s, group, &Device::Cpu).unwrap();
        let scores = randn(&[2, nkv, group * s, s], 7);
        check(
            &[scores],
            |t| causal_softmax(&t[0], &windows, nkv * group * s, scale),
            |t| {
                let x = (&t[0] * scale)?.broadcast_add(&mask)?;
                let max = x.max_keepdim(D::Minus1)?.detach();
                let e = x.broadcast_sub(&max)?.exp()?;
                e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
            },
            1e-5,
        );
        let bad = causal_softmax(
            &randn(&[3, nkv, group * s, s], 8),
            &windows,
            nkv * group * s,
            1.0,
        );
        assert!(
            bad.is_err(),
            "three batch rows for two rows of windows must be refused"
        );
    }

    #[test]
    fn flash_attention_matches_scores_softmax_values() {
        if !flash_available() {
            eprintln!("skipped: this CPU has no AVX-512 for the flash attention kernel");
            return;
        }
        // Several query blocks and key panels, packed sequences and padding (row 0: 60 + 30
        // tokens and 10 of padding; row 1: 45 and 55 of padding), grouped heads, and a head
        // width that is not a whole panel.
        let cases = [
            (
                2usize,
                3usize,
                100usize,
                64usize,
                vec![vec![60usize, 30], vec![45]],
            ),
            (1, 1, 130, 40, vec![vec![130]]),
            (1, 2, 7, 8, vec![vec![3, 4]]),
        ];
        for (seed, (nkv, group, s, hd, segments)) in cases.into_iter().enumerate() {
            let b = segments.len();
            let (windows, _) = model::key_windows(&segments, s).unwrap();
            let windows = Arc::new(windows);
            let scale = 1.0 / (hd as f64).sqrt();
            let seed = 20 + 3 * seed as u64;
            let q = randn(&[b, nkv, group * s, hd], seed);
            let k = randn(&[b, nkv, s, hd], seed + 1);
            let v = randn(&[b, nkv, s, hd], seed + 2);
            check(
                &[q, k, v],
                |t| flash_attention(&t[0], &t[1], &t[2], &windows, group, scale),
                |t| {
                    let scores = t[0].matmul(&t[1].t()?)?;
                    causal_softmax(&scores, &windows, nkv * group * s, scale)?.matmul(&t[2])
                },
                1e-4,
            );
        }
        let (q, k) = (randn(&[1, 1, 8, 4], 1), randn(&[1, 1, 8, 4], 2));
        let short = Arc::new(vec![(0u32, 1u32); 4]);
        let err = flash_attention(q.as_tensor(), k.as_tensor(), k.as_tensor(), &short, 1, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 query windows"), "{err}");
        let past_the_end = Arc::new(vec![(0u32, 9u32); 8]);
        let err = flash_attention(
            q.as_tensor(),
            k.as_tensor(),
            k.as_tensor(),
            &past_the_end,
            1,
            1.0,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("is empty or beyond 8 keys"), "{err}");
    }

    #[test]
    fn swiglu_matches_silu_mul() {
        let (a, b) = (randn(&[33, 1030], 9), randn(&[33, 1030], 10));
        check(
            &[a, b],
            |t| swiglu(&t[0], &t[1]),
            |t| t[0].silu()? * &t[1],
            1e-5,
        );
    }

    #[test]
    fn fused_ops_refuse_non_f32() {
        let x = Tensor::zeros((4, 8), candle_core::DType::F64, &Device::Cpu).unwrap();
        let w = Tensor::zeros(8, candle_core::DType::F64, &Device::Cpu).unwrap();
        let err = rms_norm(&x, &w, 1e-5).unwrap_err().to_string();
        assert!(err.contains("expected f32"), "{err}");
    }
}
