//! The real binary: exit codes, messages, JSON output, and the store read by pyarrow.

use std::process::Command;

use firstkd::schema::LogprobDtype;

use crate::util::{firstkd, in_ci, small_store, tempdir, text};

#[test]
fn synth_verify_inspect() {
    let tmp = tempdir();
    let dir = tmp.path().join("store");
    let d = dir.to_str().unwrap();
    let out = firstkd(&[
        "synth",
        d,
        "--rows",
        "3000",
        "--part-rows",
        "1000",
        "--seed",
        "3",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = firstkd(&["verify", d]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).starts_with("ok: 3 part(s)"), "{}", text(&out));
    let out = firstkd(&["inspect", d]);
    assert!(out.status.success());
    let t = text(&out);
    assert!(
        t.contains("bytes/token") && t.contains("label rows") && t.contains("not fitted"),
        "{t}"
    );
    let out = firstkd(&["inspect", "--json", d]);
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("inspect --json is JSON");
    assert_eq!(json["manifest"]["k"], 5);
    assert_eq!(json["manifest"]["logprob_dtype"], "quantized");
    assert_eq!(json["manifest"]["schema_version"], "2.0");
    assert!(json["label_rows"].as_u64().unwrap() >= 3000);
    assert!(json["labels_bytes_per_token"].as_f64().unwrap() > 0.0);
}

#[test]
fn verify_lists_problems_and_exits_non_zero() {
    let tmp = tempdir();
    let (dir, m) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    std::fs::remove_file(dir.join(&m.parts[0].labels.file)).unwrap();
    std::fs::write(dir.join("labels/stray.parquet"), b"junk").unwrap();
    let out = firstkd(&["verify", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("labels/part-00000.parquet: missing"), "{t}");
    assert!(t.contains("labels/stray.parquet: extra file"), "{t}");
    assert!(t.contains("2 problem(s) found"), "{t}");
    let out = firstkd(&["verify", "--json", dir.to_str().unwrap()]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["problems"].as_array().unwrap().len(), 2);
}

#[test]
fn bad_paths_fail_cleanly() {
    let out = firstkd(&["inspect", "/nonexistent/store"]);
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    assert!(
        t.contains("/nonexistent/store") && t.contains("not a firstkd store"),
        "{t}"
    );
    assert!(!t.contains("panicked"), "{t}");
    let out = firstkd(&["verify", "/nonexistent/store"]);
    assert_eq!(out.status.code(), Some(1));
    let tmp = tempdir();
    std::fs::write(tmp.path().join("x"), "x").unwrap();
    let out = firstkd(&["synth", tmp.path().to_str().unwrap(), "--rows", "10"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("not empty"));
    let out = firstkd(&[
        "synth",
        tmp.path().join("y").to_str().unwrap(),
        "--dtype",
        "int8",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    assert!(
        t.contains("invalid value 'int8' for '--dtype") && t.contains("float16, float32"),
        "{t}"
    );
}

/// The documented columns and metadata are visible to pyarrow (and DuckDB when installed).
#[test]
fn parts_open_in_pyarrow() {
    let have = |module: &str| {
        Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !have("pyarrow") {
        assert!(
            !in_ci(),
            "pyarrow is required under CI (.ci/run installs it)"
        );
        eprintln!("skipping: python3 pyarrow not installed (pip install pyarrow)");
        return;
    }
    let tmp = tempdir();
    let (dir, m) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let script = r#"
import json, sys
import pyarrow.parquet as pq
store = sys.argv[1]
m = json.load(open(store + "/manifest.json"))
labels = pq.read_table(store + "/" + m["parts"][0]["labels"]["file"])
samples = pq.read_table(store + "/" + m["parts"][0]["samples"]["file"])
md = pq.read_metadata(store + "/" + m["parts"][0]["labels"]["file"]).metadata
out = {
  "labels_columns": labels.column_names,
  "samples_columns": samples.column_names,
  "topk_ids_type": str(labels.schema.field("topk_ids").type),
  "topk_logprobs_type": str(labels.schema.field("topk_logprobs").type),
  "rows": labels.num_rows,
  "first_ids": labels.column("topk_ids")[0].as_py(),
  "meta": {k.decode(): v.decode() for k, v in md.items() if k.decode().startswith("firstkd.")},
  "compression": pq.ParquetFile(store + "/" + m["parts"][0]["labels"]["file"]).metadata.row_group(0).column(0).compression,
}
try:
    import duckdb
    con = duckdb.connect()
    row = con.execute(f"select count(*), sum(topk_logprobs[1]) from read_parquet('{store}/labels/*.parquet')").fetchall()[0]
    out["duckdb_rows"] = row[0]
    out["duckdb_top1_sum"] = row[1]
except ImportError:
    pass
print(json.dumps(out))
"#;
    let out = Command::new("python3")
        .args(["-c", script, dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cols: Vec<&str> = v["labels_columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        cols,
        [
            "sample_id",
            "position",
            "target_id",
            "in_loss",
            "topk_ids",
            "topk_logprobs",
            "target_logprob",
            "entropy"
        ]
    );
    let cols: Vec<&str> = v["samples_columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        cols,
        [
            "sample_id",
            "source",
            "split",
            "record_index",
            "window_index",
            "input_ids",
            "prompt_len",
            "num_positions"
        ]
    );
    assert_eq!(
        v["topk_ids_type"],
        "fixed_size_list<item: uint32 not null>[5]"
    );
    assert_eq!(
        v["topk_logprobs_type"],
        "fixed_size_list<item: halffloat not null>[5]"
    );
    assert_eq!(v["rows"].as_u64().unwrap(), m.parts[0].labels.rows);
    assert_eq!(v["first_ids"].as_array().unwrap().len(), 5);
    assert_eq!(v["compression"], "ZSTD");
    assert_eq!(v["meta"]["firstkd.schema_version"], "1.0");
    assert_eq!(v["meta"]["firstkd.table"], "labels");
    assert_eq!(v["meta"]["firstkd.k"], "5");
    assert_eq!(v["meta"]["firstkd.logprob_dtype"], "float16");
    for key in firstkd::schema::meta_keys::ALL {
        assert!(v["meta"].get(key).is_some(), "missing {key}");
    }
    if let Some(rows) = v.get("duckdb_rows") {
        assert_eq!(
            rows.as_u64().unwrap(),
            m.rows(firstkd::schema::Table::Labels)
        );
        // DuckDB decodes the float16 log-probs: the sum of top-1 log-probs is negative.
        assert!(v["duckdb_top1_sum"].as_f64().unwrap() < 0.0, "{v}");
    }
}

/// calibrate fits T > 1 for an over-confident synthetic teacher, lowers held-out ECE, records it
/// in the manifest without touching the parts, and a calibrated teacher gets T near 1.
#[test]
fn calibrate_fits_and_records_temperature() {
    let tmp = tempdir();
    let dir = tmp.path().join("over");
    let d = dir.to_str().unwrap();
    let out = firstkd(&[
        "synth",
        d,
        "--rows",
        "40000",
        "--overconfidence",
        "2.0",
        "--seed",
        "5",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let before = firstkd::store::Manifest::load(&dir).unwrap();
    assert!(before.temperature.is_none());
    let out = firstkd(&["calibrate", d, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let fit: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = fit["fit"]["temperature"].as_f64().unwrap();
    assert!(t > 1.3, "over-confident teacher fitted T = {t}");
    let (ece0, ece1) = (
        fit["fit"]["before"]["ece"].as_f64().unwrap(),
        fit["fit"]["after"]["ece"].as_f64().unwrap(),
    );
    assert!(ece1 < ece0 / 2.0, "ECE {ece0} -> {ece1}");
    assert_eq!(fit["fitted_on"]["rule"], "split = \"valid\"");
    let after = firstkd::store::Manifest::load(&dir).unwrap();
    let temp = after.temperature.as_ref().expect("temperature recorded");
    assert!((temp.value - t).abs() < 1e-12);
    assert_eq!(temp.objective, firstkd::calibration::FitObjective::Ece);
    assert_eq!(
        temp.mode(),
        firstkd::calibration::TemperatureMode::Renormalized
    );
    assert_eq!(after.parts, before.parts, "parts are not rewritten");
    assert_eq!(firstkd(&["verify", d]).status.code(), Some(0));
    let shown = text(&firstkd(&["inspect", d]));
    assert!(
        shown.contains(&format!("temperature      {t:.4}")),
        "{shown}"
    );

    // Held-out ECE on data the fit did not see: a second store from another seed.
    let other = tmp.path().join("other");
    firstkd(&[
        "synth",
        other.to_str().unwrap(),
        "--rows",
        "40000",
        "--overconfidence",
        "2.0",
        "--seed",
        "6",
    ]);
    let report = |temp: f64| -> f64 {
        let o = firstkd(&[
            "stats",
            other.to_str().unwrap(),
            "--report",
            "calibration",
            "--mode",
            "renormalized",
            "--temperature",
            &temp.to_string(),
            "--json",
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        find_ece(&v).expect("ece in stats json")
    };
    let (held0, held1) = (report(1.0), report(t));
    assert!(held1 < held0, "held-out ECE {held0} -> {held1}");

    // A calibrated teacher (sharpening 1) fits close to T = 1 under uniform-tail, which keeps the tail.
    let cal = tmp.path().join("cal");
    firstkd(&[
        "synth",
        cal.to_str().unwrap(),
        "--rows",
        "40000",
        "--overconfidence",
        "1.0",
        "--seed",
        "5",
    ]);
    let out = firstkd(&[
        "calibrate",
        cal.to_str().unwrap(),
        "--mode",
        "uniform-tail",
        "--objective",
        "nll",
        "--dry-run",
        "--json",
    ]);
    let fit: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = fit["fit"]["temperature"].as_f64().unwrap();
    assert!((0.8..1.2).contains(&t), "calibrated teacher fitted T = {t}");
    assert!(
        firstkd::store::Manifest::load(&cal)
            .unwrap()
            .temperature
            .is_none(),
        "dry run writes nothing"
    );

    // No held-out data at all is a clear error.
    let out = firstkd(&[
        "calibrate",
        d,
        "--split",
        "none",
        "--held-out-fraction",
        "0.0000001",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("no held-out positions"),
        "{}",
        text(&out)
    );
}

fn find_ece(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(e) = m.get("ece").and_then(|e| e.as_f64()) {
                return Some(e);
            }
            m.values().find_map(find_ece)
        }
        serde_json::Value::Array(a) => a.iter().find_map(find_ece),
        _ => None,
    }
}
