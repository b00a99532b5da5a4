//! The student's blocks, candle-style: [`Attention`], [`Mlp`] and [`DecoderLayer`], each built
//! with `new(cfg, weights)` from the weights under its Hugging Face prefix and run with
//! `forward`. Each has two paths computing the same function: the fused CPU kernels of
//! [`super::fused`] and composed candle ops (every other device).

use std::sync::Arc;

use candle_core::{DType, Tensor, D};

use super::fused;
use super::model::{rms_norm, rope, StudentConfig};
use crate::error::Result;
use crate::weights::Role;

/// What every block of one forward pass shares: the batch shape, the type of the matrix
/// products and the attention inputs of the chosen path.
pub(crate) struct Pass<'a> {
    pub b: usize,
    pub s: usize,
    pub dt: DType,
    pub path: Path<'a>,
}

/// Attention inputs of each path.
pub(crate) enum Path<'a> {
    /// Fused kernels: the keys each query sees and the RoPE tables with per-token positions.
    Fused {
        windows: &'a Arc<Vec<(u32, u32)>>,
        rope: &'a fused::Rope,
    },
    /// Composed ops: an additive mask `[b, 1, group*s, s]` and per-token cos/sin
    /// `[b, 1, s, hd]`.
    Composed {
        mask: &'a Tensor,
        cos: &'a Tensor,
        sin: &'a Tensor,
    },
}

impl Pass<'_> {
    fn fused(&self) -> bool {
        matches!(self.path, Path::Fused { .. })
    }

    /// `x @ w^T` in the pass's product type.
    fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if self.fused() && self.dt == DType::F32 {
            Ok(fused::linear(x, w)?)
        } else {
            linear(x, w, self.dt)
        }
    }

    fn norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        if self.fused() {
            Ok(fused::rms_norm(x, w, eps)?)
        } else {
            rms_norm(x, w, eps)
        }
    }
}

/// `x @ w^T` for `x: [n, in]`, `w: [out, in]`, computed in `dt` (result f32).
pub(crate) fn linear(x: &Tensor, w: &Tensor, dt: DType) -> Result<Tensor> {
    matmul(x, &w.t()?, dt)
}

/// `a @ b` computed in `dt`: both sides are cast (differentiably) and the product cast back to
/// f32, so the gradients of f32 inputs are f32.
pub(crate) fn matmul(a: &Tensor, b: &Tensor, dt: DType) -> Result<Tensor> {
    if dt == DType::F32 {
        return Ok(a.matmul(b)?);
    }
    Ok(a.to_dtype(dt)?
        .matmul(&b.to_dtype(dt)?)?
        .to_dtype(DType::F32)?)
}

/// Looks one layer's weight up by its role.
pub(crate) type Weights<'a> = dyn Fn(Role) -> Result<Tensor> + 'a;

/// Grouped-query self-attention with RoPE (query heads sharing a K/V head are folded into
/// the rows instead of repeating K and V).
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Option<(Tensor, Tensor, Tensor)>,
    o: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn new(cfg: &StudentConfig, w: &Weights<'_>) -> Result<Self> {
        let bias = if cfg.qkv_bias() {
            Some((w(Role::QBias)?, w(Role::KBias)?, w(Role::VBias)?))
        } else {
            None
        };
        Ok(Attention {
            q: w(Role::Q)?,
            k: w(Role::K)?,
            v: w(Role::V)?,
            bias,
            o: w(Role::O)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.kv_heads(),
            head_dim: cfg.head_dim(),
        })
    }

    /// Attention output `[b * s, hidden]` of normed hidden states `h` `[b * s, hidden]`.
    pub fn forward(&self, h: &Tensor, pass: &Pass<'_>) -> Result<Tensor> {
        let mut q = pass.linear(h, &self.q)?;
        let mut k = pass.linear(h, &self.k)?;
        let mut v = pass.linear(h, &self.v)?;
        if let Some((bq, bk, bv)) = &self.bias {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        let attn = match &pass.path {
            Path::Fused { windows, rope } => self.fused(q, k, v, pass, windows, rope)?,
            Path::Composed { mask, cos, sin } => self.composed(q, k, v, pass, mask, cos, sin)?,
        };
        pass.linear(&attn, &self.o)
    }

    fn fused(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pass: &Pass<'_>,
        windows: &Arc<Vec<(u32, u32)>>,
        rope: &fused::Rope,
    ) -> Result<Tensor> {
        let (b, s, dt) = (pass.b, pass.s, pass.dt);
        let (nq, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let group = nq / nkv;
        let q = fused::split_heads(&q, (b, s, nq, hd), Some(rope))?;
        let k = fused::split_heads(&k, (b, s, nkv, hd), Some(rope))?;
        let v = fused::split_heads(&v, (b, s, nkv, hd), None)?;
        let q = q.reshape((b, nkv, group * s, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        if dt == DType::F32 && fused::flash_available() {
            let out = fused::flash_attention(&q, &k, &v, windows, group, scale)?;
            return Ok(fused::merge_heads(&out.reshape((b, nq, s, hd))?)?);
        }
        let scores = matmul(&q, &k.t()?, dt)?; // [b, nkv, group*s, s]
        let probs = fused::causal_softmax(&scores, windows, nkv * group * s, scale)?;
        Ok(fused::merge_heads(
            &matmul(&probs, &v, dt)?.reshape((b, nq, s, hd))?,
        )?)
    }

    #[allow(clippy::too_many_arguments)]
    fn composed(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pass: &Pass<'_>,
        mask: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let (b, s, dt) = (pass.b, pass.s, pass.dt);
        let (nq, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let group = nq / nkv;
        // [b, heads, s, hd]
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = rope(&heads(q, nq)?, cos, sin)?;
        let k = rope(&heads(k, nkv)?, cos, sin)?;
        let v = heads(v, nkv)?;
        let q = (q.reshape((b, nkv, group * s, hd))? * (1.0 / (hd as f64).sqrt()))?;
        let scores = matmul(&q, &k.t()?, dt)?.broadcast_add(mask)?; // [b, nkv, group*s, s]
        let max = scores.max_keepdim(D::Minus1)?.detach();
        let e = scores.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        Ok(matmul(&probs, &v, dt)?
            .reshape((b, nq, s, hd))?
            .transpose(1, 2)?
            .reshape((b * s, nq * hd))?)
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(h)) * up(h))`.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

impl Mlp {
    pub fn new(w: &Weights<'_>) -> Result<Self> {
        Ok(Mlp {
            gate: w(Role::Gate)?,
            up: w(Role::Up)?,
            down: w(Role::Down)?,
        })
    }

    pub fn forward(&self, h: &Tensor, pass: &Pass<'_>) -> Result<Tensor> {
        let (gate, up) = (pass.linear(h, &self.gate)?, pass.linear(h, &self.up)?);
        let act = if pass.fused() {
            fused::swiglu(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        pass.linear(&act, &self.down)
    }
}

/// One pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Debug, Clone)]
pub(crate) struct DecoderLayer {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
    eps: f64,
}

impl DecoderLayer {
    /// Layer `l` of a student, its weights looked up by their full Hugging Face names.
    pub fn new(
        cfg: &StudentConfig,
        l: usize,
        get: &dyn Fn(&str) -> Result<Tensor>,
    ) -> Result<Self> {
        let w = |role: Role| get(&role.hf(l));
        Ok(DecoderLayer {
            input_norm: w(Role::AttnNorm)?,
            attn: Attention::new(cfg, &w)?,
            post_norm: w(Role::FfnNorm)?,
            mlp: Mlp::new(&w)?,
            eps: cfg.rms_norm_eps,
        })
    }

    /// Hidden states `[b * s, hidden]` after this layer.
    pub fn forward(&self, x: &Tensor, pass: &Pass<'_>) -> Result<Tensor> {
        let h = pass.norm(x, &self.input_norm, self.eps)?;
        let x = (x + self.attn.forward(&h, pass)?)?;
        let h = pass.norm(&x, &self.post_norm, self.eps)?;
        Ok((&x + self.mlp.forward(&h, pass)?)?)
    }
}
