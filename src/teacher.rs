//! The teacher: a Llama-family model (GGUF or Hugging Face safetensors), its tokenizer and chat
//! template, and labelling: for every position of every sequence, the top-k token ids with their
//! full-vocabulary log-probs, the entropy and the log-prob of the actual next token.
//!
//! ```no_run
//! # fn main() -> firstkd::Result<()> {
//! use firstkd::teacher::{LabelInput, LabelOptions, Teacher};
//! let teacher = Teacher::load("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(), &candle_core::Device::Cpu)?;
//! let ids = teacher.tokenizer().encode("The capital of France is Paris.", true)?;
//! let labels = teacher.label_batch(&[LabelInput { input_ids: &ids, prompt_len: 0 }], &LabelOptions::default())?;
//! assert_eq!(labels[0].entropy.len(), ids.len() - 1);
//! # Ok(()) }
//! ```
//!
//! Design notes live in `docs/teacher.md`.

mod attention;
pub mod device_select;
mod kernels;
mod load;
pub use load::gguf_tokenizer;
pub mod model;
pub mod qgemm;
pub mod select;
pub mod sgemm;

use std::path::Path;

use candle_core::{Device, Tensor};

pub use crate::digest::sha256_file;
pub use crate::tokenize::{chat, tokenizer};
pub use crate::tokenize::{ChatTemplate, Message};
pub use crate::tokenize::{SpecialToken, TeacherTokenizer, TokenizerIdentity};
pub use attention::{AttentionLayout, KeySpan};
pub(crate) use load::safetensors_shards;
pub use model::{Architecture, Compute, ModelConfig, TeacherModel};
pub use select::{select_row, RowSelection};

use crate::error::{Error, Result};
use crate::temperature::Temperature;

/// Who the teacher is, for provenance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TeacherIdentity {
    /// File (GGUF) or directory (HF checkpoint) name.
    pub file_name: String,
    /// Hex sha256 of the GGUF file; for a checkpoint directory, sha256 over
    /// `"<shard name>\n<shard sha256>\n"` for every `*.safetensors` shard in name order.
    pub sha256: String,
    /// `gguf` or `safetensors`.
    pub format: String,
    /// `llama` or `qwen2`.
    pub architecture: String,
    /// Storage precision: GGUF file type with tensor dtype counts, e.g.
    /// `Q4_1 (F32:61,Q4_1:210,Q8_0:1)`, or the checkpoint's `torch_dtype`.
    pub quantization: String,
    /// Compute mode, e.g. `f32 (dequantized) on cpu`.
    pub compute: String,
    /// Training context length.
    pub context_length: u32,
    /// Output vocabulary size.
    pub vocab_size: u32,
    /// Whether the output matrix is the token embedding.
    pub tied_embeddings: bool,
}

/// Which positions [`Teacher::label_batch`] labels. Position `p` predicts token `p + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Positions {
    /// Every position that has a next token: `0 .. len - 1`.
    #[default]
    All,
    /// Only positions whose next token is in the loss: `p + 1 >= prompt_len`, i.e.
    /// `max(prompt_len, 1) - 1 .. len - 1`. The output layer is skipped for the others.
    Response,
}

/// Options for [`Teacher::label_batch`].
#[derive(Debug, Clone, PartialEq)]
pub struct LabelOptions {
    /// How many top tokens to keep per position.
    pub k: usize,
    /// Softmax temperature applied to the logits before everything else (1.0 = none).
    pub temperature: Temperature,
    /// Which positions to label.
    pub positions: Positions,
    /// Rows of logits computed at once (bounds memory at `chunk_rows * vocab * 4` bytes).
    pub chunk_rows: usize,
    /// Knowledge selection (None: top-k with `k`).
    pub select: Option<crate::schema::Selection>,
    /// Where a top-k selection is computed: `None` on the logits' device (the host for the CPU,
    /// the accelerator otherwise, so only `k` values per position are copied back);
    /// `Some(true)` forces the tensor path ([`device_select`]) even on the CPU.
    pub select_on_device: Option<bool>,
    /// Packs the batch's sequences into rows of this many tokens (first-fit, longest first),
    /// each attending only to itself, instead of one right-padded row per sequence. `Some(0)`
    /// packs into rows of the batch's longest sequence.
    pub pack: Option<usize>,
}

impl Default for LabelOptions {
    fn default() -> Self {
        Self {
            k: 5,
            temperature: Temperature::ONE,
            positions: Positions::All,
            chunk_rows: 64,
            select: None,
            select_on_device: None,
            pack: None,
        }
    }
}

/// One sequence to label.
#[derive(Debug, Clone, Copy)]
pub struct LabelInput<'a> {
    /// Token ids (at least one).
    pub input_ids: &'a [u32],
    /// Number of leading prompt tokens (not in the loss).
    pub prompt_len: u32,
}

/// Labels of one sequence. Entry `j` is position `first_position + j`, which predicts token
/// `input_ids[first_position + j + 1]`; there are `n = len - 1 - first_position` entries.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SequenceLabels {
    /// Position of the first entry.
    pub first_position: u32,
    /// `n * k` ids, position-major, descending log-prob within a position.
    pub topk_ids: Vec<u32>,
    /// `n * k` full-vocabulary log-probs matching `topk_ids`.
    pub topk_logprobs: Vec<f32>,
    /// `n` log-probs of the actual next token.
    pub target_logprobs: Vec<f32>,
    /// `n` entropies (nats).
    pub entropy: Vec<f32>,
    /// Entries per position (top-p and sample selections; empty for top-k: `k` each).
    pub lengths: Vec<u32>,
    /// Draws of each entry (sample selection only).
    pub counts: Vec<u16>,
}

impl SequenceLabels {
    /// Number of labelled positions.
    pub fn len(&self) -> usize {
        self.entropy.len()
    }

    /// Whether no position was labelled.
    pub fn is_empty(&self) -> bool {
        self.entropy.is_empty()
    }
}

/// A loaded teacher.
#[derive(Debug)]
pub struct Teacher {
    model: TeacherModel,
    tokenizer: TeacherTokenizer,
    chat_template: Option<ChatTemplate>,
    identity: TeacherIdentity,
}

impl Teacher {
    /// Loads a GGUF file (llama or qwen2 architecture) or a Hugging Face checkpoint directory
    /// (config.json + *.safetensors + tokenizer.json) onto `device`, with weights in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with_tokenizer(path, None, device)
    }

    /// Like [`load`](Self::load), with a `tokenizer.json` overriding the GGUF's own tokenizer
    /// (needed for GGUF files whose tokenizer is not byte-level BPE, e.g. Llama 2's).
    pub fn load_with_tokenizer(
        path: &Path,
        tokenizer_json: Option<&Path>,
        device: &Device,
    ) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let loaded = if meta.is_dir() {
            load::load_hf_dir(path, device)?
        } else {
            load::load_gguf(path, tokenizer_json, device)?
        };
        Ok(Self {
            model: loaded.model,
            tokenizer: loaded.tokenizer,
            chat_template: loaded.chat_template,
            identity: loaded.identity,
        })
    }

    /// Switches the matrix products to `compute` ([`TeacherModel::set_compute`]) and records
    /// it in [`identity`](Self::identity)`.compute`.
    pub fn set_compute(&mut self, compute: Compute) -> Result<()> {
        if compute == self.model.compute() {
            return Ok(());
        }
        let desc = self.model.set_compute(compute)?;
        let on = self
            .identity
            .compute
            .rsplit_once(" on ")
            .map(|(_, dev)| dev.to_string())
            .unwrap_or_else(|| "cpu".to_string());
        self.identity.compute = format!("{desc} on {on}");
        Ok(())
    }

    /// The decoder.
    pub fn model(&self) -> &TeacherModel {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TeacherTokenizer {
        &self.tokenizer
    }

    /// The chat template, if the model ships one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The tokenizer and chat template, to turn input records into sequences.
    pub fn encoder(&self) -> crate::input::Encoder<'_> {
        crate::input::Encoder {
            tokenizer: self.tokenizer(),
            chat_template: self.chat_template(),
        }
    }

    /// Provenance of the model file.
    pub fn identity(&self) -> &TeacherIdentity {
        &self.identity
    }

    /// Labels a batch of sequences in one forward pass (right-padded to the longest). Results
    /// are in input order and equal, up to float rounding, to labelling each sequence alone.
    ///
    /// Batches of similar lengths waste less compute; see [`plan_batches`].
    pub fn label_batch(
        &self,
        batch: &[LabelInput<'_>],
        opts: &LabelOptions,
    ) -> Result<Vec<SequenceLabels>> {
        let ids: Vec<u64> = (0..batch.len() as u64).collect();
        self.label_batch_seeded(batch, opts, &ids)
    }

    /// [`Self::label_batch`] with the sample id of each sequence, which seeds the per-position
    /// draws of a sample selection (so a resumed or sharded run draws the same tokens).
    pub fn label_batch_seeded(
        &self,
        batch: &[LabelInput<'_>],
        opts: &LabelOptions,
        sample_ids: &[u64],
    ) -> Result<Vec<SequenceLabels>> {
        self.model.label_batch_seeded(batch, opts, sample_ids)
    }
}

impl TeacherModel {
    /// [`Teacher::label_batch_seeded`] on the model alone (token ids in, labels out).
    pub fn label_batch_seeded(
        &self,
        batch: &[LabelInput<'_>],
        opts: &LabelOptions,
        sample_ids: &[u64],
    ) -> Result<Vec<SequenceLabels>> {
        let cfg = self.config();
        let select = opts
            .select
            .unwrap_or(crate::schema::Selection::TopK { k: opts.k });
        if sample_ids.len() != batch.len() {
            return Err(Error::Internal(format!(
                "{} sample ids for {} sequences",
                sample_ids.len(),
                batch.len()
            )));
        }
        let k = select.max_len();
        if k == 0 || k > cfg.vocab_size {
            return Err(Error::InvalidArgument(format!(
                "k = {k} must be in 1..={}",
                cfg.vocab_size
            )));
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let seq = batch.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
        for (i, s) in batch.iter().enumerate() {
            if s.input_ids.is_empty() {
                return Err(Error::InvalidArgument(format!("sequence {i} is empty")));
            }
            if let Some(&bad) = s.input_ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::InvalidArgument(format!(
                    "sequence {i}: token id {bad} outside the vocabulary of {}",
                    cfg.vocab_size
                )));
            }
        }
        if seq > cfg.context_length {
            return Err(Error::InvalidArgument(format!(
                "sequence of {seq} tokens exceeds the model's context of {}",
                cfg.context_length
            )));
        }
        let device = self.device();
        // Where each sequence's tokens sit: row and offset within it.
        let (slots, n_rows, row_len) = match opts.pack {
            None => (
                (0..batch.len()).map(|b| (b, 0usize)).collect::<Vec<_>>(),
                batch.len(),
                seq,
            ),
            Some(len) => {
                let row_len = if len == 0 { seq } else { len };
                if seq > row_len {
                    return Err(Error::InvalidArgument(format!(
                        "a sequence of {seq} tokens does not fit packed rows of {row_len}"
                    )));
                }
                if row_len > cfg.context_length {
                    return Err(Error::InvalidArgument(format!(
                        "packed rows of {row_len} tokens exceed the model's context of {}",
                        cfg.context_length
                    )));
                }
                let lengths: Vec<usize> = batch.iter().map(|s| s.input_ids.len()).collect();
                let (slots, n_rows) = pack_rows(&lengths, row_len);
                (slots, n_rows, row_len)
            }
        };
        let mut padded = vec![0u32; n_rows * row_len];
        for (s, &(r, off)) in batch.iter().zip(&slots) {
            let at = r * row_len + off;
            padded[at..at + s.input_ids.len()].copy_from_slice(s.input_ids);
        }
        let ids = Tensor::from_vec(padded, (n_rows, row_len), device)?;
        let hidden = match opts.pack {
            None => self.hidden_states(&ids)?,
            Some(_) => {
                let lengths: Vec<usize> = batch.iter().map(|s| s.input_ids.len()).collect();
                let layout = packed_layout(&lengths, &slots, n_rows, row_len);
                self.hidden_states_with(&ids, Some(&layout))?
            }
        }
        .reshape((n_rows * row_len, cfg.hidden_size))?;

        // Rows to label and, for each, (sequence, target id).
        let mut rows: Vec<u32> = Vec::new();
        let mut owners: Vec<(usize, u32)> = Vec::new();
        let mut seeds: Vec<u64> = Vec::new();
        let mut out: Vec<SequenceLabels> = Vec::with_capacity(batch.len());
        for (b, s) in batch.iter().enumerate() {
            let len = s.input_ids.len();
            let first = match opts.positions {
                Positions::All => 0,
                Positions::Response => (s.prompt_len.max(1) as usize - 1).min(len - 1),
            };
            let n = len - 1 - first;
            let (r, off) = slots[b];
            for p in first..len - 1 {
                rows.push((r * row_len + off + p) as u32);
                owners.push((b, s.input_ids[p + 1]));
                seeds.push(select::position_seed(&select, sample_ids[b], p as u64));
            }
            out.push(SequenceLabels {
                first_position: first as u32,
                topk_ids: Vec::with_capacity(n * k),
                topk_logprobs: Vec::with_capacity(n * k),
                target_logprobs: Vec::with_capacity(n),
                entropy: Vec::with_capacity(n),
                lengths: Vec::new(),
                counts: Vec::new(),
            });
        }
        let on_device = matches!(select, crate::schema::Selection::TopK { .. })
            && opts
                .select_on_device
                .unwrap_or(!matches!(device, Device::Cpu));
        let chunk_rows = opts.chunk_rows.max(1);
        let inv_t = 1.0 / opts.temperature.get();
        for (chunk_idx, row_chunk) in rows.chunks(chunk_rows).enumerate() {
            let index = Tensor::from_slice(row_chunk, row_chunk.len(), device)?;
            let mut logits = self.logits(&hidden.index_select(&index, 0)?)?;
            if !opts.temperature.is_one() {
                logits = (logits * inv_t)?;
            }
            let span = chunk_idx * chunk_rows..chunk_idx * chunk_rows + row_chunk.len();
            let owners = &owners[span.clone()];
            let selections = if on_device {
                let targets: Vec<u32> = owners.iter().map(|o| o.1).collect();
                device_select::select_top_k(&logits, k, &targets)?
            } else {
                let logits = logits.to_dtype(candle_core::DType::F32)?;
                select_rows(&logits, cfg.vocab_size, &select, owners, &seeds[span])?
            };
            for ((b, _), sel) in owners.iter().zip(selections) {
                let o = &mut out[*b];
                o.topk_ids.extend_from_slice(&sel.topk_ids);
                o.topk_logprobs.extend_from_slice(&sel.topk_logprobs);
                if !select.fixed_len() {
                    o.lengths.push(sel.topk_ids.len() as u32);
                    o.counts.extend_from_slice(&sel.counts);
                }
                o.target_logprobs
                    .push(sel.target_logprob.unwrap_or(f32::NEG_INFINITY));
                o.entropy.push(sel.entropy);
            }
        }
        Ok(out)
    }
}

/// Runs [`select_row`] over every row of a `[rows, vocab]` logits tensor, split across the
/// available CPU threads. Logits on an accelerator are copied to the host first.
fn select_rows(
    logits: &Tensor,
    vocab: usize,
    select: &crate::schema::Selection,
    owners: &[(usize, u32)],
    seeds: &[u64],
) -> Result<Vec<RowSelection>> {
    crate::host::with_f32(logits, |data| {
        select_host_rows(data, vocab, select, owners, seeds)
    })?
}

fn select_host_rows(
    data: &[f32],
    vocab: usize,
    select: &crate::schema::Selection,
    owners: &[(usize, u32)],
    seeds: &[u64],
) -> Result<Vec<RowSelection>> {
    let n = owners.len();
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .min(n.max(1));
    let per = n.div_ceil(threads.max(1)).max(1);
    let work = |lo: usize, hi: usize| -> Result<Vec<RowSelection>> {
        (lo..hi)
            .map(|r| {
                select::select_row_with(
                    &data[r * vocab..(r + 1) * vocab],
                    select,
                    Some(owners[r].1),
                    seeds[r],
                )
            })
            .collect()
    };
    if threads <= 1 {
        return work(0, n);
    }
    let parts: Vec<Result<Vec<RowSelection>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|lo| {
                let hi = (lo + per).min(n);
                scope.spawn(move || work(lo, hi))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Internal("selection thread panicked".to_string()))
                })
            })
            .collect()
    });
    let mut all = Vec::with_capacity(n);
    for part in parts {
        all.extend(part?);
    }
    Ok(all)
}

/// First-fit-decreasing packing of sequences of `lengths` into rows of `row_len` tokens (every
/// length `<= row_len`): returns each sequence's `(row, offset)` and the number of rows.
/// Deterministic: longest first, ties by index.
pub fn pack_rows(lengths: &[usize], row_len: usize) -> (Vec<(usize, usize)>, usize) {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut used: Vec<usize> = Vec::new();
    let mut slots = vec![(0, 0); lengths.len()];
    for i in order {
        let len = lengths[i];
        let row = match used.iter().position(|&u| u + len <= row_len) {
            Some(r) => r,
            None => {
                used.push(0);
                used.len() - 1
            }
        };
        slots[i] = (row, used[row]);
        used[row] += len;
    }
    (slots, used.len())
}

/// The attention layout of packed rows: every sequence attends causally to itself only, with
/// RoPE positions from 0; the padding at the end of a row attends to itself.
fn packed_layout(
    lengths: &[usize],
    slots: &[(usize, usize)],
    n_rows: usize,
    row_len: usize,
) -> AttentionLayout {
    let mut positions = vec![0u32; n_rows * row_len];
    let mut spans = vec![KeySpan::causal(0); n_rows * row_len];
    let mut used = vec![0usize; n_rows];
    for (&len, &(r, off)) in lengths.iter().zip(slots) {
        for p in 0..len {
            positions[r * row_len + off + p] = p as u32;
            spans[r * row_len + off + p] = KeySpan::causal(off as u32);
        }
        used[r] = used[r].max(off + len);
    }
    for (r, &u) in used.iter().enumerate() {
        for p in u..row_len {
            positions[r * row_len + p] = (p - u) as u32;
            spans[r * row_len + p] = KeySpan::causal(u as u32);
        }
    }
    AttentionLayout { positions, spans }
}

/// Groups sequence indices into batches of packed rows: sequences are packed longest first
/// into rows of `row_len` ([`pack_rows`]) and consecutive rows grouped so that a batch holds at
/// most `max_tokens / row_len` rows (at least one).
pub fn plan_packed_batches(
    lengths: &[usize],
    row_len: usize,
    max_tokens: usize,
) -> Vec<Vec<usize>> {
    let (slots, n_rows) = pack_rows(lengths, row_len);
    let per = (max_tokens / row_len.max(1)).max(1);
    let mut batches: Vec<Vec<usize>> = vec![Vec::new(); n_rows.div_ceil(per)];
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| slots[i]);
    for i in order {
        batches[slots[i].0 / per].push(i);
    }
    batches
}

/// Groups sequence indices into batches whose padded size (`count * longest`) stays within
/// `max_tokens` (a single longer sequence still gets its own batch). Sequences are sorted by
/// length, longest first, so each batch holds similar lengths and little padding.
pub fn plan_batches(lengths: &[usize], max_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut longest = 0;
    for i in order {
        let len = lengths[i];
        let new_longest = longest.max(len);
        if !current.is_empty() && new_longest * (current.len() + 1) > max_tokens {
            batches.push(std::mem::take(&mut current));
            longest = 0;
        }
        longest = longest.max(len);
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests;
