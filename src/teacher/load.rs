//! Loading a teacher from a GGUF file or a Hugging Face checkpoint directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use super::model::{to_f32, Architecture, LayerWeights, ModelConfig, TeacherModel};
use super::TeacherIdentity;
use crate::digest::sha256_file;
use crate::error::{Error, Result};
use crate::tokenize::chat::ChatTemplate;
use crate::tokenize::tokenizer::TeacherTokenizer;
use crate::weights::gguf::GgufFile;
use crate::weights::Role;

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

/// Loads a GGUF file of the llama or qwen2 architecture, dequantising every weight to f32.
/// `tokenizer_json` overrides the tokenizer built from the GGUF metadata.
pub(crate) fn load_gguf(
    path: &Path,
    tokenizer_json: Option<&Path>,
    device: &Device,
) -> Result<Loaded> {
    let mut gguf = GgufFile::open(path)?;
    let cfg = gguf.config()?;
    let tied = gguf.tied();
    let quantization = gguf.quantization();
    let embed = gguf.role(Role::Embed, 0, &cfg, device)?;
    let output = if tied {
        None
    } else {
        Some(gguf.role(Role::Output, 0, &cfg, device)?)
    };
    let norm = gguf.role(Role::FinalNorm, 0, &cfg, device)?;
    let layers = (0..cfg.num_layers)
        .map(|i| {
            LayerWeights::from_roles(cfg.architecture, |role| gguf.role(role, i, &cfg, device))
        })
        .collect::<Result<Vec<_>>>()?;
    let tokenizer = gguf.tokenizer(tokenizer_json)?;
    let chat_template = match gguf.chat_template_source() {
        Some(src) => Some(compile_template(&src, &tokenizer)?),
        None => None,
    };
    let arch = cfg.architecture;
    let model = TeacherModel::new(cfg, embed, layers, norm, output, device)
        .map_err(|e| e.in_model(path))?;
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

/// Only the tokenizer of a GGUF file (its metadata; no weights are read).
pub fn gguf_tokenizer(path: &Path) -> Result<TeacherTokenizer> {
    GgufFile::open(path)?.tokenizer(None)
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

impl HfConfig {
    /// Reads and parses `dir/config.json`.
    fn read(dir: &Path) -> Result<(PathBuf, Self)> {
        let path = dir.join("config.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let cfg = serde_json::from_slice(&bytes)
            .map_err(|e| model_err(&path, format!("parsing config.json: {e}")))?;
        Ok((path, cfg))
    }

    /// The decoder config (`path` names config.json in errors). Its vocabulary is
    /// `vocab_size`; the loader replaces it with the embedding's row count.
    fn model_config(&self, path: &Path) -> Result<ModelConfig> {
        let arch_name = self
            .model_type
            .clone()
            .or_else(|| {
                self.architectures
                    .first()
                    .map(|a| a.to_lowercase().replace("forcausallm", ""))
            })
            .unwrap_or_default();
        let arch = Architecture::parse(&arch_name).ok_or_else(|| {
            model_err(
                path,
                format!("unsupported model_type {arch_name:?} (supported: llama, qwen2)"),
            )
        })?;
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let rope_theta = self.rope_theta.unwrap_or(10_000.0);
        let rope_freq_divisors = match &self.rope_scaling {
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
                            .ok_or_else(|| model_err(path, "incomplete llama3 rope_scaling"))?,
                    ),
                    other => {
                        return Err(model_err(
                            path,
                            format!("unsupported rope_scaling type {other:?}"),
                        ))
                    }
                }
            }
        };
        Ok(ModelConfig {
            architecture: arch,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            vocab_size: self.vocab_size,
            context_length: self.max_position_embeddings.unwrap_or(4096),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_freq_divisors,
        })
    }
}

/// The tensors of every `*.safetensors` shard of `dir`, the directory's hash (sha256 over
/// `"<shard name>\n<shard sha256>\n"` per shard in name order) and the first tensor's dtype.
fn read_shards(dir: &Path) -> Result<(HashMap<String, Tensor>, String, Option<String>)> {
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    let mut hasher = Sha256::new();
    let mut dtype = None;
    for shard in &safetensors_shards(dir)? {
        let tensors = candle_core::safetensors::load(shard, &Device::Cpu)
            .map_err(|e| model_err(shard, format!("reading safetensors: {e}")))?;
        if dtype.is_none() {
            dtype = tensors.values().next().map(|t| format!("{:?}", t.dtype()));
        }
        weights.extend(tensors);
        hasher.update(file_name(shard).as_bytes());
        hasher.update(b"\n");
        hasher.update(sha256_file(shard)?.as_bytes());
        hasher.update(b"\n");
    }
    Ok((weights, hex::encode(hasher.finalize()), dtype))
}

/// Loads a Hugging Face checkpoint directory: `config.json`, `*.safetensors`, `tokenizer.json`
/// (and `tokenizer_config.json` / `chat_template.jinja` for the chat template).
pub(crate) fn load_hf_dir(dir: &Path, device: &Device) -> Result<Loaded> {
    let (config_path, cfg) = HfConfig::read(dir)?;
    let mut model_cfg = cfg.model_config(&config_path)?;
    let (mut weights, sha256, shard_dtype) = read_shards(dir)?;
    let mut take = |role: Role, layer: usize| -> Result<Tensor> {
        let name = role.hf(layer);
        let t = weights
            .remove(&name)
            .ok_or_else(|| model_err(dir, format!("missing tensor {name}")))?;
        to_f32(t, device)
    };
    let embed = take(Role::Embed, 0)?;
    model_cfg.vocab_size = embed.dims().first().copied().unwrap_or(0);
    let output = if cfg.tie_word_embeddings {
        None
    } else {
        take(Role::Output, 0).ok()
    };
    let tied = output.is_none();
    let norm = take(Role::FinalNorm, 0)?;
    let arch = model_cfg.architecture;
    let layers = (0..cfg.num_hidden_layers)
        .map(|i| LayerWeights::from_roles(arch, |role| take(role, i)))
        .collect::<Result<Vec<_>>>()?;
    let model = TeacherModel::new(model_cfg, embed, layers, norm, output, device)
        .map_err(|e| e.in_model(&config_path))?;

    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.exists() {
        return Err(model_err(&tokenizer_path, "missing tokenizer.json"));
    }
    let ids = [&cfg.bos_token_id, &cfg.eos_token_id, &cfg.pad_token_id].map(first_id);
    let tokenizer = TeacherTokenizer::from_tokenizer_json(&tokenizer_path, ids)?;
    let chat_template = match hf_chat_template(dir)? {
        Some(src) => Some(compile_template(&src, &tokenizer)?),
        None => None,
    };
    let identity = TeacherIdentity {
        file_name: file_name(dir),
        sha256,
        format: "safetensors".to_string(),
        architecture: arch.as_str().to_string(),
        quantization: cfg
            .torch_dtype
            .or(shard_dtype)
            .unwrap_or_else(|| "unknown".to_string()),
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
