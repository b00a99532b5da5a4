//! Text to token ids and back: the byte-level BPE tokenizer built from a model's vocabulary
//! (`tokenizer`) and the model's Jinja chat template (`chat`). Below both `input` (records to
//! sequences) and `teacher` (which loads them from a model file), so neither imports the other.

pub mod chat;
pub mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use tokenizer::{SpecialToken, TeacherTokenizer, TokenizerIdentity};
