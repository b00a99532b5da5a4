//! Model files, below both the teacher and the trainer: the architectures firstkd runs, their
//! hyper-parameters, **one table of tensor roles** with each role's GGUF and Hugging Face name,
//! and one GGUF reader ([`gguf::GgufFile`]: metadata, config, tokenizer, f32 tensors).
//!
//! A new model architecture starts here: a variant of [`Architecture`], the roles it adds to
//! [`ROLES`], and its metadata keys in [`gguf::GgufFile::config`].

pub mod gguf;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Architectures firstkd runs (teacher and student).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM/SmolLM2, Mistral-style dense models without biases.
    Llama,
    /// Qwen2 / Qwen2.5: Llama with biases on the Q, K and V projections.
    Qwen2,
}

impl Architecture {
    /// The GGUF `general.architecture` / HF `model_type` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// Parses a GGUF `general.architecture` or HF `model_type`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "llama" | "mistral" => Some(Architecture::Llama),
            "qwen2" => Some(Architecture::Qwen2),
            _ => None,
        }
    }

    /// The Hugging Face class name (`config.json` `architectures`).
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// Whether the Q, K and V projections have biases.
    pub fn qkv_bias(self) -> bool {
        self == Architecture::Qwen2
    }
}

/// Hyper-parameters of a decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture family.
    pub architecture: Architecture,
    /// Model width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Output vocabulary (rows of the output matrix).
    pub vocab_size: usize,
    /// Longest sequence the model was trained for.
    pub context_length: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Per-frequency divisors of the RoPE inverse frequencies (Llama 3.1 scaling), if any.
    pub rope_freq_divisors: Option<Vec<f32>>,
}

/// What a tensor is in a Llama-family decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Token embedding `[vocab, hidden]`.
    Embed,
    /// Final RMSNorm `[hidden]`.
    FinalNorm,
    /// Output matrix `[vocab, hidden]` (absent when tied to the embedding).
    Output,
    /// RMSNorm before attention `[hidden]`.
    AttnNorm,
    /// Query projection `[heads * head_dim, hidden]`.
    Q,
    /// Key projection `[kv_heads * head_dim, hidden]`.
    K,
    /// Value projection `[kv_heads * head_dim, hidden]`.
    V,
    /// Query bias (Qwen2).
    QBias,
    /// Key bias (Qwen2).
    KBias,
    /// Value bias (Qwen2).
    VBias,
    /// Attention output projection `[hidden, heads * head_dim]`.
    O,
    /// RMSNorm before the MLP `[hidden]`.
    FfnNorm,
    /// MLP gate projection `[intermediate, hidden]`.
    Gate,
    /// MLP up projection `[intermediate, hidden]`.
    Up,
    /// MLP down projection `[hidden, intermediate]`.
    Down,
}

/// One row of the name table.
#[derive(Debug, Clone, Copy)]
pub struct RoleNames {
    /// The role.
    pub role: Role,
    /// Per layer (`blk.N.` / `model.layers.N.` prefixes) or once per model.
    pub per_layer: bool,
    /// llama.cpp's name, after `blk.N.` for layer tensors.
    pub gguf: &'static str,
    /// Hugging Face transformers' name, after `model.layers.N.` for layer tensors.
    pub hf: &'static str,
}

const fn row(role: Role, per_layer: bool, gguf: &'static str, hf: &'static str) -> RoleNames {
    RoleNames {
        role,
        per_layer,
        gguf,
        hf,
    }
}

/// Every tensor role with its GGUF and Hugging Face name, in [`Role`] order: the one place
/// these names live.
pub const ROLES: [RoleNames; 15] = [
    row(
        Role::Embed,
        false,
        "token_embd.weight",
        "model.embed_tokens.weight",
    ),
    row(
        Role::FinalNorm,
        false,
        "output_norm.weight",
        "model.norm.weight",
    ),
    row(Role::Output, false, "output.weight", "lm_head.weight"),
    row(
        Role::AttnNorm,
        true,
        "attn_norm.weight",
        "input_layernorm.weight",
    ),
    row(Role::Q, true, "attn_q.weight", "self_attn.q_proj.weight"),
    row(Role::K, true, "attn_k.weight", "self_attn.k_proj.weight"),
    row(Role::V, true, "attn_v.weight", "self_attn.v_proj.weight"),
    row(Role::QBias, true, "attn_q.bias", "self_attn.q_proj.bias"),
    row(Role::KBias, true, "attn_k.bias", "self_attn.k_proj.bias"),
    row(Role::VBias, true, "attn_v.bias", "self_attn.v_proj.bias"),
    row(
        Role::O,
        true,
        "attn_output.weight",
        "self_attn.o_proj.weight",
    ),
    row(
        Role::FfnNorm,
        true,
        "ffn_norm.weight",
        "post_attention_layernorm.weight",
    ),
    row(Role::Gate, true, "ffn_gate.weight", "mlp.gate_proj.weight"),
    row(Role::Up, true, "ffn_up.weight", "mlp.up_proj.weight"),
    row(Role::Down, true, "ffn_down.weight", "mlp.down_proj.weight"),
];

/// The roles of one decoder layer, in table order.
pub const LAYER_ROLES: [Role; 12] = [
    Role::AttnNorm,
    Role::Q,
    Role::K,
    Role::V,
    Role::QBias,
    Role::KBias,
    Role::VBias,
    Role::O,
    Role::FfnNorm,
    Role::Gate,
    Role::Up,
    Role::Down,
];

impl Role {
    fn names(self) -> &'static RoleNames {
        // ROLES is in declaration order (checked by a test).
        &ROLES[self as usize]
    }

    /// Whether the role is repeated in every layer.
    pub fn per_layer(self) -> bool {
        self.names().per_layer
    }

    /// The name inside a layer (`self_attn.q_proj.weight`), or the whole name of a model-wide
    /// tensor, in Hugging Face spelling.
    pub fn hf_suffix(self) -> &'static str {
        self.names().hf
    }

    /// The full Hugging Face name; `layer` is ignored for model-wide tensors.
    pub fn hf(self, layer: usize) -> String {
        let n = self.names();
        if n.per_layer {
            hf_layer_name(layer, n.hf)
        } else {
            n.hf.to_string()
        }
    }

    /// The full GGUF name; `layer` is ignored for model-wide tensors.
    pub fn gguf(self, layer: usize) -> String {
        let n = self.names();
        if n.per_layer {
            format!("blk.{layer}.{}", n.gguf)
        } else {
            n.gguf.to_string()
        }
    }

    /// Whether a model has this tensor (`qkv_bias`: Q/K/V biases, as in Qwen2; `tied`: the
    /// output is the embedding).
    pub fn present(self, qkv_bias: bool, tied: bool) -> bool {
        match self {
            Role::QBias | Role::KBias | Role::VBias => qkv_bias,
            Role::Output => !tied,
            _ => true,
        }
    }

    /// The tensor's shape for the given sizes.
    pub fn shape(self, s: &Sizes) -> Vec<usize> {
        let (h, i, v) = (s.hidden, s.intermediate, s.vocab);
        let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        match self {
            Role::Embed | Role::Output => vec![v, h],
            Role::FinalNorm | Role::AttnNorm | Role::FfnNorm => vec![h],
            Role::Q => vec![q, h],
            Role::K | Role::V => vec![kv, h],
            Role::QBias => vec![q],
            Role::KBias | Role::VBias => vec![kv],
            Role::O => vec![h, q],
            Role::Gate | Role::Up => vec![i, h],
            Role::Down => vec![h, i],
        }
    }

    /// llama.cpp stores the Q and K rows of Llama models interleaved for its RoPE; this gives
    /// the number of heads to undo that for ([`unpermute_qk`]), or `None`.
    pub fn gguf_permuted_heads(self, cfg: &ModelConfig) -> Option<usize> {
        match (cfg.architecture, self) {
            (Architecture::Llama, Role::Q) => Some(cfg.num_heads),
            (Architecture::Llama, Role::K) => Some(cfg.num_kv_heads),
            _ => None,
        }
    }
}

/// The sizes that fix every tensor's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Model width.
    pub hidden: usize,
    /// MLP inner width.
    pub intermediate: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// `model.layers.{layer}.{suffix}`: a layer tensor's Hugging Face name.
pub fn hf_layer_name(layer: usize, suffix: &str) -> String {
    format!("model.layers.{layer}.{suffix}")
}

/// `model.layers.N.rest` -> (N, rest), the inverse of [`hf_layer_name`]; `None` for
/// model-wide tensors.
pub fn hf_layer_of(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (n, suffix) = rest.split_once('.')?;
    Some((n.parse().ok()?, suffix))
}

/// Every tensor of a model, as (role, layer), model-wide ones first (layer 0), then each
/// layer's in [`LAYER_ROLES`] order.
pub fn tensors(num_layers: usize, qkv_bias: bool, tied: bool) -> Vec<(Role, usize)> {
    let global = [Role::Embed, Role::FinalNorm, Role::Output]
        .into_iter()
        .filter(|r| r.present(qkv_bias, tied))
        .map(|r| (r, 0));
    let layers = (0..num_layers).flat_map(move |l| {
        LAYER_ROLES
            .into_iter()
            .filter(move |r| r.present(qkv_bias, tied))
            .map(move |r| (r, l))
    });
    global.chain(layers).collect()
}

/// Converts a weight to contiguous f32 on `device`.
pub fn to_f32(t: Tensor, device: &Device) -> Result<Tensor> {
    let t = if t.dtype() == DType::F32 {
        t
    } else {
        t.to_dtype(DType::F32)?
    };
    Ok(t.to_device(device)?.contiguous()?)
}

/// Undoes llama.cpp's Q/K row permutation (interleaved RoPE pairs) for `n_head` heads:
/// GGUF row `h*d + 2i + j` holds HF row `h*d + j*d/2 + i`.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?
        .contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_has_one_row_and_names_are_unique() {
        let all = [Role::Embed, Role::FinalNorm, Role::Output]
            .into_iter()
            .chain(LAYER_ROLES);
        let mut seen = std::collections::HashSet::new();
        for role in all {
            assert_eq!(
                ROLES.iter().filter(|r| r.role == role).count(),
                1,
                "{role:?}"
            );
            assert_eq!(ROLES[role as usize].role, role);
            assert!(seen.insert(role.gguf(3)), "{role:?}");
            assert!(seen.insert(role.hf(3)), "{role:?}");
        }
        assert_eq!(seen.len(), 2 * ROLES.len());
        assert_eq!(Role::Q.gguf(7), "blk.7.attn_q.weight");
        assert_eq!(Role::Q.hf(7), "model.layers.7.self_attn.q_proj.weight");
        assert_eq!(Role::Embed.hf(7), "model.embed_tokens.weight");
        assert_eq!(
            hf_layer_of("model.layers.12.mlp.up_proj.weight"),
            Some((12, "mlp.up_proj.weight"))
        );
        assert_eq!(hf_layer_of(&Role::FinalNorm.hf(0)), None);
    }

    #[test]
    fn tensor_lists_follow_the_architecture() {
        let llama = tensors(2, Architecture::Llama.qkv_bias(), true);
        assert_eq!(llama.len(), 2 + 2 * 9);
        assert!(!llama
            .iter()
            .any(|(r, _)| *r == Role::Output || *r == Role::QBias));
        let qwen = tensors(2, Architecture::Qwen2.qkv_bias(), false);
        assert_eq!(qwen.len(), 3 + 2 * 12);
        assert_eq!(qwen.last(), Some(&(Role::Down, 1)));
    }
}
