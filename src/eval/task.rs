//! Task files: multiple-choice and yes/no questions in the generic JSONL shape or in the shapes
//! of the public copies of BoolQ, CommonsenseQA, OpenBookQA and ARC (see `docs/eval.md`).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::input::MultipleChoice;

/// The record shape of a task file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TaskFormat {
    /// Detect per record (see [`parse_item`]).
    #[default]
    Auto,
    /// `{"question", "choices", "answer", "context"?}` and the aliases of
    /// [`MultipleChoice::from_json`]; `context` or `passage` is an optional passage.
    #[value(alias = "mc")]
    Generic,
    /// BoolQ: `{"question", "passage", "answer": true|false}` (original), `{"query":
    /// "Passage: ...\nQuestion: ...", "choices", "gold"}` (llm-foundry) or the question-only
    /// `{"instruction": "... question: ...", "answer": "true"|"false"}` (LLM-Adapters).
    /// Choices are `["no", "yes"]`.
    #[value(name = "boolq")]
    BoolQ,
    /// CommonsenseQA: `{"question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}`.
    #[value(name = "csqa", alias = "commonsenseqa")]
    CommonsenseQa,
    /// OpenBookQA: original, llm-foundry (`query`/`choices`/`gold`) or LLM-Adapters
    /// (`instruction` with `Answer1: ...`, `answer: "answerN"`).
    #[value(name = "obqa", alias = "openbookqa")]
    OpenBookQa,
    /// ARC: original (`question.stem`, `answerKey`) or LLM-Adapters (as OpenBookQA).
    #[value(alias = "arc-easy", alias = "arc_easy")]
    Arc,
}

impl TaskFormat {
    /// The spelling used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskFormat::Auto => "auto",
            TaskFormat::Generic => "generic",
            TaskFormat::BoolQ => "boolq",
            TaskFormat::CommonsenseQa => "csqa",
            TaskFormat::OpenBookQa => "obqa",
            TaskFormat::Arc => "arc",
        }
    }
}

impl std::str::FromStr for TaskFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        crate::parse_value(s, "task format")
    }
}

/// One evaluation item: a multiple-choice question with an optional passage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalItem {
    /// 1-based line (JSONL) or element number (JSON array) in the task file.
    pub line: u64,
    /// Passage to read before the question (BoolQ), if any.
    pub context: Option<String>,
    /// Question, options and gold index.
    pub mc: MultipleChoice,
}

/// Reads the first `limit` items (all when `None`) of a JSONL or JSON-array task file. Stops at
/// the first invalid record with [`Error::InvalidRecord`] naming the file and line.
pub fn read_task(path: &Path, format: TaskFormat, limit: Option<usize>) -> Result<Vec<EvalItem>> {
    let io = |e| Error::io(path, e);
    let mut text = String::new();
    BufReader::new(std::fs::File::open(path).map_err(io)?)
        .read_to_string(&mut text)
        .map_err(io)?;
    let limit = limit.unwrap_or(usize::MAX);
    let invalid = |line: u64, reason: String| Error::InvalidRecord {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut items = Vec::new();
    if text.trim_start().starts_with('[') {
        let values: Vec<Value> = serde_json::from_str(&text)
            .map_err(|e| invalid(e.line() as u64, format!("malformed JSON array: {e}")))?;
        for (i, v) in values.iter().take(limit).enumerate() {
            let line = i as u64 + 1;
            let item =
                parse_item(v, format).map_err(|r| invalid(line, format!("element {i}: {r}")))?;
            items.push(EvalItem { line, ..item });
        }
    } else {
        for (i, line) in text.as_bytes().lines().enumerate() {
            if items.len() >= limit {
                break;
            }
            let line_no = i as u64 + 1;
            let line = line.map_err(io)?;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| invalid(line_no, format!("malformed JSON: {e}")))?;
            let item = parse_item(&v, format).map_err(|r| invalid(line_no, r))?;
            items.push(EvalItem {
                line: line_no,
                ..item
            });
        }
    }
    if items.is_empty() {
        return Err(Error::InvalidRecord {
            path: path.to_path_buf(),
            line: 0,
            reason: "no items".to_string(),
        });
    }
    Ok(items)
}

/// Parses one record (its `line` is left 0). With [`TaskFormat::Auto`]: an `instruction` field
/// means LLM-Adapters (BoolQ when it asks for true/false, ARC/OpenBookQA otherwise); a
/// `passage` with a boolean `answer`, or a `query` starting with `Passage:`, means BoolQ;
/// anything else is the generic shape.
pub fn parse_item(v: &Value, format: TaskFormat) -> std::result::Result<EvalItem, String> {
    if !v.is_object() {
        return Err("expected a JSON object".to_string());
    }
    let format = match format {
        TaskFormat::Auto => detect(v),
        f => f,
    };
    match format {
        TaskFormat::BoolQ => parse_boolq(v),
        TaskFormat::OpenBookQa | TaskFormat::Arc if v.get("instruction").is_some() => {
            parse_adapters_choice(v)
        }
        TaskFormat::CommonsenseQa => {
            if !v["question"].is_object() {
                return Err(
                    "not a CommonsenseQA record: expected \"question\": {\"stem\", \"choices\"}"
                        .to_string(),
                );
            }
            parse_generic(v)
        }
        _ => parse_generic(v),
    }
}

fn detect(v: &Value) -> TaskFormat {
    let instruction = v["instruction"].as_str().unwrap_or("");
    if !instruction.is_empty() {
        if instruction.contains("true or false") {
            return TaskFormat::BoolQ;
        }
        return TaskFormat::Arc;
    }
    let boolq_original = v["passage"].is_string() && v["answer"].is_boolean();
    let boolq_foundry = v["query"]
        .as_str()
        .is_some_and(|q| q.starts_with("Passage:"));
    if boolq_original || boolq_foundry {
        TaskFormat::BoolQ
    } else {
        TaskFormat::Generic
    }
}

fn parse_generic(v: &Value) -> std::result::Result<EvalItem, String> {
    let mc = MultipleChoice::from_json(v)?;
    let context = match (&v["context"], &v["passage"]) {
        (Value::String(c), _) | (Value::Null, Value::String(c)) => Some(c.clone()),
        (Value::Null, Value::Null) => None,
        _ => return Err("field \"context\"/\"passage\" is not a string".to_string()),
    };
    Ok(EvalItem {
        line: 0,
        context: context.filter(|c| !c.trim().is_empty()),
        mc,
    })
}

const YES_NO: [&str; 2] = ["no", "yes"];

fn yes_no(question: String, context: Option<String>, yes: bool) -> EvalItem {
    EvalItem {
        line: 0,
        context,
        mc: MultipleChoice {
            question,
            choices: YES_NO.iter().map(|s| s.to_string()).collect(),
            answer: usize::from(yes),
        },
    }
}

fn parse_boolq(v: &Value) -> std::result::Result<EvalItem, String> {
    // LLM-Adapters: question only, answer "true"/"false".
    if let Some(instruction) = v["instruction"].as_str() {
        let question = instruction
            .split_once("question:")
            .map(|(_, q)| q)
            .ok_or("BoolQ instruction has no \"question:\"")?;
        let question = question
            .split("\n\nAnswer format:")
            .next()
            .unwrap_or(question)
            .trim();
        if question.is_empty() {
            return Err("empty question".to_string());
        }
        let yes = match v["answer"].as_str().map(str::trim) {
            Some("true") => true,
            Some("false") => false,
            _ => {
                return Err(format!(
                    "BoolQ answer {} is not \"true\"/\"false\"",
                    v["answer"]
                ))
            }
        };
        return Ok(yes_no(question.to_string(), None, yes));
    }
    // Original: question + passage + boolean answer.
    if let (Some(q), Some(p)) = (v["question"].as_str(), v["passage"].as_str()) {
        let yes = v["answer"]
            .as_bool()
            .ok_or(format!("BoolQ answer {} is not a boolean", v["answer"]))?;
        if q.trim().is_empty() {
            return Err("empty question".to_string());
        }
        return Ok(yes_no(q.to_string(), Some(p.to_string()), yes));
    }
    // llm-foundry: "Passage: ...\nQuestion: ...", choices ["no", "yes"], gold 0/1.
    let mut item = parse_generic(v)?;
    if let Some(rest) = item.mc.question.strip_prefix("Passage:") {
        let (passage, question) = rest
            .rsplit_once("\nQuestion:")
            .ok_or("BoolQ query has a passage but no \"\\nQuestion:\"")?;
        item.context = Some(passage.trim().to_string());
        item.mc.question = question.trim().to_string();
        if item.mc.question.is_empty() {
            return Err("empty question".to_string());
        }
    }
    Ok(item)
}

/// LLM-Adapters' ARC / OpenBookQA shape (see [`MultipleChoice::from_adapters_instruction`]).
fn parse_adapters_choice(v: &Value) -> std::result::Result<EvalItem, String> {
    Ok(EvalItem {
        line: 0,
        context: None,
        mc: MultipleChoice::from_adapters_instruction(v)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn adapters_arc_record() {
        let v = json!({"instruction": "Please choose the correct answer to the question: Which is a metal?\n\nAnswer1: wood Answer2: iron Answer3: glass\n\nAnswer format: answer1/answer2/answer3", "input": "", "output": "the correct answer is answer2", "answer": "answer2"});
        let item = parse_item(&v, TaskFormat::Auto).unwrap();
        assert_eq!(item.mc.question, "Which is a metal?");
        assert_eq!(item.mc.choices, vec!["wood", "iron", "glass"]);
        assert_eq!(item.mc.answer, 1);
        let bad = json!({"instruction": v["instruction"], "answer": "answer4"});
        assert!(parse_item(&bad, TaskFormat::Arc)
            .unwrap_err()
            .contains("out of range"));
    }

    #[test]
    fn boolq_shapes() {
        let adapters = json!({"instruction": "Please answer the following question with true or false, question: is the sky blue?\n\nAnswer format: true/false", "answer": "true"});
        let item = parse_item(&adapters, TaskFormat::Auto).unwrap();
        assert_eq!(
            (item.mc.question.as_str(), item.mc.answer, item.context),
            ("is the sky blue?", 1, None)
        );
        let foundry = json!({"query": "Passage: The sky is blue.\nQuestion: is the sky green?", "choices": ["no", "yes"], "gold": 0});
        let item = parse_item(&foundry, TaskFormat::Auto).unwrap();
        assert_eq!(item.context.as_deref(), Some("The sky is blue."));
        assert_eq!(
            (item.mc.question.as_str(), item.mc.answer),
            ("is the sky green?", 0)
        );
        let original =
            json!({"question": "is water wet", "passage": "Water is wet.", "answer": true});
        let item = parse_item(&original, TaskFormat::Auto).unwrap();
        assert_eq!((item.mc.choices.len(), item.mc.answer), (2, 1));
        let bad = json!({"question": "q", "passage": "p", "answer": "maybe"});
        assert!(parse_item(&bad, TaskFormat::BoolQ)
            .unwrap_err()
            .contains("boolean"));
    }

    #[test]
    fn csqa_requires_its_shape() {
        let v = json!({"question": "q", "choices": ["a", "b"], "answer": 0});
        assert!(parse_item(&v, TaskFormat::CommonsenseQa)
            .unwrap_err()
            .contains("CommonsenseQA"));
        assert_eq!(parse_item(&v, TaskFormat::Generic).unwrap().mc.answer, 0);
        assert!("xyz".parse::<TaskFormat>().is_err());
    }
}
