//! The bad-input rows of docs/reliability.md that no other test covers: each gets a clear
//! error naming the file, exit code 2 (never 101, a panic), and no store that looks complete.

use std::path::Path;

use firstkd::schema::LogprobDtype;
use firstkd::store::Manifest;

use crate::util::{firstkd, label_args, small_store, teacher_path, tempdir, text};

/// Exit 2, no panic, the message names `needle`.
fn refused(o: &std::process::Output, needle: &str) {
    let t = text(o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    assert!(t.contains(needle), "wanted {needle:?} in: {t}");
}

fn no_complete_store(dir: &Path) {
    assert!(
        Manifest::load(dir).map(|m| !m.complete).unwrap_or(true),
        "{} looks complete",
        dir.display()
    );
}

fn label(model: &Path, out: &Path, input: &Path) -> std::process::Output {
    let args = label_args(model, out, input, &[]);
    firstkd(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn bad_model_files_and_inputs_fail_cleanly() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/text.jsonl");
    let bytes = std::fs::read(&model).unwrap();

    // A GGUF cut off after 1 MiB (inside the tensor data) and one cut inside its header.
    for (name, len) in [("cut.gguf", 1 << 20), ("header.gguf", 4096)] {
        let cut = tmp.path().join(name);
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let out = tmp.path().join(format!("out-{name}"));
        refused(&label(&cut, &out, &good), name);
        no_complete_store(&out);
    }

    // A GGUF of an architecture firstkd does not run: `general.architecture` patched from
    // "llama" to "lxama" (same length, so the header stays well formed).
    let key = b"general.architecture";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    let value = at + key.len() + 4 + 8; // value type (u32), string length (u64)
    assert_eq!(&bytes[value..value + 5], b"llama");
    let mut patched = bytes.clone();
    patched[value + 1] = b'x';
    let other = tmp.path().join("other-arch.gguf");
    std::fs::write(&other, &patched).unwrap();
    let out = tmp.path().join("out-arch");
    let o = label(&other, &out, &good);
    refused(&o, "other-arch.gguf");
    assert!(
        text(&o).contains("unsupported architecture \"lxama\""),
        "{}",
        text(&o)
    );
    no_complete_store(&out);
    drop(patched);

    // A JSONL line that is not UTF-8.
    let latin1 = tmp.path().join("latin1.jsonl");
    std::fs::write(
        &latin1,
        b"{\"text\": \"The first line is fine.\"}\n{\"text\": \"caf\xe9\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("out-latin1");
    let o = label(&model, &out, &latin1);
    refused(&o, "latin1.jsonl:2");
    no_complete_store(&out);

    // An output path that is a file: refused, and the file is untouched.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"user data").unwrap();
    let o = label(&model, &file, &good);
    refused(&o, "a-file");
    assert_eq!(std::fs::read(&file).unwrap(), b"user data");
}

#[test]
fn damaged_manifests_and_mixed_parts_are_refused() {
    let tmp = tempdir();
    let (store, _) = small_store(tmp.path(), "a", LogprobDtype::Quantized);
    let manifest = store.join("manifest.json");
    let original = std::fs::read(&manifest).unwrap();
    let s = store.to_str().unwrap();

    // Empty and truncated manifests: every reader refuses, naming the manifest.
    for (what, bytes) in [
        ("empty", Vec::new()),
        ("truncated", original[..original.len() / 2].to_vec()),
    ] {
        std::fs::write(&manifest, &bytes).unwrap();
        for cmd in [vec!["verify", s], vec!["inspect", s], vec!["stats", s]] {
            let o = firstkd(&cmd);
            assert_ne!(o.status.code(), Some(0), "{what} {cmd:?}: {}", text(&o));
            assert_ne!(o.status.code(), Some(101), "{what} {cmd:?}: {}", text(&o));
            assert!(
                text(&o).contains("manifest.json"),
                "{what} {cmd:?}: {}",
                text(&o)
            );
        }
    }
    std::fs::write(&manifest, &original).unwrap();

    // A wrong sha256 in the manifest, and a part of another store put in place of one of
    // this store's: both are found by verify and refused by a reader.
    let mut m = Manifest::load(&store).unwrap();
    let part = store.join(&m.parts[1].labels.file);
    m.parts[0].labels.sha256 = "0".repeat(64);
    m.save(&store).unwrap();
    let o = firstkd(&["verify", s]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains(&m.parts[0].labels.file), "{}", text(&o));
    std::fs::write(&manifest, &original).unwrap();

    let other_cfg = firstkd::store::synthetic::SyntheticConfig {
        label_rows: 6_000,
        seed: 8,
        min_len: 20,
        max_len: 200,
        part_rows: 2_000,
        ..Default::default()
    };
    let other = tmp.path().join("b");
    firstkd::store::synthetic::generate(&other, &other_cfg, Default::default()).unwrap();
    let theirs = Manifest::load(&other).unwrap();
    std::fs::copy(other.join(&theirs.parts[0].labels.file), &part).unwrap();
    let o = firstkd(&["verify", s]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains(&m.parts[1].labels.file), "{}", text(&o));
    // Readers check each part's size against the manifest before reading a row.
    let part_name = m.parts[1].labels.file.clone();
    refused(
        &firstkd(&["sql", s, "SELECT count(*) FROM labels"]),
        &part_name,
    );
    refused(&firstkd(&["stats", s]), &part_name);
}

#[test]
fn a_student_config_with_missing_fields_names_the_file() {
    let tmp = tempdir();
    let (store, _) = small_store(tmp.path(), "s", LogprobDtype::Quantized);
    let cfg = tmp.path().join("config.json");
    std::fs::write(&cfg, br#"{"model_type": "llama", "hidden_size": 64}"#).unwrap();
    let o = firstkd(&[
        "distill",
        "--store",
        store.to_str().unwrap(),
        "--init",
        &format!("random:{}", cfg.display()),
        "--loss",
        "kd",
        "--steps",
        "1",
        "--quiet",
        "--out",
        tmp.path().join("run").to_str().unwrap(),
    ]);
    refused(&o, "config.json");
    assert!(text(&o).contains("missing field"), "{}", text(&o));

    // A config that parses but cannot work is a problem of that model file too.
    let bad = tmp.path().join("gelu.json");
    let mut cfg_json: serde_json::Value = serde_json::from_str(
        r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 512,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true}"#,
    )
    .unwrap();
    cfg_json["hidden_act"] = "gelu".into();
    std::fs::write(&bad, cfg_json.to_string()).unwrap();
    let o = firstkd(&[
        "distill",
        "--store",
        store.to_str().unwrap(),
        "--init",
        &format!("random:{}", bad.display()),
        "--loss",
        "kd",
        "--steps",
        "1",
        "--quiet",
        "--out",
        tmp.path().join("run2").to_str().unwrap(),
    ]);
    refused(&o, "gelu.json: model:");
    assert!(text(&o).contains("hidden_act \"gelu\""), "{}", text(&o));
}
