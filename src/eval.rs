//! Multiple-choice evaluation of any model (the teacher GGUF or a student checkpoint): accuracy
//! and calibration (ECE and friends, via [`crate::calibration`]) in letter and cloze modes.
//!
//! ```no_run
//! # fn main() -> firstkd::Result<()> {
//! use firstkd::eval::{evaluate, read_task, EvalOptions, Mode, TaskFormat};
//! use firstkd::teacher::Teacher;
//! let teacher = Teacher::load("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(), &candle_core::Device::Cpu)?;
//! let path = std::path::Path::new("arc_easy/test.json");
//! let items = read_task(path, TaskFormat::Auto, Some(20))?;
//! let opts = EvalOptions { mode: Mode::Both, ..EvalOptions::default() };
//! let result = evaluate(&teacher, path, &items, &opts, &mut |_, _| {})?;
//! for r in &result.reports {
//!     assert!(r.calibration.ece >= 0.0 && r.accuracy <= 1.0);
//! }
//! # Ok(()) }
//! ```
//!
//! Prompts, scores and metric definitions are documented in `docs/eval.md`.

pub mod plot;
pub mod report;
pub mod score;
pub mod task;

use std::path::Path;

pub use plot::reliability_svg;
pub use report::{argmax, option_probabilities, ModeReport};
pub use score::{cloze_prompt, letter_prompt, ClozeLayout, ItemScores, PromptOptions};
pub use task::{parse_item, read_task, EvalItem, TaskFormat};

use crate::calibration::DEFAULT_N_BINS;
use crate::error::{Error, Result};
use crate::teacher::Teacher;
use crate::temperature::Temperature;
use score::{Readout, ScoredSequence};

/// Scoring mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// Next-token probability of the option letters after a lettered prompt.
    Letter,
    /// Summed log-prob of each option's text after the question (lm-evaluation-harness).
    #[default]
    Cloze,
    /// Both of the above.
    Both,
}

impl Mode {
    /// The spelling used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Letter => "letter",
            Mode::Cloze => "cloze",
            Mode::Both => "both",
        }
    }

    fn letter(self) -> bool {
        matches!(self, Mode::Letter | Mode::Both)
    }

    fn cloze(self) -> bool {
        matches!(self, Mode::Cloze | Mode::Both)
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        crate::parse_value(s, "mode")
    }
}

/// Options of [`evaluate`].
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    /// Letter, cloze or both.
    pub mode: Mode,
    /// Plain prompt or chat template.
    pub prompt: PromptOptions,
    /// Temperature dividing the logits (letter) or the summed log-probs (cloze) before the
    /// softmax over options. Rankings, hence accuracy, do not change.
    pub temperature: Temperature,
    /// Padded tokens per forward pass (a question's options always share one pass).
    pub batch_tokens: usize,
    /// Cloze: the prompt once per question (shared) or once per option (separate).
    pub cloze_layout: ClozeLayout,
    /// Equal-width bins of the ECE.
    pub n_bins: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Cloze,
            prompt: PromptOptions::default(),
            temperature: Temperature::ONE,
            batch_tokens: 4096,
            cloze_layout: ClozeLayout::Shared,
            n_bins: DEFAULT_N_BINS,
        }
    }
}

/// Scores and reports of one evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalResult {
    /// One report per mode (letter first).
    pub reports: Vec<ModeReport>,
    /// Per-item, per-option scores.
    pub items: Vec<ItemScores>,
    /// Tokens run through the model (padding excluded).
    pub tokens: u64,
    /// Forward passes.
    pub forward_passes: u64,
}

/// One unit of batching: the sequences of one item in one mode.
struct Unit {
    item: usize,
    letter: bool,
    seqs: Vec<ScoredSequence>,
    readout: Readout,
}

/// Scores `items` with `teacher` and computes the report of each mode. `progress(done,
/// total)` is called after each forward pass with counts of (item, mode) units.
pub fn evaluate(
    teacher: &Teacher,
    task_path: &Path,
    items: &[EvalItem],
    opts: &EvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalResult> {
    if items.is_empty() {
        return Err(Error::InvalidArgument("no items to evaluate".to_string()));
    }
    let context = teacher.model().config().context_length;
    let invalid = |item: &EvalItem, reason: String| Error::InvalidRecord {
        path: task_path.to_path_buf(),
        line: item.line,
        reason,
    };
    let mut units = Vec::new();
    let mut scores: Vec<ItemScores> = items
        .iter()
        .map(|item| ItemScores {
            line: item.line,
            gold: item.mc.answer,
            letter_logprobs: None,
            cloze_logprobs: None,
            cloze_bytes: None,
        })
        .collect();
    for (i, item) in items.iter().enumerate() {
        if opts.mode.letter() {
            let (seq, letters) = score::letter_sequence(teacher, item, &opts.prompt)
                .map_err(|r| invalid(item, r))?;
            units.push(Unit {
                item: i,
                letter: true,
                seqs: vec![seq],
                readout: Readout::LastPosition(letters),
            });
        }
        if opts.mode.cloze() {
            let (seqs, bytes) =
                score::cloze_sequences(teacher, item, &opts.prompt, opts.cloze_layout)
                    .map_err(|r| invalid(item, r))?;
            scores[i].cloze_bytes = Some(bytes);
            units.push(Unit {
                item: i,
                letter: false,
                seqs,
                readout: Readout::Continuation,
            });
        }
    }
    for u in &units {
        let longest = u.seqs.iter().map(|s| s.span()).max().unwrap_or(0);
        if longest > context {
            return Err(invalid(
                &items[u.item],
                format!("sequence of {longest} tokens exceeds the model's context of {context}"),
            ));
        }
    }
    let batches = plan_unit_batches(&units, opts.batch_tokens);
    let (mut done, total) = (0usize, units.len());
    let mut tokens = 0u64;
    for batch in &batches {
        let mut flat: Vec<(&ScoredSequence, &Readout)> = Vec::new();
        for &u in batch {
            for s in &units[u].seqs {
                flat.push((s, &units[u].readout));
                tokens += s.ids.len() as u64;
            }
        }
        let temperature = opts.temperature.get();
        let out = score::run_batch(teacher, &flat, temperature)?;
        let mut k = 0;
        for &u in batch {
            let unit = &units[u];
            let n = unit.seqs.len();
            let values = &out[k..k + n];
            k += n;
            if unit.letter {
                scores[unit.item].letter_logprobs = values.first().cloned();
            } else {
                scores[unit.item].cloze_logprobs = Some(values.iter().flatten().copied().collect());
            }
        }
        done += batch.len();
        progress(done, total);
    }
    let mut reports = Vec::new();
    if opts.mode.letter() {
        // The temperature already divided the logits.
        let mut r = ModeReport::from_scores(Mode::Letter, &scores, 1.0, opts.n_bins)?;
        r.temperature = opts.temperature.get();
        reports.push(r);
    }
    if opts.mode.cloze() {
        reports.push(ModeReport::from_scores(
            Mode::Cloze,
            &scores,
            opts.temperature.get(),
            opts.n_bins,
        )?);
    }
    Ok(EvalResult {
        reports,
        items: scores,
        tokens,
        forward_passes: batches.len() as u64,
    })
}

/// Groups units into forward passes of at most `max_tokens` padded tokens (a unit larger than
/// that runs alone), longest first so each pass holds similar lengths.
fn plan_unit_batches(units: &[Unit], max_tokens: usize) -> Vec<Vec<usize>> {
    let longest = |u: &Unit| u.seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by(|&a, &b| longest(&units[b]).cmp(&longest(&units[a])).then(a.cmp(&b)));
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let (mut rows, mut width) = (0usize, 0usize);
    for u in order {
        let (n, len) = (units[u].seqs.len(), longest(&units[u]));
        if !current.is_empty() && (rows + n) * width.max(len) > max_tokens {
            batches.push(std::mem::take(&mut current));
            rows = 0;
            width = 0;
        }
        rows += n;
        width = width.max(len);
        current.push(u);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}
