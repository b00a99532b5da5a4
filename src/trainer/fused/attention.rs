//! The attention kernels of [`super`]: head split/merge with RoPE applied on the way, and the
//! windowed causal softmax, each with its hand-written backward pass (CPU, f32).

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_slice, cpu_tensor, last_dim, with_data, CResult, ROWS_PER_TASK};

// ---------------------------------------------------------------------------------------------
// split / merge heads, with RoPE

/// RoPE tables `[s, hd]` (each half repeated, as `model.rs` builds them).
#[derive(Debug)]
pub struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    hd: usize,
}

impl RopeTables {
    /// Wraps cos/sin tables of `s * hd` values each.
    pub fn new(cos: Vec<f32>, sin: Vec<f32>, hd: usize) -> Self {
        RopeTables { cos, sin, hd }
    }

    fn positions(&self) -> usize {
        self.cos.len() / self.hd.max(1)
    }
}

/// `out = v * cos + rotate_half(v) * sign * sin` for one head vector at one position
/// (`sign = -1` is the transpose of the rotation).
fn rotate(out: &mut [f32], v: &[f32], cos: &[f32], sin: &[f32], sign: f32) {
    let half = v.len() / 2;
    for j in 0..half {
        out[j] = v[j] * cos[j] - sign * v[j + half] * sin[j];
        out[j + half] = v[j + half] * cos[j + half] + sign * v[j] * sin[j + half];
    }
}

/// RoPE tables and the position of every token `[b * s]` (positions restart at each sequence
/// packed into a row).
pub type Rope = (Arc<RopeTables>, Arc<Vec<u32>>);

#[derive(Clone)]
struct Heads {
    b: usize,
    s: usize,
    n: usize,
    hd: usize,
    /// `[b*s, n*hd] -> [b, n, s, hd]` when true, the inverse otherwise.
    split: bool,
    rope: Option<Rope>,
    /// +1 rotates, -1 applies the transposed rotation.
    sign: f32,
}

impl Heads {
    fn check(&self, len: usize) -> CResult<()> {
        if len != self.b * self.s * self.n * self.hd {
            bail!(
                "heads: {len} values for [{}, {}, {}, {}]",
                self.b,
                self.n,
                self.s,
                self.hd
            );
        }
        if let Some((r, pos)) = &self.rope {
            if r.hd != self.hd || pos.len() != self.b * self.s {
                bail!(
                    "heads: RoPE tables of width {} and {} positions for [{}, {}] x {}",
                    r.hd,
                    pos.len(),
                    self.b,
                    self.s,
                    self.hd
                );
            }
            if let Some(&p) = pos.iter().find(|&&p| p as usize >= r.positions()) {
                bail!(
                    "heads: position {p} beyond the {} RoPE positions",
                    r.positions()
                );
            }
        }
        Ok(())
    }

    fn out_shape(&self) -> Shape {
        if self.split {
            Shape::from((self.b, self.n, self.s, self.hd))
        } else {
            Shape::from((self.b * self.s, self.n * self.hd))
        }
    }

    fn run(&self, src: &[f32]) -> CResult<Vec<f32>> {
        self.check(src.len())?;
        let (s, n, hd) = (self.s, self.n, self.hd);
        let mut dst = vec![0f32; src.len()];
        // `token` = batch row * s + t.
        let copy = |out: &mut [f32], v: &[f32], token: usize| match &self.rope {
            Some((r, pos)) => {
                let p = pos[token] as usize;
                rotate(
                    out,
                    v,
                    &r.cos[p * hd..(p + 1) * hd],
                    &r.sin[p * hd..(p + 1) * hd],
                    self.sign,
                )
            }
            None => out.copy_from_slice(v),
        };
        if self.split {
            // One task per (batch row, head): s vectors of hd.
            dst.par_chunks_mut(s * hd)
                .enumerate()
                .for_each(|(bh, out)| {
                    let (bi, h) = (bh / n, bh % n);
                    for t in 0..s {
                        let from = (bi * s + t) * n * hd + h * hd;
                        copy(
                            &mut out[t * hd..(t + 1) * hd],
                            &src[from..from + hd],
                            bi * s + t,
                        );
                    }
                });
        } else {
            // One task per token: n vectors of hd.
            dst.par_chunks_mut(n * hd)
                .enumerate()
                .for_each(|(row, out)| {
                    let (bi, t) = (row / s, row % s);
                    for h in 0..n {
                        let from = ((bi * n + h) * s + t) * hd;
                        copy(&mut out[h * hd..(h + 1) * hd], &src[from..from + hd], row);
                    }
                });
        }
        Ok(dst)
    }

    fn inverse(&self) -> Heads {
        Heads {
            split: !self.split,
            sign: -self.sign,
            ..self.clone()
        }
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "firstkd-heads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let src = cpu_slice(storage, layout, "heads")?;
        Ok((CpuStorage::F32(self.run(src)?), self.out_shape()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let back = self.inverse();
        let dx = with_data(grad, "heads", |g| back.run(g))?;
        Ok(Some(cpu_tensor(dx, arg.shape())?))
    }
}

/// `[b*s, n*hd] -> [b, n, s, hd]`, rotating each head vector with `rope` (tables and token
/// positions) when given (CPU, f32).
pub fn split_heads(
    x: &Tensor,
    (b, s, n, hd): (usize, usize, usize, usize),
    rope: Option<&Rope>,
) -> CResult<Tensor> {
    x.contiguous()?.apply_op1(Heads {
        b,
        s,
        n,
        hd,
        split: true,
        rope: rope.cloned(),
        sign: 1.0,
    })
}

/// `[b, n, s, hd] -> [b*s, n*hd]` (CPU, f32).
pub fn merge_heads(x: &Tensor) -> CResult<Tensor> {
    let (b, n, s, hd) = x.dims4()?;
    x.contiguous()?.apply_op1(Heads {
        b,
        s,
        n,
        hd,
        split: false,
        rope: None,
        sign: 1.0,
    })
}

// ---------------------------------------------------------------------------------------------
// causal softmax

struct CausalSoftmax {
    /// Keys `lo..hi` each query `[b * s]` attends to.
    windows: Arc<Vec<(u32, u32)>>,
    /// Query positions (and keys) per sequence.
    s: usize,
    /// Score rows per batch row (`heads * s`, or `kv_heads * group * s`).
    rows_per_batch: usize,
    scale: f32,
}

impl CausalSoftmax {
    /// The keys `lo..hi` seen by score row `r` (query `r % s` of batch row
    /// `r / rows_per_batch`).
    fn visible(&self, r: usize) -> (usize, usize) {
        let (lo, hi) = self.windows[(r / self.rows_per_batch) * self.s + r % self.s];
        (lo as usize, hi as usize)
    }

    fn check(&self, shape: &Shape) -> CResult<()> {
        let s = last_dim(shape, "causal_softmax")?;
        let rows = shape.elem_count() / s;
        let batch = self.windows.len() / s.max(1);
        if s != self.s
            || self.windows.len() != batch * s
            || !self.rows_per_batch.is_multiple_of(s)
            || rows != batch * self.rows_per_batch
        {
            bail!(
                "causal_softmax: scores {shape:?} for {} query windows of {} keys",
                self.windows.len(),
                self.s
            );
        }
        check_windows(&self.windows, s, "causal_softmax")
    }
}

/// Refuses a key window that is empty or reaches past the `s` keys of its row.
pub(super) fn check_windows(windows: &[(u32, u32)], s: usize, op: &str) -> CResult<()> {
    if let Some(w) = windows.iter().find(|(lo, hi)| lo >= hi || *hi as usize > s) {
        bail!("{op}: key window {w:?} is empty or beyond {s} keys");
    }
    Ok(())
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "firstkd-causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.check(layout.shape())?;
        let x = cpu_slice(storage, layout, "causal_softmax")?;
        let s = self.s;
        let mut p = vec![0f32; x.len()];
        p.par_chunks_mut(s * ROWS_PER_TASK)
            .zip(x.par_chunks(s * ROWS_PER_TASK))
            .enumerate()
            .for_each(|(task, (pc, xc))| {
                for (i, (pr, xr)) in pc.chunks_mut(s).zip(xc.chunks(s)).enumerate() {
                    let (lo, hi) = self.visible(task * ROWS_PER_TASK + i);
                    let (pr, xr) = (&mut pr[lo..hi], &xr[lo..hi]);
                    let max = xr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * self.scale;
                    let mut sum = 0f32;
                    for (p, &x) in pr.iter_mut().zip(xr) {
                        *p = (x * self.scale - max).exp();
                        sum += *p;
                    }
                    let inv = 1.0 / sum;
                    pr.iter_mut().for_each(|p| *p *= inv);
                }
            });
        Ok((CpuStorage::F32(p), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let s = self.s;
        let dx = with_data(res, "causal_softmax", |p| {
            with_data(grad, "causal_softmax", |g| {
                let mut dx = vec![0f32; p.len()];
                dx.par_chunks_mut(s * ROWS_PER_TASK)
                    .zip(p.par_chunks(s * ROWS_PER_TASK))
                    .zip(g.par_chunks(s * ROWS_PER_TASK))
                    .enumerate()
                    .for_each(|(task, ((dc, pc), gc))| {
                        for (i, ((dr, pr), gr)) in dc
                            .chunks_mut(s)
                            .zip(pc.chunks(s))
                            .zip(gc.chunks(s))
                            .enumerate()
                        {
                            let (lo, hi) = self.visible(task * ROWS_PER_TASK + i);
                            let dot: f32 =
                                pr[lo..hi].iter().zip(&gr[lo..hi]).map(|(p, g)| p * g).sum();
                            for j in lo..hi {
                                dr[j] = self.scale * pr[j] * (gr[j] - dot);
                            }
                        }
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(cpu_tensor(dx, arg.shape())?))
    }
}

/// Attention probabilities from raw scores `[b, .., s]` whose rows are grouped per batch row
/// (`rows_per_batch` score rows each, query position = row index mod `s`): softmax of
/// `scale * scores` over the keys `lo..hi` of the query's window (`windows[b * s + q]`, see
/// `model::key_windows`), exactly 0 for the others (CPU, f32).
pub fn causal_softmax(
    scores: &Tensor,
    windows: &Arc<Vec<(u32, u32)>>,
    rows_per_batch: usize,
    scale: f64,
) -> CResult<Tensor> {
    let s = scores.dim(candle_core::D::Minus1)?;
    scores.contiguous()?.apply_op1(CausalSoftmax {
        windows: windows.clone(),
        s,
        rows_per_batch,
        scale: scale as f32,
    })
}
