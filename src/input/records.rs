//! Record shapes: detection and parsing of one JSON record into what gets rendered.

use serde_json::Value;

use super::InputFormat;
use crate::tokenize::Message;

/// One parsed record, before tokenisation.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Plain text, windowed; every token is in the loss.
    Text(String),
    /// A conversation whose trailing assistant turn(s) are in the loss.
    Chat(Vec<Message>),
    /// A multiple-choice question; the answer is in the loss.
    MultipleChoice(MultipleChoice),
}

/// A multiple-choice question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultipleChoice {
    /// The question text.
    pub question: String,
    /// Option texts, in order (labelled A, B, C, ...).
    pub choices: Vec<String>,
    /// 0-based index of the correct option.
    pub answer: usize,
}

impl MultipleChoice {
    /// Parses the multiple-choice shapes firstkd accepts (see `docs/inputs.md`):
    ///
    /// * question: `question` (string), `question.stem`, `query` or `stem`;
    /// * choices: `choices` (or `question.choices`, `options`): strings, or objects with
    ///   `text` (and optional `label`);
    /// * answer: `answer`, `answerKey`, `gold` or `label`: a letter (`"B"`), a choice label,
    ///   or a 0-based integer index.
    ///
    /// A record with none of the question fields but an LLM-Adapters `instruction` (ARC,
    /// OpenBookQA training files) is read with [`Self::from_adapters_instruction`].
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let no_question = ["question", "query", "stem"]
            .iter()
            .all(|k| v[*k].is_null());
        if no_question
            && v["instruction"]
                .as_str()
                .is_some_and(|i| i.contains("\n\nAnswer1: "))
        {
            return Self::from_adapters_instruction(v);
        }
        let question = match (&v["question"], &v["query"], &v["stem"]) {
            (Value::String(q), _, _) => q.clone(),
            (Value::Object(o), _, _) => o
                .get("stem")
                .and_then(Value::as_str)
                .ok_or("question object has no \"stem\"")?
                .to_string(),
            (_, Value::String(q), _) | (_, _, Value::String(q)) => q.clone(),
            _ => return Err("missing field \"question\"".into()),
        };
        if question.trim().is_empty() {
            return Err("empty question".into());
        }
        let raw = [&v["choices"], &v["question"]["choices"], &v["options"]]
            .into_iter()
            .find(|c| c.is_array())
            .and_then(Value::as_array)
            .ok_or("missing field \"choices\" (an array)")?;
        let mut choices = Vec::with_capacity(raw.len());
        let mut labels = Vec::with_capacity(raw.len());
        for (i, c) in raw.iter().enumerate() {
            match c {
                Value::String(s) => {
                    choices.push(s.clone());
                    labels.push(None);
                }
                Value::Object(o) => {
                    let text = o
                        .get("text")
                        .and_then(Value::as_str)
                        .ok_or(format!("choice {i} has no \"text\""))?;
                    choices.push(text.to_string());
                    labels.push(o.get("label").and_then(Value::as_str).map(String::from));
                }
                _ => return Err(format!("choice {i} is neither a string nor an object")),
            }
        }
        if choices.len() < 2 {
            return Err(format!("{} choice(s); need at least 2", choices.len()));
        }
        if choices.len() > 26 {
            return Err(format!("{} choices; at most 26 (A-Z)", choices.len()));
        }
        let answer_value = ["answer", "answerKey", "gold", "label"]
            .iter()
            .map(|k| &v[*k])
            .find(|a| !a.is_null())
            .ok_or("missing field \"answer\"")?;
        let answer = match answer_value {
            Value::Number(n) => n
                .as_u64()
                .map(|x| x as usize)
                .ok_or(format!("answer {n} is not a non-negative integer"))?,
            Value::String(s) => {
                let s = s.trim();
                if let Some(i) = labels.iter().position(|l| l.as_deref() == Some(s)) {
                    i
                } else if let Some(i) = letter_index(s) {
                    i
                } else {
                    return Err(format!(
                        "answer {s:?} is neither a choice label nor a letter"
                    ));
                }
            }
            other => return Err(format!("answer {other} is neither a letter nor an index")),
        };
        if answer >= choices.len() {
            return Err(format!(
                "answer index {answer} out of range for {} choices",
                choices.len()
            ));
        }
        Ok(Self {
            question,
            choices,
            answer,
        })
    }
}

impl MultipleChoice {
    /// LLM-Adapters' ARC / OpenBookQA shape: `instruction` = `"Please choose the correct answer
    /// to the question: {q}\n\nAnswer1: {a} Answer2: {b} ...\n\nAnswer format:
    /// answer1/answer2/..."`, `answer` = `"answerN"` (1-based).
    pub fn from_adapters_instruction(v: &Value) -> Result<Self, String> {
        let instruction = v["instruction"]
            .as_str()
            .ok_or("field \"instruction\" is not a string")?;
        let body = instruction
            .split_once("question:")
            .map(|(_, rest)| rest)
            .unwrap_or(instruction);
        let (body, format) = body
            .rsplit_once("\n\nAnswer format:")
            .ok_or("instruction has no \"Answer format:\" line")?;
        let n = format.split('/').filter(|s| !s.trim().is_empty()).count();
        let (question, options) = body
            .split_once("\n\nAnswer1: ")
            .ok_or("instruction has no \"Answer1:\" option")?;
        let mut choices = Vec::with_capacity(n);
        let mut rest = options;
        for k in 2..=n {
            let marker = format!(" Answer{k}: ");
            let (choice, tail) = rest
                .split_once(&marker)
                .ok_or(format!("instruction has no \"Answer{k}:\" option"))?;
            choices.push(choice.trim().to_string());
            rest = tail;
        }
        choices.push(rest.trim().to_string());
        let gold = v["answer"]
            .as_str()
            .and_then(|a| a.trim().strip_prefix("answer"))
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or(format!("answer {} is not \"answerN\"", v["answer"]))?;
        if gold == 0 || gold > choices.len() {
            return Err(format!(
                "answer{gold} out of range for {} choices",
                choices.len()
            ));
        }
        if question.trim().is_empty() {
            return Err("empty question".to_string());
        }
        Ok(Self {
            question: question.trim().to_string(),
            choices,
            answer: gold - 1,
        })
    }
}

fn letter_index(s: &str) -> Option<usize> {
    let mut chars = s.chars();
    let c = chars.next()?;
    if chars.next().is_some() || !c.is_ascii_uppercase() {
        return None;
    }
    Some((c as u8 - b'A') as usize)
}

fn str_field<'v>(v: &'v Value, key: &str) -> Result<&'v str, String> {
    match &v[key] {
        Value::String(s) => Ok(s),
        Value::Null => Err(format!("missing field {key:?}")),
        other => Err(format!("field {key:?} is not a string: {other}")),
    }
}

fn non_empty<'v>(v: &'v Value, key: &str) -> Result<&'v str, String> {
    let s = str_field(v, key)?;
    if s.trim().is_empty() {
        Err(format!("empty {key:?}"))
    } else {
        Ok(s)
    }
}

/// The shape auto-detection picks for a record (see [`InputFormat::Auto`]).
pub fn detect(v: &Value) -> Result<InputFormat, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, found {}", kind(v)))?;
    if obj.is_empty() {
        return Err("empty record".into());
    }
    let has = |k: &str| obj.get(k).is_some_and(|x| !x.is_null());
    Ok(if has("messages") {
        InputFormat::Messages
    } else if has("choices") || v["question"]["choices"].is_array() || has("options") {
        InputFormat::MultipleChoice
    } else if has("instruction") {
        InputFormat::Alpaca
    } else if has("prompt") || (has("question") && has("answer")) {
        InputFormat::PromptResponse
    } else if has("text") {
        InputFormat::Text
    } else {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        return Err(format!(
            "unrecognised record with fields {keys:?}; expected one of: text; prompt+response; \
             messages; instruction+input+output; question+choices+answer"
        ));
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses one record in the given format (`Auto` detects it).
pub fn parse(v: &Value, format: InputFormat) -> Result<Record, String> {
    let format = match format {
        InputFormat::Auto => detect(v)?,
        f => {
            if !v.is_object() {
                return Err(format!("expected a JSON object, found {}", kind(v)));
            }
            f
        }
    };
    match format {
        InputFormat::Text => Ok(Record::Text(non_empty(v, "text")?.to_string())),
        InputFormat::PromptResponse => {
            let (prompt, response) = if !v["prompt"].is_null() {
                let response = if v["response"].is_null() && !v["completion"].is_null() {
                    non_empty(v, "completion")?
                } else {
                    non_empty(v, "response")?
                };
                (non_empty(v, "prompt")?, response)
            } else {
                (non_empty(v, "question")?, non_empty(v, "answer")?)
            };
            let mut messages = Vec::with_capacity(3);
            if let Value::String(system) = &v["system"] {
                messages.push(Message::new("system", system.clone()));
            }
            messages.push(Message::new("user", prompt));
            messages.push(Message::new("assistant", response));
            Ok(Record::Chat(messages))
        }
        InputFormat::Alpaca => {
            let instruction = non_empty(v, "instruction")?;
            let input = match &v["input"] {
                Value::Null => "",
                Value::String(s) => s.as_str(),
                other => return Err(format!("field \"input\" is not a string: {other}")),
            };
            let output = non_empty(v, "output")?;
            let user = if input.trim().is_empty() {
                instruction.to_string()
            } else {
                format!("{instruction}\n\n{input}")
            };
            let mut messages = Vec::with_capacity(3);
            if let Value::String(system) = &v["system"] {
                messages.push(Message::new("system", system.clone()));
            }
            messages.push(Message::new("user", user));
            messages.push(Message::new("assistant", output));
            Ok(Record::Chat(messages))
        }
        InputFormat::Messages => {
            let list = v["messages"]
                .as_array()
                .ok_or("field \"messages\" is missing or not an array")?;
            if list.is_empty() {
                return Err("empty \"messages\"".into());
            }
            let messages = list
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let role = str_field(m, "role").map_err(|e| format!("message {i}: {e}"))?;
                    let content =
                        str_field(m, "content").map_err(|e| format!("message {i}: {e}"))?;
                    Ok(Message::new(role, content))
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(Record::Chat(messages))
        }
        InputFormat::MultipleChoice => Ok(Record::MultipleChoice(MultipleChoice::from_json(v)?)),
        InputFormat::Auto => Err("format detection failed".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn detects_every_shape() {
        let cases = [
            (json!({"text": "x"}), InputFormat::Text),
            (
                json!({"prompt": "a", "response": "b"}),
                InputFormat::PromptResponse,
            ),
            (
                json!({"question": "a", "answer": "b"}),
                InputFormat::PromptResponse,
            ),
            (json!({"messages": []}), InputFormat::Messages),
            (
                json!({"instruction": "a", "input": "", "output": "b"}),
                InputFormat::Alpaca,
            ),
            (
                json!({"question": "q", "choices": ["a", "b"], "answer": "B"}),
                InputFormat::MultipleChoice,
            ),
            (
                json!({"query": "q", "choices": ["a", "b"], "gold": 1}),
                InputFormat::MultipleChoice,
            ),
        ];
        for (v, want) in cases {
            assert_eq!(detect(&v).unwrap(), want, "{v}");
        }
        assert!(detect(&json!({})).unwrap_err().contains("empty"));
        assert!(detect(&json!({"foo": 1}))
            .unwrap_err()
            .contains("unrecognised"));
        assert!(detect(&json!([1])).is_err());
    }

    #[test]
    fn multiple_choice_variants() {
        let csqa = json!({"answerKey": "C", "question": {"stem": "Where?", "choices": [
            {"label": "A", "text": "bank"}, {"label": "B", "text": "library"}, {"label": "C", "text": "mall"}]}});
        let mc = MultipleChoice::from_json(&csqa).unwrap();
        assert_eq!(mc.question, "Where?");
        assert_eq!(mc.choices, vec!["bank", "library", "mall"]);
        assert_eq!(mc.answer, 2);
        let foundry = json!({"query": "q", "choices": ["no", "yes"], "gold": 1});
        assert_eq!(MultipleChoice::from_json(&foundry).unwrap().answer, 1);
        let bad = json!({"question": "q", "choices": ["a", "b"], "answer": "E"});
        assert!(MultipleChoice::from_json(&bad)
            .unwrap_err()
            .contains("out of range"));
        let bad = json!({"question": "q", "choices": ["a"], "answer": 0});
        assert!(MultipleChoice::from_json(&bad).is_err());
        let bad = json!({"question": "q", "choices": ["a", "b"]});
        assert!(MultipleChoice::from_json(&bad)
            .unwrap_err()
            .contains("answer"));
    }

    #[test]
    fn multiple_choice_from_adapters_instruction() {
        // The ARC-Easy / OpenBookQA training files of ../shared/data.
        let v = json!({"instruction": "Please choose the correct answer to the question: Which is a metal?\n\nAnswer1: wood Answer2: iron Answer3: glass\n\nAnswer format: answer1/answer2/answer3", "input": "", "output": "the correct answer is answer2", "answer": "answer2"});
        let Record::MultipleChoice(mc) = parse(&v, InputFormat::MultipleChoice).unwrap() else {
            panic!("not multiple choice");
        };
        assert_eq!(mc.question, "Which is a metal?");
        assert_eq!(mc.choices, ["wood", "iron", "glass"]);
        assert_eq!(mc.answer, 1);
        let mut bad = v.clone();
        bad["answer"] = json!("answer4");
        assert!(parse(&bad, InputFormat::MultipleChoice)
            .unwrap_err()
            .contains("answer4 out of range"));
        // Auto-detection still reads an `instruction` record as Alpaca.
        assert_eq!(detect(&v).unwrap(), InputFormat::Alpaca);
    }

    #[test]
    fn parse_errors_name_the_field() {
        let e = parse(&json!({"prompt": "a"}), InputFormat::Auto).unwrap_err();
        assert!(e.contains("response"), "{e}");
        let e = parse(
            &json!({"instruction": "a", "output": ""}),
            InputFormat::Auto,
        )
        .unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = parse(&json!({"text": 3}), InputFormat::Text).unwrap_err();
        assert!(e.contains("not a string"), "{e}");
        let e = parse(&json!({"messages": [{"role": "user"}]}), InputFormat::Auto).unwrap_err();
        assert!(e.contains("content"), "{e}");
        let e = parse(&json!({"text": "x"}), InputFormat::Alpaca).unwrap_err();
        assert!(e.contains("instruction"), "{e}");
    }

    #[test]
    fn alpaca_joins_instruction_and_input() {
        let r = parse(
            &json!({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}),
            InputFormat::Auto,
        )
        .unwrap();
        assert_eq!(
            r,
            Record::Chat(vec![
                Message::new("user", "Translate.\n\nBonjour"),
                Message::new("assistant", "Hello")
            ])
        );
    }
}
