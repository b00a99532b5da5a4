//! The teacher's tokenizer: a `tokenizers::Tokenizer` plus the special tokens and an identity
//! hash, built from a `tokenizer.json` or from GGUF metadata (`tokenizer.ggml.*`).
//!
//! From GGUF only the byte-level BPE family (`tokenizer.ggml.model = "gpt2"`) is built, with the
//! pre-tokenizer chosen by `tokenizer.ggml.pre` (see [`pre_tokenizer_for`]). candle's own GGUF
//! tokenizer prepends a space for SmolLM2, so it is not used.

use std::path::Path;

use sha2::{Digest, Sha256};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};

/// Identity of a tokenizer, stored with every label so a student can check it uses the same one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerIdentity {
    /// Hex sha256 of the canonical serialisation (see [`TeacherTokenizer::identity`]).
    pub sha256: String,
    /// Number of ids (base vocabulary plus added tokens).
    pub vocab_size: u32,
    /// Beginning-of-sequence token, if any.
    pub bos: Option<SpecialToken>,
    /// End-of-sequence token, if any.
    pub eos: Option<SpecialToken>,
    /// Padding token, if any.
    pub pad: Option<SpecialToken>,
}

/// A special token: its id and its text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpecialToken {
    /// Token id.
    pub id: u32,
    /// Token text, e.g. `<|im_end|>`.
    pub text: String,
}

/// Tokenizer of the teacher model.
#[derive(Clone)]
pub struct TeacherTokenizer {
    inner: tokenizers::Tokenizer,
    add_bos: bool,
    identity: TokenizerIdentity,
}

impl std::fmt::Debug for TeacherTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeacherTokenizer")
            .field("add_bos", &self.add_bos)
            .field("identity", &self.identity)
            .finish()
    }
}

/// Metadata for a byte-level BPE tokenizer as stored in GGUF files.
#[derive(Debug, Clone, Default)]
pub struct BpeSpec {
    /// Token strings by id (byte-level alphabet, e.g. `Ġthe`).
    pub tokens: Vec<String>,
    /// Merges as `"left right"` strings, by priority.
    pub merges: Vec<String>,
    /// GGUF token types by id (1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.pre`, e.g. `smollm`, `llama-bpe`, `qwen2`, `gpt2`.
    pub pre: String,
    /// BOS id.
    pub bos_id: Option<u32>,
    /// EOS id.
    pub eos_id: Option<u32>,
    /// Padding id.
    pub pad_id: Option<u32>,
    /// Whether encoding prepends BOS (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
}

/// GPT-2's split regex with single-digit numbers (Qwen2).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's split regex (numbers in groups of up to three).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer for a GGUF `tokenizer.ggml.pre` value, as the matching Hugging Face
/// `tokenizer.json` declares it. Returns `None` for an unknown value.
pub fn pre_tokenizer_for(pre: &str) -> Option<PreTokenizerWrapper> {
    let byte_level_regex = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    let split_then_bytes = |re: &str| -> Option<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .ok()?;
        Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        ])))
    };
    match pre {
        // SmolLM / SmolLM2 / StarCoder: every digit on its own, then GPT-2 byte-level splitting.
        "smollm" | "starcoder" => Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level_regex(),
        ]))),
        "" | "default" | "gpt2" | "gpt-2" => Some(byte_level_regex()),
        "qwen2" => split_then_bytes(QWEN2_REGEX),
        "llama-bpe" | "llama3" | "llama-v3" => split_then_bytes(LLAMA3_REGEX),
        _ => None,
    }
}

impl TeacherTokenizer {
    /// Builds a byte-level BPE tokenizer from GGUF-style metadata. `source` names the file for
    /// error messages.
    pub fn from_bpe_spec(spec: &BpeSpec, source: &Path) -> Result<Self> {
        let err = |reason: String| Error::Model {
            path: source.to_path_buf(),
            reason,
        };
        let pre = pre_tokenizer_for(&spec.pre).ok_or_else(|| {
            err(format!(
                "unsupported tokenizer.ggml.pre {:?} (supported: smollm, gpt2, qwen2, llama-bpe); \
                 pass the model's tokenizer.json instead",
                spec.pre
            ))
        })?;
        let vocab: tokenizers::models::bpe::Vocab = spec
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = spec
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("malformed merge {m:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(matches!(
                spec.pre.as_str(),
                "llama-bpe" | "llama3" | "llama-v3"
            ))
            .build()
            .map_err(|e| err(format!("building BPE tokenizer: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevel::new(false, true, true)));
        // Control tokens (type 3) are special; user-defined ones (type 4) are matched verbatim.
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (i, t) in spec.tokens.iter().enumerate() {
            match spec.token_types.get(i) {
                Some(3) => special.push(AddedToken::from(t.clone(), true)),
                Some(4) => user.push(AddedToken::from(t.clone(), false).normalized(false)),
                _ => {}
            }
        }
        inner
            .add_special_tokens(special)
            .map_err(|e| err(format!("adding special tokens: {e}")))?;
        inner
            .add_tokens(user)
            .map_err(|e| err(format!("adding user-defined tokens: {e}")))?;
        let special_of = |id: Option<u32>| {
            id.and_then(|id| {
                spec.tokens.get(id as usize).map(|text| SpecialToken {
                    id,
                    text: text.clone(),
                })
            })
        };
        let (bos, eos, pad) = (
            special_of(spec.bos_id),
            special_of(spec.eos_id),
            special_of(spec.pad_id),
        );
        let identity = identity_of(&spec.tokens, &spec.merges, bos, eos, pad);
        Ok(Self {
            inner,
            add_bos: spec.add_bos,
            identity,
        })
    }

    /// Loads a Hugging Face `tokenizer.json`. Special tokens come from the sibling
    /// `tokenizer_config.json` when present (`bos_token`, `eos_token`, `pad_token`,
    /// `add_bos_token`), otherwise from `fallback_specials` (BOS, EOS, PAD ids).
    pub fn from_tokenizer_json(path: &Path, fallback_specials: [Option<u32>; 3]) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let err = |reason: String| Error::Model {
            path: path.to_path_buf(),
            reason,
        };
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| err(format!("parsing tokenizer.json: {e}")))?;
        let json: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| err(format!("parsing tokenizer.json: {e}")))?;
        let merges: Vec<String> = json["model"]["merges"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .filter_map(|m| match m {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Array(pair) => Some(
                            pair.iter()
                                .filter_map(|p| p.as_str())
                                .collect::<Vec<_>>()
                                .join(" "),
                        ),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let vocab = inner.get_vocab(true);
        let mut tokens =
            vec![String::new(); vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0)];
        for (t, &i) in &vocab {
            tokens[i as usize] = t.clone();
        }
        let config_path = path.with_file_name("tokenizer_config.json");
        let config: Option<serde_json::Value> = std::fs::read(&config_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let named = |key: &str, fallback: Option<u32>| -> Option<SpecialToken> {
            let text = config.as_ref().and_then(|c| match &c[key] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => {
                    o.get("content").and_then(|v| v.as_str()).map(String::from)
                }
                _ => None,
            });
            match text {
                Some(text) => inner.token_to_id(&text).map(|id| SpecialToken { id, text }),
                None => fallback.and_then(|id| {
                    tokens.get(id as usize).map(|text| SpecialToken {
                        id,
                        text: text.clone(),
                    })
                }),
            }
        };
        let bos = named("bos_token", fallback_specials[0]);
        let eos = named("eos_token", fallback_specials[1]);
        let pad = named("pad_token", fallback_specials[2]);
        let add_bos = config
            .as_ref()
            .and_then(|c| c["add_bos_token"].as_bool())
            .unwrap_or(false);
        let identity = identity_of(&tokens, &merges, bos, eos, pad);
        Ok(Self {
            inner,
            add_bos,
            identity,
        })
    }

    /// Encodes text. Special-token strings in `text` (e.g. `<|im_start|>`) become their ids.
    /// When `add_bos` is true and the model asks for it (`add_bos_token`), BOS is prepended.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            if let Some(bos) = &self.identity.bos {
                ids.push(bos.id);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Encodes text and returns, for each token, the byte offset in `text` where it starts
    /// (used to find where a prompt ends). No BOS is added.
    pub fn encode_with_starts(&self, text: &str) -> Result<(Vec<u32>, Vec<usize>)> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let starts = enc.get_offsets().iter().map(|o| o.0).collect();
        Ok((enc.get_ids().to_vec(), starts))
    }

    /// Decodes ids back to text (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The text of one token id, in the tokenizer's own alphabet (e.g. `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether [`encode`](Self::encode) prepends BOS when asked to.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Identity: sha256 of the canonical serialisation, vocabulary size and special tokens.
    ///
    /// The canonical serialisation is UTF-8 text:
    /// `"firstkd-tokenizer-v1\n"`, then `"vocab <n>\n"` and one `"<id>\t<token>\n"` per id in
    /// id order, then `"merges <m>\n"` and one `"<left> <right>\n"` per merge in priority
    /// order, then `"bos <id> <text>\n"`, `"eos ..."`, `"pad ..."` (`"bos none\n"` when absent).
    pub fn identity(&self) -> &TokenizerIdentity {
        &self.identity
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn identity_of(
    tokens: &[String],
    merges: &[String],
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    pad: Option<SpecialToken>,
) -> TokenizerIdentity {
    let mut h = Sha256::new();
    h.update(b"firstkd-tokenizer-v1\n");
    h.update(format!("vocab {}\n", tokens.len()).as_bytes());
    for (i, t) in tokens.iter().enumerate() {
        h.update(format!("{i}\t{t}\n").as_bytes());
    }
    h.update(format!("merges {}\n", merges.len()).as_bytes());
    for m in merges {
        h.update(m.as_bytes());
        h.update(b"\n");
    }
    for (name, tok) in [("bos", &bos), ("eos", &eos), ("pad", &pad)] {
        match tok {
            Some(t) => h.update(format!("{name} {} {}\n", t.id, t.text).as_bytes()),
            None => h.update(format!("{name} none\n").as_bytes()),
        }
    }
    TokenizerIdentity {
        sha256: hex::encode(h.finalize()),
        vocab_size: tokens.len() as u32,
        bos,
        eos,
        pad,
    }
}
