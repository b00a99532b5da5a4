//! A Llama-family decoder (Llama 2/3, SmolLM, Qwen2) for inference that returns the hidden
//! state of **every** position of a right-padded `[batch, seq]` batch.
//!
//! Weights are f32 (dequantised from GGUF or converted from safetensors) in Hugging Face layout:
//! `[out, in]` matrices, Q/K rows in the half-split ("neox") RoPE order. GGUF Llama files store
//! Q/K rows interleaved for llama.cpp's RoPE; the loader undoes that permutation, so one RoPE
//! kernel serves every source.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::attention::{AttentionLayout, KeySpan};
use super::qgemm::{self, Kernel, Precision, QWeight};
use super::sgemm::PackedF32;
use crate::error::{Error, Result};
use crate::weights::Role;

pub use crate::weights::{Architecture, ModelConfig};

/// One decoder block's weights in Hugging Face layout (`[out, in]`), f32.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// `input_layernorm` / `attn_norm`.
    pub attn_norm: Tensor,
    /// `q_proj`.
    pub q: Tensor,
    /// `k_proj`.
    pub k: Tensor,
    /// `v_proj`.
    pub v: Tensor,
    /// Q/K/V biases (Qwen2).
    pub qkv_bias: Option<(Tensor, Tensor, Tensor)>,
    /// `o_proj`.
    pub o: Tensor,
    /// `post_attention_layernorm` / `ffn_norm`.
    pub ffn_norm: Tensor,
    /// `gate_proj`.
    pub gate: Tensor,
    /// `up_proj`.
    pub up: Tensor,
    /// `down_proj`.
    pub down: Tensor,
}

impl LayerWeights {
    /// Reads one layer's weights through `get` (a role's tensor in Hugging Face layout);
    /// the Q/K/V biases only for architectures that have them.
    pub fn from_roles(
        arch: Architecture,
        mut get: impl FnMut(Role) -> Result<Tensor>,
    ) -> Result<Self> {
        let qkv_bias = if arch.qkv_bias() {
            Some((get(Role::QBias)?, get(Role::KBias)?, get(Role::VBias)?))
        } else {
            None
        };
        Ok(LayerWeights {
            attn_norm: get(Role::AttnNorm)?,
            q: get(Role::Q)?,
            k: get(Role::K)?,
            v: get(Role::V)?,
            qkv_bias,
            o: get(Role::O)?,
            ffn_norm: get(Role::FfnNorm)?,
            gate: get(Role::Gate)?,
            up: get(Role::Up)?,
            down: get(Role::Down)?,
        })
    }
}

/// How the teacher's matrix products are computed.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Compute {
    /// f32 weights and products (weights dequantised from GGUF): the reference path.
    #[default]
    F32,
    /// Weights quantised to 12 bits and activations to 13 bits (int16) in blocks of 64 along
    /// the reduction axis, products in i32 with AVX-512 VNNI or AVX2 (CPU only): twice the
    /// f32 multiply rate, labels within f32 rounding noise (docs/benchmarks.md).
    Int16,
    /// Weights and activations quantised to int8 in blocks of 64 (W8A8), products in i32
    /// (CPU only). The fastest, but its labels differ measurably from f32
    /// (docs/benchmarks.md): for throughput experiments, not for corpora.
    Int8,
    /// bf16 weights, and bf16 inputs to every product (projections and attention), with f32
    /// accumulation and bf16 results (cuBLAS's bf16 GEMM as candle calls it); norms, softmax,
    /// RoPE and the residual stream stay f32. For accelerators
    /// (tensor cores); on the CPU candle widens each bf16 product to f32, so it is slower than
    /// f32 there and serves to measure the labels' accuracy cost (docs/benchmarks.md).
    Bf16,
}

impl Compute {
    /// The command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Compute::F32 => "f32",
            Compute::Int16 => "int16",
            Compute::Int8 => "int8",
            Compute::Bf16 => "bf16",
        }
    }
}

/// A `[out, in]` projection: f32 for candle's `matmul`, f32 packed for the AVX-512 kernel
/// ([`PackedF32`]), or packed int8 / int16 for [`qgemm`].
#[derive(Debug, Clone)]
enum Linear {
    F32(Tensor),
    Packed(Arc<PackedF32>, Device),
    Quantized(Arc<QWeight>, Kernel),
    Bf16(Tensor),
}

impl Linear {
    /// `x W^T` for `x` of `[rows, in]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::F32(w) => Ok(x.matmul(&w.t()?)?),
            Linear::Packed(w, _) => {
                let (rows, _) = x.dims2()?;
                let out = crate::host::with_f32(x, |xs| w.matmul(xs, rows))??;
                Ok(Tensor::from_vec(out, (rows, w.rows()), x.device())?)
            }
            Linear::Quantized(w, kernel) => {
                let (rows, _) = x.dims2()?;
                let out = crate::host::with_f32(x, |xs| qgemm::matmul(xs, rows, w, *kernel))??;
                Ok(Tensor::from_vec(out, (rows, w.rows()), x.device())?)
            }
            Linear::Bf16(w) => Ok(x
                .to_dtype(DType::BF16)?
                .matmul(&w.t()?)?
                .to_dtype(DType::F32)?),
        }
    }

    /// An f32 projection, packed for the AVX-512 kernel on a CPU that has it.
    fn f32(w: Tensor) -> Result<Self> {
        if !matches!(w.device(), Device::Cpu) || !PackedF32::available() {
            return Ok(Linear::F32(w.contiguous()?));
        }
        let (n, k) = w.dims2()?;
        let p = crate::host::with_f32(&w, |ws| PackedF32::pack(ws, n, k))??;
        Ok(Linear::Packed(Arc::new(p), w.device().clone()))
    }

    /// The f32 weights `[out, in]`.
    fn weights(&self) -> Result<Tensor> {
        match self {
            Linear::F32(w) => Ok(w.clone()),
            Linear::Packed(p, device) => {
                Ok(Tensor::from_vec(p.unpack(), (p.rows(), p.cols()), device)?)
            }
            Linear::Quantized(..) | Linear::Bf16(_) => Err(Error::Internal(
                "quantised or bf16 weights have no exact f32 form".to_string(),
            )),
        }
    }

    /// The integer form of an f32 projection.
    fn quantized(&self, kernel: Kernel, precision: Precision) -> Result<Self> {
        match self {
            Linear::Packed(..) => Linear::F32(self.weights()?).quantized(kernel, precision),
            Linear::F32(w) => {
                let (n, k) = w.dims2()?;
                let q = crate::host::with_f32(w, |ws| QWeight::quantize(ws, n, k, precision))??;
                Ok(Linear::Quantized(Arc::new(q), kernel))
            }
            Linear::Quantized(..) | Linear::Bf16(_) => Err(Error::Internal(
                "the weights are already quantised".to_string(),
            )),
        }
    }
}

/// A block with fused projections: one `[q+k+v, hidden]` and one `[2*inter, hidden]` matmul.
#[derive(Debug, Clone)]
struct Block {
    attn_norm: Tensor,
    wqkv: Linear,
    bqkv: Option<Tensor>,
    wo: Linear,
    ffn_norm: Tensor,
    w_gate_up: Linear,
    w_down: Linear,
}

/// The decoder, ready for inference.
#[derive(Debug, Clone)]
pub struct TeacherModel {
    cfg: ModelConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    compute: Compute,
}

impl TeacherModel {
    /// Assembles a model from f32 weights (HF layout). `output` is `None` for tied embeddings.
    pub fn new(
        cfg: ModelConfig,
        embed: Tensor,
        layers: Vec<LayerWeights>,
        norm: Tensor,
        output: Option<Tensor>,
        device: &Device,
    ) -> Result<Self> {
        if cfg.num_heads == 0
            || cfg.num_kv_heads == 0
            || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads)
        {
            return Err(Error::InvalidArgument(format!(
                "{} query heads cannot be grouped over {} key/value heads",
                cfg.num_heads, cfg.num_kv_heads
            )));
        }
        if !cfg.head_dim.is_multiple_of(2) {
            return Err(Error::InvalidArgument(format!(
                "odd head width {}",
                cfg.head_dim
            )));
        }
        let blocks = layers
            .into_iter()
            .map(|l| {
                let wqkv = Tensor::cat(&[&l.q, &l.k, &l.v], 0)?.contiguous()?;
                let bqkv = match &l.qkv_bias {
                    Some((bq, bk, bv)) => Some(Tensor::cat(&[bq, bk, bv], 0)?),
                    None => None,
                };
                let w_gate_up = Tensor::cat(&[&l.gate, &l.up], 0)?.contiguous()?;
                Ok(Block {
                    attn_norm: l.attn_norm,
                    wqkv: Linear::f32(wqkv)?,
                    bqkv,
                    wo: Linear::f32(l.o)?,
                    ffn_norm: l.ffn_norm,
                    w_gate_up: Linear::f32(w_gate_up)?,
                    w_down: Linear::f32(l.down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let output = match output {
            Some(o) => o.contiguous()?,
            None => embed.clone(),
        };
        let (cos, sin) = rope_tables(&cfg, device)?;
        Ok(Self {
            cfg,
            embed,
            blocks,
            norm,
            output: Linear::f32(output)?,
            cos,
            sin,
            device: device.clone(),
            compute: Compute::F32,
        })
    }

    /// Switches the matrix products to `compute`. Int8 needs the CPU; it quantises every
    /// projection and the output matrix once (the f32 copies are dropped, the embedding
    /// table stays f32) and picks the best kernel this CPU has ([`Kernel::detect`]).
    /// Returns the description recorded in the store's provenance.
    pub fn set_compute(&mut self, compute: Compute) -> Result<String> {
        if compute == self.compute {
            return Ok(self.compute_description());
        }
        if (self.compute, compute) == (Compute::F32, Compute::Bf16) {
            let bf16 = |l: &Linear| -> Result<Linear> {
                Ok(Linear::Bf16(
                    l.weights()?.to_dtype(DType::BF16)?.contiguous()?,
                ))
            };
            for b in &mut self.blocks {
                b.wqkv = bf16(&b.wqkv)?;
                b.wo = bf16(&b.wo)?;
                b.w_gate_up = bf16(&b.w_gate_up)?;
                b.w_down = bf16(&b.w_down)?;
            }
            self.output = bf16(&self.output)?;
            self.compute = compute;
            return Ok(self.compute_description());
        }
        let precision = match (self.compute, compute) {
            (Compute::F32, Compute::Int16) => Precision::Int16,
            (Compute::F32, Compute::Int8) => Precision::Int8,
            (from, to) => {
                return Err(Error::InvalidArgument(format!(
                    "a model quantised for {} cannot switch to {}; load it again",
                    from.as_str(),
                    to.as_str()
                )))
            }
        };
        if !matches!(self.device, Device::Cpu) {
            return Err(Error::InvalidArgument(format!(
                "{} products run on the CPU only; use f32 on an accelerator",
                compute.as_str()
            )));
        }
        let kernel = Kernel::detect();
        for b in &mut self.blocks {
            b.wqkv = b.wqkv.quantized(kernel, precision)?;
            b.wo = b.wo.quantized(kernel, precision)?;
            b.w_gate_up = b.w_gate_up.quantized(kernel, precision)?;
            b.w_down = b.w_down.quantized(kernel, precision)?;
        }
        self.output = self.output.quantized(kernel, precision)?;
        self.compute = compute;
        Ok(self.compute_description())
    }

    /// How the products are computed, e.g. `int16 (w12a13, blocks of 64, avx512-vnni)`.
    pub fn compute_description(&self) -> String {
        match &self.output {
            Linear::F32(_) => "f32".to_string(),
            Linear::Packed(..) => "f32 (avx512 kernel)".to_string(),
            Linear::Bf16(_) => {
                "bf16 (bf16 weights, product inputs and results; f32 accumulation and elementwise)"
                    .to_string()
            }
            Linear::Quantized(w, kernel) => format!(
                "{} ({}, blocks of {}, {})",
                w.precision().as_str(),
                match w.precision() {
                    Precision::Int16 => "w12a13",
                    Precision::Int8 => "w8a8",
                },
                qgemm::QB,
                kernel.as_str()
            ),
        }
    }

    /// The compute mode.
    pub fn compute(&self) -> Compute {
        self.compute
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Final (normalised) hidden states `[batch, seq, hidden]` for a right-padded batch of ids
    /// `[batch, seq]` (u32). Position `p` of row `b` only attends to positions `<= p` of the
    /// same row, so as long as padding is on the right (after each sequence's last token) the
    /// values at real positions do not depend on the padding or on the other rows.
    pub fn hidden_states(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.hidden_states_with(input_ids, None)
    }

    /// [`hidden_states`](Self::hidden_states) with an explicit [`AttentionLayout`]: per-token
    /// RoPE positions and key spans (`None`: plain causal attention from position 0).
    pub fn hidden_states_with(
        &self,
        input_ids: &Tensor,
        layout: Option<&AttentionLayout>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let ids = input_ids.flatten_all()?;
        let mut x = self.embed.index_select(&ids, 0)?; // [b*s, h]
        let (cos, sin, attend) = match layout {
            None => {
                if s > self.cfg.context_length {
                    return Err(Error::InvalidArgument(format!(
                        "sequence of {s} tokens exceeds the model's context of {}",
                        self.cfg.context_length
                    )));
                }
                (
                    self.cos.narrow(0, 0, s)?,
                    self.sin.narrow(0, 0, s)?,
                    Attend::Causal(causal_mask(s, &self.device)?),
                )
            }
            Some(layout) => {
                layout.check(b, s, self.cfg.context_length)?;
                let pos = Tensor::from_slice(&layout.positions, b * s, &self.device)?;
                let half = self.cfg.head_dim / 2;
                let cos = self.cos.index_select(&pos, 0)?.reshape((b, s, half))?;
                let sin = self.sin.index_select(&pos, 0)?.reshape((b, s, half))?;
                let attend = if matches!(self.device, Device::Cpu) {
                    Attend::Spans(&layout.spans)
                } else {
                    Attend::Mask(layout.additive_mask(b, s, &self.device)?)
                };
                (cos, sin, attend)
            }
        };
        for block in &self.blocks {
            x = self.block_forward(block, &x, b, s, &attend, &cos, &sin)?;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps as f32)?;
        Ok(x.reshape((b, s, self.cfg.hidden_size))?)
    }

    /// Logits `[rows, vocab]` for hidden-state rows `[rows, hidden]`.
    pub fn logits(&self, hidden_rows: &Tensor) -> Result<Tensor> {
        self.output.forward(hidden_rows)
    }

    /// Logits of every position, `[batch, seq, vocab]`. Convenient for tests and short inputs;
    /// labelling goes through [`hidden_states`](Self::hidden_states) + chunked
    /// [`logits`](Self::logits) instead so the full tensor never exists.
    pub fn forward_logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let h = self.hidden_states(input_ids)?;
        let logits = self.logits(&h.reshape((b * s, self.cfg.hidden_size))?)?;
        Ok(logits.reshape((b, s, self.cfg.vocab_size))?)
    }

    /// An attention product `a b` (f32 in and out) in the model's compute mode: bf16 inputs
    /// (and a bf16 result, as cuBLAS gives it) for bf16, f32 otherwise.
    fn attention_product(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        match self.compute {
            Compute::Bf16 => Ok(a
                .to_dtype(DType::BF16)?
                .matmul(&b.to_dtype(DType::BF16)?)?
                .to_dtype(DType::F32)?),
            _ => Ok(a.matmul(b)?),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        b: usize,
        s: usize,
        attend: &Attend<'_>,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (nq, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let group = nq / nkv;
        let eps = cfg.rms_norm_eps as f32;

        let h = candle_nn::ops::rms_norm(x, &block.attn_norm, eps)?;
        let mut qkv = block.wqkv.forward(&h)?; // [b*s, (nq + 2 nkv) hd]
        if let Some(bias) = &block.bqkv {
            qkv = qkv.broadcast_add(bias)?;
        }
        let qkv = qkv.reshape((b, s, nq + 2 * nkv, hd))?;
        // [b, heads, s, hd], contiguous for the RoPE kernel and the matmuls.
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            Ok(qkv.narrow(2, start, n)?.transpose(1, 2)?.contiguous()?)
        };
        let q = candle_nn::rotary_emb::rope(&heads(0, nq)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&heads(nq, nkv)?, cos, sin)?;
        let v = heads(nq + nkv, nkv)?;
        // Grouped-query attention without repeating K/V: the `group` query heads that share a
        // key/value head are consecutive, so fold them into the row dimension.
        let q = (q.reshape((b, nkv, group * s, hd))? * (1.0 / (hd as f64).sqrt()))?;
        // bf16 compute: the two attention products take bf16 inputs; the softmax stays f32.
        let scores = self.attention_product(&q, &k.t()?)?; // [b, nkv, group*s, s]
        let probs = match attend {
            Attend::Causal(mask) => super::kernels::causal_softmax(&scores, s, mask)?,
            Attend::Spans(spans) => super::kernels::span_softmax(&scores, s, spans)?,
            Attend::Mask(mask) => {
                let masked = scores
                    .reshape((b, nq, s, s))?
                    .broadcast_add(&mask.unsqueeze(1)?)?;
                candle_nn::ops::softmax_last_dim(&masked)?.reshape((b, nkv, group * s, s))?
            }
        };
        let attn = self.attention_product(&probs, &v)?; // [b, nkv, group*s, hd]
        let attn = attn
            .reshape((b, nq, s, hd))?
            .transpose(1, 2)?
            .reshape((b * s, nq * hd))?;
        let x = (x + block.wo.forward(&attn)?)?;

        let h = candle_nn::ops::rms_norm(&x, &block.ffn_norm, eps)?;
        let gate_up = block.w_gate_up.forward(&h)?; // [b*s, 2*inter]
        let inter = cfg.intermediate_size;
        let act = super::kernels::swiglu(&gate_up, inter)?;
        Ok((x + block.w_down.forward(&act)?)?)
    }
}

/// How a block's attention is masked.
enum Attend<'a> {
    /// Causal from 0; the additive `[s, s]` mask serves non-CPU devices.
    Causal(Tensor),
    /// Per-query key spans (CPU kernel).
    Spans(&'a [KeySpan]),
    /// Per-query key spans as an additive `[b, s, s]` mask (other devices).
    Mask(Tensor),
}

/// Additive causal mask `[s, s]`: 0 where key <= query, -inf above the diagonal.
fn causal_mask(s: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..s)
        .flat_map(|q| (0..s).map(move |k| if k <= q { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(data, (s, s), device)?)
}

/// Row-major cos/sin of `p * f` for positions `p < positions` and frequencies `f`, each row
/// holding the frequencies `repeat` times (1 for half-split tables, 2 for full-width ones).
/// Angles in f64, like HF's fp32 `inv_freq @ positions` but without its rounding at large
/// positions; identical within f32 precision for short contexts.
pub(crate) fn rope_cos_sin(
    inv_freq: &[f64],
    positions: usize,
    repeat: usize,
) -> (Vec<f32>, Vec<f32>) {
    let width = inv_freq.len() * repeat;
    let mut cos = Vec::with_capacity(positions * width);
    let mut sin = Vec::with_capacity(positions * width);
    for p in 0..positions {
        for _ in 0..repeat {
            for f in inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
    }
    (cos, sin)
}

/// Cos/sin tables `[context, head_dim / 2]` for half-split RoPE.
fn rope_tables(cfg: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| {
            let f = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64);
            match &cfg.rope_freq_divisors {
                Some(div) => f / div.get(i).copied().unwrap_or(1.0) as f64,
                None => f,
            }
        })
        .collect();
    let n = cfg.context_length.max(1);
    let (cos, sin) = rope_cos_sin(&inv_freq, n, 1);
    Ok((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
}

pub(crate) use crate::weights::to_f32;

#[cfg(test)]
mod tests {
    use crate::teacher::{AttentionLayout, KeySpan};

    fn layout(spans: Vec<KeySpan>) -> AttentionLayout {
        AttentionLayout {
            positions: (0..spans.len() as u32).collect(),
            spans,
        }
    }

    #[test]
    fn attention_layout_check_refuses_bad_spans() {
        let prompt_then_branch = vec![
            KeySpan::causal(0),
            KeySpan::causal(0),
            KeySpan {
                shared_start: 0,
                shared_end: 2,
                own_start: 2,
            },
        ];
        assert!(layout(prompt_then_branch).check(1, 3, 16).is_ok());
        let bad = [
            // an empty shared range past the row
            KeySpan {
                shared_start: 9,
                shared_end: 9,
                own_start: 0,
            },
            // shared and own keys overlap
            KeySpan {
                shared_start: 0,
                shared_end: 2,
                own_start: 1,
            },
            // own keys start after the query
            KeySpan::causal(3),
        ];
        for sp in bad {
            let spans = vec![KeySpan::causal(0), KeySpan::causal(0), sp];
            assert!(layout(spans).check(1, 3, 16).is_err(), "{sp:?} accepted");
        }
        // wrong lengths, and a position past the context
        assert!(layout(vec![KeySpan::causal(0); 2]).check(1, 3, 16).is_err());
        let mut far = layout(vec![KeySpan::causal(0); 3]);
        far.positions[2] = 16;
        assert!(far.check(1, 3, 16).is_err());
    }
}
