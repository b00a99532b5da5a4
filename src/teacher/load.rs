//! Loading a teacher from a GGUF file or a Hugging Face checkpoint directory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use super::model::{to_f32, unpermute_qk, Architecture, LayerWeights, ModelConfig, TeacherModel};
use super::TeacherIdentity;
use crate::digest::sha256_file;
use crate::error::{Error, Result};
use crate::tokenize::chat::ChatTemplate;
use crate::tokenize::tokenizer::{BpeSpec, TeacherTokenizer};

/// Everything a loader produces.
pub(crate) struct Loaded {
    pub model: TeacherModel,
    pub tokenizer: TeacherTokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub identity: TeacherIdentity,
}

/// The `*.safetensors` files of a checkpoint directory, in name order; an error when none.
pub(crate) fn safetensors_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(model_err(
            dir,
            "no *.safetensors files in the checkpoint directory",
        ));
    }
    Ok(shards)
}

fn model_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Names llama.cpp's `general.file_type` (`llama_ftype`).
fn file_type_name(ft: u32) -> String {
    let name = match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return format!("file_type {ft}"),
    };
    name.to_string()
}

/// Loads a GGUF file of the llama or qwen2 architecture, dequantising every weight to f32.
/// `tokenizer_json` overrides the tokenizer built from the GGUF metadata.
pub(crate) fn load_gguf(
    path: &Path,
    tokenizer_json: Option<&Path>,
    device: &Device,
) -> Result<Loaded> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let ct = gguf_file::Content::read(&mut reader)
        .map_err(|e| model_err(path, format!("not a readable GGUF file: {e}")))?;
    let md = &ct.metadata;
    let get = |key: &str| md.get(key);
    let get_str = |key: &str| get(key).and_then(|v| v.to_string().ok()).cloned();
    let get_u32 = |key: &str| get(key).and_then(|v| v.to_u32().ok());
    // f32 metadata as the f64 of its shortest decimal form (1e-6, not 9.99999997e-7), so a
    // config.json written from it reads like the Hugging Face one; the f32 value is the same.
    let get_f32 = |key: &str| {
        get(key)
            .and_then(|v| v.to_f32().ok())
            .map(|x| x.to_string().parse::<f64>().unwrap_or(f64::from(x)))
    };
    let need_u32 = |key: &str| {
        get_u32(key).ok_or_else(|| model_err(path, format!("missing GGUF metadata {key}")))
    };

    let arch_name = get_str("general.architecture")
        .ok_or_else(|| model_err(path, "missing GGUF metadata general.architecture"))?;
    let arch = Architecture::parse(&arch_name).ok_or_else(|| {
        model_err(
            path,
            format!("unsupported architecture {arch_name:?} (supported: llama, qwen2)"),
        )
    })?;
    let a = arch_name.as_str();
    let hidden = need_u32(&format!("{a}.embedding_length"))? as usize;
    let num_heads = need_u32(&format!("{a}.attention.head_count"))? as usize;
    let num_kv_heads =
        get_u32(&format!("{a}.attention.head_count_kv")).unwrap_or(num_heads as u32) as usize;
    let head_dim = get_u32(&format!("{a}.attention.key_length"))
        .map(|v| v as usize)
        .unwrap_or(hidden / num_heads.max(1));
    if let Some(rope_dim) = get_u32(&format!("{a}.rope.dimension_count")) {
        if rope_dim as usize != head_dim {
            return Err(model_err(
                path,
                format!("partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"),
            ));
        }
    }
    let num_layers = need_u32(&format!("{a}.block_count"))? as usize;
    let tokens: Vec<String> = match get("tokenizer.ggml.tokens") {
        Some(v) => v
            .to_vec()
            .map_err(|e| model_err(path, format!("tokenizer.ggml.tokens: {e}")))?
            .iter()
            .map(|t| t.to_string().cloned())
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| model_err(path, format!("tokenizer.ggml.tokens: {e}")))?,
        None => Vec::new(),
    };
    let embd_info = ct
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| model_err(path, "missing tensor token_embd.weight"))?;
    let vocab_size = match embd_info.shape.dims() {
        [rows, _] => *rows,
        dims => {
            return Err(model_err(
                path,
                format!("token_embd.weight has shape {dims:?}, expected 2 dimensions"),
            ))
        }
    };

    // Tensor dtypes, for the identity.
    let mut dtype_counts: BTreeMap<String, usize> = BTreeMap::new();
    for info in ct.tensor_infos.values() {
        *dtype_counts
            .entry(format!("{:?}", info.ggml_dtype))
            .or_default() += 1;
    }
    let tensor_dtypes = dtype_counts
        .iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect::<Vec<_>>()
        .join(",");
    let quantization = match get_u32("general.file_type") {
        Some(ft) => format!("{} ({tensor_dtypes})", file_type_name(ft)),
        None => tensor_dtypes,
    };

    let mut tensor = |name: &str| -> Result<Tensor> {
        let q = ct
            .tensor(&mut reader, name, device)
            .map_err(|e| model_err(path, format!("tensor {name}: {e}")))?;
        to_f32(q.dequantize(device)?, device)
    };
    let has = |name: &str| ct.tensor_infos.contains_key(name);

    let rope_freq_divisors = if has("rope_freqs.weight") {
        Some(tensor("rope_freqs.weight")?.to_vec1::<f32>()?)
    } else {
        None
    };
    let embed = tensor("token_embd.weight")?;
    let output = if has("output.weight") {
        Some(tensor("output.weight")?)
    } else {
        None
    };
    let tied = output.is_none();
    let norm = tensor("output_norm.weight")?;
    let mut layers = Vec::with_capacity(num_layers);
    for i in 0..num_layers {
        let p = format!("blk.{i}");
        let mut q = tensor(&format!("{p}.attn_q.weight"))?;
        let mut k = tensor(&format!("{p}.attn_k.weight"))?;
        if arch == Architecture::Llama {
            q = unpermute_qk(&q, num_heads)?;
            k = unpermute_qk(&k, num_kv_heads)?;
        }
        let qkv_bias = if arch == Architecture::Qwen2 {
            Some((
                tensor(&format!("{p}.attn_q.bias"))?,
                tensor(&format!("{p}.attn_k.bias"))?,
                tensor(&format!("{p}.attn_v.bias"))?,
            ))
        } else {
            None
        };
        layers.push(LayerWeights {
            attn_norm: tensor(&format!("{p}.attn_norm.weight"))?,
            q,
            k,
            v: tensor(&format!("{p}.attn_v.weight"))?,
            qkv_bias,
            o: tensor(&format!("{p}.attn_output.weight"))?,
            ffn_norm: tensor(&format!("{p}.ffn_norm.weight"))?,
            gate: tensor(&format!("{p}.ffn_gate.weight"))?,
            up: tensor(&format!("{p}.ffn_up.weight"))?,
            down: tensor(&format!("{p}.ffn_down.weight"))?,
        });
    }
    let intermediate = layers
        .first()
        .and_then(|l| l.gate.dims().first().copied())
        .unwrap_or_default();
    let cfg = ModelConfig {
        architecture: arch,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        context_length: get_u32(&format!("{a}.context_length")).unwrap_or(4096) as usize,
        rms_norm_eps: get_f32(&format!("{a}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: get_f32(&format!("{a}.rope.freq_base")).unwrap_or(10_000.0),
        rope_freq_divisors,
    };
    let model = TeacherModel::new(cfg, embed, layers, norm, output, device)?;

    let tokenizer = tokenizer_from_metadata(md, path, tokenizer_json, &tokens)?;
    let chat_template = match get_str("tokenizer.chat_template") {
        Some(src) => Some(compile_template(&src, &tokenizer)?),
        None => None,
    };
    let identity = TeacherIdentity {
        file_name: file_name(path),
        sha256: sha256_file(path)?,
        format: "gguf".to_string(),
        architecture: arch.as_str().to_string(),
        quantization,
        compute: compute_description(device),
        context_length: model.config().context_length as u32,
        vocab_size: model.config().vocab_size as u32,
        tied_embeddings: tied,
    };
    Ok(Loaded {
        model,
        tokenizer,
        chat_template,
        identity,
    })
}

/// The tokenizer of a GGUF file's metadata (byte-level BPE), or `tokenizer_json` with the
/// GGUF's special-token ids.
fn tokenizer_from_metadata(
    md: &std::collections::HashMap<String, Value>,
    path: &Path,
    tokenizer_json: Option<&Path>,
    tokens: &[String],
) -> Result<TeacherTokenizer> {
    let get = |key: &str| md.get(key);
    let get_str = |key: &str| get(key).and_then(|v| v.to_string().ok()).cloned();
    let get_u32 = |key: &str| get(key).and_then(|v| v.to_u32().ok());
    let bos_id = get_u32("tokenizer.ggml.bos_token_id");
    let eos_id = get_u32("tokenizer.ggml.eos_token_id");
    let pad_id = get_u32("tokenizer.ggml.padding_token_id");
    Ok(match tokenizer_json {
        Some(tj) => TeacherTokenizer::from_tokenizer_json(tj, [bos_id, eos_id, pad_id])?,
        None => {
            let model_kind = get_str("tokenizer.ggml.model").unwrap_or_default();
            if model_kind != "gpt2" {
                return Err(model_err(
                    path,
                    format!(
                        "tokenizer.ggml.model {model_kind:?} cannot be built from GGUF metadata \
                         (only byte-level BPE \"gpt2\" can); pass the model's tokenizer.json"
                    ),
                ));
            }
            let merges = match get("tokenizer.ggml.merges") {
                Some(v) => v
                    .to_vec()
                    .map_err(|e| model_err(path, format!("tokenizer.ggml.merges: {e}")))?
                    .iter()
                    .map(|m| m.to_string().cloned())
                    .collect::<candle_core::Result<Vec<_>>>()
                    .map_err(|e| model_err(path, format!("tokenizer.ggml.merges: {e}")))?,
                None => return Err(model_err(path, "missing tokenizer.ggml.merges")),
            };
            let token_types = match get("tokenizer.ggml.token_type") {
                Some(v) => v
                    .to_vec()
                    .map_err(|e| model_err(path, format!("tokenizer.ggml.token_type: {e}")))?
                    .iter()
                    .map(value_to_i32)
                    .collect(),
                None => Vec::new(),
            };
            let spec = BpeSpec {
                tokens: tokens.to_vec(),
                merges,
                token_types,
                pre: get_str("tokenizer.ggml.pre").unwrap_or_default(),
                bos_id,
                eos_id,
                pad_id,
                add_bos: get("tokenizer.ggml.add_bos_token")
                    .and_then(|v| v.to_bool().ok())
                    .unwrap_or(false),
            };
            TeacherTokenizer::from_bpe_spec(&spec, path)?
        }
    })
}

/// Only the tokenizer of a GGUF file (its metadata; no weights are read).
pub fn gguf_tokenizer(path: &Path) -> Result<TeacherTokenizer> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let ct = gguf_file::Content::read(&mut reader)
        .map_err(|e| model_err(path, format!("not a readable GGUF file: {e}")))?;
    let tokens: Vec<String> = match ct.metadata.get("tokenizer.ggml.tokens") {
        Some(v) => v
            .to_vec()
            .map_err(|e| model_err(path, format!("tokenizer.ggml.tokens: {e}")))?
            .iter()
            .map(|t| t.to_string().cloned())
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| model_err(path, format!("tokenizer.ggml.tokens: {e}")))?,
        None => return Err(model_err(path, "missing tokenizer.ggml.tokens")),
    };
    tokenizer_from_metadata(&ct.metadata, path, None, &tokens)
}

fn value_to_i32(v: &Value) -> i32 {
    v.to_i32()
        .or_else(|_| v.to_u32().map(|u| u as i32))
        .unwrap_or(0)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// How the weights are computed with: always f32 here (quantised weights are dequantised).
fn compute_description(device: &Device) -> String {
    let dev = match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    };
    format!("f32 (dequantized) on {dev}")
}

fn compile_template(src: &str, tokenizer: &TeacherTokenizer) -> Result<ChatTemplate> {
    let id = tokenizer.identity();
    let bos = id.bos.as_ref().map(|t| t.text.as_str()).unwrap_or("");
    let eos = id.eos.as_ref().map(|t| t.text.as_str()).unwrap_or("");
    ChatTemplate::new(src, bos, eos)
}

/// `config.json` fields used (Llama and Qwen2).
#[derive(Debug, serde::Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_scaling: Option<serde_json::Value>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    pad_token_id: Option<serde_json::Value>,
    torch_dtype: Option<String>,
}

fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

/// Llama 3.1 `rope_scaling` (`rope_type: "llama3"`) as per-frequency divisors.
fn llama3_divisors(scaling: &serde_json::Value, theta: f64, head_dim: usize) -> Option<Vec<f32>> {
    let factor = scaling["factor"].as_f64()?;
    let low = scaling["low_freq_factor"].as_f64()?;
    let high = scaling["high_freq_factor"].as_f64()?;
    let orig = scaling["original_max_position_embeddings"].as_f64()?;
    let (low_wl, high_wl) = (orig / low, orig / high);
    Some(
        (0..head_dim / 2)
            .map(|i| {
                let f = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                let wl = 2.0 * std::f64::consts::PI / f;
                let scaled = if wl < high_wl {
                    f
                } else if wl > low_wl {
                    f / factor
                } else {
                    let smooth = (orig / wl - low) / (high - low);
                    (1.0 - smooth) * f / factor + smooth * f
                };
                (f / scaled) as f32
            })
            .collect(),
    )
}

/// Loads a Hugging Face checkpoint directory: `config.json`, `*.safetensors`, `tokenizer.json`
/// (and `tokenizer_config.json` / `chat_template.jinja` for the chat template).
pub(crate) fn load_hf_dir(dir: &Path, device: &Device) -> Result<Loaded> {
    let config_path = dir.join("config.json");
    let bytes = std::fs::read(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let cfg: HfConfig = serde_json::from_slice(&bytes)
        .map_err(|e| model_err(&config_path, format!("parsing config.json: {e}")))?;
    let arch_name = cfg
        .model_type
        .clone()
        .or_else(|| {
            cfg.architectures
                .first()
                .map(|a| a.to_lowercase().replace("forcausallm", ""))
        })
        .unwrap_or_default();
    let arch = Architecture::parse(&arch_name).ok_or_else(|| {
        model_err(
            &config_path,
            format!("unsupported model_type {arch_name:?} (supported: llama, qwen2)"),
        )
    })?;
    let head_dim = cfg
        .head_dim
        .unwrap_or(cfg.hidden_size / cfg.num_attention_heads.max(1));
    let rope_theta = cfg.rope_theta.unwrap_or(10_000.0);
    let rope_freq_divisors = match &cfg.rope_scaling {
        None | Some(serde_json::Value::Null) => None,
        Some(s) => {
            let kind = s["rope_type"]
                .as_str()
                .or_else(|| s["type"].as_str())
                .unwrap_or("");
            match kind {
                "default" => None,
                "llama3" => Some(
                    llama3_divisors(s, rope_theta, head_dim)
                        .ok_or_else(|| model_err(&config_path, "incomplete llama3 rope_scaling"))?,
                ),
                other => {
                    return Err(model_err(
                        &config_path,
                        format!("unsupported rope_scaling type {other:?}"),
                    ))
                }
            }
        }
    };

    let shards = safetensors_shards(dir)?;
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    let mut hasher = Sha256::new();
    let mut source_dtype = cfg.torch_dtype.clone();
    for shard in &shards {
        let tensors = candle_core::safetensors::load(shard, &Device::Cpu)
            .map_err(|e| model_err(shard, format!("reading safetensors: {e}")))?;
        if source_dtype.is_none() {
            source_dtype = tensors.values().next().map(|t| format!("{:?}", t.dtype()));
        }
        weights.extend(tensors);
        hasher.update(file_name(shard).as_bytes());
        hasher.update(b"\n");
        hasher.update(sha256_file(shard)?.as_bytes());
        hasher.update(b"\n");
    }
    let mut take = |name: &str| -> Result<Tensor> {
        let t = weights
            .remove(name)
            .ok_or_else(|| model_err(dir, format!("missing tensor {name}")))?;
        to_f32(t, device)
    };
    let embed = take("model.embed_tokens.weight")?;
    let output = if cfg.tie_word_embeddings {
        None
    } else {
        take("lm_head.weight").ok()
    };
    let tied = output.is_none();
    let norm = take("model.norm.weight")?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let qkv_bias = if arch == Architecture::Qwen2 {
            Some((
                take(&format!("{p}.self_attn.q_proj.bias"))?,
                take(&format!("{p}.self_attn.k_proj.bias"))?,
                take(&format!("{p}.self_attn.v_proj.bias"))?,
            ))
        } else {
            None
        };
        layers.push(LayerWeights {
            attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
            q: take(&format!("{p}.self_attn.q_proj.weight"))?,
            k: take(&format!("{p}.self_attn.k_proj.weight"))?,
            v: take(&format!("{p}.self_attn.v_proj.weight"))?,
            qkv_bias,
            o: take(&format!("{p}.self_attn.o_proj.weight"))?,
            ffn_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
            gate: take(&format!("{p}.mlp.gate_proj.weight"))?,
            up: take(&format!("{p}.mlp.up_proj.weight"))?,
            down: take(&format!("{p}.mlp.down_proj.weight"))?,
        });
    }
    let model_cfg = ModelConfig {
        architecture: arch,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_layers: cfg.num_hidden_layers,
        num_heads: cfg.num_attention_heads,
        num_kv_heads: cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads),
        head_dim,
        vocab_size: embed.dims().first().copied().unwrap_or(0),
        context_length: cfg.max_position_embeddings.unwrap_or(4096),
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta,
        rope_freq_divisors,
    };
    let _ = cfg.vocab_size;
    let model = TeacherModel::new(model_cfg, embed, layers, norm, output, device)?;

    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.exists() {
        return Err(model_err(&tokenizer_path, "missing tokenizer.json"));
    }
    let tokenizer = TeacherTokenizer::from_tokenizer_json(
        &tokenizer_path,
        [
            first_id(&cfg.bos_token_id),
            first_id(&cfg.eos_token_id),
            first_id(&cfg.pad_token_id),
        ],
    )?;
    let chat_template = match hf_chat_template(dir)? {
        Some(src) => Some(compile_template(&src, &tokenizer)?),
        None => None,
    };
    let identity = TeacherIdentity {
        file_name: file_name(dir),
        sha256: hex::encode(hasher.finalize()),
        format: "safetensors".to_string(),
        architecture: arch.as_str().to_string(),
        quantization: source_dtype.unwrap_or_else(|| "unknown".to_string()),
        compute: compute_description(device).replace(" (dequantized)", ""),
        context_length: model.config().context_length as u32,
        vocab_size: model.config().vocab_size as u32,
        tied_embeddings: tied,
    };
    Ok(Loaded {
        model,
        tokenizer,
        chat_template,
        identity,
    })
}

/// The chat template of an HF directory: `chat_template.jinja`, else `tokenizer_config.json`'s
/// `chat_template` (a string, or a list of `{name, template}` from which `default` is taken).
fn hf_chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| Error::io(&jinja, e));
    }
    let cfg_path = dir.join("tokenizer_config.json");
    let Ok(bytes) = std::fs::read(&cfg_path) else {
        return Ok(None);
    };
    let cfg: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| model_err(&cfg_path, format!("parsing tokenizer_config.json: {e}")))?;
    Ok(match &cfg["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .or_else(|| list.first())
            .and_then(|t| t["template"].as_str().map(String::from)),
        _ => None,
    })
}
