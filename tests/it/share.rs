//! Sharing a store between teams and tools (docs/sharing.md), on a store labelled by the real
//! SmolLM2 teacher: the axolotl export against what `distill` trains on, import round trips,
//! DistillKit import, merge and split, the dataset card, and readers other than firstkd.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use firstkd::schema::Table;
use firstkd::store::{verify, LabelColumn, LabelledSample, Manifest, StoreReader};
use firstkd::trainer::data::SequenceReader;
use firstkd::trainer::loss::teacher_log_targets;

use crate::util::{firstkd, in_ci, teacher_path, tempdir, text};

/// A store of 16 Alpaca records labelled by SmolLM2-135M in three parts, with a fitted
/// temperature; labelled once per test binary. None (skip) without the cached teacher or the
/// shared data outside CI.
fn real_store() -> Option<&'static Path> {
    static STORE: OnceLock<Option<PathBuf>> = OnceLock::new();
    STORE
        .get_or_init(|| {
            let teacher = teacher_path()?;
            let data = firstkd::testing::require_shared("data/alpaca_en_demo/alpaca_en_demo.json")?;
            let dir = tempdir().keep();
            let store = dir.join("store");
            let s = store.to_str().unwrap();
            let o = firstkd(&[
                "label",
                "--model",
                teacher.to_str().unwrap(),
                "--input",
                data.to_str().unwrap(),
                "--format",
                "alpaca",
                "--limit",
                "16",
                "--part-sequences",
                "6",
                "--out",
                s,
            ]);
            assert!(o.status.success(), "{}", text(&o));
            let o = firstkd(&["calibrate", s, "--held-out-fraction", "0.3"]);
            assert!(o.status.success(), "{}", text(&o));
            Some(store)
        })
        .as_deref()
}

/// Python with `modules` importable; None (skip) outside CI when one is missing.
fn python(modules: &[&str]) -> Option<()> {
    for m in modules {
        let ok = Command::new("python3")
            .args(["-c", &format!("import {m}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            assert!(
                !in_ci(),
                "python3 cannot import {m} under CI (scripts/test.sh installs it)"
            );
            eprintln!("skipping: python3 cannot import {m}");
            return None;
        }
    }
    Some(())
}

fn script(name: &str, args: &[&str]) -> std::process::Output {
    let path = format!("{}/scripts/{name}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{name}: {}", text(&out));
    out
}

fn samples(dir: &Path) -> Vec<LabelledSample> {
    let columns = [
        LabelColumn::InLoss,
        LabelColumn::TopkIds,
        LabelColumn::TopkLogprobs,
        LabelColumn::TargetLogprob,
        LabelColumn::Entropy,
    ];
    StoreReader::open(dir)
        .unwrap()
        .labelled_samples(&columns, |_| true)
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

fn run_ok(args: &[&str]) -> String {
    let o = firstkd(args);
    assert!(o.status.success(), "{args:?}: {}", text(&o));
    text(&o)
}

#[test]
fn axolotl_export_trains_the_student_on_what_distill_does() {
    let Some(store) = real_store() else { return };
    if python(&["pyarrow", "numpy"]).is_none() {
        return;
    }
    let tmp = tempdir();
    let m = Manifest::load(store).unwrap();
    let t = m.temperature.as_ref().expect("calibrated").value;
    assert!(
        (t - 1.0).abs() > 1e-3,
        "want a temperature that changes the targets, got {t}"
    );
    let (pq_dir, js_dir) = (tmp.path().join("ax"), tmp.path().join("axj"));
    let said = run_ok(&["export", store.to_str().unwrap(), pq_dir.to_str().unwrap()]);
    assert!(said.contains("fitted"), "{said}");
    run_ok(&[
        "export",
        store.to_str().unwrap(),
        js_dir.to_str().unwrap(),
        "--file-format",
        "jsonl",
    ]);
    let described: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pq_dir.join("firstkd_export.json")).unwrap())
            .unwrap();
    assert_eq!(described["options"]["temperature"].as_f64(), Some(t));
    let card = std::fs::read_to_string(pq_dir.join("README.md")).unwrap();
    assert!(
        card.contains(&format!("T = {t}")) && card.contains("path: data/train-*.parquet"),
        "{card}"
    );
    assert!(card.contains(&m.teacher.sha256), "{card}");

    // What axolotl's collator and loss would train on, per (sequence, position).
    let collated = |dir: &Path| -> serde_json::Value {
        let out = dir.join("collated.json");
        script(
            "axolotl_collate.py",
            &[dir.to_str().unwrap(), out.to_str().unwrap()],
        );
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
    };
    let (a, b) = (collated(&pq_dir), collated(&js_dir));
    for shape in a["tensor_shapes"].as_array().unwrap() {
        assert_eq!(shape[2].as_u64(), Some(m.k as u64), "[batch, seq, k]");
    }
    let rows = |v: &serde_json::Value| -> HashMap<(u64, u64), (Vec<u32>, Vec<f64>)> {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let ids = r[2]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect();
                let ps = r[3]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                ((r[0].as_u64().unwrap(), r[1].as_u64().unwrap()), (ids, ps))
            })
            .collect()
    };
    let (axolotl, axolotl_json) = (rows(&a), rows(&b));
    assert_eq!(
        axolotl.len(),
        axolotl_json.len(),
        "Parquet and JSONL exports agree"
    );
    for (key, (ids, ps)) in &axolotl {
        let (ids2, ps2) = &axolotl_json[key];
        assert_eq!(ids, ids2);
        for (x, y) in ps.iter().zip(ps2) {
            assert!((x - y).abs() < 1e-6, "{key:?}: {x} vs {y}");
        }
    }

    // What `firstkd distill` trains on: the trainer's sequences and its target function.
    let reader = StoreReader::open(store).unwrap();
    let order: HashMap<u64, u64> = reader
        .sample_rows(&[firstkd::store::SampleColumn::SampleId])
        .enumerate()
        .map(|(i, s)| (s.unwrap().sample_id, i as u64))
        .collect();
    let (mut compared, mut worst) = (0usize, 0f64);
    for seq in SequenceReader::new(reader, "train", usize::MAX) {
        let seq = seq.unwrap();
        let row = order[&seq.sample_id];
        let n = seq.positions();
        let lps = Tensor::from_vec(seq.topk_logprobs.clone(), (n, m.k), &Device::Cpu).unwrap();
        let targets = teacher_log_targets(&lps, t, 0.0).unwrap().exp().unwrap();
        let targets: Vec<Vec<f32>> = targets.to_vec2().unwrap();
        for (p, target) in targets.iter().enumerate() {
            let key = (row, p as u64);
            if !seq.in_loss[p] {
                assert!(
                    !axolotl.contains_key(&key),
                    "{key:?} is masked out in distill"
                );
                continue;
            }
            let (ids, ps) = axolotl
                .get(&key)
                .unwrap_or_else(|| panic!("{key:?} trained by distill, not by axolotl"));
            assert_eq!(
                ids.as_slice(),
                &seq.topk_ids[p * m.k..(p + 1) * m.k],
                "{key:?}"
            );
            for (x, y) in ps.iter().zip(target) {
                worst = worst.max((x - f64::from(*y)).abs());
            }
            compared += 1;
        }
    }
    assert_eq!(
        compared as u64,
        m.in_loss_rows(),
        "every trained position compared"
    );
    assert_eq!(compared, axolotl.len());
    assert!(worst < 1e-6, "distributions differ by {worst}");
    eprintln!("axolotl vs distill: {compared} positions at T = {t:.4}, max |p - q| {worst:.2e}");
}

#[test]
fn export_then_import_gives_back_the_same_labels() {
    let Some(store) = real_store() else { return };
    let teacher = teacher_path().unwrap();
    let tmp = tempdir();
    let original = samples(store);
    let m = Manifest::load(store).unwrap();
    for format in ["parquet", "jsonl"] {
        let ex = tmp.path().join(format!("raw-{format}"));
        let back = tmp.path().join(format!("back-{format}"));
        run_ok(&[
            "export",
            store.to_str().unwrap(),
            ex.to_str().unwrap(),
            "--temperature",
            "raw",
            "--file-format",
            format,
        ]);
        let files: Vec<String> = std::fs::read_dir(ex.join("data"))
            .unwrap()
            .map(|e| e.unwrap().path().to_string_lossy().into_owned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut args = vec!["import"];
        args.extend(files.iter().map(String::as_str));
        args.extend(["--format", "axolotl", "--out", back.to_str().unwrap()]);
        args.extend(["--tokenizer", teacher.to_str().unwrap()]);
        run_ok(&args);
        assert!(
            verify(&back).unwrap().is_clean(),
            "{:?}",
            verify(&back).unwrap()
        );
        let bm = Manifest::load(&back).unwrap();
        assert_eq!(
            bm.tokenizer.sha256, m.tokenizer.sha256,
            "tokenizer hash computed"
        );
        assert_eq!(bm.teacher.sha256, "unknown");
        let imported = samples(&back);
        assert_eq!(imported.len(), original.len());
        for (a, b) in original.iter().zip(&imported) {
            assert_eq!(a.sample.input_ids, b.sample.input_ids);
            assert_eq!(a.labels.in_loss, b.labels.in_loss);
            assert_eq!(a.labels.topk_ids, b.labels.topk_ids, "{format}: ids");
            assert_eq!(
                a.labels.topk_logprobs, b.labels.topk_logprobs,
                "{format}: log-probs"
            );
        }
    }
    // Rerunning a finished export is a no-op; other settings into it are refused.
    let ex = tmp.path().join("raw-parquet");
    let again = run_ok(&[
        "export",
        store.to_str().unwrap(),
        ex.to_str().unwrap(),
        "--temperature",
        "raw",
    ]);
    assert!(again.contains("already complete"), "{again}");
    let o = firstkd(&["export", store.to_str().unwrap(), ex.to_str().unwrap()]);
    assert!(
        !o.status.success() && text(&o).contains("other settings"),
        "{}",
        text(&o)
    );
}

#[test]
fn import_refuses_bad_rows_naming_file_and_row() {
    let tmp = tempdir();
    let good = serde_json::json!({
        "input_ids": [1, 2, 3, 4], "attention_mask": [1, 1, 1, 1], "labels": [-100, -100, 3, 4],
        "target_token_ids": [[2, 5], [3, 6], [4, 7], [0, 0]],
        "target_logprobs": [[-0.1, -2.5], [-0.2, -2.0], [-0.3, -1.9], [-1e9, -1e9]],
        "target_mask": [[0, 0], [1, 1], [1, 1], [0, 0]],
    });
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        v
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "holes",
            with(&|v| v["labels"] = serde_json::json!([-100, 2, -100, 4])).to_string(),
            "one prompt prefix",
        ),
        (
            "padding",
            with(&|v| {
                v["target_logprobs"][1] = serde_json::json!([-1e9, -1e9]);
                v["target_mask"][1] = serde_json::json!([0, 0]);
            })
            .to_string(),
            "no teacher entries",
        ),
        (
            "masked-pad",
            with(&|v| v["target_logprobs"][1] = serde_json::json!([-1e9, -0.5])).to_string(),
            "padding entry 0 has mask 1",
        ),
        (
            "short",
            with(&|v| v["target_token_ids"] = serde_json::json!([[2, 5]])).to_string(),
            "target_token_ids rows",
        ),
        (
            "positive",
            with(&|v| v["target_logprobs"][0][0] = serde_json::json!(0.5)).to_string(),
            "not a log-probability",
        ),
        (
            "ragged-k",
            with(&|v| {
                v["target_token_ids"][2] = serde_json::json!([4]);
                v["target_logprobs"][2] = serde_json::json!([-0.3]);
                v["target_mask"][2] = serde_json::json!([1]);
            })
            .to_string(),
            "same number",
        ),
        ("not-json", "{\"input_ids\": [1, 2".to_string(), "not JSON"),
        ("empty", String::new(), "no sequences"),
    ];
    for (name, line, expect) in cases {
        let file = tmp.path().join(format!("{name}.jsonl"));
        // The bad row is the second one (row 1), after a good row.
        let body = if name == "empty" {
            String::new()
        } else {
            format!("{good}\n{line}\n")
        };
        std::fs::write(&file, body).unwrap();
        let out = tmp.path().join(format!("store-{name}"));
        let o = firstkd(&[
            "import",
            file.to_str().unwrap(),
            "--format",
            "axolotl",
            "--out",
            out.to_str().unwrap(),
        ]);
        let said = text(&o);
        assert!(!o.status.success(), "{name}: accepted\n{said}");
        assert!(said.contains(expect), "{name}: {said}");
        assert!(!said.contains("panicked"), "{name}: {said}");
        if name != "empty" && name != "ragged-k" {
            assert!(
                said.contains(&format!("{name}.jsonl")) && said.contains("row 1"),
                "{name}: {said}"
            );
        }
        let complete = Manifest::load(&out).map(|m| m.complete).unwrap_or(false);
        assert!(!complete, "{name}: left a store that looks complete");
    }
    // DistillKit: a truncated position is refused the same way.
    let dk = tmp.path().join("dk");
    std::fs::create_dir_all(&dk).unwrap();
    std::fs::write(
        dk.join("compression_config.yaml"),
        "d: 16\nk: 2\nexact_k: 2\nexact_dtype: float32\nresidual_bins: []\ndelta_encoding: false\n",
    )
    .unwrap();
    if python(&["pyarrow"]).is_some() {
        let code = format!(
            "import pyarrow as pa, pyarrow.parquet as pq, struct\n\
             lp = list(struct.pack('<ff', -0.1, -2.0))\n\
             t = pa.table({{'input_ids': pa.array([[1, 2, 3]], pa.list_(pa.uint64())),\
             'bytepacked_indices': pa.array([[[0x12], [0x34], [0x56]]], pa.list_(pa.list_(pa.uint8()))),\
             'compressed_logprobs': pa.array([[lp, lp[:5], lp]], pa.list_(pa.list_(pa.uint8())))}})\n\
             pq.write_table(t, '{}')\n",
            dk.join("data_0.parquet").display()
        );
        let o = Command::new("python3")
            .args(["-c", &code])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let out = tmp.path().join("store-dk");
        let o = firstkd(&[
            "import",
            dk.to_str().unwrap(),
            "--format",
            "distillkit",
            "--out",
            out.to_str().unwrap(),
        ]);
        let said = text(&o);
        assert!(
            !o.status.success() && said.contains("data_0.parquet") && said.contains("row 0"),
            "{said}"
        );
        assert!(
            said.contains("position 1") && said.contains("log-prob bytes"),
            "{said}"
        );
    }
}

#[test]
fn distillkit_compressed_logits_import_as_distillkit_decodes_them() {
    let Some(store) = real_store() else { return };
    if python(&["pyarrow", "numpy"]).is_none() {
        return;
    }
    let tmp = tempdir();
    let raw = tmp.path().join("raw");
    run_ok(&[
        "export",
        store.to_str().unwrap(),
        raw.to_str().unwrap(),
        "--temperature",
        "raw",
    ]);
    let dk = tmp.path().join("dk");
    script(
        "distillkit_encode.py",
        &[raw.to_str().unwrap(), dk.to_str().unwrap()],
    );
    let back = tmp.path().join("back");
    run_ok(&[
        "import",
        dk.to_str().unwrap(),
        "--format",
        "distillkit",
        "--out",
        back.to_str().unwrap(),
        "--dtype",
        "float32",
        "--teacher",
        "SmolLM2-135M-Instruct",
    ]);
    assert!(
        verify(&back).unwrap().is_clean(),
        "{:?}",
        verify(&back).unwrap()
    );
    let m = Manifest::load(&back).unwrap();
    assert_eq!(m.tokenizer.vocab_size, 49152, "d of the config");
    assert_eq!(m.teacher.file_name, "SmolLM2-135M-Instruct");
    let expected: Vec<Vec<(Vec<u32>, Vec<f64>)>> =
        serde_json::from_str(&std::fs::read_to_string(dk.join("expected.json")).unwrap()).unwrap();
    let (original, imported) = (samples(store), samples(&back));
    assert_eq!(imported.len(), original.len());
    let (mut worst_decode, mut worst_vs_teacher) = (0f64, 0f64);
    for ((o, i), e) in original.iter().zip(&imported).zip(&expected) {
        assert_eq!(o.sample.input_ids, i.sample.input_ids);
        assert!(
            i.labels.in_loss.iter().all(|&x| x),
            "DistillKit has no loss mask"
        );
        for (p, (ids, vals)) in e.iter().enumerate() {
            let got: HashMap<u32, f32> = i
                .labels
                .ids(p)
                .iter()
                .copied()
                .zip(i.labels.logprobs(p).iter().copied())
                .collect();
            let mut want_ids = ids.clone();
            want_ids.sort();
            let mut got_ids: Vec<u32> = got.keys().copied().collect();
            got_ids.sort();
            assert_eq!(got_ids, want_ids, "position {p}: ids");
            let mut orig_ids = o.labels.ids(p).to_vec();
            orig_ids.sort();
            assert_eq!(got_ids, orig_ids, "position {p}: ids of the teacher");
            // A row whose decoded mass overshoots 1 is scaled to 1 on import (documented).
            let mass: f64 = vals.iter().map(|v| v.min(0.0).exp()).sum();
            let shift = if mass > 1.0 { mass.ln() } else { 0.0 };
            for (id, v) in ids.iter().zip(vals) {
                let want = (v.min(0.0) - shift).min(0.0);
                worst_decode = worst_decode.max((f64::from(got[id]) - want).abs());
            }
            for (id, lp) in o.labels.ids(p).iter().zip(o.labels.logprobs(p)) {
                let (a, b) = (f64::from(got[id]).exp(), f64::from(*lp).exp());
                worst_vs_teacher = worst_vs_teacher.max((a - b).abs());
            }
        }
    }
    assert!(
        worst_decode < 1e-5,
        "firstkd decodes DistillKit's bytes as DistillKit: {worst_decode}"
    );
    assert!(
        worst_vs_teacher < 0.02,
        "compression error in probability {worst_vs_teacher}"
    );
    eprintln!("distillkit: decode vs reference {worst_decode:.2e}, vs the teacher {worst_vs_teacher:.4} in probability");
}

/// The split a sample lands in, computed in Python from the documented rule.
fn python_splits(store: &Path, spec: &[(&str, f64)]) -> HashMap<u64, String> {
    let code = format!(
        "import hashlib, json, struct, pyarrow.parquet as pq, sys\n\
         m = json.load(open('{0}/manifest.json'))\nspec = {1}\nout = {{}}\n\
         for p in m['parts']:\n\
         \x20   for r in pq.read_table('{0}/' + p['samples']['file']).to_pylist():\n\
         \x20       h = hashlib.sha256(b'firstkd-split-v1\\0' + b''.join(struct.pack('<I', t) for t in r['input_ids'])).digest()\n\
         \x20       x = int.from_bytes(h[:8], 'big') / 2**64\n\
         \x20       acc = 0.0\n\
         \x20       for name, f in spec:\n\
         \x20           acc += f\n\
         \x20           if x < acc: break\n\
         \x20       out[r['sample_id']] = name\n\
         print(json.dumps(out))\n",
        store.display(),
        serde_json::to_string(&spec.iter().map(|(n, f)| (n.to_string(), *f)).collect::<Vec<_>>()).unwrap()
    );
    let o = Command::new("python3")
        .args(["-c", &code])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: HashMap<String, String> = serde_json::from_slice(&o.stdout).unwrap();
    v.into_iter()
        .map(|(k, s)| (k.parse().unwrap(), s))
        .collect()
}

#[test]
fn split_by_hash_and_merge_back_to_the_same_store() {
    let Some(store) = real_store() else { return };
    let tmp = tempdir();
    let out = tmp.path().join("splits");
    run_ok(&[
        "split",
        store.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--splits",
        "train=0.6,valid=0.2,test=0.2",
    ]);
    let original = samples(store);
    let mut seen = HashSet::new();
    let want = python(&["pyarrow"])
        .map(|_| python_splits(store, &[("train", 0.6), ("valid", 0.2), ("test", 0.2)]));
    for name in ["train", "valid", "test"] {
        let dir = out.join(name);
        assert!(
            verify(&dir).unwrap().is_clean(),
            "{name}: {:?}",
            verify(&dir).unwrap()
        );
        assert_eq!(
            Manifest::load(&dir).unwrap().temperature,
            Manifest::load(store).unwrap().temperature
        );
        for s in samples(&dir) {
            assert_eq!(s.sample.split, name);
            assert!(seen.insert(s.sample.sample_id), "sample in two splits");
            if let Some(want) = &want {
                assert_eq!(want[&s.sample.sample_id], name, "the documented hash rule");
            }
            let o = original
                .iter()
                .find(|o| o.sample.sample_id == s.sample.sample_id)
                .unwrap();
            assert_eq!(o.sample.input_ids, s.sample.input_ids);
            assert_eq!(o.labels.topk_ids, s.labels.topk_ids);
            assert_eq!(o.labels.topk_logprobs, s.labels.topk_logprobs);
            assert_eq!(o.labels.in_loss, s.labels.in_loss);
        }
    }
    assert_eq!(seen.len(), original.len(), "every sample in one split");

    // Splitting again gives the same files; merging the splits gives the store back.
    let again = tmp.path().join("again");
    run_ok(&[
        "split",
        store.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
        "--splits",
        "train=0.6,valid=0.2,test=0.2",
    ]);
    for name in ["train", "valid", "test"] {
        let (a, b) = (
            Manifest::load(&out.join(name)).unwrap(),
            Manifest::load(&again.join(name)).unwrap(),
        );
        let shas = |m: &Manifest| {
            m.parts
                .iter()
                .map(|p| p.labels.sha256.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(shas(&a), shas(&b), "{name}: deterministic");
    }
    let merged = tmp.path().join("merged");
    let said = run_ok(&[
        "merge",
        out.join("train").to_str().unwrap(),
        out.join("valid").to_str().unwrap(),
        out.join("test").to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(said.contains("kept"), "{said}");
    assert!(verify(&merged).unwrap().is_clean());
    let mut back: Vec<_> = samples(&merged);
    back.sort_by_key(|s| s.sample.sample_id);
    assert_eq!(back.len(), original.len());
    for (a, b) in original.iter().zip(&back) {
        assert_eq!(a.sample.sample_id, b.sample.sample_id);
        assert_eq!(a.sample.input_ids, b.sample.input_ids);
        assert_eq!(a.labels.topk_ids, b.labels.topk_ids);
        assert_eq!(a.labels.topk_logprobs, b.labels.topk_logprobs);
        assert_eq!(a.labels.target_logprob, b.labels.target_logprob);
        assert_eq!(a.labels.entropy, b.labels.entropy);
        assert_eq!(a.labels.in_loss, b.labels.in_loss);
    }
    assert_eq!(
        Manifest::load(&merged).unwrap().temperature,
        Manifest::load(store).unwrap().temperature
    );

    // The same store twice: ids collide, so the second copy's are shifted; one column layout.
    let twice = tmp.path().join("twice");
    let said = run_ok(&[
        "merge",
        store.to_str().unwrap(),
        store.to_str().unwrap(),
        "--out",
        twice.to_str().unwrap(),
    ]);
    assert!(said.contains("+ 16"), "{said}");
    assert!(verify(&twice).unwrap().is_clean());
    assert_eq!(Manifest::load(&twice).unwrap().rows(Table::Samples), 32);
    let col = tmp.path().join("column");
    run_ok(&[
        "split",
        store.to_str().unwrap(),
        "--out",
        col.to_str().unwrap(),
        "--layout",
        "column",
        "--key",
        "record",
    ]);
    let split_of: HashSet<String> = samples(&col).into_iter().map(|s| s.sample.split).collect();
    assert!(split_of
        .iter()
        .all(|s| ["train", "valid", "test"].contains(&s.as_str())));
    assert_eq!(Manifest::load(&col).unwrap().rows(Table::Samples), 16);
}

#[test]
fn merge_refuses_stores_of_another_teacher_naming_the_field() {
    let Some(store) = real_store() else { return };
    let tmp = tempdir();
    let other = tmp.path().join("synthetic");
    run_ok(&[
        "synth",
        other.to_str().unwrap(),
        "--rows",
        "2000",
        "--vocab",
        "49152",
        "--seed",
        "2",
    ]);
    let out = tmp.path().join("m");
    let o = firstkd(&[
        "merge",
        store.to_str().unwrap(),
        other.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let said = text(&o);
    assert!(!o.status.success(), "{said}");
    assert!(said.contains("teacher.sha256 differs"), "{said}");
    assert!(!out.join("manifest.json").exists(), "nothing written");
    // A temperature that differs between inputs is dropped, with the reason.
    let copy = tmp.path().join("copy");
    run_ok(&[
        "convert",
        store.to_str().unwrap(),
        "--out",
        copy.to_str().unwrap(),
    ]);
    let mut m = Manifest::load(&copy).unwrap();
    if let Some(t) = m.temperature.as_mut() {
        t.value += 0.5;
    }
    m.save(&copy).unwrap();
    let out = tmp.path().join("m2");
    let said = run_ok(&[
        "merge",
        store.to_str().unwrap(),
        copy.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(said.contains("temperature: not kept"), "{said}");
    assert!(Manifest::load(&out).unwrap().temperature.is_none());
}

#[test]
fn dataset_card_describes_the_store_and_loads_with_datasets() {
    let Some(store) = real_store() else { return };
    let tmp = tempdir();
    let copy = tmp.path().join("store");
    run_ok(&[
        "convert",
        store.to_str().unwrap(),
        "--out",
        copy.to_str().unwrap(),
    ]);
    let mut m = Manifest::load(&copy).unwrap();
    m.temperature = Manifest::load(store).unwrap().temperature;
    m.save(&copy).unwrap();
    run_ok(&["card", copy.to_str().unwrap(), "--license", "apache-2.0"]);
    let card = std::fs::read_to_string(copy.join("README.md")).unwrap();
    assert!(card.starts_with("---\nlicense: apache-2.0\n"), "{card}");
    for needle in [
        m.teacher.sha256.as_str(),
        m.tokenizer.sha256.as_str(),
        &format!("{:.4}", m.temperature.as_ref().unwrap().value),
        "size_categories:\n- 1K<n<10K",
        "card/reliability.svg",
        "load_dataset('parquet'",
        "topk_probs_q / 1024",
    ] {
        assert!(card.contains(needle), "card lacks {needle:?}");
    }
    for plot in ["reliability.svg", "coverage.svg"] {
        let svg = std::fs::read_to_string(copy.join("card").join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg") || svg.starts_with("<?xml"),
            "{plot}"
        );
    }
    assert!(
        verify(&copy).unwrap().is_clean(),
        "the card is not part of the data"
    );
    if python(&["datasets", "yaml"]).is_none() {
        return;
    }
    // The YAML header parses and each config loads with `datasets` as the card says.
    let code = format!(
        "import yaml, json, os, datasets\n\
         text = open('{0}/README.md').read()\n\
         meta = yaml.safe_load(text.split('---')[1])\n\
         out = {{}}\n\
         for c in meta['configs']:\n\
         \x20   files = [os.path.join('{0}', f['path']) for f in c['data_files']]\n\
         \x20   out[c['config_name']] = datasets.load_dataset('parquet', data_files=files, split='train').num_rows\n\
         print(json.dumps({{'license': meta['license'], 'rows': out}}))\n",
        copy.display()
    );
    let o = Command::new("python3")
        .args(["-c", &code])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["rows"]["labels"].as_u64(), Some(m.rows(Table::Labels)));
    assert_eq!(v["rows"]["samples"].as_u64(), Some(m.rows(Table::Samples)));
}

fn frozen(table: &str) -> Vec<(String, String)> {
    let path = format!("{}/schemas/{table}.json", env!("CARGO_MANIFEST_DIR"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["type"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Spark has no unsigned integers: what it reads each portable type as.
fn spark_type(portable: &str) -> String {
    match portable {
        "uint64" => "decimal(20,0)".into(),
        "uint32" => "bigint".into(),
        "uint16" => "int".into(),
        "bool" => "boolean".into(),
        "utf8" => "string".into(),
        t if t.starts_with("list<") => format!("array<{}>", spark_type(&t[5..t.len() - 1])),
        t => t.into(),
    }
}

#[test]
fn pyarrow_duckdb_polars_datasets_and_spark_see_the_documented_store() {
    let Some(store) = real_store() else { return };
    let mut engines = vec![];
    for (engine, module) in [
        ("pyarrow", "pyarrow"),
        ("duckdb", "duckdb"),
        ("polars", "polars"),
        ("datasets", "datasets"),
        ("spark", "pyspark"),
    ] {
        if python(&[module]).is_some() {
            engines.push(engine);
        }
    }
    let has_java = Command::new("java")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_java {
        assert!(!in_ci(), "java missing under CI");
        engines.retain(|e| *e != "spark");
    }
    if !engines.contains(&"pyarrow") || !engines.contains(&"duckdb") {
        return;
    }
    let out = script(
        "open_format_check.py",
        &[store.to_str().unwrap(), "--engines", &engines.join(",")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(stdout.lines().rev().find(|l| l.starts_with('{')).unwrap()).unwrap();
    let m = Manifest::load(store).unwrap();
    for engine in &engines {
        for (table, schema, rows) in [
            ("labels", frozen("labels.v2"), m.rows(Table::Labels)),
            ("samples", frozen("samples.v1"), m.rows(Table::Samples)),
        ] {
            let seen: Vec<(String, String)> = v[engine][table]["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c[0].as_str().unwrap().to_string(),
                        c[1].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            let want: Vec<(String, String)> = if *engine == "spark" {
                schema
                    .iter()
                    .map(|(n, t)| (n.clone(), spark_type(t)))
                    .collect()
            } else {
                schema
            };
            assert_eq!(seen, want, "{engine} {table}");
            assert_eq!(
                v[engine][table]["rows"].as_u64(),
                Some(rows),
                "{engine} {table} rows"
            );
        }
    }
    let keys: Vec<String> = {
        let path = format!("{}/schemas/labels.v2.json", env!("CARGO_MANIFEST_DIR"));
        let f: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        f["parquet_metadata_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect()
    };
    for reader in ["pyarrow", "duckdb"] {
        for (file, found) in v["kv"][reader].as_object().unwrap() {
            let found: Vec<&str> = found
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap())
                .collect();
            for key in &keys {
                assert!(found.contains(&key.as_str()), "{reader} {file}: no {key}");
            }
        }
    }
    // DuckDB's coverage from the files alone equals `firstkd stats`.
    let o = firstkd(&[
        "stats",
        store.to_str().unwrap(),
        "--report",
        "coverage",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let row = stats["coverage"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["positions"] == "in_loss" && r["source"].is_null() && r["split"].is_null())
        .unwrap();
    for (j, (ours, duck)) in row["mean_mass"]
        .as_array()
        .unwrap()
        .iter()
        .zip(v["duckdb_coverage"].as_array().unwrap())
        .enumerate()
    {
        let (a, b) = (ours.as_f64().unwrap(), duck.as_f64().unwrap());
        assert!(
            (a - b).abs() < 1e-6,
            "mass@{}: firstkd {a} vs DuckDB {b}",
            j + 1
        );
    }
}

#[test]
fn a_student_checkpoint_loads_with_safetensors_and_transformers_config() {
    let Some(store) = real_store() else { return };
    let teacher = teacher_path().unwrap();
    if python(&["safetensors", "numpy"]).is_none() {
        return;
    }
    let tmp = tempdir();
    let out = tmp.path().join("run");
    run_ok(&[
        "distill",
        "--store",
        store.to_str().unwrap(),
        "--init",
        &format!("teacher-layers:{}:0,29", teacher.display()),
        "--steps",
        "2",
        "--batch-tokens",
        "256",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    let fin = out.join("final");
    let code = format!(
        "import json, safetensors.numpy as st\n\
         w = st.load_file('{0}/model.safetensors')\n\
         cfg = json.load(open('{0}/config.json'))\n\
         res = {{'tensors': len(w), 'embed': list(w['model.embed_tokens.weight'].shape), 'model_type': cfg['model_type']}}\n\
         try:\n\
         \x20   import transformers\n\
         \x20   c = transformers.AutoConfig.from_pretrained('{0}')\n\
         \x20   res['config_class'] = type(c).__name__\n\
         \x20   res['layers'] = c.num_hidden_layers\n\
         except ImportError:\n\
         \x20   pass\n\
         print(json.dumps(res))\n",
        fin.display()
    );
    let o = Command::new("python3")
        .args(["-c", &code])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["model_type"], "llama");
    assert_eq!(v["embed"][0].as_u64(), Some(49152));
    assert!(v["tensors"].as_u64().unwrap() >= 2 * 9 + 2, "{v}");
    if v.get("config_class").is_some() {
        assert_eq!(v["config_class"], "LlamaConfig");
        assert_eq!(v["layers"].as_u64(), Some(2));
    } else {
        assert!(
            !in_ci(),
            "transformers missing under CI (scripts/test.sh installs it)"
        );
    }
}

fn part_shas(dir: &Path) -> Vec<(String, String)> {
    Manifest::load(dir)
        .unwrap()
        .parts
        .iter()
        .flat_map(|p| {
            [
                (p.labels.file.clone(), p.labels.sha256.clone()),
                (p.samples.file.clone(), p.samples.sha256.clone()),
            ]
        })
        .collect()
}

#[test]
fn interrupted_export_and_split_resume_to_the_same_files() {
    let Some(store) = real_store() else { return };
    let tmp = tempdir();
    let s = store.to_str().unwrap();
    // Export: a run stopped after its first part (progress file, one part's file, a
    // half-written temporary file) finishes with the files of an uninterrupted run.
    let full = tmp.path().join("full");
    run_ok(&["export", s, full.to_str().unwrap()]);
    let cut = tmp.path().join("cut");
    run_ok(&["export", s, cut.to_str().unwrap()]);
    let done: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cut.join("firstkd_export.json")).unwrap())
            .unwrap();
    let first = done["files"][0]["file"].as_str().unwrap().to_string();
    for f in done["files"].as_array().unwrap().iter().skip(1) {
        std::fs::remove_file(cut.join(f["file"].as_str().unwrap())).unwrap();
    }
    std::fs::remove_file(cut.join("firstkd_export.json")).unwrap();
    let progress = serde_json::json!({ "options": done["options"], "parts_done": 1, "files": [done["files"][0]] });
    std::fs::write(
        cut.join(".firstkd_export_progress.json"),
        progress.to_string(),
    )
    .unwrap();
    std::fs::write(cut.join("data").join(".train-00001.parquet.tmp"), b"half").unwrap();
    let said = run_ok(&["export", s, cut.to_str().unwrap()]);
    assert!(said.contains("written"), "{said}");
    let files = |d: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(d.join("data"))
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        files(&cut),
        files(&full),
        "resumed export equals an uninterrupted one"
    );
    assert!(cut.join(&first).exists());
    assert!(!cut.join(".firstkd_export_progress.json").exists());

    // Split: one output left incomplete after its first part is finished by a rerun.
    let args = ["split", s, "--out"];
    let a = tmp.path().join("a");
    run_ok(&[args[0], args[1], args[2], a.to_str().unwrap()]);
    let b = tmp.path().join("b");
    run_ok(&[args[0], args[1], args[2], b.to_str().unwrap()]);
    let train = b.join("train");
    let mut m = Manifest::load(&train).unwrap();
    assert!(m.parts.len() >= 2, "want several parts");
    m.parts.truncate(1);
    m.complete = false;
    m.cursor = serde_json::json!({ "source_parts": 1 });
    m.save(&train).unwrap();
    run_ok(&[args[0], args[1], args[2], b.to_str().unwrap()]);
    for name in ["train", "valid", "test"] {
        assert_eq!(part_shas(&a.join(name)), part_shas(&b.join(name)), "{name}");
        assert!(verify(&b.join(name)).unwrap().is_clean());
    }
}

/// The first step's loss of `distill`, from its metrics file.
fn first_loss(run: &Path) -> f64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    line["loss"].as_f64().unwrap()
}

#[test]
fn online_kd_is_zero_for_the_teacher_itself_and_trains_a_smaller_student() {
    let Some(store) = real_store() else { return };
    let teacher = teacher_path().unwrap();
    let t = teacher.to_str().unwrap();
    let tmp = tempdir();
    let all: Vec<String> = (0..30).map(|i| i.to_string()).collect();
    let whole = format!("teacher-layers:{t}:{}", all.join(","));
    let run = tmp.path().join("self");
    let base = [
        "distill",
        "--store",
        store.to_str().unwrap(),
        "--loss",
        "online",
        "--teacher",
        t,
    ];
    let mut args = base.to_vec();
    args.extend([
        "--init",
        &whole,
        "--steps",
        "1",
        "--batch-tokens",
        "256",
        "--quiet",
    ]);
    args.extend(["--out", run.to_str().unwrap()]);
    run_ok(&args);
    let loss = first_loss(&run);
    assert!(loss.abs() < 1e-4, "KL of the teacher to itself: {loss}");
    // A 2-layer student: a real, finite loss that training lowers.
    let small = format!("teacher-layers:{t}:0,29");
    let run = tmp.path().join("small");
    let mut args = base.to_vec();
    args.extend([
        "--init",
        &small,
        "--steps",
        "6",
        "--batch-tokens",
        "256",
        "--lr",
        "1e-3",
    ]);
    args.extend(["--quiet", "--out", run.to_str().unwrap()]);
    run_ok(&args);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert!(
        losses.len() >= 6 && losses.iter().all(|l| l.is_finite() && *l > 0.01),
        "{losses:?}"
    );
    eprintln!("online KD: teacher vs itself {loss:.2e}; 2-layer student {losses:?}");
    // --loss online without a teacher, or a teacher without --loss online, is refused.
    let o = firstkd(&[
        "distill",
        "--store",
        store.to_str().unwrap(),
        "--loss",
        "online",
        "--init",
        &small,
        "--steps",
        "1",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("go together"),
        "{}",
        text(&o)
    );
}
