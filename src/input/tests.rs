//! Input tests. A tiny byte-level tokenizer (one token per byte, no merges) makes most of them
//! self-contained; the ones marked "real" use the SmolLM2 teacher and `../shared/data` when
//! present (skipped otherwise, failing under `CI=true`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;

use super::*;
use crate::teacher::Teacher;
use crate::tokenize::tokenizer::BpeSpec;

const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Byte-level tokenizer: ids 0..=2 are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, then one
/// id per byte-level character.
fn tiny() -> &'static (TeacherTokenizer, ChatTemplate) {
    static TINY: OnceLock<(TeacherTokenizer, ChatTemplate)> = OnceLock::new();
    TINY.get_or_init(|| {
        let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .collect();
        alphabet.sort();
        let mut tokens: Vec<String> = vec![
            "<|endoftext|>".into(),
            "<|im_start|>".into(),
            "<|im_end|>".into(),
        ];
        tokens.extend(alphabet.iter().map(|c| c.to_string()));
        let mut token_types = vec![3, 3, 3];
        token_types.extend(std::iter::repeat_n(1, alphabet.len()));
        let spec = BpeSpec {
            tokens,
            merges: vec![],
            token_types,
            pre: "gpt2".into(),
            bos_id: Some(1),
            eos_id: Some(2),
            pad_id: Some(2),
            add_bos: false,
        };
        let tok = TeacherTokenizer::from_bpe_spec(&spec, Path::new("tiny")).unwrap();
        let chat = ChatTemplate::new(SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>").unwrap();
        (tok, chat)
    })
}

fn encoder() -> Encoder<'static> {
    let (tok, chat) = tiny();
    Encoder {
        tokenizer: tok,
        chat_template: Some(chat),
    }
}

fn write_tmp(content: &str, suffix: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(suffix).tempfile().unwrap();
    f.write_all(content.as_bytes()).unwrap();
    f
}

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn mixed_file_yields_one_sample_per_shape() {
    let opts = InputOptions {
        seq_len: 64,
        ..InputOptions::default()
    };
    let samples = read_samples(&data("tests/data/inputs_mixed.jsonl"), encoder(), opts).unwrap();
    let (tok, _) = tiny();
    // Text: 111 bytes, one token per byte -> windows of 64 + 47, all in the loss.
    assert_eq!(samples[0].record, 0);
    assert_eq!((samples[0].input_ids.len(), samples[0].prompt_len), (64, 0));
    assert_eq!((samples[1].record, samples[1].segment), (0, 1));
    assert_eq!(samples[1].input_ids.len(), 47);
    // Every chat-shaped sample: prompt ends right after "<|im_start|>assistant\n".
    for s in &samples[2..] {
        let prompt = tok.decode(&s.input_ids[..s.prompt_len as usize]).unwrap();
        let response = tok.decode(&s.input_ids[s.prompt_len as usize..]).unwrap();
        match s.record {
            1 => {
                assert!(prompt.ends_with(
                    "<|im_start|>user\nName a primary colour.<|im_end|>\n<|im_start|>assistant\n"
                ));
                assert_eq!(response, "Red.<|im_end|>\n");
            }
            2 => {
                assert!(prompt.starts_with("<|im_start|>system\nYou are terse.<|im_end|>\n"));
                assert_eq!(response, "4<|im_end|>\n");
            }
            3 => {
                assert!(prompt.contains("Translate to English.\n\nBonjour<|im_end|>"));
                assert_eq!(response, "Hello<|im_end|>\n");
            }
            4 => {
                assert_eq!(
                    prompt,
                    "Question: Which gas do plants take in from the air?\nA. oxygen\nB. carbon dioxide\nC. helium\nAnswer:"
                );
                assert_eq!(response, " B");
            }
            5 => assert_eq!(response, "3 + 4 = 7<|im_end|>\n"),
            r => panic!("unexpected record {r}"),
        }
    }
    assert_eq!(samples.len(), 7);
}

#[test]
fn text_windows_drop_a_single_token_remainder() {
    let enc = encoder();
    let opts = InputOptions {
        seq_len: 4,
        ..InputOptions::default()
    };
    let lens = |text: &str| -> Vec<usize> {
        enc.encode(&Record::Text(text.into()), &opts)
            .unwrap()
            .iter()
            .map(|(ids, p)| {
                assert_eq!(*p, 0);
                ids.len()
            })
            .collect()
    };
    assert_eq!(lens("abcdefghij"), vec![4, 4, 2]);
    assert_eq!(lens("abcdefghi"), vec![4, 4]);
    assert!(enc.encode(&Record::Text("a".into()), &opts).is_err());
}

#[test]
fn errors_carry_path_and_one_based_line() {
    let cases = [
        ("{\"text\": \"ok ok\"}\n{not json}\n", 2, "malformed JSON"),
        (
            "{\"text\": \"ok ok\"}\n\n{\"text\": \"ok\"}\n",
            2,
            "empty record",
        ),
        ("{}\n", 1, "empty record"),
        ("{\"prompt\": \"hi\"}\n", 1, "missing field \"response\""),
        (
            "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": \"Z\"}\n",
            1,
            "out of range",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
            1,
            "does not end with an assistant",
        ),
        (
            "{\"prompt\": \"hi\", \"response\": \"a very long answer indeed\"}\n",
            1,
            "exceeds the model's context",
        ),
        ("{\"foo\": 1}\n", 1, "unrecognised record"),
    ];
    for (content, line, reason) in cases {
        let f = write_tmp(content, ".jsonl");
        let opts = InputOptions {
            seq_len: 8,
            max_len: 64,
            ..InputOptions::default()
        };
        let err = read_samples(f.path(), encoder(), opts).unwrap_err();
        match &err {
            Error::InvalidRecord {
                path,
                line: l,
                reason: r,
            } => {
                assert_eq!(path, f.path());
                assert_eq!(*l, line, "{content:?}: {err}");
                assert!(r.contains(reason), "{content:?}: {r}");
            }
            other => panic!("{content:?}: unexpected {other}"),
        }
        assert!(err.to_string().contains(&format!(":{line}: ")), "{err}");
    }
}

#[test]
fn json_array_and_txt_files() {
    let arr = write_tmp(
        "[{\"instruction\": \"Say hi.\", \"input\": \"\", \"output\": \"hi\"},\n {\"text\": \"hello world\"}]",
        ".json",
    );
    let samples = read_samples(arr.path(), encoder(), InputOptions::default()).unwrap();
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[1].record, 1);
    assert_eq!(samples[1].prompt_len, 0);
    let txt = write_tmp("line one\nline two\n", ".txt");
    let opts = InputOptions {
        seq_len: 8,
        ..InputOptions::default()
    };
    let samples = read_samples(txt.path(), encoder(), opts).unwrap();
    assert_eq!(samples.len(), 3); // 18 bytes -> 8 + 8 + 2
    assert!(samples.iter().all(|s| s.record == 0));
    assert!(SampleReader::open(
        txt.path(),
        encoder(),
        InputOptions {
            seq_len: 1,
            ..InputOptions::default()
        }
    )
    .is_err());
}

#[test]
fn explicit_format_and_parsing_names() {
    assert_eq!(
        "mc".parse::<InputFormat>().unwrap(),
        InputFormat::MultipleChoice
    );
    assert!("xml".parse::<InputFormat>().is_err());
    let f = write_tmp(
        "{\"text\": \"abc\", \"prompt\": \"p\", \"response\": \"r\"}\n",
        ".jsonl",
    );
    let text = read_samples(
        f.path(),
        encoder(),
        InputOptions {
            format: InputFormat::Text,
            ..InputOptions::default()
        },
    )
    .unwrap();
    assert_eq!(text[0].prompt_len, 0);
    let auto = read_samples(f.path(), encoder(), InputOptions::default()).unwrap();
    assert!(auto[0].prompt_len > 0);
}

#[test]
fn multiple_choice_prompt_and_text_response() {
    let mc = MultipleChoice {
        question: "Which gas do plants take in from the air?".into(),
        choices: vec!["oxygen".into(), "carbon dioxide".into(), "helium".into()],
        answer: 1,
    };
    // Same string as the third reference text of smollm2_reference.json.
    assert_eq!(
        multiple_choice_prompt(&mc.question, &mc.choices),
        "Question: Which gas do plants take in from the air?\nA. oxygen\nB. carbon dioxide\nC. helium\nAnswer:"
    );
    assert_eq!(multiple_choice_response(&mc, McResponse::Letter), " B");
    assert_eq!(
        multiple_choice_response(&mc, McResponse::Text),
        " carbon dioxide"
    );
    assert_eq!(answer_letter(25), Some('Z'));
    assert_eq!(answer_letter(26), None);
}

// ---- real teacher and data -------------------------------------------------------------

fn missing(what: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} is required when CI=true");
    }
    eprintln!("skipping: {what} not found");
}

fn real_teacher() -> Option<&'static Teacher> {
    static T: OnceLock<Option<Teacher>> = OnceLock::new();
    T.get_or_init(|| {
        let path = crate::testing::require_model("smollm2-135m")?;
        Some(Teacher::load(&path, &Device::Cpu).expect("loading the teacher"))
    })
    .as_ref()
}

#[test]
fn real_chat_prompt_len_matches_reference_rendering() {
    let Some(t) = real_teacher() else { return };
    let enc = t.encoder();
    let record = Record::Chat(vec![
        Message::new("user", "Name a primary colour."),
        Message::new("assistant", "Red."),
    ]);
    let out = enc.encode(&record, &InputOptions::default()).unwrap();
    // rendered_ids of chat_template_example in smollm2_reference.json (HF transformers).
    let reference: Vec<u32> = vec![
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
        407, 19712, 8182, 2, 198, 1, 4093, 198, 5820, 253, 3003, 7302, 30, 2, 198, 1, 520, 9531,
        198, 12869, 30, 2, 198,
    ];
    assert_eq!(out[0].0, reference);
    // "Red" (12869) is the first response token.
    assert_eq!(out[0].1, 35);
}

#[test]
fn real_shared_data_files_read_cleanly() {
    let Some(t) = real_teacher() else { return };
    let enc = t.encoder();
    let opts = InputOptions {
        max_len: 8192,
        ..InputOptions::default()
    };
    let files = [
        (
            "../shared/data/alpaca_en_demo/alpaca_en_demo.json",
            999usize,
        ),
        ("../shared/data/commonsenseqa/dev_rand_split.jsonl", 1221),
        ("../shared/data/openbookqa/openbook_qa.jsonl", 500),
    ];
    for (rel, records) in files {
        let path = data(rel);
        if !path.exists() {
            missing(&path.display().to_string());
            continue;
        }
        let samples = read_samples(&path, enc, opts.clone()).unwrap();
        assert_eq!(samples.len(), records, "{rel}");
        for s in &samples {
            assert!(
                (s.prompt_len as usize) < s.input_ids.len(),
                "{rel} record {}",
                s.record
            );
        }
    }
}
