//! Reading prompts, chat and multiple-choice records into token sequences.
//!
//! Every [`Sample`] is `input_ids` plus `prompt_len`: position `p` predicts token `p + 1` and is
//! in the loss iff `p + 1 >= prompt_len`. Shapes, rendering and loss masks are documented in
//! `docs/inputs.md`.

pub mod records;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::tokenize::{ChatTemplate, Message, TeacherTokenizer};
pub use records::{MultipleChoice, Record};

/// The record shape of an input file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum InputFormat {
    /// Detect per record: `messages` -> Messages; `choices` -> MultipleChoice; `instruction`
    /// -> Alpaca; `prompt` (or `question` + `answer`) -> PromptResponse; `text` -> Text.
    #[default]
    Auto,
    /// `{"text": ...}`: windows of `seq_len` tokens, all in the loss.
    Text,
    /// `{"prompt", "response"}` (or `completion`; or GSM8K's `question` + `answer`), optional
    /// `system`; rendered with the chat template.
    #[value(name = "prompt", alias = "prompt-response")]
    PromptResponse,
    /// `{"messages": [{"role", "content"}, ...]}` ending with assistant turn(s).
    #[value(alias = "chat")]
    Messages,
    /// `{"instruction", "input", "output"}` (Alpaca), optional `system`.
    Alpaca,
    /// `{"question", "choices", "answer"}` and aliases, see [`MultipleChoice::from_json`].
    #[value(name = "mc", alias = "multiple-choice")]
    MultipleChoice,
}

impl std::str::FromStr for InputFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        crate::parse_value(s, "input format")
    }
}

/// What the response of a multiple-choice sample is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum McResponse {
    /// `" B"`: a space and the answer's letter.
    #[default]
    Letter,
    /// `" carbon dioxide"`: a space and the answer's text.
    Text,
}

/// Options for [`SampleReader`].
#[derive(Debug, Clone, PartialEq)]
pub struct InputOptions {
    /// Record shape (default: detect per record).
    pub format: InputFormat,
    /// Window length for plain text, in tokens.
    pub seq_len: usize,
    /// Longest sequence accepted (the model's context); longer chat/multiple-choice records
    /// are errors.
    pub max_len: usize,
    /// Response of multiple-choice samples.
    pub mc_response: McResponse,
    /// Longest JSONL line accepted, in bytes; a longer one is an invalid record (read in
    /// bounded pieces and skipped, never held in memory whole).
    pub max_record_bytes: usize,
}

/// Default of [`InputOptions::max_record_bytes`]: 64 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 64 << 20;

impl Default for InputOptions {
    fn default() -> Self {
        Self {
            format: InputFormat::Auto,
            seq_len: 256,
            max_len: 2048,
            mc_response: McResponse::Letter,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
        }
    }
}

/// One token sequence to label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// 0-based record index: the line number - 1 in JSONL, the element index in a JSON array,
    /// 0 for a `.txt` file.
    pub record: u64,
    /// Window number within the record (plain text is split into windows; 0 otherwise).
    pub segment: u32,
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Leading tokens that are not in the loss: position `p` is in the loss iff
    /// `p + 1 >= prompt_len`.
    pub prompt_len: u32,
}

/// Tokenizer and chat template used to turn records into samples.
#[derive(Debug, Clone, Copy)]
pub struct Encoder<'a> {
    /// The teacher's tokenizer.
    pub tokenizer: &'a TeacherTokenizer,
    /// The teacher's chat template (needed for instruction/chat records).
    pub chat_template: Option<&'a ChatTemplate>,
}

impl<'a> Encoder<'a> {
    /// Turns one parsed record into samples (several windows for text). Errors are reasons,
    /// without the file position.
    pub fn encode(
        &self,
        record: &Record,
        opts: &InputOptions,
    ) -> std::result::Result<Vec<(Vec<u32>, u32)>, String> {
        let out = match record {
            Record::Text(text) => {
                let ids = self
                    .tokenizer
                    .encode(text, true)
                    .map_err(|e| e.to_string())?;
                let windows: Vec<(Vec<u32>, u32)> = ids
                    .chunks(opts.seq_len.max(2))
                    .filter(|w| w.len() >= 2)
                    .map(|w| (w.to_vec(), 0))
                    .collect();
                if windows.is_empty() {
                    return Err("text has fewer than 2 tokens".to_string());
                }
                return Ok(windows);
            }
            Record::Chat(messages) => self.encode_chat(messages)?,
            Record::MultipleChoice(mc) => {
                let prompt = multiple_choice_prompt(&mc.question, &mc.choices);
                let response = multiple_choice_response(mc, opts.mc_response);
                self.split_encode(&format!("{prompt}{response}"), prompt.len(), true)?
            }
        };
        if out.0.len() > opts.max_len {
            return Err(format!(
                "sequence of {} tokens exceeds the model's context of {}",
                out.0.len(),
                opts.max_len
            ));
        }
        Ok(vec![out])
    }

    /// Renders a conversation ending with assistant turn(s); the prompt is everything before
    /// the trailing assistant run, rendered with `add_generation_prompt`.
    fn encode_chat(&self, messages: &[Message]) -> std::result::Result<(Vec<u32>, u32), String> {
        let template = self
            .chat_template
            .ok_or("the model has no chat template; instruction and chat records need one")?;
        let responses = messages
            .iter()
            .rev()
            .take_while(|m| m.role == "assistant")
            .count();
        if responses == 0 {
            return Err("the conversation does not end with an assistant message".to_string());
        }
        let prefix = &messages[..messages.len() - responses];
        if prefix.is_empty() {
            return Err("no user message before the final assistant turn".to_string());
        }
        if messages[prefix.len()..]
            .iter()
            .all(|m| m.content.trim().is_empty())
        {
            return Err("empty assistant response".to_string());
        }
        let full = template
            .render(messages, false)
            .map_err(|e| e.to_string())?;
        let prompt = template.render(prefix, true).map_err(|e| e.to_string())?;
        if !full.starts_with(&prompt) {
            return Err(
                "the chat template renders the prompt differently inside the full conversation"
                    .to_string(),
            );
        }
        // The rendering carries its own BOS text when the template wants one.
        self.split_encode(&full, prompt.len(), false)
    }

    /// Tokenises `text` and counts the tokens that start before byte `prompt_bytes`.
    fn split_encode(
        &self,
        text: &str,
        prompt_bytes: usize,
        add_bos: bool,
    ) -> std::result::Result<(Vec<u32>, u32), String> {
        let (ids, starts) = self
            .tokenizer
            .encode_with_starts(text)
            .map_err(|e| e.to_string())?;
        let mut prompt_len = starts.iter().take_while(|&&s| s < prompt_bytes).count();
        let mut all = Vec::with_capacity(ids.len() + 1);
        if add_bos && self.tokenizer.adds_bos() {
            if let Some(bos) = &self.tokenizer.identity().bos {
                all.push(bos.id);
                prompt_len += 1;
            }
        }
        all.extend(ids);
        if prompt_len >= all.len() {
            return Err("the response renders to no tokens".to_string());
        }
        Ok((all, prompt_len as u32))
    }
}

/// The letter of the `index`-th choice (`0 -> 'A'`); `None` past `Z`.
pub fn answer_letter(index: usize) -> Option<char> {
    (index < 26).then(|| (b'A' + index as u8) as char)
}

/// The multiple-choice prompt, shared with evaluation:
///
/// ```text
/// Question: {question}
/// A. {choice 0}
/// B. {choice 1}
/// ...
/// Answer:
/// ```
///
/// (no trailing space or newline; the response starts with a space, e.g. `" B"`).
pub fn multiple_choice_prompt(question: &str, choices: &[String]) -> String {
    multiple_choice_prompt_with_context(None, question, choices)
}

/// [`multiple_choice_prompt`] preceded by `Passage: {context}\n` when there is a context
/// (reading comprehension, e.g. BoolQ).
pub fn multiple_choice_prompt_with_context(
    context: Option<&str>,
    question: &str,
    choices: &[String],
) -> String {
    let mut s = match context {
        Some(c) => format!("Passage: {}\n", c.trim()),
        None => String::new(),
    };
    s.push_str(&format!("Question: {}\n", question.trim()));
    for (i, c) in choices.iter().enumerate() {
        let letter = answer_letter(i).unwrap_or('?');
        s.push_str(&format!("{letter}. {}\n", c.trim()));
    }
    s.push_str("Answer:");
    s
}

/// The response of a multiple-choice sample: `" B"` or `" {answer text}"`.
pub fn multiple_choice_response(mc: &MultipleChoice, style: McResponse) -> String {
    match style {
        McResponse::Letter => format!(" {}", answer_letter(mc.answer).unwrap_or('?')),
        McResponse::Text => format!(" {}", mc.choices[mc.answer].trim()),
    }
}

/// One line of a JSONL file, read with a bound on its length.
enum Line {
    Text(String),
    /// Longer than the bound: its length in bytes (the rest of it was skipped).
    TooLong(u64),
    NotUtf8,
}

/// The lines of a file, like [`BufRead::lines`] (without the `\n` or `\r\n`), but a line
/// longer than `limit` bytes is skipped in bounded pieces and reported, not read whole.
struct Lines {
    inner: BufReader<File>,
    limit: usize,
}

impl Lines {
    fn next_line(&mut self) -> Option<std::io::Result<Line>> {
        let mut buf = Vec::new();
        let read = (&mut self.inner)
            .take(self.limit as u64 + 1)
            .read_until(b'\n', &mut buf);
        match read {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return Some(Err(e)),
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        } else if buf.len() > self.limit {
            let mut total = buf.len() as u64;
            drop(buf);
            loop {
                let chunk = match self.inner.fill_buf() {
                    Ok(c) => c,
                    Err(e) => return Some(Err(e)),
                };
                if chunk.is_empty() {
                    break;
                }
                match chunk.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        total += i as u64;
                        self.inner.consume(i + 1);
                        break;
                    }
                    None => {
                        let n = chunk.len();
                        total += n as u64;
                        self.inner.consume(n);
                    }
                }
            }
            return Some(Ok(Line::TooLong(total)));
        }
        Some(Ok(String::from_utf8(buf).map_or(Line::NotUtf8, Line::Text)))
    }
}

enum Source {
    /// JSONL: one record per line.
    Lines(Lines),
    /// A JSON array of records.
    Array(std::vec::IntoIter<serde_json::Value>),
    /// A `.txt` file: one text record.
    Text(Option<String>),
}

/// Streams [`Sample`]s from a JSONL file (one record per line), a JSON array file (first
/// non-space byte `[`) or a `.txt` file (one plain-text record).
pub struct SampleReader<'a> {
    path: PathBuf,
    source: Source,
    next_record: u64,
    pending: VecDeque<Sample>,
    encoder: Encoder<'a>,
    opts: InputOptions,
}

impl<'a> SampleReader<'a> {
    /// Opens `path`. Errors when it cannot be read or `seq_len` is outside `2..=max_len`.
    pub fn open(path: &Path, encoder: Encoder<'a>, opts: InputOptions) -> Result<Self> {
        if opts.seq_len < 2 || opts.seq_len > opts.max_len {
            return Err(Error::InvalidArgument(format!(
                "seq_len {} must be in 2..={} (the model's context)",
                opts.seq_len, opts.max_len
            )));
        }
        let io = |e| Error::io(path, e);
        let source = if path.extension().is_some_and(|e| e == "txt") {
            Source::Text(Some(std::fs::read_to_string(path).map_err(io)?))
        } else {
            let mut file = BufReader::new(File::open(path).map_err(io)?);
            let first = loop {
                let buf = file.fill_buf().map_err(io)?;
                match buf.iter().position(|b| !b.is_ascii_whitespace()) {
                    Some(i) => break Some(buf[i]),
                    None if buf.is_empty() => break None,
                    None => {
                        let n = buf.len();
                        file.consume(n);
                    }
                }
            };
            if first == Some(b'[') {
                let mut text = String::new();
                file.read_to_string(&mut text).map_err(io)?;
                let values: Vec<serde_json::Value> =
                    serde_json::from_str(&text).map_err(|e| Error::InvalidRecord {
                        path: path.to_path_buf(),
                        line: e.line() as u64,
                        reason: format!("malformed JSON array: {e}"),
                    })?;
                Source::Array(values.into_iter())
            } else {
                // Reopen so that skipped leading blank lines still count as lines.
                Source::Lines(Lines {
                    inner: BufReader::new(File::open(path).map_err(io)?),
                    limit: opts.max_record_bytes,
                })
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            source,
            next_record: 0,
            pending: VecDeque::new(),
            encoder,
            opts,
        })
    }

    fn invalid(&self, record: u64, reason: String) -> Error {
        Error::InvalidRecord {
            path: self.path.clone(),
            line: record + 1,
            reason,
        }
    }

    /// Reads the next record into `pending`; `None` at end of input.
    fn fill(&mut self) -> Option<Result<()>> {
        let record = self.next_record;
        let parsed: std::result::Result<Record, String> = match &mut self.source {
            Source::Lines(lines) => {
                // A bad line's bytes are consumed, so the next line reads normally.
                let line = match lines.next_line()? {
                    Ok(Line::Text(l)) => Ok(l),
                    Ok(Line::NotUtf8) => {
                        Err("not valid UTF-8 (JSON Lines are UTF-8 text)".to_string())
                    }
                    Ok(Line::TooLong(n)) => Err(format!(
                        "line of {n} bytes, longer than the limit of {} bytes for one record",
                        lines.limit
                    )),
                    Err(e) => return Some(Err(Error::io(&self.path, e))),
                };
                line.and_then(|line| {
                    if line.trim().is_empty() {
                        Err("empty record (blank line)".to_string())
                    } else {
                        serde_json::from_str::<serde_json::Value>(&line)
                            .map_err(|e| format!("malformed JSON: {e}"))
                            .and_then(|v| records::parse(&v, self.opts.format))
                    }
                })
            }
            Source::Array(values) => {
                let v = values.next()?;
                records::parse(&v, self.opts.format)
            }
            Source::Text(text) => Ok(Record::Text(text.take()?)),
        };
        self.next_record += 1;
        let samples = parsed.and_then(|r| self.encoder.encode(&r, &self.opts));
        match samples {
            Ok(samples) => {
                for (segment, (input_ids, prompt_len)) in samples.into_iter().enumerate() {
                    self.pending.push_back(Sample {
                        record,
                        segment: segment as u32,
                        input_ids,
                        prompt_len,
                    });
                }
                Some(Ok(()))
            }
            Err(reason) => Some(Err(self.invalid(record, reason))),
        }
    }
}

impl Iterator for SampleReader<'_> {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(s) = self.pending.pop_front() {
                return Some(Ok(s));
            }
            if let Err(e) = self.fill()? {
                return Some(Err(e));
            }
        }
    }
}

/// Reads every sample of a file (see [`SampleReader`]); stops at the first invalid record.
pub fn read_samples(path: &Path, encoder: Encoder<'_>, opts: InputOptions) -> Result<Vec<Sample>> {
    SampleReader::open(path, encoder, opts)?.collect()
}

#[cfg(test)]
mod tests;
