//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs`, run with cargo-fuzz) and of the
//! test that replays their corpora on the stable toolchain (`tests/it/fuzz_corpus.rs`). Each
//! takes arbitrary bytes and must end with a result or a typed error: never a panic, a hang
//! or an unbounded allocation. docs/reliability.md says how to run them.
//!
//! Not a stable interface; it exists for the fuzzers.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::input::{Encoder, InputFormat, InputOptions, SampleReader};
use crate::schema::Table;
use crate::store::synthetic::{generate, SyntheticConfig};
use crate::store::{verify, LabelColumn, Manifest, SampleColumn, StoreReader, WriterOptions};
use crate::tokenize::{ChatTemplate, Message, TeacherTokenizer};
use crate::weights::gguf::GgufFile;

/// The fuzz targets, by name (the files of `fuzz/fuzz_targets/` and `fuzz/corpus/`).
pub const TARGETS: [&str; 4] = [
    "input_records",
    "chat_template",
    "gguf_header",
    "store_files",
];

/// What the targets share, built once per process: the SmolLM2-135M teacher's tokenizer and
/// chat template (from the cached GGUF), Qwen2.5's chat template when that model is cached,
/// a small valid store to damage, and a scratch folder.
pub struct Fixtures {
    pub tokenizer: TeacherTokenizer,
    pub templates: Vec<ChatTemplate>,
    pub store: PathBuf,
    pub scratch: PathBuf,
    /// The SmolLM2 GGUF the fixtures came from.
    pub model: PathBuf,
    /// The process's folder (store and scratch), for a caller that wants it removed.
    pub root: PathBuf,
}

fn template_of(gguf: &GgufFile, tokenizer: &TeacherTokenizer) -> Option<ChatTemplate> {
    let id = tokenizer.identity();
    let bos = id.bos.as_ref().map(|t| t.text.as_str()).unwrap_or("");
    let eos = id.eos.as_ref().map(|t| t.text.as_str()).unwrap_or("");
    ChatTemplate::new(&gguf.chat_template_source()?, bos, eos).ok()
}

impl Fixtures {
    /// The fixtures of this process; None (with the reason on stderr) when the SmolLM2 GGUF
    /// is not cached (a failure under CI, see [`crate::testing::require_model`]).
    pub fn get() -> Option<&'static Fixtures> {
        static FIXTURES: OnceLock<Option<Fixtures>> = OnceLock::new();
        FIXTURES.get_or_init(Self::build).as_ref()
    }

    fn build() -> Option<Fixtures> {
        let model = crate::testing::require_model("smollm2-135m")?;
        let gguf = GgufFile::open(&model).expect("the cached SmolLM2 GGUF opens");
        let tokenizer = gguf.tokenizer(None).expect("the SmolLM2 tokenizer loads");
        let mut templates: Vec<ChatTemplate> = template_of(&gguf, &tokenizer).into_iter().collect();
        let qwen = crate::testing::model_path("qwen2.5-coder-0.5b").filter(|p| p.exists());
        if let Some(q) = qwen.and_then(|p| GgufFile::open(&p).ok()) {
            if let Ok(t) = q.tokenizer(None) {
                templates.extend(template_of(&q, &t));
            }
        }
        // One folder per process (the fuzzer's jobs run side by side), replaced on start.
        let dir = std::env::temp_dir().join(format!("firstkd-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = dir.join("store");
        let cfg = SyntheticConfig {
            label_rows: 300,
            seed: 5,
            vocab_size: 512,
            min_len: 10,
            max_len: 60,
            part_rows: 150,
            ..SyntheticConfig::default()
        };
        generate(&store, &cfg, WriterOptions::default()).expect("a small synthetic store");
        let scratch = dir.join("scratch");
        std::fs::create_dir(&scratch).expect("a scratch folder");
        Some(Fixtures {
            tokenizer,
            templates,
            store,
            scratch,
            model,
            root: dir,
        })
    }
}

/// Runs target `name` on `data`. Panics on an unknown name.
pub fn run(name: &str, fx: &Fixtures, data: &[u8]) {
    match name {
        "input_records" => input_records(fx, data),
        "chat_template" => chat_template(fx, data),
        "gguf_header" => gguf_header(fx, data),
        "store_files" => store_files(fx, data),
        other => panic!("no fuzz target {other}"),
    }
}

const FORMATS: [InputFormat; 6] = [
    InputFormat::Auto,
    InputFormat::Text,
    InputFormat::PromptResponse,
    InputFormat::Messages,
    InputFormat::Alpaca,
    InputFormat::MultipleChoice,
];

/// `data` as a JSONL (or JSON array) input file, read as `label` reads it in every record
/// shape: parsing, chat rendering, multiple-choice prompts and tokenisation.
pub fn input_records(fx: &Fixtures, data: &[u8]) {
    let path = fx.scratch.join("input.jsonl");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    for (i, format) in FORMATS.into_iter().enumerate() {
        let encoder = Encoder {
            tokenizer: &fx.tokenizer,
            chat_template: fx.templates.get(i % fx.templates.len().max(1)),
        };
        let opts = InputOptions {
            format,
            seq_len: 64,
            max_len: 256,
            max_record_bytes: 1 << 16,
            ..InputOptions::default()
        };
        let Ok(reader) = SampleReader::open(&path, encoder, opts) else {
            continue;
        };
        for s in reader.take(10_000).flatten() {
            assert!(s.input_ids.len() >= 2 && s.input_ids.len() <= 256);
            assert!((s.prompt_len as usize) < s.input_ids.len());
        }
    }
}

/// `data` as JSON messages (an array of `{role, content}`, or anything else JSON), rendered by
/// each real chat template, with and without the generation prompt.
pub fn chat_template(fx: &Fixtures, data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let messages: Vec<Message> = match value.as_array() {
        Some(items) => items
            .iter()
            .map(|m| {
                let text = |k: &str| match &m[k] {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Message::new(text("role"), text("content"))
            })
            .collect(),
        None => vec![Message::new("user", value.to_string())],
    };
    for t in &fx.templates {
        for generation in [false, true] {
            let _ = t.render(&messages, generation);
        }
    }
}

/// `data` as a GGUF file: the header, the config, the tokenizer, the chat template and the
/// quantisation name.
pub fn gguf_header(fx: &Fixtures, data: &[u8]) {
    let path = fx.scratch.join("model.gguf");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(mut g) = GgufFile::open(&path) else {
        return;
    };
    let _ = g.architecture();
    let _ = g.config();
    let _ = g.quantization();
    let _ = g.chat_template_source();
    if let Ok(t) = g.tokenizer(None) {
        let _ = t.encode("Hello, world", true);
    }
}

/// The first byte picks one file of the fixture store (manifest, a labels part, a samples
/// part) and the rest replaces it; the damaged store is verified, opened and read whole.
pub fn store_files(fx: &Fixtures, data: &[u8]) {
    let Some((&pick, content)) = data.split_first() else {
        return;
    };
    let dir = fx.scratch.join("store");
    if dir.exists() && std::fs::remove_dir_all(&dir).is_err() {
        return;
    }
    if copy_dir(&fx.store, &dir).is_err() {
        return;
    }
    let Ok(manifest) = Manifest::load(&fx.store) else {
        return;
    };
    let mut files = vec!["manifest.json".to_string()];
    for p in &manifest.parts {
        files.push(p.labels.file.clone());
        files.push(p.samples.file.clone());
    }
    let target = dir.join(&files[pick as usize % files.len()]);
    if std::fs::write(&target, content).is_err() {
        return;
    }
    let _ = verify(&dir);
    let Ok(reader) = StoreReader::open(&dir) else {
        return;
    };
    for rows in reader.label_rows(&LabelColumn::ALL, 64).take(10_000) {
        if rows.is_err() {
            break;
        }
    }
    for rows in reader.sample_rows(&SampleColumn::ALL).take(10_000) {
        if rows.is_err() {
            break;
        }
    }
    for table in [Table::Labels, Table::Samples] {
        if let Ok(batches) = reader.batches(table, None, 64) {
            for b in batches.take(10_000) {
                if b.is_err() {
                    break;
                }
            }
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()))?;
        } else {
            std::fs::copy(&p, to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// Starting inputs for target `name`: real records of the repository's `data/` and
/// `tests/data/` files (one per line), conversations, a small GGUF made from the SmolLM2
/// file's metadata (its vocabulary cut to 400 tokens, no tensors), and each file of the
/// fixture store behind its selector byte.
pub fn seeds(name: &str, fx: &Fixtures) -> Vec<Vec<u8>> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    match name {
        "input_records" => {
            let mut out = Vec::new();
            for file in [
                "data/chat.jsonl",
                "data/text.jsonl",
                "tests/data/inputs_mixed.jsonl",
            ] {
                if let Ok(text) = std::fs::read_to_string(repo.join(file)) {
                    out.extend(text.lines().map(|l| l.as_bytes().to_vec()));
                    out.push(text.into_bytes());
                }
            }
            out.push(br#"[{"text": "an array file"}, {"prompt": "p", "response": "r"}]"#.to_vec());
            out
        }
        "chat_template" => [
            r#"[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]"#,
            r#"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]"#,
            r#"[{"role": "tool", "content": {"x": [1, 2]}}, {"role": 7}]"#,
            r#""just a string""#,
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect(),
        "gguf_header" => small_gguf(&fx.model).into_iter().collect(),
        "store_files" => {
            let Ok(manifest) = Manifest::load(&fx.store) else {
                return Vec::new();
            };
            let mut files = vec!["manifest.json".to_string()];
            for p in &manifest.parts {
                files.push(p.labels.file.clone());
                files.push(p.samples.file.clone());
            }
            files
                .iter()
                .enumerate()
                .filter_map(|(i, f)| {
                    let mut seed = vec![i as u8];
                    seed.extend(std::fs::read(fx.store.join(f)).ok()?);
                    Some(seed)
                })
                .collect()
        }
        _ => Vec::new(),
    }
}

/// The GGUF of `model` with its metadata kept but its token lists cut to 400 entries (and the
/// merges to 200) and no tensors: a valid header small enough to fuzz quickly.
fn small_gguf(model: &Path) -> Option<Vec<u8>> {
    use candle_core::quantized::gguf_file::{self, Value};
    let mut file = std::fs::File::open(model).ok()?;
    let content = gguf_file::Content::read(&mut file).ok()?;
    let cut = |v: &Value, n: usize| match v {
        Value::Array(items) => Value::Array(items.iter().take(n).cloned().collect()),
        other => other.clone(),
    };
    let mut keys: Vec<&String> = content.metadata.keys().collect();
    keys.sort();
    let values: Vec<(String, Value)> = keys
        .into_iter()
        .map(|k| {
            let v = &content.metadata[k];
            let v = match k.as_str() {
                "tokenizer.ggml.merges" => cut(v, 200),
                k if k.starts_with("tokenizer.ggml.") => cut(v, 400),
                _ => v.clone(),
            };
            (k.clone(), v)
        })
        .collect();
    let refs: Vec<(&str, &Value)> = values.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &refs, &[]).ok()?;
    Some(out.into_inner())
}
