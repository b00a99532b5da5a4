//! Store format 2.0 (the quantized layout): bounds against float32, lossless round trips
//! through `convert`, the same SQL answers, and readers other than firstkd (pyarrow, DuckDB,
//! polars, Spark) decoding it with the documented steps.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use firstkd::schema::LogprobDtype;
use firstkd::store::{convert, verify, LabelColumn, LabelRows, StoreReader};

use crate::util::{firstkd, in_ci, small_store, tempdir, text};

fn all_rows(dir: &Path) -> Vec<LabelRows> {
    StoreReader::open(dir)
        .unwrap()
        .label_rows(&LabelColumn::ALL, 100_000)
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// (id -> probability) of row `i`.
fn probs(rows: &LabelRows, i: usize) -> HashMap<u32, f64> {
    rows.ids(i)
        .iter()
        .zip(rows.logprobs(i))
        .map(|(&id, &lp)| (id, f64::from(lp).exp()))
        .collect()
}

#[test]
fn quantized_store_is_within_its_bounds_of_float32_and_round_trips_losslessly() {
    let tmp = tempdir();
    let (f32_dir, _) = small_store(tmp.path(), "f32", LogprobDtype::Float32);
    let q_dir = tmp.path().join("q");
    convert(&f32_dir, &q_dir, LogprobDtype::Quantized, |_, _| {}).unwrap();
    let m = StoreReader::open(&q_dir).unwrap().manifest().clone();
    assert_eq!(m.schema_version, "2.0");
    assert!(
        verify(&q_dir).unwrap().is_clean(),
        "{:?}",
        verify(&q_dir).unwrap()
    );

    let (exact, quant) = (all_rows(&f32_dir), all_rows(&q_dir));
    let (exact, quant) = (&exact[0], &quant[0]);
    assert_eq!(exact.len(), quant.len());
    let (mut worst_p, mut worst_tail, mut worst_h, mut worst_t) = (0f64, 0f64, 0f32, 0f32);
    let mut zeros = 0;
    for i in 0..exact.len() {
        assert_eq!(exact.sample_id[i], quant.sample_id[i]);
        assert_eq!(exact.position[i], quant.position[i]);
        assert_eq!(exact.target_id[i], quant.target_id[i], "row {i}");
        assert_eq!(exact.in_loss[i], quant.in_loss[i]);
        let (a, b) = (probs(exact, i), probs(quant, i));
        let mut ids_a: Vec<_> = a.keys().collect();
        let mut ids_b: Vec<_> = b.keys().collect();
        ids_a.sort();
        ids_b.sort();
        assert_eq!(ids_a, ids_b, "row {i}: ids are lossless");
        for (id, p) in &a {
            worst_p = worst_p.max((p - b[id]).abs());
        }
        let tail = |m: &HashMap<u32, f64>| 1.0 - m.values().sum::<f64>();
        worst_tail = worst_tail.max((tail(&a) - tail(&b)).abs());
        zeros += b.values().filter(|&&p| p < 1e-5).count();
        // Descending stored probability, ties by id.
        let lps = quant.logprobs(i);
        let ids = quant.ids(i);
        for j in 1..lps.len() {
            assert!(lps[j - 1] > lps[j] || (lps[j - 1] == lps[j] && ids[j - 1] < ids[j]));
        }
        worst_h = worst_h.max((exact.entropy[i] - quant.entropy[i]).abs());
        let in_list = ids.iter().position(|&t| t == quant.target_id[i]);
        match in_list {
            Some(j) => assert_eq!(quant.target_logprob[i], lps[j]),
            None => {
                worst_t = worst_t.max((exact.target_logprob[i] - quant.target_logprob[i]).abs())
            }
        }
    }
    assert!(
        worst_p > 0.0 && worst_p <= 1.0 / 1024.0 + 1e-6,
        "probability error {worst_p}"
    );
    assert!(worst_tail <= 0.5 / 1024.0 + 1e-6, "tail error {worst_tail}");
    assert!(worst_h <= 0.5 / 64.0 + 1e-5, "entropy error {worst_h}");
    assert!(
        worst_t <= 0.5 / 256.0 + 1e-5,
        "target log-prob error {worst_t}"
    );
    println!("max errors: p {worst_p:.2e} tail {worst_tail:.2e} entropy {worst_h:.2e} target {worst_t:.2e}; {zeros} entries below a step");

    // 2.0 -> float32 1.0 -> 2.0 gives back exactly the same rows (and files of the same size).
    let back = tmp.path().join("back");
    let again = tmp.path().join("again");
    convert(&q_dir, &back, LogprobDtype::Float32, |_, _| {}).unwrap();
    convert(&back, &again, LogprobDtype::Quantized, |_, _| {}).unwrap();
    assert!(
        verify(&back).unwrap().is_clean(),
        "{:?}",
        verify(&back).unwrap()
    );
    assert_eq!(all_rows(&q_dir)[0].topk_ids, all_rows(&again)[0].topk_ids);
    let (r1, r2) = (all_rows(&q_dir), all_rows(&again));
    for (a, b) in r1.iter().zip(&r2) {
        assert_eq!(a.topk_logprobs, b.topk_logprobs);
        assert_eq!(a.target_logprob, b.target_logprob);
        assert_eq!(a.entropy, b.entropy);
        assert_eq!(a.target_id, b.target_id);
    }
    let ma = StoreReader::open(&again).unwrap().manifest().clone();
    for (p, q) in m.parts.iter().zip(&ma.parts) {
        assert_eq!(
            p.labels.sha256, q.labels.sha256,
            "same bytes after a round trip"
        );
    }

    // Smaller than both 1.0 layouts.
    let f16_dir = tmp.path().join("f16");
    convert(&f32_dir, &f16_dir, LogprobDtype::Float16, |_, _| {}).unwrap();
    let bytes = |d: &Path| {
        StoreReader::open(d)
            .unwrap()
            .manifest()
            .bytes(firstkd::schema::Table::Labels)
    };
    assert!(
        bytes(&q_dir) < bytes(&f16_dir),
        "{} vs {}",
        bytes(&q_dir),
        bytes(&f16_dir)
    );
}

#[test]
fn sql_answers_the_same_on_a_quantized_store_and_convert_refuses_bad_targets() {
    let tmp = tempdir();
    let (f32_dir, _) = small_store(tmp.path(), "f32", LogprobDtype::Float32);
    let q_dir = tmp.path().join("q");
    let out = firstkd(&[
        "convert",
        f32_dir.to_str().unwrap(),
        "--out",
        q_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("quantized 2.0"), "{}", text(&out));
    let query = "SELECT count(*) AS n, sum(CAST(target_id AS BIGINT)) AS t, \
                 sum(CAST(target_in_topk AS BIGINT)) AS hits, sum(CAST(in_loss AS BIGINT)) AS l, \
                 round(avg(topk_mass), 3) AS mass, round(avg(entropy), 2) AS h \
                 FROM tokens";
    let answer = |dir: &Path| {
        let out = firstkd(&["sql", dir.to_str().unwrap(), query, "--format", "csv"]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(answer(&f32_dir), answer(&q_dir));
    // Converting into the source itself or into a non-empty directory is refused.
    let out = firstkd(&[
        "convert",
        q_dir.to_str().unwrap(),
        "--out",
        q_dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let out = firstkd(&[
        "convert",
        q_dir.to_str().unwrap(),
        "--out",
        f32_dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
}

/// Runs scripts/read_store.py; None (skip) when the engine's Python package is missing
/// outside CI.
fn external(store: &Path, engine: &str) -> Option<serde_json::Value> {
    let root = env!("CARGO_MANIFEST_DIR");
    let module = match engine {
        "spark" => "pyspark",
        other => other,
    };
    let has = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    let java = engine != "spark"
        || Command::new("java")
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !has || !java {
        let what = if has {
            "java is not installed"
        } else {
            "python3 cannot import it"
        };
        assert!(
            !in_ci(),
            "{engine}: {what} under CI (scripts/test.sh installs both)"
        );
        eprintln!("skipping {engine}: {what}");
        return None;
    }
    let out = Command::new("python3")
        .args([
            &format!("{root}/scripts/read_store.py"),
            store.to_str().unwrap(),
            "--engine",
            engine,
            "--summary",
        ])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{engine}: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    Some(serde_json::from_str(line).unwrap())
}

#[test]
fn pyarrow_duckdb_polars_and_spark_decode_a_quantized_store_as_firstkd_does() {
    let tmp = tempdir();
    let (f32_dir, _) = small_store(tmp.path(), "f32", LogprobDtype::Float32);
    let q_dir = tmp.path().join("q");
    convert(&f32_dir, &q_dir, LogprobDtype::Quantized, |_, _| {}).unwrap();
    let query = "SELECT count(*) AS rows, sum(CAST(target_id AS BIGINT)) AS target_sum, \
                 sum(CAST(in_loss AS INT)) AS in_loss, avg(exp(topk_logprobs[1])) AS top1_prob, \
                 avg(target_logprob) AS target_logprob, avg(entropy) AS entropy FROM labels";
    let out = firstkd(&["sql", q_dir.to_str().unwrap(), query, "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ours: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    for engine in ["pyarrow", "duckdb", "polars", "spark"] {
        let Some(theirs) = external(&q_dir, engine) else {
            continue;
        };
        for key in ["rows", "target_sum", "in_loss"] {
            assert_eq!(
                theirs[key].as_i64(),
                ours[key].as_i64(),
                "{engine} {key}: {theirs} vs {ours}"
            );
        }
        for key in ["top1_prob", "target_logprob", "entropy"] {
            let (a, b) = (theirs[key].as_f64().unwrap(), ours[key].as_f64().unwrap());
            assert!((a - b).abs() < 1e-6, "{engine} {key}: {a} vs {b}");
        }
    }
}
