//! `firstkd label` end to end with the real SmolLM2-135M-Instruct teacher.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::AsArray;
use arrow::datatypes::{UInt32Type, UInt64Type};
use firstkd::schema::Table;
use firstkd::store::{verify, LabelColumn, Manifest, StoreReader};

use crate::util::{firstkd, label_rows as rows, teacher_path, tempdir, text};

fn data(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn label(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "label",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    firstkd(&args)
}

/// `--compute int16` / `int8` / `bf16`: recorded in the manifest, close to the f32 labels
/// (docs/benchmarks.md measures how close on a larger text), and never mixed with f32 labels
/// in one store.
#[test]
fn integer_compute_is_recorded_close_to_f32_and_never_mixed_into_an_f32_store() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    let f32_dir = tmp.path().join("f32");
    let input = data("text.jsonl");
    let o = label(&model, &f32_dir, &["--input", &input]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        Manifest::load(&f32_dir).unwrap().teacher.compute_dtype,
        "f32"
    );
    let a = rows(&f32_dir);
    assert!(a.len() > 50, "{} positions", a.len());
    // (mode, provenance prefix, least top-1 agreement, largest mean top-1 log-prob difference)
    for (mode, desc, min_agree, max_diff) in [
        ("int16", "int16 (w12a13, blocks of 64", 0.95, 0.02),
        ("int8", "int8 (w8a8, blocks of 64", 0.85, 0.2),
        ("bf16", "bf16 (bf16 weights", 0.9, 0.05),
    ] {
        let dir = tmp.path().join(mode);
        let o = label(&model, &dir, &["--input", &input, "--compute", mode]);
        assert!(o.status.success(), "{}", text(&o));
        let m = Manifest::load(&dir).unwrap();
        assert_eq!(m.teacher.compute_dtype, mode);
        assert!(
            m.teacher.compute_mode.starts_with(desc),
            "{}",
            m.teacher.compute_mode
        );
        verify(&dir).unwrap();
        let b = rows(&dir);
        assert_eq!(a.len(), b.len());
        let same_top1 = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.0 == y.0 && x.1 .2[0] == y.1 .2[0])
            .count();
        let mean_diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x.1 .3[0] - y.1 .3[0]).abs() as f64)
            .sum::<f64>()
            / a.len() as f64;
        let agree = same_top1 as f64 / a.len() as f64;
        assert!(
            agree >= min_agree,
            "{mode} top-1 agrees with f32 at {agree}"
        );
        assert!(
            mean_diff < max_diff,
            "{mode}: mean top-1 log-prob difference {mean_diff}"
        );
        assert!(mean_diff > 0.0, "{mode} labels are bit-identical to f32");
    }

    // Resuming the f32 store with int8 would mix two kinds of labels: refused, saying why.
    let o = label(&model, &f32_dir, &["--input", &input, "--compute", "int8"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("compute f32"), "{}", text(&o));
    assert_eq!(rows(&f32_dir), a);
}

/// `--pack`: sequences packed several to a row give the padded batches' labels, part by part
/// (the labelling thread runs a part ahead of the writer), and a row too short for the longest
/// sequence is refused before anything is written.
#[test]
fn packed_rows_label_like_padded_batches() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    let input = data("text.jsonl");
    let padded = tmp.path().join("padded");
    let o = label(&model, &padded, &["--input", &input, "--seq-len", "48"]);
    assert!(o.status.success(), "{}", text(&o));
    let a = rows(&padded);
    for extra in [
        &["--pack"][..],
        &["--pack", "200", "--part-sequences", "3"][..],
    ] {
        let dir = tmp.path().join(format!("packed{}", extra.len()));
        let mut args = vec!["--input", input.as_str(), "--seq-len", "48"];
        args.extend_from_slice(extra);
        let o = label(&model, &dir, &args);
        assert!(o.status.success(), "{extra:?}: {}", text(&o));
        verify(&dir).unwrap();
        let b = rows(&dir);
        assert_eq!(a.len(), b.len(), "{extra:?}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.0, y.0);
            assert_eq!(x.1 .2, y.1 .2, "{extra:?}: top-5 ids at {:?}", x.0);
            for (p, q) in x.1 .3.iter().zip(&y.1 .3) {
                assert!((p - q).abs() < 1e-3, "{extra:?} at {:?}: {p} vs {q}", x.0);
            }
        }
    }
    let dir = tmp.path().join("short-rows");
    let o = label(
        &model,
        &dir,
        &["--input", &input, "--seq-len", "48", "--pack", "20"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("packed rows of 20 tokens"),
        "{}",
        text(&o)
    );
    assert!(!Manifest::path(&dir).exists());
    let o = label(&model, &dir, &["--input", &input, "--pack", "lots"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn labels_every_input_kind_into_a_valid_store() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    for (name, file, format) in [
        ("chat", "chat.jsonl", "auto"),
        ("mc", "mc.jsonl", "mc"),
        ("text", "text.jsonl", "text"),
    ] {
        let out = tmp.path().join(name);
        let o = label(
            &model,
            &out,
            &[
                "--input",
                &data(file),
                "--format",
                format,
                "--seq-len",
                "64",
            ],
        );
        assert!(o.status.success(), "{name}: {}", text(&o));
        let report = verify(&out).unwrap();
        assert!(report.is_clean(), "{name}: {:?}", report.problems);
        let m = Manifest::load(&out).unwrap();
        assert!(m.complete);
        assert_eq!(m.tokenizer.vocab_size, 49152);
        assert_eq!(m.teacher.file_name, "SmolLM2-135M-Instruct.Q4_1.gguf");
        assert_eq!(m.teacher.sha256.len(), 64);
        let loss = m.in_loss_rows();
        let all = m.rows(Table::Labels);
        match name {
            // Prompt tokens are labelled but out of the loss.
            "chat" | "mc" => assert!(loss > 0 && loss < all, "{name}: {loss} of {all} in loss"),
            _ => assert!(loss > 0),
        }
        if name == "mc" {
            // Letter responses: " B<|im_end|>"-style short responses, a few in-loss rows per record.
            assert!(loss <= 3 * 3, "mc in-loss rows {loss}");
        }
    }
}

/// Top-1 (and the top-5 log-probs) of the store agree with an independent HF transformers fp32
/// computation on the same GGUF: ../shared/reference/smollm2_reference.json, made by
/// ../shared/reference/make_smollm2_reference.py. First 6 positions of its first text pasted here.
#[test]
fn store_agrees_with_independent_reference() {
    let Some(model) = teacher_path() else { return };
    let ref_ids: [u32; 24] = [
        504, 3575, 282, 4649, 314, 7042, 30, 4643, 36411, 418, 582, 3822, 5027, 20590, 418, 3426,
        1106, 28, 284, 3908, 34294, 418, 6708, 30,
    ];
    let ref_topk: [[u32; 5]; 6] = [
        [29, 28, 198, 79, 506],
        [282, 2240, 1005, 314, 1847],
        [260, 4649, 7476, 4754, 4617],
        [314, 28, 5721, 25, 30],
        [7042, 260, 4528, 2250, 1315],
        [30, 28, 284, 365, 1270],
    ];
    let ref_lp: [[f32; 5]; 6] = [
        [-0.86549, -2.65324, -3.15153, -3.30409, -3.5206],
        [-0.3376, -2.31955, -3.11377, -4.34503, -5.04877],
        [-2.18448, -2.43866, -3.48546, -3.62229, -3.62336],
        [-0.45094, -2.43846, -2.5222, -3.54469, -3.58115],
        [-0.25807, -2.74074, -4.38436, -4.61987, -4.67782],
        [-0.38012, -1.6585, -2.99541, -4.45165, -4.50598],
    ];
    let tmp = tempdir();
    let input = tmp.path().join("ref.jsonl");
    std::fs::write(&input, "{\"text\": \"The capital of France is Paris. Water boils at one hundred degrees Celsius at sea level, and ice melts at zero.\"}\n").unwrap();
    let out = tmp.path().join("store");
    let o = label(
        &model,
        &out,
        &["--input", input.to_str().unwrap(), "--dtype", "float32"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let reader = StoreReader::open(&out).unwrap();
    let samples: Vec<_> = reader
        .batches(Table::Samples, Some(&["input_ids"]), 10)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let ids = samples[0].column(0).as_list::<i32>().value(0);
    assert_eq!(
        ids.as_primitive::<UInt32Type>().values().to_vec(),
        ref_ids.to_vec()
    );
    let rows = rows(&out);
    assert_eq!(rows.len(), 23);
    for (p, (ids, lps)) in ref_topk.iter().zip(&ref_lp).enumerate() {
        let (_, (_, _, got_ids, got_lps, _, _)) = &rows[p];
        assert_eq!(got_ids[0], ids[0], "top-1 at position {p}");
        for j in 0..5 {
            assert!(
                (got_lps[j] - lps[j]).abs() < 2e-3,
                "position {p} rank {j}: {} vs {}",
                got_lps[j],
                lps[j]
            );
        }
    }
}

#[test]
fn resume_after_kill_equals_uninterrupted_run_and_shards_union() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    let input = data("chat.jsonl");
    let common = [
        "--input",
        input.as_str(),
        "--part-sequences",
        "1",
        "--dtype",
        "float32",
    ];
    let full = tmp.path().join("full");
    let o = label(&model, &full, &common);
    assert!(o.status.success(), "{}", text(&o));

    // Start, wait for the first committed part, kill -9, rerun the same command.
    let killed = tmp.path().join("killed");
    let mut args = vec![
        "label",
        "--model",
        model.to_str().unwrap(),
        "--out",
        killed.to_str().unwrap(),
    ];
    args.extend_from_slice(&common);
    let mut child = Command::new(env!("CARGO_BIN_EXE_firstkd"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let parts = Manifest::load(&killed).map(|m| m.parts.len()).unwrap_or(0);
        if parts >= 1 || start.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let m = Manifest::load(&killed).unwrap();
    assert!(
        !m.complete,
        "killed before the end (4 sequences, 1 per part)"
    );
    let o = firstkd(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("already labelled (resumed)"),
        "{}",
        text(&o)
    );
    assert!(verify(&killed).unwrap().is_clean());
    assert_eq!(rows(&killed), rows(&full));
    // Same input and model: identical label files.
    let sums = |d: &Path| {
        Manifest::load(d)
            .unwrap()
            .parts
            .iter()
            .map(|p| p.labels.sha256.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(sums(&killed), sums(&full));

    // Two shards, one after the other, into one store equal the single run; the store is
    // committed by the second (tests/it/scale.rs runs them at the same time).
    let sharded = tmp.path().join("sharded");
    for shard in ["0/2", "1/2"] {
        let mut a = common.to_vec();
        a.extend_from_slice(&["--shard", shard]);
        let o = label(&model, &sharded, &a);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(Manifest::path(&sharded).exists(), shard == "1/2");
    }
    assert!(verify(&sharded).unwrap().is_clean());
    assert_eq!(rows(&sharded), rows(&full));
    // The unsharded command finds the committed store complete.
    let o = label(&model, &sharded, &common);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("already complete"), "{}", text(&o));
}

#[test]
fn bad_input_fails_cleanly_without_a_store() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"broken\"\n",
    )
    .unwrap();
    let out = tmp.path().join("store");
    let o = label(&model, &out, &["--input", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let t = text(&o);
    assert!(
        t.contains("bad.jsonl:2") && t.contains("malformed JSON"),
        "{t}"
    );
    assert!(!t.contains("panicked"));
    assert!(
        !out.join("manifest.json").exists(),
        "no store is written when an input is invalid"
    );

    // Skipping invalid records is explicit and counted.
    let o = label(
        &model,
        &out,
        &["--input", bad.to_str().unwrap(), "--skip-invalid"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("skipped 1 invalid records"),
        "{}",
        text(&o)
    );
    assert!(verify(&out).unwrap().is_clean());

    // Longer than the allowed context, empty record, missing file, unknown model file.
    let long = tmp.path().join("long.jsonl");
    std::fs::write(
        &long,
        format!(
            "{{\"prompt\": \"{}\", \"response\": \"x\"}}\n",
            "word ".repeat(300)
        ),
    )
    .unwrap();
    let o = label(
        &model,
        &tmp.path().join("s2"),
        &[
            "--input",
            long.to_str().unwrap(),
            "--max-len",
            "128",
            "--seq-len",
            "64",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("long.jsonl:1"), "{}", text(&o));
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "{\"text\": \"\"}\n").unwrap();
    let o = label(
        &model,
        &tmp.path().join("s3"),
        &["--input", empty.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("empty.jsonl:1"), "{}", text(&o));
    let o = label(
        &model,
        &tmp.path().join("s4"),
        &["--input", "/no/such/file.jsonl"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("/no/such/file.jsonl"), "{}", text(&o));
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf").unwrap();
    let o = label(
        &junk,
        &tmp.path().join("s5"),
        &["--input", &data("chat.jsonl")],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("junk.gguf"), "{}", text(&o));
}

/// Every report works on a store labelled by the real teacher: sql, stats (with plots),
/// calibrate.
#[test]
fn reports_work_on_a_real_teacher_store() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    let out = tmp.path().join("store");
    let o = label(
        &model,
        &out,
        &["--input", &data("chat.jsonl"), "--input", &data("mc.jsonl")],
    );
    assert!(o.status.success(), "{}", text(&o));
    let m = Manifest::load(&out).unwrap();
    let store = out.to_str().unwrap();

    let o = firstkd(&[
        "sql",
        store,
        "SELECT count(*) AS n, sum(CAST(in_loss AS INT)) AS l FROM labels",
        "--format",
        "csv",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let csv = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(
        csv.lines().nth(1),
        Some(format!("{},{}", m.rows(Table::Labels), m.in_loss_rows()).as_str()),
        "{csv}"
    );

    let plots = tmp.path().join("plots");
    let o = firstkd(&["stats", store, "--json", "--plot", plots.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["coverage"].is_object() && v["calibration"].is_object(),
        "{v}"
    );
    for f in ["reliability.svg", "coverage.svg"] {
        let svg = std::fs::read_to_string(plots.join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<title>"), "{f}");
    }
    let coverage = std::fs::read_to_string(plots.join("coverage.svg")).unwrap();
    assert!(
        coverage.contains(&format!("(n = {})", m.in_loss_rows())),
        "histogram counts every in-loss position"
    );

    let o = firstkd(&["calibrate", store, "--held-out-fraction", "0.5", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = Manifest::load(&out)
        .unwrap()
        .temperature
        .expect("temperature written")
        .value;
    assert!(t.is_finite() && t > 0.0);
    assert!(verify(&out).unwrap().is_clean());
}

/// `--limit N` labels only the first N records of each input, and the setting is part of the
/// store's labelling provenance.
#[test]
fn limit_reads_only_the_first_records() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    let out = tmp.path().join("store");
    let o = label(
        &model,
        &out,
        &["--input", &data("chat.jsonl"), "--limit", "2"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let reader = StoreReader::open(&out).unwrap();
    let batches: Vec<_> = reader
        .batches(Table::Samples, Some(&["record_index"]), 100)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let records: Vec<u64> = batches
        .iter()
        .flat_map(|b| b.column(0).as_primitive::<UInt64Type>().values().to_vec())
        .collect();
    assert_eq!(records, vec![0, 1]);
    assert_eq!(reader.manifest().labeling["limit_records"], 2);
}

/// `--select top-p:P,max=K` and `--select sample:N` with the real teacher: recorded in the
/// manifest, verified, readable by SQL, the draws identical on a second run (seeded per
/// position), and refused where a command cannot use them yet.
#[test]
fn top_p_and_sampled_selections_label_verify_and_repeat_exactly() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    let input = data("text.jsonl");
    let topk = tmp.path().join("topk");
    let o = label(&model, &topk, &["--input", &input, "--dtype", "float32"]);
    assert!(o.status.success(), "{}", text(&o));
    let reference = rows(&topk);

    let top_p = tmp.path().join("top-p");
    let o = label(
        &model,
        &top_p,
        &["--input", &input, "--select", "top-p:0.8,max=12"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let m = Manifest::load(&top_p).unwrap();
    assert_eq!(m.selection().to_string(), "top-p:0.8,max=12");
    assert_eq!(m.k, 12);
    assert!(
        verify(&top_p).unwrap().is_clean(),
        "{:?}",
        verify(&top_p).unwrap()
    );
    let got = rows(&top_p);
    assert_eq!(got.len(), reference.len());
    let (mut short, mut long) = (0, 0);
    for (a, b) in got.iter().zip(&reference) {
        assert_eq!(a.0, b.0);
        let n = a.1 .2.len();
        assert!((1..=12).contains(&n));
        // Same leading ids as top-5 where both have them (ties aside), same target.
        assert_eq!(a.1 .0, b.1 .0);
        assert_eq!(a.1 .2[0], b.1 .2[0]);
        let mass: f64 = a.1 .3.iter().map(|&l| f64::from(l).exp()).sum();
        assert!(mass >= 0.8 - 12e-3 || n == 12, "{mass} with {n} entries");
        if n < 5 {
            short += 1;
        }
        if n > 5 {
            long += 1;
        }
    }
    assert!(
        short > 0 && long > 0,
        "lists of several lengths: {short} short, {long} long"
    );

    let sampled = tmp.path().join("sampled");
    let again = tmp.path().join("sampled-again");
    for dir in [&sampled, &again] {
        let o = label(
            &model,
            dir,
            &["--input", &input, "--select", "sample:16,t=1,seed=3"],
        );
        assert!(o.status.success(), "{}", text(&o));
    }
    assert!(
        verify(&sampled).unwrap().is_clean(),
        "{:?}",
        verify(&sampled).unwrap()
    );
    let counts = |dir: &Path| -> Vec<Vec<u16>> {
        let reader = StoreReader::open(dir).unwrap();
        let mut out = Vec::new();
        for r in reader.label_rows(&[LabelColumn::TopkIds, LabelColumn::TopkCounts], 4096) {
            let r = r.unwrap();
            for i in 0..r.len() {
                assert_eq!(r.counts(i).len(), r.ids(i).len());
                out.push(r.counts(i).to_vec());
            }
        }
        out
    };
    let c = counts(&sampled);
    assert!(c
        .iter()
        .all(|row| row.iter().map(|&x| u32::from(x)).sum::<u32>() == 16));
    assert_eq!(rows(&sampled), rows(&again), "same seed, same draws");
    assert_eq!(c, counts(&again));
    // SQL sees the draws; the tokens view works on variable-length lists.
    for query in [
        "SELECT count(*), min(cardinality(topk_counts)), max(cardinality(topk_ids)) FROM labels",
        "SELECT avg(tail_mass), avg(topk_mass), sum(CAST(target_in_topk AS INT)) FROM tokens",
    ] {
        let o = firstkd(&["sql", sampled.to_str().unwrap(), query, "--format", "csv"]);
        assert!(o.status.success(), "{query}: {}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        let values: Vec<f64> = out
            .lines()
            .nth(1)
            .unwrap()
            .split(',')
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(
            values.iter().all(|v| v.is_finite() && *v >= 0.0),
            "{query}: {out}"
        );
    }
    // The samples + labels join keeps variable-length lists and their counts in step.
    let reader = StoreReader::open(&sampled).unwrap();
    let cols = [
        LabelColumn::TopkIds,
        LabelColumn::TopkLogprobs,
        LabelColumn::TopkCounts,
    ];
    let (mut joined_ids, mut joined_counts) = (Vec::new(), Vec::new());
    for s in reader.labelled_samples(&cols, |_| true) {
        let s = s.unwrap();
        for i in 0..s.labels.len() {
            joined_ids.push(s.labels.ids(i).to_vec());
            joined_counts.push(s.labels.counts(i).to_vec());
        }
    }
    let direct: Vec<Vec<u32>> = rows(&sampled).into_iter().map(|r| r.1 .2).collect();
    assert_eq!(joined_ids, direct);
    assert_eq!(joined_counts, c);
    // convert rewrites a sampled store (2.0 -> 2.0) with the same rows and draws.
    let copy = tmp.path().join("sampled-copy");
    let o = firstkd(&[
        "convert",
        sampled.to_str().unwrap(),
        "--out",
        copy.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(rows(&copy), rows(&sampled));
    assert_eq!(counts(&copy), c);
    // The trainer refuses top-token losses on draws (before any model is loaded) and trains
    // the sampled loss; the draws are not storable in the fixed-length 1.0 layout.
    let init = format!("teacher-layers:{}:0,1", model.display());
    let store = sampled.to_str().unwrap();
    let distill = |loss: &str, steps: &str| {
        let out = tmp.path().join(format!("run-{loss}"));
        firstkd(&[
            "distill",
            "--store",
            store,
            "--init",
            &init,
            "--loss",
            loss,
            "--steps",
            steps,
            "--batch-tokens",
            "128",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let o = distill("kd", "1");
    assert!(!o.status.success());
    assert!(text(&o).contains("--loss sampled"), "{}", text(&o));
    let o = distill("sampled", "2");
    assert!(o.status.success(), "{}", text(&o));
    let o = firstkd(&[
        "convert",
        sampled.to_str().unwrap(),
        "--out",
        tmp.path().join("f16").to_str().unwrap(),
        "--dtype",
        "float16",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("quantized log-prob layout"),
        "{}",
        text(&o)
    );
    let o = label(
        &model,
        &tmp.path().join("x"),
        &[
            "--input",
            &input,
            "--select",
            "top-p:0.8,max=12",
            "--dtype",
            "float16",
        ],
    );
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("needs the quantized log-prob layout") && t.contains("pass --dtype quantized"),
        "{t}"
    );
}

#[test]
fn an_empty_input_is_an_error_unless_allowed() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let out = tmp.path().join("store");
    let o = label(&model, &out, &["--input", empty.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("empty.jsonl") && t.contains("no sequence to label"),
        "{t}"
    );
    assert!(!out.join("manifest.json").exists(), "nothing is written");
    let o = label(
        &model,
        &out,
        &["--input", empty.to_str().unwrap(), "--allow-empty"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let m = Manifest::load(&out).unwrap();
    assert!(m.complete && m.parts.is_empty());
}

#[test]
fn a_second_writer_of_the_same_store_is_refused_and_a_dead_ones_lock_does_not_block() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    let input = data("chat.jsonl");
    let out = tmp.path().join("store");
    // This test process plays the running writer: it holds the store's writer lock.
    std::fs::create_dir_all(&out).unwrap();
    let lock = std::fs::File::create(out.join("writer.lock")).unwrap();
    lock.try_lock().unwrap();
    let o = label(&model, &out, &["--input", input.as_str()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("another firstkd process (`label` or `calibrate`) is writing it now"),
        "{}",
        text(&o)
    );
    assert!(!out.join("manifest.json").exists());
    // The same for one shard of a sharded store; other shards are not blocked by it.
    let shard_lock = out.join("shards").join("00001-of-00002.lock");
    std::fs::create_dir_all(shard_lock.parent().unwrap()).unwrap();
    let sharded = std::fs::File::create(&shard_lock).unwrap();
    sharded.try_lock().unwrap();
    drop(lock);
    std::fs::remove_file(out.join("writer.lock")).unwrap();
    let o = label(&model, &out, &["--input", input.as_str(), "--shard", "1/2"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = label(&model, &out, &["--input", input.as_str(), "--shard", "0/2"]);
    assert!(o.status.success(), "{}", text(&o));
    // A writer that died (here: the lock's holder closed it) leaves a file that blocks nobody.
    drop(sharded);
    let o = label(&model, &out, &["--input", input.as_str(), "--shard", "1/2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("all 2 shards complete"), "{}", text(&o));
    assert!(verify(&out).unwrap().is_clean());
}
