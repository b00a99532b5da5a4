//! The trainable student: a Llama-family decoder (Llama, SmolLM/SmolLM2, Qwen2 shapes) built
//! only from differentiable candle ops.
//!
//! candle's fused `rms_norm`, `softmax_last_dim` and `rope` kernels have no backward pass, so
//! this module composes them from elementary ops: RMSNorm as
//! `x / sqrt(mean(x^2) + eps) * w`, rotate-half RoPE with cos/sin tables, and softmax as
//! `exp(x - max) / sum`. Grouped-query attention folds the query heads that share a key/value
//! head into the row dimension instead of repeating K and V. Weights live in a
//! [`candle_nn::VarMap`] under their Hugging Face names (`model.layers.N.self_attn.q_proj.weight`,
//! ...), so a checkpoint is a plain HF `model.safetensors`.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::fused;
use super::layers::{DecoderLayer, Pass, Path};
use crate::error::{Error, Result};
use crate::weights::{tensors, Role, Sizes};

/// Additive attention-mask value for masked keys (finite, so fully masked rows stay finite).
const MASKED: f32 = -1e9;

/// Student hyper-parameters, mirroring the fields of a Hugging Face `config.json` for
/// `LlamaForCausalLM` / `Qwen2ForCausalLM`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudentConfig {
    /// `llama` (Llama, SmolLM, Mistral-style) or `qwen2` (Q/K/V biases).
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// HF class names, e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Model width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (defaults to `num_attention_heads`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head (defaults to `hidden_size / num_attention_heads`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Vocabulary size (rows of the embedding and output matrices).
    pub vocab_size: usize,
    /// Longest sequence the model handles.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Whether the output matrix is the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on the Q/K/V projections (defaults to true for `qwen2`, false otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// RoPE scaling; only `null` (none) is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// MLP activation; only `silu` (SwiGLU) is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Beginning-of-sequence id (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<serde_json::Value>,
    /// End-of-sequence id (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
    /// Padding token id(s), as in HF configs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<serde_json::Value>,
    /// Storage dtype of the weights; checkpoints written here are `float32`.
    #[serde(default = "default_dtype")]
    pub torch_dtype: String,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_max_positions() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_act() -> String {
    "silu".into()
}
fn default_dtype() -> String {
    "float32".into()
}

impl StudentConfig {
    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether Q/K/V projections carry biases.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.model_type == "qwen2")
    }

    /// Checks the shapes are usable.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidArgument(format!("student config: {reason}")));
        if !matches!(self.model_type.as_str(), "llama" | "qwen2" | "mistral") {
            return bad(format!(
                "model_type {:?} is not supported (llama, qwen2)",
                self.model_type
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act {:?} is not supported (silu)",
                self.hidden_act
            ));
        }
        if self.hidden_size == 0 || self.intermediate_size == 0 || self.vocab_size == 0 {
            return bad("hidden_size, intermediate_size and vocab_size must be positive".into());
        }
        let (nq, nkv) = (self.num_attention_heads, self.kv_heads());
        if nq == 0 || nkv == 0 || nq % nkv != 0 {
            return bad(format!(
                "{nq} query heads cannot be grouped over {nkv} key/value heads"
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head width {} must be even and positive",
                self.head_dim()
            ));
        }
        if self.rms_norm_eps <= 0.0 || self.rope_theta <= 0.0 {
            return bad("rms_norm_eps and rope_theta must be positive".into());
        }
        match &self.rope_scaling {
            None | Some(serde_json::Value::Null) => {}
            Some(other) => return bad(format!("rope_scaling {other} is not supported")),
        }
        Ok(())
    }

    /// The sizes that fix every tensor's shape.
    pub fn sizes(&self) -> Sizes {
        Sizes {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            vocab: self.vocab_size,
            heads: self.num_attention_heads,
            kv_heads: self.kv_heads(),
            head_dim: self.head_dim(),
        }
    }

    /// Shapes of every trainable tensor by HF name.
    pub fn tensor_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let sizes = self.sizes();
        tensors(
            self.num_hidden_layers,
            self.qkv_bias(),
            self.tie_word_embeddings,
        )
        .into_iter()
        .map(|(role, l)| (role.hf(l), role.shape(&sizes)))
        .collect()
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        self.tensor_shapes()
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }
}

/// A trainable Llama-family decoder whose weights are [`Var`]s in a [`VarMap`].
pub struct Student {
    cfg: StudentConfig,
    varmap: VarMap,
    vars: Vec<(String, Var)>,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    device: Device,
    /// Type of the transformer blocks' matrix products (weights stay f32; see
    /// [`Student::set_compute_dtype`]).
    compute: DType,
    /// Whether the blocks use the fused CPU kernels of [`super::fused`].
    fused: bool,
}

impl std::fmt::Debug for Student {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Student")
            .field("cfg", &self.cfg)
            .field("tensors", &self.vars.len())
            .finish()
    }
}

/// Deterministic N(0, std^2) samples (Box-Muller over a seeded [`StdRng`]).
fn normal_vec(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

impl Student {
    /// A randomly initialised student: weights N(0, 0.02^2) drawn in name order from `seed`,
    /// norms 1, biases 0. The same config and seed always give the same weights.
    pub fn random(cfg: StudentConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut weights = BTreeMap::new();
        for (name, shape) in cfg.tensor_shapes() {
            let n: usize = shape.iter().product();
            let data = if name.ends_with("norm.weight") {
                vec![1f32; n]
            } else if name.ends_with(".bias") {
                vec![0f32; n]
            } else {
                normal_vec(&mut rng, n, 0.02)
            };
            weights.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Self::from_weights(cfg, weights, device)
    }

    /// Builds a student from f32 weights under their HF names. Missing tensors or wrong shapes
    /// are refused; extra tensors (e.g. `lm_head.weight` of a tied model) are ignored.
    pub fn from_weights(
        cfg: StudentConfig,
        mut weights: BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let varmap = VarMap::new();
        let mut vars = Vec::new();
        for (name, shape) in cfg.tensor_shapes() {
            let t = weights.remove(&name).ok_or_else(|| {
                Error::InvalidArgument(format!("student weights: missing tensor {name}"))
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::InvalidArgument(format!(
                    "student weights: {name} has shape {:?}, config expects {shape:?}",
                    t.dims()
                )));
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?.contiguous()?;
            let var = Var::from_tensor(&t)?;
            match varmap.data().lock() {
                Ok(mut data) => {
                    data.insert(name.clone(), var.clone());
                }
                Err(_) => return Err(Error::Internal("var map lock poisoned".into())),
            }
            vars.push((name, var));
        }
        let get = |name: &str| -> Result<Tensor> {
            vars.iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_tensor().clone())
                .ok_or_else(|| Error::Internal(format!("missing tensor {name}")))
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| DecoderLayer::new(&cfg, l, &get))
            .collect::<Result<Vec<_>>>()?;
        let embed = get(&Role::Embed.hf(0))?;
        let norm = get(&Role::FinalNorm.hf(0))?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(get(&Role::Output.hf(0))?)
        };
        Ok(Student {
            cfg,
            varmap,
            vars,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
            compute: DType::F32,
            fused: device.is_cpu(),
        })
    }

    /// Mixed precision: the blocks' matrix products (projections, attention scores and
    /// values) run in `dtype` (bf16 on a GPU), on bf16 copies of the f32 weights, so gradients
    /// and the optimizer state stay f32 (master weights). Norms, softmax, the output layer and
    /// the losses stay f32. `F32` (the default) turns it off.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        match dtype {
            DType::F32 | DType::BF16 | DType::F16 => {
                self.compute = dtype;
                Ok(())
            }
            other => Err(Error::InvalidArgument(format!(
                "compute dtype {other:?}: expected f32, bf16 or f16"
            ))),
        }
    }

    /// Chooses between the fused CPU kernels of [`super::fused`] (the default on the CPU) and
    /// the composed candle ops (the path on other devices). Both compute the same function;
    /// turning the fused kernels on for a non-CPU student is refused.
    pub fn set_fused(&mut self, fused: bool) -> Result<()> {
        if fused && !self.device.is_cpu() {
            return Err(Error::InvalidArgument(
                "the fused kernels run on the CPU only".into(),
            ));
        }
        self.fused = fused;
        Ok(())
    }

    /// See [`Student::set_fused`].
    pub fn fused(&self) -> bool {
        self.fused
    }

    /// See [`Student::set_compute_dtype`].
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &StudentConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights as a candle [`VarMap`].
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Trainable variables sorted by name (the order every optimizer loop uses, so float
    /// reductions over parameters are reproducible).
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Current weights by HF name (sharing storage with the variables).
    pub fn weights(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// The output projection `[vocab, hidden]` (the embedding when tied).
    pub fn output_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Final-norm hidden states `[batch * seq, hidden]` of a right-padded batch `[batch, seq]`
    /// (u32 ids). `lengths[b]` is the number of real tokens of row `b`; keys beyond it are
    /// masked, as are future keys (causal).
    pub fn hidden_states(&self, input_ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let segments: Vec<Vec<usize>> = lengths.iter().map(|&l| vec![l]).collect();
        self.hidden_states_packed(input_ids, &segments)
    }

    /// [`Student::hidden_states`] of a batch whose rows hold several sequences back to back:
    /// `segments[b]` lists the lengths of the sequences packed into row `b`, in order (their
    /// sum is the row's real tokens; the rest is padding). A token attends only to the earlier
    /// tokens of its own sequence and its RoPE position restarts at each sequence, so a packed
    /// sequence gets the hidden states it would get alone.
    pub fn hidden_states_packed(
        &self,
        input_ids: &Tensor,
        segments: &[Vec<usize>],
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if segments.len() != b {
            return Err(Error::InvalidArgument(format!(
                "{} rows of sequence lengths for a batch of {b} rows",
                segments.len()
            )));
        }
        if s > self.cfg.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "sequence of {s} tokens exceeds the student's max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        let (windows, positions) = key_windows(segments, s)?;
        let mut x = self.embed.index_select(&input_ids.flatten_all()?, 0)?;
        if self.fused {
            let (cos, sin) = rope_vecs(&self.cfg, s);
            let rope = (
                Arc::new(fused::RopeTables::new(cos, sin, self.cfg.head_dim())),
                Arc::new(positions),
            );
            let windows = Arc::new(windows);
            let pass = Pass {
                b,
                s,
                dt: self.compute,
                path: Path::Fused {
                    windows: &windows,
                    rope: &rope,
                },
            };
            for layer in &self.layers {
                x = layer.forward(&x, &pass)?;
            }
            return Ok(fused::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?);
        }
        let group = self.cfg.num_attention_heads / self.cfg.kv_heads();
        let mask = attention_mask(&windows, b, s, group, &self.device)?;
        let (cos, sin) = rope_tables(&self.cfg, s, &self.device)?;
        // Per-token tables [b, 1, s, hd] (positions restart at each packed sequence).
        let pos = Tensor::from_vec(positions, b * s, &self.device)?;
        let hd = self.cfg.head_dim();
        let cos = cos.index_select(&pos, 0)?.reshape((b, 1, s, hd))?;
        let sin = sin.index_select(&pos, 0)?.reshape((b, 1, s, hd))?;
        let pass = Pass {
            b,
            s,
            dt: self.compute,
            path: Path::Composed {
                mask: &mask,
                cos: &cos,
                sin: &sin,
            },
        };
        for layer in &self.layers {
            x = layer.forward(&x, &pass)?;
        }
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Logits `[batch, seq, vocab]` (for tests and small inputs; training never builds them).
    pub fn logits(&self, input_ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let h = self.hidden_states(input_ids, lengths)?;
        let logits = h.matmul(&self.output_weight().t()?)?;
        Ok(logits.reshape((b, s, self.cfg.vocab_size))?)
    }
}

/// Differentiable RMSNorm over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(weight)?)
}

/// Rotate-half RoPE on `[b, heads, s, hd]` with `cos`/`sin` tables `[s, hd]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// cos/sin values `[s, head_dim]` (each half repeated) for positions `0..s`.
fn rope_vecs(cfg: &StudentConfig, s: usize) -> (Vec<f32>, Vec<f32>) {
    let hd = cfg.head_dim();
    let half = hd / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64))
        .collect();
    crate::teacher::model::rope_cos_sin(&inv_freq, s, 2)
}

/// cos/sin tables `[s, head_dim]` (each half repeated) for positions `0..s`.
fn rope_tables(cfg: &StudentConfig, s: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let (cos, sin) = rope_vecs(cfg, s);
    Ok((
        Tensor::from_vec(cos, (s, hd), device)?,
        Tensor::from_vec(sin, (s, hd), device)?,
    ))
}

/// Per token `[b * s]`: the keys `lo..hi` it may see, and its RoPE position.
pub(crate) type KeyWindows = (Vec<(u32, u32)>, Vec<u32>);

/// The keys each query may see and each token's RoPE position, for rows of packed sequences
/// (`segments[b]`: lengths of the sequences of row `b`, in order), both `[b * s]`. A real token
/// at position `q` of a sequence starting at `start` sees keys `start..=q` and has RoPE position
/// `q - start`. A padding token sees the row's real tokens (key 0 alone in an empty row) so
/// its softmax stays finite; no real token ever sees padding.
pub(crate) fn key_windows(segments: &[Vec<usize>], s: usize) -> Result<KeyWindows> {
    let mut windows = Vec::with_capacity(segments.len() * s);
    let mut positions = Vec::with_capacity(segments.len() * s);
    for (r, row) in segments.iter().enumerate() {
        let fill: usize = row.iter().sum();
        if fill > s {
            return Err(Error::InvalidArgument(format!(
                "row {r}: sequences of {fill} tokens in a row of {s}"
            )));
        }
        let mut start = 0;
        for &len in row {
            for q in start..start + len {
                windows.push((start as u32, q as u32 + 1));
                positions.push((q - start) as u32);
            }
            start += len;
        }
        for q in fill..s {
            windows.push((0, fill.max(1) as u32));
            positions.push(q as u32);
        }
    }
    Ok((windows, positions))
}

/// Additive mask `[b, 1, group * s, s]` from [`key_windows`]: 0 where query `q` of row `r` may
/// see key `k`, a large negative value elsewhere.
pub(crate) fn attention_mask(
    windows: &[(u32, u32)],
    b: usize,
    s: usize,
    group: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut data = Vec::with_capacity(b * group * s * s);
    for r in 0..b {
        for _ in 0..group {
            for &(lo, hi) in &windows[r * s..(r + 1) * s] {
                for k in 0..s as u32 {
                    data.push(if (lo..hi).contains(&k) { 0.0 } else { MASKED });
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, group * s, s), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny_config(tied: bool) -> StudentConfig {
        serde_json::from_value(serde_json::json!({
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 512,
            "max_position_embeddings": 128,
            "tie_word_embeddings": tied,
        }))
        .unwrap()
    }

    #[test]
    fn every_trainable_tensor_gets_a_gradient() {
        for (tied, bias) in [(true, false), (false, true)] {
            let mut cfg = tiny_config(tied);
            cfg.attention_bias = Some(bias);
            let student = Student::random(cfg, 3, &Device::Cpu).unwrap();
            let ids = Tensor::new(&[[1u32, 5, 9, 300, 7], [2, 8, 4, 0, 0]], &Device::Cpu).unwrap();
            let logits = student.logits(&ids, &[5, 3]).unwrap();
            // A loss touching every output row: log-softmax cross-entropy on fixed targets.
            let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
            let loss = lsm.mean_all().unwrap().neg().unwrap();
            let grads = loss.backward().unwrap();
            for (name, var) in student.vars() {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("no grad for {name}"));
                let norm = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(norm > 0.0 && norm.is_finite(), "{name}: grad norm {norm}");
            }
        }
    }

    #[test]
    fn fused_and_composed_blocks_agree() {
        for (tied, bias) in [(true, false), (false, true)] {
            let mut cfg = tiny_config(tied);
            cfg.attention_bias = Some(bias);
            let mut student = Student::random(cfg, 11, &Device::Cpu).unwrap();
            assert!(student.fused(), "fused kernels are the CPU default");
            let ids =
                Tensor::new(&[[1u32, 5, 9, 300, 7, 2], [2, 8, 4, 0, 0, 0]], &Device::Cpu).unwrap();
            let run = |s: &Student| {
                let logits = s.logits(&ids, &[6, 3]).unwrap();
                let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
                // A loss weighting the positions differently, so position mix-ups show.
                let w = Tensor::arange(0f32, 6.0, &Device::Cpu)
                    .unwrap()
                    .reshape((1, 6, 1))
                    .unwrap();
                let loss = lsm.broadcast_mul(&w).unwrap().mean_all().unwrap();
                (logits, loss.backward().unwrap())
            };
            let (la, ga) = run(&student);
            student.set_fused(false).unwrap();
            let (lb, gb) = run(&student);
            let d = crate::testing::max_abs_diff(&la, &lb).unwrap();
            assert!(d < 1e-4, "logits differ by {d}");
            for (name, var) in student.vars() {
                let (a, b) = (
                    ga.get(var.as_tensor()).unwrap(),
                    gb.get(var.as_tensor()).unwrap(),
                );
                let d = crate::testing::max_abs_diff(a, b).unwrap();
                let scale = crate::testing::max_abs(b).unwrap();
                assert!(
                    scale > 0.0 && d <= 1e-3 * scale,
                    "{name}: {d} (scale {scale})"
                );
            }
        }
    }

    #[test]
    fn padding_does_not_change_real_positions() {
        let student = Student::random(tiny_config(true), 1, &Device::Cpu).unwrap();
        let alone = Tensor::new(&[[3u32, 1, 4]], &Device::Cpu).unwrap();
        let padded = Tensor::new(&[[3u32, 1, 4, 1, 5], [9, 2, 6, 5, 3]], &Device::Cpu).unwrap();
        let a = student.logits(&alone, &[3]).unwrap();
        let p = student.logits(&padded, &[3, 5]).unwrap();
        let diff =
            crate::testing::max_abs_diff(&a, &p.narrow(0, 0, 1).unwrap().narrow(1, 0, 3).unwrap())
                .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn packed_sequences_get_the_hidden_states_they_get_alone() {
        let mut student = Student::random(tiny_config(true), 4, &Device::Cpu).unwrap();
        let (a, b) = ([3u32, 1, 4, 1], [5u32, 9, 2]);
        for fused in [true, false] {
            student.set_fused(fused).unwrap();
            let alone = |ids: &[u32]| {
                let t = Tensor::new(ids, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                student.hidden_states(&t, &[ids.len()]).unwrap()
            };
            // Row 0: a then b then one padding token; row 1: b alone, padded.
            let ids = Tensor::new(
                &[[3u32, 1, 4, 1, 5, 9, 2, 0], [5, 9, 2, 0, 0, 0, 0, 0]],
                &Device::Cpu,
            )
            .unwrap();
            let packed = student
                .hidden_states_packed(&ids, &[vec![4, 3], vec![3]])
                .unwrap();
            let rows = |start: usize, len: usize| packed.narrow(0, start, len).unwrap();
            let d1 = crate::testing::max_abs_diff(&alone(&a), &rows(0, 4)).unwrap();
            let d2 = crate::testing::max_abs_diff(&alone(&b), &rows(4, 3)).unwrap();
            let d3 = crate::testing::max_abs_diff(&alone(&b), &rows(8, 3)).unwrap();
            assert!(
                d1 < 1e-5 && d2 < 1e-5 && d3 < 1e-5,
                "fused {fused}: {d1} {d2} {d3}"
            );
            // Without the segment boundary, b would attend to a: the states differ.
            let joined = student.hidden_states(&ids, &[7, 3]).unwrap();
            let d = crate::testing::max_abs_diff(&rows(4, 3), &joined.narrow(0, 4, 3).unwrap())
                .unwrap();
            assert!(d > 1e-3, "fused {fused}: segments had no effect ({d})");
        }
        let err = student
            .hidden_states_packed(
                &Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap(),
                &[vec![2, 2]],
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("sequences of 4 tokens in a row of 3"), "{err}");
    }

    #[test]
    fn random_init_is_seeded() {
        let a = Student::random(tiny_config(false), 7, &Device::Cpu).unwrap();
        let b = Student::random(tiny_config(false), 7, &Device::Cpu).unwrap();
        let c = Student::random(tiny_config(false), 8, &Device::Cpu).unwrap();
        let w = |s: &Student| {
            s.weights()["model.layers.1.mlp.up_proj.weight"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(w(&a), w(&b));
        assert_ne!(w(&a), w(&c));
    }
}
