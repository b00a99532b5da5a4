//! Where a student's first weights come from: random, a Hugging Face safetensors directory, a
//! GGUF file (dequantised to f32), or a subset of a teacher's layers.
//!
//! GGUF files are read with the teacher's reader, [`GgufFile`]: the config, the tokenizer and
//! each tensor (dequantised to f32, Q/K rows un-permuted) under its name in
//! [`crate::weights::ROLES`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::model::{Student, StudentConfig};
use crate::error::{Error, Result};
use crate::tokenize::{SpecialToken, TeacherTokenizer};
use crate::weights::gguf::GgufFile;
use crate::weights::{hf_layer_name, hf_layer_of, tensors, to_f32};

/// How to initialise a student.
#[derive(Debug, Clone, PartialEq)]
pub enum Init {
    /// Random weights for the shapes of an HF-style `config.json`, seeded.
    Random { config: PathBuf, seed: u64 },
    /// A GGUF file (llama or qwen2), every weight dequantised to f32.
    Gguf(PathBuf),
    /// A Hugging Face checkpoint directory (`config.json` + `*.safetensors`).
    Hf(PathBuf),
    /// A teacher (GGUF file or HF directory) keeping only the listed layers, in that order.
    TeacherLayers { path: PathBuf, layers: Vec<usize> },
}

impl Init {
    /// Parses `random:CONFIG.json`, `gguf:PATH`, `hf:DIR` or `teacher-layers:PATH:0,2,4`
    /// (a space may replace the first colon). `seed` seeds random initialisation.
    pub fn parse(spec: &str, seed: u64) -> Result<Self> {
        let (kind, rest) = spec
            .split_once(':')
            .or_else(|| spec.split_once(' '))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "init {spec:?}: expected random:CONFIG.json, gguf:PATH, hf:DIR or \
                     teacher-layers:PATH:0,2,4"
                ))
            })?;
        let rest = rest.trim();
        match kind.trim() {
            "random" => Ok(Init::Random {
                config: rest.into(),
                seed,
            }),
            "gguf" => Ok(Init::Gguf(rest.into())),
            "hf" => Ok(Init::Hf(rest.into())),
            "teacher-layers" => {
                let (path, list) = rest.rsplit_once(':').ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "init {spec:?}: expected teacher-layers:PATH:0,2,4"
                    ))
                })?;
                let layers = list
                    .split(',')
                    .map(|x| {
                        x.trim().parse::<usize>().map_err(|_| {
                            Error::InvalidArgument(format!("init {spec:?}: bad layer {x:?}"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                if layers.is_empty() {
                    return Err(Error::InvalidArgument(format!("init {spec:?}: no layers")));
                }
                Ok(Init::TeacherLayers {
                    path: path.into(),
                    layers,
                })
            }
            other => Err(Error::InvalidArgument(format!(
                "init kind {other:?} unknown (random, gguf, hf, teacher-layers)"
            ))),
        }
    }
}

/// The tokenizer that came with a pretrained source: its hash (same canonical form as the
/// store manifest's `tokenizer.sha256`) and the files a Hugging Face checkpoint needs to
/// carry it (`tokenizer.json`, `tokenizer_config.json` with the chat template).
#[derive(Debug, Clone, Default)]
pub struct TokenizerSource {
    pub sha256: String,
    /// (file name, contents), copied into every checkpoint.
    pub files: Vec<(String, Vec<u8>)>,
}

/// A student plus the sha256 of its tokenizer when the source carries one.
#[derive(Debug)]
pub struct Initialised {
    /// The model.
    pub student: Student,
    /// Tokenizer hash (same canonical form as the store manifest's `tokenizer.sha256`).
    pub tokenizer_sha256: Option<String>,
    /// Tokenizer files to write next to the model in checkpoints.
    pub tokenizer_files: Vec<(String, Vec<u8>)>,
}

/// Builds the student described by `init` on `device`.
pub fn initialise(init: &Init, device: &Device) -> Result<Initialised> {
    match init {
        Init::Random { config, seed } => {
            let cfg = read_config(config)?;
            Ok(Initialised {
                student: Student::random(cfg, *seed, device)?,
                tokenizer_sha256: None,
                tokenizer_files: Vec::new(),
            })
        }
        Init::Gguf(path) | Init::Hf(path) => {
            let (cfg, weights, tok) = load_pretrained(path, None)?;
            Ok(Initialised {
                student: Student::from_weights(cfg, weights, device)
                    .map_err(|e| e.in_model(path))?,
                tokenizer_sha256: tok.as_ref().map(|t| t.sha256.clone()),
                tokenizer_files: tok.map(|t| t.files).unwrap_or_default(),
            })
        }
        Init::TeacherLayers { path, layers } => {
            let (cfg, weights, tok) = load_pretrained(path, Some(layers))?;
            Ok(Initialised {
                student: Student::from_weights(cfg, weights, device)
                    .map_err(|e| e.in_model(path))?,
                tokenizer_sha256: tok.as_ref().map(|t| t.sha256.clone()),
                tokenizer_files: tok.map(|t| t.files).unwrap_or_default(),
            })
        }
    }
}

/// Reads an HF-style `config.json` into a [`StudentConfig`].
pub fn read_config(path: &Path) -> Result<StudentConfig> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let cfg: StudentConfig = serde_json::from_slice(&bytes).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        reason: format!("parsing student config: {e}"),
    })?;
    cfg.validate().map_err(|e| e.in_model(path))?;
    Ok(cfg)
}

/// Loads a GGUF file or an HF directory as (config, f32 weights under HF names on the CPU,
/// tokenizer sha256). With `layers`, only those source layers are kept, renumbered 0.. in the
/// given order.
pub fn load_pretrained(path: &Path, layers: Option<&[usize]>) -> Result<Pretrained> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let (mut cfg, mut weights, sha) = if meta.is_dir() {
        load_hf(path)?
    } else {
        load_gguf(path)?
    };
    if let Some(keep) = layers {
        if let Some(&bad) = keep.iter().find(|&&l| l >= cfg.num_hidden_layers) {
            return Err(Error::InvalidArgument(format!(
                "layer {bad} does not exist: {} has {} layers",
                path.display(),
                cfg.num_hidden_layers
            )));
        }
        let mut renamed = BTreeMap::new();
        for (name, t) in std::mem::take(&mut weights) {
            match hf_layer_of(&name) {
                None => {
                    renamed.insert(name, t);
                }
                Some((src, suffix)) => {
                    for (dst, _) in keep.iter().enumerate().filter(|(_, &l)| l == src) {
                        renamed.insert(hf_layer_name(dst, suffix), t.clone());
                    }
                }
            }
        }
        weights = renamed;
        cfg.num_hidden_layers = keep.len();
    }
    Ok((cfg, weights, sha))
}

fn model_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Config, f32 weights by HF name, and the source's tokenizer when it has one.
pub type Pretrained = (
    StudentConfig,
    BTreeMap<String, Tensor>,
    Option<TokenizerSource>,
);

fn load_hf(dir: &Path) -> Result<Pretrained> {
    let cfg = read_config(&dir.join("config.json"))?;
    let shards = crate::teacher::safetensors_shards(dir)?;
    let mut weights = BTreeMap::new();
    for shard in &shards {
        let tensors = candle_core::safetensors::load(shard, &Device::Cpu)
            .map_err(|e| model_err(shard, format!("reading safetensors: {e}")))?;
        for (name, t) in tensors {
            weights.insert(name, to_f32(t, &Device::Cpu)?);
        }
    }
    let tokenizer = dir.join("tokenizer.json");
    let sha = if tokenizer.exists() {
        let id = |v: &Option<serde_json::Value>| match v {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32),
            Some(serde_json::Value::Array(a)) => {
                a.first().and_then(|x| x.as_u64()).map(|x| x as u32)
            }
            _ => None,
        };
        let specials = [
            id(&cfg.bos_token_id),
            id(&cfg.eos_token_id),
            id(&cfg.pad_token_id),
        ];
        let hash = TeacherTokenizer::from_tokenizer_json(&tokenizer, specials)
            .ok()
            .map(|t| t.identity().sha256.clone());
        let mut files = Vec::new();
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "special_tokens_map.json",
        ] {
            let path = dir.join(name);
            if path.exists() {
                files.push((
                    name.to_string(),
                    std::fs::read(&path).map_err(|e| Error::io(&path, e))?,
                ));
            }
        }
        hash.map(|sha256| TokenizerSource { sha256, files })
    } else {
        None
    };
    Ok((cfg, weights, sha))
}

fn load_gguf(path: &Path) -> Result<Pretrained> {
    let mut gguf = GgufFile::open(path)?;
    let mcfg = gguf.config()?;
    if mcfg.rope_freq_divisors.is_some() {
        return Err(model_err(
            path,
            "RoPE frequency scaling is not supported by the student",
        ));
    }
    let tied = gguf.tied();
    let tok = gguf.tokenizer(None)?;
    let identity = tok.identity();
    let json = tok
        .inner()
        .to_string(false)
        .map_err(|e| model_err(path, format!("serialising the tokenizer: {e}")))?;
    let text = |t: &Option<SpecialToken>| t.as_ref().map(|t| t.text.clone());
    let tokenizer_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(&identity.bos),
        "eos_token": text(&identity.eos),
        "pad_token": text(&identity.pad),
        "add_bos_token": tok.adds_bos(),
        "chat_template": gguf.chat_template_source(),
    });
    let files = vec![
        ("tokenizer.json".to_string(), json.into_bytes()),
        (
            "tokenizer_config.json".to_string(),
            serde_json::to_vec_pretty(&tokenizer_config)?,
        ),
    ];
    let id = |t: &Option<SpecialToken>| t.as_ref().map(|t| serde_json::Value::from(t.id));
    let arch = mcfg.architecture;
    let cfg = StudentConfig {
        model_type: arch.as_str().to_string(),
        architectures: vec![arch.hf_class().to_string()],
        hidden_size: mcfg.hidden_size,
        intermediate_size: mcfg.intermediate_size,
        num_hidden_layers: mcfg.num_layers,
        num_attention_heads: mcfg.num_heads,
        num_key_value_heads: Some(mcfg.num_kv_heads),
        head_dim: Some(mcfg.head_dim),
        vocab_size: mcfg.vocab_size,
        max_position_embeddings: mcfg.context_length,
        rms_norm_eps: mcfg.rms_norm_eps,
        rope_theta: mcfg.rope_theta,
        tie_word_embeddings: tied,
        attention_bias: Some(arch.qkv_bias()),
        rope_scaling: None,
        hidden_act: "silu".into(),
        bos_token_id: id(&identity.bos),
        eos_token_id: id(&identity.eos),
        pad_token_id: id(&identity.pad),
        torch_dtype: "float32".into(),
    };
    let mut weights = BTreeMap::new();
    for (role, layer) in tensors(mcfg.num_layers, arch.qkv_bias(), tied) {
        let t = gguf.role(role, layer, &mcfg, &Device::Cpu)?;
        weights.insert(role.hf(layer), t);
    }
    let source = TokenizerSource {
        sha256: identity.sha256.clone(),
        files,
    };
    Ok((cfg, weights, Some(source)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_init_specs() {
        assert_eq!(
            Init::parse("random:cfg.json", 3).unwrap(),
            Init::Random {
                config: "cfg.json".into(),
                seed: 3
            }
        );
        assert_eq!(
            Init::parse("gguf /m.gguf", 0).unwrap(),
            Init::Gguf("/m.gguf".into())
        );
        assert_eq!(Init::parse("hf:dir", 0).unwrap(), Init::Hf("dir".into()));
        assert_eq!(
            Init::parse("teacher-layers:/a/b.gguf:0,2,4", 0).unwrap(),
            Init::TeacherLayers {
                path: "/a/b.gguf".into(),
                layers: vec![0, 2, 4]
            }
        );
        assert!(Init::parse("teacher-layers:/a/b.gguf:x", 0).is_err());
        assert!(Init::parse("nonsense", 0).is_err());
    }
}
