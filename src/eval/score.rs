//! Scoring: prompts, tokenisation, batched forward passes and the per-option scores.
//!
//! * Letter: one sequence per question (the lettered prompt of
//!   [`multiple_choice_prompt_with_context`]); the score of option `i` is the full-vocabulary
//!   log-prob of its letter token (`" A"`, `" B"`, ...) at the last prompt position, after
//!   dividing the logits by the temperature.
//! * Cloze: the score of an option is the summed log-prob (temperature 1) of its tokens after
//!   `"[Passage: ...\n]Question: ...\nAnswer:" + " "`. With [`ClozeLayout::Shared`] (the
//!   default) a question is one sequence: its prompt once, then every option's tokens (all but
//!   the last, whose next-token distribution is never read), each option attending to the prompt
//!   and to itself with positions continuing the prompt's ([`AttentionLayout`]), so the prompt
//!   is computed once instead of once per option. [`ClozeLayout::Separate`] runs one full
//!   sequence per option (the lm-evaluation-harness way); both give the same scores. The
//!   options of a question always go in the same forward pass.

use candle_core::{Device, Tensor};

use super::task::EvalItem;
use crate::error::{Error, Result};
use crate::input::{answer_letter, multiple_choice_prompt_with_context};
use crate::teacher::{AttentionLayout, KeySpan, Message, Teacher};

/// How cloze options are laid out for the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ClozeLayout {
    /// One sequence per question: the prompt once, the options after it, each attending to the
    /// prompt and itself.
    #[default]
    Shared,
    /// One sequence per option: prompt + option, the prompt recomputed for every option.
    Separate,
}

impl ClozeLayout {
    /// The spelling used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            ClozeLayout::Shared => "shared",
            ClozeLayout::Separate => "separate",
        }
    }
}

impl std::str::FromStr for ClozeLayout {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        crate::parse_value(s, "cloze layout")
    }
}

/// How the prompt is presented to the model.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PromptOptions {
    /// Wrap the prompt in the model's chat template as a user turn followed by the opening of
    /// the assistant turn; continuations then have no leading space (`"A"`, `"carbon dioxide"`).
    pub chat_template: bool,
}

/// Per-option scores of one item.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ItemScores {
    /// Line (or element number) of the item in the task file.
    pub line: u64,
    /// Gold option index.
    pub gold: usize,
    /// Letter mode: full-vocabulary log-prob of each option's letter token at temperature `T`.
    pub letter_logprobs: Option<Vec<f64>>,
    /// Cloze mode: summed log-prob of each option's continuation tokens.
    pub cloze_logprobs: Option<Vec<f64>>,
    /// Cloze mode: UTF-8 byte length of each option's continuation text (for `acc_norm`).
    pub cloze_bytes: Option<Vec<usize>>,
}

/// The cloze prompt (lm-evaluation-harness style): `"[Passage: {context}\n]Question:
/// {question}\nAnswer:"`.
pub fn cloze_prompt(context: Option<&str>, question: &str) -> String {
    let mut s = match context {
        Some(c) => format!("Passage: {}\n", c.trim()),
        None => String::new(),
    };
    s.push_str(&format!("Question: {}\nAnswer:", question.trim()));
    s
}

/// The lettered prompt of an item (shared with labelling, see
/// [`multiple_choice_prompt_with_context`]).
pub fn letter_prompt(item: &EvalItem) -> String {
    multiple_choice_prompt_with_context(
        item.context.as_deref(),
        &item.mc.question,
        &item.mc.choices,
    )
}

/// One sequence to run: `ids`, and which next-token log-probs to read from it.
#[derive(Debug, Clone)]
pub(crate) struct ScoredSequence {
    pub ids: Vec<u32>,
    /// Positions and key spans when the sequence is not plain causal from position 0.
    pub layout: Option<(Vec<u32>, Vec<KeySpan>)>,
    /// Cloze: per option, the (index whose next-token distribution is read, target id) pairs
    /// whose log-probs are summed.
    pub targets: Vec<Vec<(usize, u32)>>,
}

impl ScoredSequence {
    /// Largest RoPE position + 1 (the context the sequence needs).
    pub fn span(&self) -> usize {
        match &self.layout {
            Some((pos, _)) => pos.iter().map(|&p| p as usize + 1).max().unwrap_or(0),
            None => self.ids.len(),
        }
    }
}

/// Tokenised prompt of an item and its continuation separator.
struct Encoded {
    /// Prompt ids as the model sees them (BOS included when the model wants one).
    prompt: Vec<u32>,
    /// Prompt text and its ids without BOS, to split joined encodings.
    prompt_text: String,
    prompt_bare: Vec<u32>,
    /// `" "` without the chat template, `""` with it.
    separator: &'static str,
}

fn encode_prompt(teacher: &Teacher, text: &str, opts: &PromptOptions) -> Result<Encoded> {
    let tok = teacher.tokenizer();
    let (prompt_text, add_bos, separator) = if opts.chat_template {
        let template = teacher.chat_template().ok_or_else(|| {
            Error::InvalidArgument(
                "the model has no chat template to wrap the prompt in".to_string(),
            )
        })?;
        // The rendering carries its own BOS text when the template wants one.
        (
            template.render(&[Message::new("user", text)], true)?,
            false,
            "",
        )
    } else {
        (text.to_string(), true, " ")
    };
    Ok(Encoded {
        prompt: tok.encode(&prompt_text, add_bos)?,
        prompt_bare: tok.encode(&prompt_text, false)?,
        prompt_text,
        separator,
    })
}

/// Tokens of `continuation` after the prompt, the lm-evaluation-harness way: encode the joined
/// text and drop the prompt's tokens (falling back to encoding the continuation alone when the
/// joined encoding does not start with the prompt's).
fn continuation_ids(teacher: &Teacher, enc: &Encoded, continuation: &str) -> Result<Vec<u32>> {
    let tok = teacher.tokenizer();
    let joined = tok.encode(&format!("{}{continuation}", enc.prompt_text), false)?;
    if joined.starts_with(&enc.prompt_bare) && joined.len() > enc.prompt_bare.len() {
        Ok(joined[enc.prompt_bare.len()..].to_vec())
    } else {
        tok.encode(continuation, false)
    }
}

/// Letter-mode sequence of an item and its option letter token ids.
pub(crate) fn letter_sequence(
    teacher: &Teacher,
    item: &EvalItem,
    opts: &PromptOptions,
) -> std::result::Result<(ScoredSequence, Vec<u32>), String> {
    let enc = encode_prompt(teacher, &letter_prompt(item), opts).map_err(|e| e.to_string())?;
    let mut letters = Vec::with_capacity(item.mc.choices.len());
    for i in 0..item.mc.choices.len() {
        let letter = answer_letter(i).ok_or("more than 26 choices")?;
        let ids = continuation_ids(teacher, &enc, &format!("{}{letter}", enc.separator))
            .map_err(|e| e.to_string())?;
        match ids.as_slice() {
            [id] => letters.push(*id),
            _ => {
                return Err(format!(
                    "option letter {:?} is {} tokens, not one",
                    format!("{}{letter}", enc.separator),
                    ids.len()
                ))
            }
        }
    }
    Ok((
        ScoredSequence {
            ids: enc.prompt,
            layout: None,
            targets: Vec::new(),
        },
        letters,
    ))
}

/// Cloze-mode sequences of an item (one per question with [`ClozeLayout::Shared`], one per
/// option with [`ClozeLayout::Separate`]) and the byte length of each continuation.
pub(crate) fn cloze_sequences(
    teacher: &Teacher,
    item: &EvalItem,
    opts: &PromptOptions,
    layout: ClozeLayout,
) -> std::result::Result<(Vec<ScoredSequence>, Vec<usize>), String> {
    let prompt = cloze_prompt(item.context.as_deref(), &item.mc.question);
    let enc = encode_prompt(teacher, &prompt, opts).map_err(|e| e.to_string())?;
    let p = enc.prompt.len();
    if p == 0 {
        return Err("the prompt renders to no tokens".to_string());
    }
    let mut conts = Vec::with_capacity(item.mc.choices.len());
    let mut bytes = Vec::with_capacity(item.mc.choices.len());
    for (i, choice) in item.mc.choices.iter().enumerate() {
        let continuation = format!("{}{}", enc.separator, choice.trim());
        let cont = continuation_ids(teacher, &enc, &continuation).map_err(|e| e.to_string())?;
        if cont.is_empty() {
            return Err(format!("choice {i} renders to no tokens"));
        }
        bytes.push(continuation.len());
        conts.push(cont);
    }
    let seqs = match layout {
        ClozeLayout::Separate => conts
            .iter()
            .map(|cont| {
                let mut ids = enc.prompt.clone();
                ids.extend_from_slice(cont);
                let targets = (0..cont.len()).map(|j| (p - 1 + j, cont[j])).collect();
                ScoredSequence {
                    ids,
                    layout: None,
                    targets: vec![targets],
                }
            })
            .collect(),
        ClozeLayout::Shared => {
            let mut ids = enc.prompt.clone();
            let mut positions: Vec<u32> = (0..p as u32).collect();
            let mut spans = vec![KeySpan::causal(0); p];
            let mut targets = Vec::with_capacity(conts.len());
            for cont in &conts {
                // Token j of the option is predicted by the prompt's last position (j = 0) or
                // by the option's token j - 1, which sits at `start + j - 1`.
                let start = ids.len();
                let t: Vec<(usize, u32)> = cont
                    .iter()
                    .enumerate()
                    .map(|(j, &id)| (if j == 0 { p - 1 } else { start + j - 1 }, id))
                    .collect();
                targets.push(t);
                for (j, &id) in cont[..cont.len() - 1].iter().enumerate() {
                    ids.push(id);
                    positions.push((p + j) as u32);
                    spans.push(KeySpan {
                        shared_start: 0,
                        shared_end: p as u32,
                        own_start: start as u32,
                    });
                }
            }
            vec![ScoredSequence {
                ids,
                layout: Some((positions, spans)),
                targets,
            }]
        }
    };
    Ok((seqs, bytes))
}

/// What to read from one sequence's forward pass.
#[derive(Debug, Clone)]
pub(crate) enum Readout {
    /// Full-vocabulary log-probs (at `1 / inv_temperature`) of these ids at the last position.
    LastPosition(Vec<u32>),
    /// Summed log-prob (temperature 1) of each option's tokens ([`ScoredSequence::targets`]).
    Continuation,
}

/// Runs a batch of sequences (right-padded) in one forward pass and returns, per sequence, the
/// requested log-probs: the letter ids' log-probs, or one summed log-prob per option.
pub(crate) fn run_batch(
    teacher: &Teacher,
    batch: &[(&ScoredSequence, &Readout)],
    temperature: f64,
) -> Result<Vec<Vec<f64>>> {
    let model = teacher.model();
    let cfg = model.config();
    let seq = batch.iter().map(|(s, _)| s.ids.len()).max().unwrap_or(0);
    if seq == 0 {
        return Ok(Vec::new());
    }
    let device = model.device();
    let mut padded = vec![0u32; batch.len() * seq];
    for (b, (s, _)) in batch.iter().enumerate() {
        padded[b * seq..b * seq + s.ids.len()].copy_from_slice(&s.ids);
    }
    let ids = Tensor::from_vec(padded, (batch.len(), seq), device)?;
    let layout = if batch.iter().any(|(s, _)| s.layout.is_some()) {
        let mut layout = AttentionLayout {
            positions: Vec::with_capacity(batch.len() * seq),
            spans: Vec::with_capacity(batch.len() * seq),
        };
        for (s, _) in batch {
            let n = s.ids.len();
            match &s.layout {
                Some((pos, spans)) => {
                    layout.positions.extend_from_slice(pos);
                    layout.spans.extend_from_slice(spans);
                }
                None => {
                    layout.positions.extend(0..n as u32);
                    layout
                        .spans
                        .extend(std::iter::repeat_n(KeySpan::causal(0), n));
                }
            }
            // Padding: causal, position 0 (its outputs are never read, and a position past
            // the context would be refused).
            layout.positions.extend(std::iter::repeat_n(0, seq - n));
            layout
                .spans
                .extend(std::iter::repeat_n(KeySpan::causal(n as u32), seq - n));
        }
        Some(layout)
    } else {
        None
    };
    let hidden = model
        .hidden_states_with(&ids, layout.as_ref())?
        .reshape((batch.len() * seq, cfg.hidden_size))?;
    // Rows whose logits are needed, with (sequence, target id or None for the last position).
    let mut rows: Vec<u32> = Vec::new();
    for (b, (s, readout)) in batch.iter().enumerate() {
        match readout {
            Readout::LastPosition(_) => rows.push((b * seq + s.ids.len() - 1) as u32),
            Readout::Continuation => {
                for &(p, _) in s.targets.iter().flatten() {
                    rows.push((b * seq + p) as u32);
                }
            }
        }
    }
    let index = Tensor::from_slice(&rows, rows.len(), device)?;
    let logits = model
        .logits(&hidden.index_select(&index, 0)?)?
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?;
    let vocab = cfg.vocab_size;
    Ok(crate::host::with_f32(&logits, |data| {
        read_out(data, batch, vocab, temperature)
    })?)
}

/// The scores of each sequence of `batch` from the logits rows `run_batch` selected, in order.
fn read_out(
    data: &[f32],
    batch: &[(&ScoredSequence, &Readout)],
    vocab: usize,
    temperature: f64,
) -> Vec<Vec<f64>> {
    let mut row = 0usize;
    let mut out = Vec::with_capacity(batch.len());
    for (s, readout) in batch {
        match readout {
            Readout::LastPosition(ids) => {
                let logits = &data[row * vocab..(row + 1) * vocab];
                row += 1;
                let scale = 1.0 / temperature;
                let lse = log_sum_exp(logits, scale);
                out.push(
                    ids.iter()
                        .map(|&id| f64::from(logits[id as usize]) * scale - lse)
                        .collect(),
                );
            }
            Readout::Continuation => {
                let mut sums = Vec::with_capacity(s.targets.len());
                for option in &s.targets {
                    let mut total = 0.0;
                    for &(_, target) in option {
                        let logits = &data[row * vocab..(row + 1) * vocab];
                        row += 1;
                        total += f64::from(logits[target as usize]) - log_sum_exp(logits, 1.0);
                    }
                    sums.push(total);
                }
                out.push(sums);
            }
        }
    }
    out
}

/// `log(sum_j exp(scale * x_j))`, in f64.
pub(crate) fn log_sum_exp(xs: &[f32], scale: f64) -> f64 {
    let max = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let max = f64::from(max) * scale;
    let sum: f64 = xs.iter().map(|&x| (f64::from(x) * scale - max).exp()).sum();
    max + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_matches_direct_sum() {
        // numpy: np.log(np.exp(np.array([1.0, 2.0, 3.0]) / 2).sum()) -> 2.1802696706417346
        let got = log_sum_exp(&[1.0, 2.0, 3.0], 0.5);
        assert!((got - 2.180_269_670_641_734_6).abs() < 1e-12, "{got}");
    }

    #[test]
    fn cloze_prompt_with_and_without_passage() {
        assert_eq!(cloze_prompt(None, " Why? "), "Question: Why?\nAnswer:");
        assert_eq!(
            cloze_prompt(Some("Sky."), "Is it blue?"),
            "Passage: Sky.\nQuestion: Is it blue?\nAnswer:"
        );
    }
}
