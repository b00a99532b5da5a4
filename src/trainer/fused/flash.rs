//! Causal attention in blocks of queries, without the `[rows, keys]` score matrix (CPU, f32,
//! AVX-512): the student's training attention where the CPU has the packed f32 kernel.
//!
//! The composed form (`q k^T`, [`super::causal_softmax`], `p v`) materialises the scores and
//! probabilities of every head, `rows x s` floats, computes the masked half of both products,
//! and keeps the probabilities for the backward pass. Here each task is one (batch row, query
//! head): it packs that head's K and V once, then per block of [`BLOCK`] queries computes the
//! scores of the keys the block can see (whole 32-key panels from the first key of the
//! earliest window to the last key of the latest), takes the softmax over each query's window
//! in place, and multiplies by V; blocks of keys that no query of the block sees are never
//! touched, so causal attention does about half the products. Only the output and one
//! log-sum-exp per query are kept. The backward pass recomputes each block's probabilities
//! from those (`p = exp(scale * s - lse)`), as flash attention does, and accumulates
//! `dK = dS^T Q` and `dV = P^T dO` per task; the query heads that share a K/V head are summed
//! at the end in a fixed order, so results do not depend on the thread count. The products
//! run on [`PackedF32::product_into`], serially inside each task.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_slice, cpu_tensor, with_data, CResult};
use crate::teacher::sgemm::{PackedF32, PackedRows, NR};

/// Queries per block (a multiple of the kernel's 12-row tile; a block's scores, 48 x 1,024
/// floats at a sequence of 1,024, stay in L2).
const BLOCK: usize = 48;

/// Whether [`flash_attention`] runs on this CPU (the packed f32 kernel's AVX-512F).
/// `FIRSTKD_ATTENTION=materialised` keeps the composed form, for benchmarks and comparisons.
pub fn flash_available() -> bool {
    std::env::var("FIRSTKD_ATTENTION").as_deref() != Ok("materialised") && PackedF32::available()
}

struct FlashAttention {
    /// Keys `lo..hi` each query `[b * s]` attends to.
    windows: Arc<Vec<(u32, u32)>>,
    /// Query heads per K/V head.
    group: usize,
    scale: f32,
    /// Log-sum-exp of every query row `[b, heads, s]`, from the forward pass.
    lse: Mutex<Option<Vec<f32>>>,
}

/// The shapes of one call: q `[b, nkv, group * s, hd]`, k and v `[b, nkv, s, hd]`.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    nkv: usize,
    group: usize,
    s: usize,
    hd: usize,
}

impl Dims {
    fn heads(&self) -> usize {
        self.nkv * self.group
    }

    /// Offset of K/V head of query head task `bh` (`batch row * heads + head`).
    fn kv_offset(&self, bh: usize) -> usize {
        let (bi, h) = (bh / self.heads(), bh % self.heads());
        (bi * self.nkv + h / self.group) * self.s * self.hd
    }
}

/// One query head's inputs: its queries, its K/V head, its batch row's windows.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    windows: &'a [(u32, u32)],
}

/// The block of queries `t0..t1` and the key panels it sees.
struct Block {
    t0: usize,
    t1: usize,
    /// First key panel; key `c0 = p0 * NR` is column 0 of the block's scores.
    p0: usize,
    p1: usize,
}

impl Block {
    fn of(windows: &[(u32, u32)], t0: usize, s: usize) -> Self {
        let t1 = (t0 + BLOCK).min(s);
        let lo = windows[t0..t1].iter().map(|w| w.0).min().unwrap_or(0) as usize;
        let hi = windows[t0..t1].iter().map(|w| w.1).max().unwrap_or(1) as usize;
        Block {
            t0,
            t1,
            p0: lo / NR,
            p1: hi.div_ceil(NR),
        }
    }

    fn rows(&self) -> usize {
        self.t1 - self.t0
    }

    fn c0(&self) -> usize {
        self.p0 * NR
    }

    /// Columns of the block's scores.
    fn ld(&self) -> usize {
        (self.p1 - self.p0) * NR
    }

    /// Columns that are keys (the last panel may run past the sequence).
    fn keys(&self, s: usize) -> usize {
        self.ld().min(s - self.c0())
    }
}

fn wrap(e: crate::error::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

impl FlashAttention {
    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> CResult<Dims> {
        let (b, nkv, rows, hd) = q.shape().dims4()?;
        let (kb, knkv, s, khd) = k.shape().dims4()?;
        if (kb, knkv, khd) != (b, nkv, hd)
            || v.shape() != k.shape()
            || rows != self.group * s
            || self.windows.len() != b * s
            || s == 0
            || hd == 0
        {
            bail!(
                "flash_attention: q {:?}, k {:?}, v {:?} for {} query windows and {} heads per \
                 K/V head",
                q.shape(),
                k.shape(),
                v.shape(),
                self.windows.len(),
                self.group
            );
        }
        super::attention::check_windows(&self.windows, s, "flash_attention")?;
        Ok(Dims {
            b,
            nkv,
            group: self.group,
            s,
            hd,
        })
    }

    fn head<'a>(
        &'a self,
        d: Dims,
        bh: usize,
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
    ) -> Head<'a> {
        let (sh, kv) = (d.s * d.hd, d.kv_offset(bh));
        let bi = bh / d.heads();
        Head {
            q: &q[bh * sh..(bh + 1) * sh],
            k: &k[kv..kv + sh],
            v: &v[kv..kv + sh],
            windows: &self.windows[bi * d.s..(bi + 1) * d.s],
        }
    }

    /// Scores of `block` into `p` (stride `block.ld()`), then, row by row, their softmax over
    /// the query's window (0 elsewhere). With `lse` given (the backward pass) the
    /// probabilities are `exp(scale * s - lse)`; otherwise they are normalised here and each
    /// row's log-sum-exp is written to `lse_out`.
    #[allow(clippy::too_many_arguments)]
    fn probabilities(
        &self,
        h: &Head<'_>,
        kp: &PackedF32,
        block: &Block,
        hd: usize,
        p: &mut [f32],
        lse: Option<&[f32]>,
        lse_out: &mut [f32],
    ) -> CResult<()> {
        let (ld, c0) = (block.ld(), block.c0());
        let a = PackedRows::new(
            &h.q[block.t0 * hd..block.t1 * hd],
            block.rows(),
            hd,
            hd,
            false,
        )
        .map_err(wrap)?;
        kp.product_into(&a, 0, block.p0..block.p1, p, ld, false)
            .map_err(wrap)?;
        for (r, row) in p.chunks_exact_mut(ld).take(block.rows()).enumerate() {
            let t = block.t0 + r;
            let (lo, hi) = h.windows[t];
            let (lo, hi) = (lo as usize - c0, hi as usize - c0);
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            let seen = &mut row[lo..hi];
            match lse {
                Some(lse) => {
                    let l = lse[t];
                    seen.iter_mut()
                        .for_each(|x| *x = (*x * self.scale - l).exp());
                }
                None => {
                    let max = seen.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) * self.scale;
                    let mut sum = 0f32;
                    for x in seen.iter_mut() {
                        *x = (*x * self.scale - max).exp();
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    seen.iter_mut().for_each(|x| *x *= inv);
                    lse_out[r] = max + sum.ln();
                }
            }
        }
        Ok(())
    }

    /// `out[t0..t1] = x w` for `x` the block's `[rows, keys]` matrix (stride `ld`) and `w` a
    /// `[s, hd]` matrix packed transposed (its reduction axis the keys), via `tmp`.
    fn times_keys(
        w: &PackedF32,
        x: &[f32],
        block: &Block,
        s: usize,
        hd: usize,
        tmp: &mut [f32],
        out: &mut [f32],
    ) -> CResult<()> {
        let wide = PackedF32::padded(hd);
        let a = PackedRows::new(x, block.rows(), block.keys(s), block.ld(), false).map_err(wrap)?;
        w.product_into(&a, block.c0(), 0..wide / NR, tmp, wide, false)
            .map_err(wrap)?;
        for (r, dst) in out[block.t0 * hd..block.t1 * hd]
            .chunks_exact_mut(hd)
            .enumerate()
        {
            dst.copy_from_slice(&tmp[r * wide..r * wide + hd]);
        }
        Ok(())
    }

    /// `acc[keys of block] += x^T y` for `x` the block's `[rows, keys]` matrix (stride `ld`)
    /// and `y` the block's rows of a `[s, hd]` matrix; `acc` has rows of `padded(hd)`.
    fn accumulate_keys(
        x: &[f32],
        y: &[f32],
        block: &Block,
        s: usize,
        hd: usize,
        acc: &mut [f32],
    ) -> CResult<()> {
        let wide = PackedF32::padded(hd);
        let w =
            PackedF32::pack_transposed_serial(&y[block.t0 * hd..block.t1 * hd], block.rows(), hd)
                .map_err(wrap)?;
        let a = PackedRows::new(x, block.keys(s), block.rows(), block.ld(), true).map_err(wrap)?;
        w.product_into(
            &a,
            0,
            0..wide / NR,
            &mut acc[block.c0() * wide..],
            wide,
            true,
        )
        .map_err(wrap)
    }

    /// One head's output `[s, hd]` and log-sum-exps `[s]`.
    fn forward_head(
        &self,
        h: &Head<'_>,
        s: usize,
        hd: usize,
        o: &mut [f32],
        lse: &mut [f32],
    ) -> CResult<()> {
        let kp = PackedF32::pack_serial(h.k, s, hd).map_err(wrap)?;
        let vt = PackedF32::pack_transposed_serial(h.v, s, hd).map_err(wrap)?;
        let mut p = vec![0f32; BLOCK * PackedF32::padded(s)];
        let mut tmp = vec![0f32; BLOCK * PackedF32::padded(hd)];
        for t0 in (0..s).step_by(BLOCK) {
            let block = Block::of(h.windows, t0, s);
            self.probabilities(h, &kp, &block, hd, &mut p, None, &mut lse[t0..block.t1])?;
            Self::times_keys(&vt, &p, &block, s, hd, &mut tmp, o)?;
        }
        Ok(())
    }

    /// One head's `dq` `[s, hd]` and its contributions to its K/V head's `dk`, `dv`
    /// (`[s, hd]` each).
    #[allow(clippy::too_many_arguments)]
    fn backward_head(
        &self,
        h: &Head<'_>,
        o: &[f32],
        g: &[f32],
        lse: &[f32],
        (s, hd): (usize, usize),
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) -> CResult<()> {
        let wide = PackedF32::padded(hd);
        let kp = PackedF32::pack_serial(h.k, s, hd).map_err(wrap)?;
        let vp = PackedF32::pack_serial(h.v, s, hd).map_err(wrap)?;
        let kt = PackedF32::pack_transposed_serial(h.k, s, hd).map_err(wrap)?;
        let mut p = vec![0f32; BLOCK * PackedF32::padded(s)];
        let mut ds = vec![0f32; BLOCK * PackedF32::padded(s)];
        let mut tmp = vec![0f32; BLOCK * wide];
        let mut dk_acc = vec![0f32; PackedF32::padded(s) * wide];
        let mut dv_acc = vec![0f32; PackedF32::padded(s) * wide];
        for t0 in (0..s).step_by(BLOCK) {
            let block = Block::of(h.windows, t0, s);
            let (ld, c0) = (block.ld(), block.c0());
            self.probabilities(h, &kp, &block, hd, &mut p, Some(lse), &mut [])?;
            // dP = dO V^T over the block's keys.
            let a = PackedRows::new(
                &g[block.t0 * hd..block.t1 * hd],
                block.rows(),
                hd,
                hd,
                false,
            )
            .map_err(wrap)?;
            vp.product_into(&a, 0, block.p0..block.p1, &mut ds, ld, false)
                .map_err(wrap)?;
            // dS = scale * P (dP - rowsum(dO o O)); 0 outside the window, as P is.
            for r in 0..block.rows() {
                let t = block.t0 + r;
                let dot: f32 = g[t * hd..(t + 1) * hd]
                    .iter()
                    .zip(&o[t * hd..(t + 1) * hd])
                    .map(|(a, b)| a * b)
                    .sum();
                let (lo, hi) = h.windows[t];
                let (lo, hi) = (lo as usize - c0, hi as usize - c0);
                let (pr, dr) = (&p[r * ld..(r + 1) * ld], &mut ds[r * ld..(r + 1) * ld]);
                dr[..lo].fill(0.0);
                dr[hi..].fill(0.0);
                for (d, &pv) in dr[lo..hi].iter_mut().zip(&pr[lo..hi]) {
                    *d = self.scale * pv * (*d - dot);
                }
            }
            Self::times_keys(&kt, &ds, &block, s, hd, &mut tmp, dq)?;
            Self::accumulate_keys(&ds, h.q, &block, s, hd, &mut dk_acc)?;
            Self::accumulate_keys(&p, g, &block, s, hd, &mut dv_acc)?;
        }
        for (t, (k, v)) in dk
            .chunks_exact_mut(hd)
            .zip(dv.chunks_exact_mut(hd))
            .enumerate()
        {
            k.copy_from_slice(&dk_acc[t * wide..t * wide + hd]);
            v.copy_from_slice(&dv_acc[t * wide..t * wide + hd]);
        }
        Ok(())
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "firstkd-flash-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let d = self.dims(ql, kl, vl)?;
        let q = cpu_slice(qs, ql, "flash_attention")?;
        let k = cpu_slice(ks, kl, "flash_attention")?;
        let v = cpu_slice(vs, vl, "flash_attention")?;
        let sh = d.s * d.hd;
        let mut o = vec![0f32; q.len()];
        let mut lse = vec![0f32; d.b * d.heads() * d.s];
        o.par_chunks_mut(sh)
            .zip(lse.par_chunks_mut(d.s))
            .enumerate()
            .try_for_each(|(bh, (o, lse))| {
                self.forward_head(&self.head(d, bh, q, k, v), d.s, d.hd, o, lse)
            })?;
        match self.lse.lock() {
            Ok(mut slot) => *slot = Some(lse),
            Err(_) => bail!("flash_attention: the saved log-sum-exps were poisoned"),
        }
        Ok((CpuStorage::F32(o), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = match self.lse.lock() {
            Ok(slot) => slot.clone(),
            Err(_) => bail!("flash_attention: the saved log-sum-exps were poisoned"),
        };
        let Some(lse) = lse else {
            bail!("flash_attention: backward pass before the forward pass")
        };
        let d = self.dims(q.layout(), k.layout(), v.layout())?;
        let grad = grad.contiguous()?;
        let sh = d.s * d.hd;
        let (dq, dk, dv) = with_data(q, "flash_attention", |qd| {
            with_data(k, "flash_attention", |kd| {
                with_data(v, "flash_attention", |vd| {
                    with_data(res, "flash_attention", |od| {
                        with_data(&grad, "flash_attention", |gd| {
                            let tasks = d.b * d.heads();
                            let mut dq = vec![0f32; qd.len()];
                            // Per query head; summed over each K/V head's group below.
                            let mut dk_h = vec![0f32; tasks * sh];
                            let mut dv_h = vec![0f32; tasks * sh];
                            dq.par_chunks_mut(sh)
                                .zip(dk_h.par_chunks_mut(sh))
                                .zip(dv_h.par_chunks_mut(sh))
                                .enumerate()
                                .try_for_each(|(bh, ((dq, dk), dv))| {
                                    let rows = bh * sh..(bh + 1) * sh;
                                    self.backward_head(
                                        &self.head(d, bh, qd, kd, vd),
                                        &od[rows.clone()],
                                        &gd[rows],
                                        &lse[bh * d.s..(bh + 1) * d.s],
                                        (d.s, d.hd),
                                        dq,
                                        dk,
                                        dv,
                                    )
                                })?;
                            let sum_groups = |per_head: &[f32]| {
                                let mut out = vec![0f32; kd.len()];
                                out.par_chunks_mut(sh).enumerate().for_each(|(kv, dst)| {
                                    for h in
                                        per_head.chunks_exact(sh).skip(kv * d.group).take(d.group)
                                    {
                                        dst.iter_mut().zip(h).for_each(|(a, b)| *a += b);
                                    }
                                });
                                out
                            };
                            Ok((dq, sum_groups(&dk_h), sum_groups(&dv_h)))
                        })
                    })
                })
            })
        })?;
        Ok((
            Some(cpu_tensor(dq, q.shape())?),
            Some(cpu_tensor(dk, k.shape())?),
            Some(cpu_tensor(dv, v.shape())?),
        ))
    }
}

/// Causal attention output `[b, nkv, group * s, hd]` of queries `q` (the query heads sharing a
/// K/V head folded into the rows, each head's `s` queries together, RoPE applied), keys and
/// values `[b, nkv, s, hd]`: per query, the softmax of `scale * q k^T` over the keys `lo..hi`
/// of its window (`windows[b * s + t]`, see `model::key_windows`) times those values (CPU,
/// f32, AVX-512F: see [`flash_available`]).
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    windows: &Arc<Vec<(u32, u32)>>,
    group: usize,
    scale: f64,
) -> CResult<Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        FlashAttention {
            windows: windows.clone(),
            group,
            scale: scale as f32,
            lse: Mutex::new(None),
        },
    )
}
