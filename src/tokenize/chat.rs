//! The model's chat template (Jinja, as in GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`'s `chat_template`), rendered with minijinja the way Hugging Face's
//! `apply_chat_template` does: `trim_blocks` and `lstrip_blocks` on, `raise_exception`,
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, a `tojson` filter and the
//! common Python string/dict methods (`strip`, `startswith`, `items`, ...).

use minijinja::value::{from_args, Value, ValueKind};
use minijinja::{Environment, ErrorKind};

use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (any string the template accepts).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// Builds a message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles a template. `bos_token` / `eos_token` are the texts exposed to it.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_filter(
            "tojson",
            |v: Value| -> std::result::Result<String, minijinja::Error> {
                serde_json::to_string(&v)
                    .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))
            },
        );
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| Error::ChatTemplate(format!("compiling: {e}")))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders `messages`; with `add_generation_prompt` the template appends the opening of an
    /// assistant turn (e.g. `<|im_start|>assistant\n`).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| Error::ChatTemplate(format!("rendering: {e}")))
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }
}

fn invalid(msg: String) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg)
}

/// Python methods templates commonly call on strings and dicts.
fn python_method(
    _state: &minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            string_method(s, method, args)
        }
        ValueKind::Map => match method {
            "items" => {
                let mut pairs = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    pairs.push(Value::from(vec![key, item]));
                }
                Ok(Value::from(pairs))
            }
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let mut vals = Vec::new();
                for key in value.try_iter()? {
                    vals.push(value.get_item(&key)?);
                }
                Ok(Value::from(vals))
            }
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let item = value.get_item(&key)?;
                Ok(if item.is_undefined() {
                    default.unwrap_or(Value::from(()))
                } else {
                    item
                })
            }
            _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
        },
        _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
    }
}

fn string_method(
    s: &str,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    let chars_arg = |args: &[Value]| -> std::result::Result<Option<String>, minijinja::Error> {
        let (chars,): (Option<String>,) = from_args(args)?;
        Ok(chars)
    };
    let strip_set = |chars: &Option<String>, c: char| match chars {
        Some(set) => set.contains(c),
        None => c.is_whitespace(),
    };
    match method {
        "strip" => {
            let chars = chars_arg(args)?;
            Ok(Value::from(s.trim_matches(|c| strip_set(&chars, c))))
        }
        "lstrip" => {
            let chars = chars_arg(args)?;
            Ok(Value::from(s.trim_start_matches(|c| strip_set(&chars, c))))
        }
        "rstrip" => {
            let chars = chars_arg(args)?;
            Ok(Value::from(s.trim_end_matches(|c| strip_set(&chars, c))))
        }
        "startswith" => {
            let (prefix,): (String,) = from_args(args)?;
            Ok(Value::from(s.starts_with(prefix.as_str())))
        }
        "endswith" => {
            let (suffix,): (String,) = from_args(args)?;
            Ok(Value::from(s.ends_with(suffix.as_str())))
        }
        "upper" => Ok(Value::from(s.to_uppercase())),
        "lower" => Ok(Value::from(s.to_lowercase())),
        "replace" => {
            let (from, to): (String, String) = from_args(args)?;
            Ok(Value::from(s.replace(from.as_str(), to.as_str())))
        }
        "split" => {
            let (sep, maxsplit): (Option<String>, Option<i64>) = from_args(args)?;
            let parts: Vec<Value> = match (sep, maxsplit) {
                (Some(sep), Some(n)) if n >= 0 => s
                    .splitn(n as usize + 1, sep.as_str())
                    .map(Value::from)
                    .collect(),
                (Some(sep), _) => {
                    if sep.is_empty() {
                        return Err(invalid("empty separator".to_string()));
                    }
                    s.split(sep.as_str()).map(Value::from).collect()
                }
                (None, _) => s.split_whitespace().map(Value::from).collect(),
            };
            Ok(Value::from(parts))
        }
        _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, as stored in its GGUF `tokenizer.chat_template`.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_smollm2_template() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let msgs = [
            Message::new("user", "Name a primary colour."),
            Message::new("assistant", "Red."),
        ];
        let out = t.render(&msgs, false).unwrap();
        // From /work/shared/reference/smollm2_reference.json, chat_template_example.rendered
        // (HF transformers apply_chat_template; make_smollm2_reference.py).
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nName a primary colour.<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
        );
        let prompt = t.render(&msgs[..1], true).unwrap();
        assert!(out.starts_with(&prompt), "{prompt:?}");
        assert!(prompt.ends_with("<|im_start|>assistant\n"));
    }

    #[test]
    fn raise_exception_and_python_methods() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}\
                   {{ messages[0].content.strip().upper() }}|{{ messages[0].content.startswith(' hi') }}|{{ {'a': 1} | tojson }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let out = t
            .render(&[Message::new("user", " hi there ")], false)
            .unwrap();
        // minijinja prints booleans the Python way, as Jinja2 does.
        assert_eq!(out, "HI THERE|True|{\"a\":1}");
        let err = t
            .render(&[Message::new("assistant", "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }
}
