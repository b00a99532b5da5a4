//! One reader for GGUF files, shared by the teacher loader and student initialisation: the
//! metadata, the decoder config, the tokenizer and chat template, and every tensor
//! dequantised to f32 in Hugging Face layout.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{Device, Tensor};

use super::{to_f32, unpermute_qk, Architecture, ModelConfig, Role};
use crate::error::{Error, Result};
use crate::tokenize::tokenizer::{BpeSpec, TeacherTokenizer};

/// An open GGUF file: its header (metadata and tensor table) and a reader for the tensors.
pub struct GgufFile {
    path: PathBuf,
    content: gguf_file::Content,
    reader: BufReader<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
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

impl GgufFile {
    /// Opens `path` and reads its header (no tensor data yet).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| model_err(path, format!("not a readable GGUF file: {e}")))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata key/value pairs.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn get_str(&self, key: &str) -> Option<String> {
        self.metadata()
            .get(key)
            .and_then(|v| v.to_string().ok())
            .cloned()
    }

    fn get_u32(&self, key: &str) -> Option<u32> {
        self.metadata().get(key).and_then(|v| v.to_u32().ok())
    }

    /// f32 metadata as the f64 of its shortest decimal form (1e-6, not 9.99999997e-7), so a
    /// config.json written from it reads like the Hugging Face one; the f32 value is the same.
    fn get_f32(&self, key: &str) -> Option<f64> {
        self.metadata()
            .get(key)
            .and_then(|v| v.to_f32().ok())
            .map(|x| x.to_string().parse::<f64>().unwrap_or(f64::from(x)))
    }

    fn need_u32(&self, key: &str) -> Result<u32> {
        self.get_u32(key)
            .ok_or_else(|| model_err(&self.path, format!("missing GGUF metadata {key}")))
    }

    /// A string list of the metadata, empty when the key is absent.
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let Some(v) = self.metadata().get(key) else {
            return Ok(Vec::new());
        };
        v.to_vec()
            .map_err(|e| model_err(&self.path, format!("{key}: {e}")))?
            .iter()
            .map(|t| t.to_string().cloned())
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| model_err(&self.path, format!("{key}: {e}")))
    }

    /// Whether the file has a tensor of this name.
    pub fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Whether the output matrix is the token embedding (no `output.weight`).
    pub fn tied(&self) -> bool {
        !self.has(&Role::Output.gguf(0))
    }

    fn dims(&self, name: &str) -> Result<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims().to_vec())
            .ok_or_else(|| model_err(&self.path, format!("missing tensor {name}")))
    }

    /// One tensor, dequantised to contiguous f32 on `device`.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<Tensor> {
        let q = self
            .content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| model_err(&self.path, format!("tensor {name}: {e}")))?;
        to_f32(q.dequantize(device)?, device)
    }

    /// The tensor of `role` (in `layer`) in Hugging Face layout: f32, Q/K rows of Llama
    /// models un-permuted.
    pub fn role(
        &mut self,
        role: Role,
        layer: usize,
        cfg: &ModelConfig,
        device: &Device,
    ) -> Result<Tensor> {
        let t = self.tensor(&role.gguf(layer), device)?;
        match role.gguf_permuted_heads(cfg) {
            Some(heads) => unpermute_qk(&t, heads),
            None => Ok(t),
        }
    }

    /// The architecture named by `general.architecture`.
    pub fn architecture(&self) -> Result<Architecture> {
        let name = self
            .get_str("general.architecture")
            .ok_or_else(|| model_err(&self.path, "missing GGUF metadata general.architecture"))?;
        Architecture::parse(&name).ok_or_else(|| {
            model_err(
                &self.path,
                format!("unsupported architecture {name:?} (supported: llama, qwen2)"),
            )
        })
    }

    /// The decoder's hyper-parameters from the metadata and the tensor table (reads only the
    /// small `rope_freqs.weight` tensor when there is one).
    pub fn config(&mut self) -> Result<ModelConfig> {
        let arch = self.architecture()?;
        let a = self
            .get_str("general.architecture")
            .unwrap_or_else(|| arch.as_str().to_string());
        let hidden = self.need_u32(&format!("{a}.embedding_length"))? as usize;
        let num_heads = self.need_u32(&format!("{a}.attention.head_count"))? as usize;
        let num_kv_heads = self
            .get_u32(&format!("{a}.attention.head_count_kv"))
            .map_or(num_heads, |v| v as usize);
        let head_dim = self
            .get_u32(&format!("{a}.attention.key_length"))
            .map_or(hidden / num_heads.max(1), |v| v as usize);
        if let Some(rope_dim) = self.get_u32(&format!("{a}.rope.dimension_count")) {
            if rope_dim as usize != head_dim {
                return Err(model_err(
                    &self.path,
                    format!(
                        "partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"
                    ),
                ));
            }
        }
        let num_layers = self.need_u32(&format!("{a}.block_count"))? as usize;
        let embed = Role::Embed.gguf(0);
        let vocab_size = match self.dims(&embed)?.as_slice() {
            [rows, _] => *rows,
            dims => {
                return Err(model_err(
                    &self.path,
                    format!("{embed} has shape {dims:?}, expected 2 dimensions"),
                ))
            }
        };
        let intermediate_size = if num_layers > 0 {
            self.dims(&Role::Gate.gguf(0))?
                .first()
                .copied()
                .unwrap_or_default()
        } else {
            0
        };
        let rope_freq_divisors = if self.has("rope_freqs.weight") {
            Some(
                self.tensor("rope_freqs.weight", &Device::Cpu)?
                    .to_vec1::<f32>()?,
            )
        } else {
            None
        };
        Ok(ModelConfig {
            architecture: arch,
            hidden_size: hidden,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            context_length: self.get_u32(&format!("{a}.context_length")).unwrap_or(4096) as usize,
            rms_norm_eps: self
                .get_f32(&format!("{a}.attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_theta: self
                .get_f32(&format!("{a}.rope.freq_base"))
                .unwrap_or(10_000.0),
            rope_freq_divisors,
        })
    }

    /// The storage precision: the GGUF file type with tensor dtype counts, e.g.
    /// `Q4_1 (F32:61,Q4_1:210,Q8_0:1)`.
    pub fn quantization(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for info in self.content.tensor_infos.values() {
            *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
        }
        let dtypes = counts
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(",");
        match self.get_u32("general.file_type") {
            Some(ft) => format!("{} ({dtypes})", file_type_name(ft)),
            None => dtypes,
        }
    }

    /// The chat template's source (`tokenizer.chat_template`), if any.
    pub fn chat_template_source(&self) -> Option<String> {
        self.get_str("tokenizer.chat_template")
    }

    /// The tokenizer of the metadata (byte-level BPE), or `tokenizer_json` with the GGUF's
    /// special-token ids.
    pub fn tokenizer(&self, tokenizer_json: Option<&Path>) -> Result<TeacherTokenizer> {
        let path = &self.path;
        let bos_id = self.get_u32("tokenizer.ggml.bos_token_id");
        let eos_id = self.get_u32("tokenizer.ggml.eos_token_id");
        let pad_id = self.get_u32("tokenizer.ggml.padding_token_id");
        if let Some(tj) = tokenizer_json {
            return TeacherTokenizer::from_tokenizer_json(tj, [bos_id, eos_id, pad_id]);
        }
        let model_kind = self.get_str("tokenizer.ggml.model").unwrap_or_default();
        if model_kind != "gpt2" {
            return Err(model_err(
                path,
                format!(
                    "tokenizer.ggml.model {model_kind:?} cannot be built from GGUF metadata \
                     (only byte-level BPE \"gpt2\" can); pass the model's tokenizer.json"
                ),
            ));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(model_err(path, "missing tokenizer.ggml.tokens"));
        }
        let merges = self.strings("tokenizer.ggml.merges")?;
        if merges.is_empty() {
            return Err(model_err(path, "missing tokenizer.ggml.merges"));
        }
        let token_types = match self.metadata().get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| model_err(path, format!("tokenizer.ggml.token_type: {e}")))?
                .iter()
                .map(value_to_i32)
                .collect(),
            None => Vec::new(),
        };
        let spec = BpeSpec {
            tokens,
            merges,
            token_types,
            pre: self.get_str("tokenizer.ggml.pre").unwrap_or_default(),
            bos_id,
            eos_id,
            pad_id,
            add_bos: self
                .metadata()
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
        };
        TeacherTokenizer::from_bpe_spec(&spec, path)
    }
}

fn value_to_i32(v: &Value) -> i32 {
    v.to_i32()
        .or_else(|_| v.to_u32().map(|u| u as i32))
        .unwrap_or(0)
}
