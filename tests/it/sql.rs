//! `firstkd sql` / `stats` and the `query` module: SQL results against values computed
//! directly from the store reader, UDFs against hand computations, output formats.

use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float32Type, Float64Type, UInt32Type, UInt64Type};
use firstkd::calibration::{CalibrationAccumulator, TemperatureMode, TopKPosition};
use firstkd::query::{stats, QueryOptions, QueryResult, QuerySession};
use firstkd::schema::{LogprobDtype, Table};
use firstkd::store::StoreReader;

use crate::util::{firstkd, small_store, tempdir, text};

fn open(dir: &Path) -> QuerySession {
    QuerySession::open(dir, &QueryOptions::default()).expect("open query session")
}

/// The single value of a one-row, one-column result, as f64.
fn scalar(result: &QueryResult, column: usize) -> f64 {
    assert_eq!(result.num_rows(), 1, "expected one row");
    let batch = result.batches.iter().find(|b| b.num_rows() > 0).unwrap();
    let col = cast(batch.column(column), &DataType::Float64).unwrap();
    col.as_primitive::<Float64Type>().value(0)
}

/// Per-row values read straight from the store: (top-k log-probs as f64, ids, target, in_loss).
struct Rows {
    k: usize,
    lps: Vec<f64>,
    ids: Vec<u32>,
    target: Vec<u32>,
    in_loss: Vec<bool>,
    target_lp: Vec<f32>,
}

fn read_rows(dir: &Path) -> Rows {
    let reader = StoreReader::open(dir).unwrap();
    let k = reader.manifest().k;
    let mut rows = Rows {
        k,
        lps: vec![],
        ids: vec![],
        target: vec![],
        in_loss: vec![],
        target_lp: vec![],
    };
    for batch in reader.batches(Table::Labels, None, 4096).unwrap() {
        let batch = batch.unwrap();
        let lp = batch
            .column_by_name("topk_logprobs")
            .unwrap()
            .as_fixed_size_list();
        let values = cast(lp.values(), &DataType::Float64).unwrap();
        rows.lps
            .extend(values.as_primitive::<Float64Type>().values().iter());
        let ids = batch
            .column_by_name("topk_ids")
            .unwrap()
            .as_fixed_size_list();
        rows.ids
            .extend(ids.values().as_primitive::<UInt32Type>().values().iter());
        let target = batch
            .column_by_name("target_id")
            .unwrap()
            .as_primitive::<UInt32Type>();
        rows.target.extend(target.values().iter());
        let in_loss = batch.column_by_name("in_loss").unwrap().as_boolean();
        rows.in_loss
            .extend((0..in_loss.len()).map(|i| in_loss.value(i)));
        let tlp = cast(
            batch.column_by_name("target_logprob").unwrap(),
            &DataType::Float32,
        )
        .unwrap();
        rows.target_lp
            .extend(tlp.as_primitive::<Float32Type>().values().iter());
    }
    rows
}

#[test]
fn counts_match_manifest_and_reader() {
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let session = open(&dir);
    let rows = read_rows(&dir);
    let r = session
        .sql("SELECT count(*), sum(CAST(in_loss AS BIGINT)), count(DISTINCT sample_id) FROM labels")
        .unwrap();
    assert_eq!(scalar(&r, 0) as u64, manifest.rows(Table::Labels));
    assert_eq!(scalar(&r, 0) as usize, rows.target.len());
    assert_eq!(scalar(&r, 1) as u64, manifest.in_loss_rows());
    assert_eq!(
        scalar(&r, 1) as usize,
        rows.in_loss.iter().filter(|&&b| b).count()
    );
    assert_eq!(scalar(&r, 2) as u64, manifest.rows(Table::Samples));
    let r = session
        .sql("SELECT count(*), sum(num_positions) FROM samples")
        .unwrap();
    assert_eq!(scalar(&r, 0) as u64, manifest.rows(Table::Samples));
    assert_eq!(scalar(&r, 1) as u64, manifest.rows(Table::Labels));
}

fn check_view_against_reader(dtype: LogprobDtype) {
    let tmp = tempdir();
    let (dir, _) = small_store(tmp.path(), "s", dtype);
    let session = open(&dir);
    let rows = read_rows(&dir);
    let k = rows.k;
    let n = rows.target.len();
    let (mut mass, mut top1, mut is_top1, mut in_topk, mut in_loss_mass, mut n_in_loss) =
        (0.0, 0.0, 0u64, 0u64, 0.0, 0u64);
    for i in 0..n {
        let lps = &rows.lps[i * k..(i + 1) * k];
        let ids = &rows.ids[i * k..(i + 1) * k];
        let m: f64 = lps.iter().map(|lp| lp.exp()).sum();
        mass += m;
        top1 += lps[0].exp();
        is_top1 += u64::from(ids[0] == rows.target[i]);
        in_topk += u64::from(ids.contains(&rows.target[i]));
        if rows.in_loss[i] {
            in_loss_mass += m;
            n_in_loss += 1;
        }
    }
    let r = session
        .sql(
            "SELECT avg(topk_mass), avg(top1_prob), sum(CAST(target_is_top1 AS BIGINT)), \
             sum(CAST(target_in_topk AS BIGINT)), avg(tail_mass), \
             avg(topk_mass) FILTER (WHERE in_loss), count(*) FROM tokens",
        )
        .unwrap();
    let nf = n as f64;
    assert!((scalar(&r, 0) - mass / nf).abs() < 1e-12, "{dtype:?}");
    assert!((scalar(&r, 1) - top1 / nf).abs() < 1e-12);
    assert_eq!(scalar(&r, 2) as u64, is_top1);
    assert_eq!(scalar(&r, 3) as u64, in_topk);
    assert!((scalar(&r, 4) - (1.0 - mass / nf)).abs() < 1e-12);
    assert!((scalar(&r, 5) - in_loss_mass / n_in_loss as f64).abs() < 1e-12);
    assert_eq!(scalar(&r, 6) as usize, n);
    assert!(is_top1 > 0 && in_topk > is_top1 && (in_topk as usize) < n);
}

#[test]
fn tokens_view_matches_reader_float16() {
    check_view_against_reader(LogprobDtype::Float16);
}

#[test]
fn tokens_view_matches_reader_float32() {
    check_view_against_reader(LogprobDtype::Float32);
}

// numpy:
//   lp = np.array([-0.5, -1.5, -3.0])
//   np.exp(lp).sum()          -> 0.8794478882289272
//   np.exp(lp[:2]).sum()      -> 0.8296608198610632
//   q = np.exp(lp / 2); q / q.sum()  -> [0.52825212 0.32040111 0.15134677]
//   V=10, k=3: m = 1 - np.exp(lp).sum(); lt = np.log(m / (V - k))
//   np.exp(lp/2) / (np.exp(lp/2).sum() + (V-k) * np.exp(lt/2)) -> [0.32546062 0.19740185 0.09324603]
#[test]
fn udfs_match_hand_computation() {
    let tmp = tempdir();
    let (dir, _) = small_store(tmp.path(), "s", LogprobDtype::Float32);
    let session = open(&dir);
    let lit = "make_array(-0.5, -1.5, -3.0)";
    let r = session
        .sql(&format!(
            "SELECT topk_mass({lit}), topk_mass({lit}, 2), top1_prob_at({lit}, 2.0), \
             top1_prob_at({lit}, 2.0, 10)"
        ))
        .unwrap();
    assert!((scalar(&r, 0) - 0.8794478882289272).abs() < 1e-12);
    assert!((scalar(&r, 1) - 0.8296608198610632).abs() < 1e-12);
    assert!((scalar(&r, 2) - 0.52825212).abs() < 1e-8);
    assert!((scalar(&r, 3) - 0.32546062).abs() < 1e-8);
    let r = session
        .sql(&format!(
            "SELECT topk_probs_at({lit}, 2.0), topk_probs_at({lit}, 2.0, 10), topk_probs({lit})"
        ))
        .unwrap();
    let batch = &r.batches[0];
    let list = |c: usize| -> Vec<f64> {
        let l = batch.column(c).as_list::<i32>().value(0);
        l.as_primitive::<Float64Type>().values().to_vec()
    };
    for (got, want) in list(0).iter().zip([0.52825212, 0.32040111, 0.15134677]) {
        assert!((got - want).abs() < 1e-8, "{got} vs {want}");
    }
    for (got, want) in list(1).iter().zip([0.32546062, 0.19740185, 0.09324603]) {
        assert!((got - want).abs() < 1e-8, "{got} vs {want}");
    }
    for (got, lp) in list(2).iter().zip([-0.5f64, -1.5, -3.0]) {
        assert!((got - lp.exp()).abs() < 1e-15);
    }
    let err = session
        .sql(&format!("SELECT topk_probs_at({lit}, 0.0)"))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("temperature must be finite and positive"),
        "{err}"
    );
}

fn check_temperature_one_is_renormalised(dtype: LogprobDtype) {
    let tmp = tempdir();
    let (dir, _) = small_store(tmp.path(), "s", dtype);
    let session = open(&dir);
    let rows = read_rows(&dir);
    let k = rows.k;
    // Per row: probs at T = 1 equal p / sum(p) and sum to 1. Ordered so rows line up.
    let r = session
        .sql(
            "SELECT topk_probs_at(topk_logprobs, 1.0) AS q, topk_logprobs FROM labels \
             ORDER BY sample_id, position",
        )
        .unwrap();
    let reader = StoreReader::open(&dir).unwrap();
    let mut order: Vec<(u64, u32, usize)> = Vec::new();
    let mut idx = 0;
    for batch in reader
        .batches(Table::Labels, Some(&["sample_id", "position"]), 4096)
        .unwrap()
    {
        let batch = batch.unwrap();
        let s = batch.column(0).as_primitive::<UInt64Type>();
        let p = batch.column(1).as_primitive::<UInt32Type>();
        for i in 0..batch.num_rows() {
            order.push((s.value(i), p.value(i), idx));
            idx += 1;
        }
    }
    order.sort();
    let mut row = 0;
    for batch in &r.batches {
        let q = batch.column(0).as_fixed_size_list();
        assert_eq!(q.value_length() as usize, k);
        for i in 0..batch.num_rows() {
            let got = q.value(i);
            let got = got.as_primitive::<Float64Type>().values();
            let src = order[row].2;
            let lps = &rows.lps[src * k..(src + 1) * k];
            let total: f64 = lps.iter().map(|lp| lp.exp()).sum();
            for (g, lp) in got.iter().zip(lps) {
                assert!((g - lp.exp() / total).abs() < 1e-12, "{dtype:?} row {row}");
            }
            assert!((got.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            row += 1;
        }
    }
    assert_eq!(row, rows.target.len());
}

#[test]
fn temperature_one_renormalises_float16() {
    check_temperature_one_is_renormalised(LogprobDtype::Float16);
}

#[test]
fn temperature_one_renormalises_float32() {
    check_temperature_one_is_renormalised(LogprobDtype::Float32);
}

#[test]
fn manifest_function_returns_k_and_version() {
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let session = open(&dir);
    let r = session
        .sql(
            "SELECT key, value FROM manifest() WHERE key IN \
             ('k', 'schema_version', 'logprob_dtype', 'num_parts', 'label_rows', 'temperature') \
             ORDER BY key",
        )
        .unwrap();
    let batch = &r.batches[0];
    let keys = batch.column(0).as_string::<i32>();
    let values = batch.column(1).as_string::<i32>();
    let get = |key: &str| -> Option<String> {
        (0..batch.num_rows())
            .find(|&i| keys.value(i) == key)
            .and_then(|i| (!values.is_null(i)).then(|| values.value(i).to_string()))
    };
    assert_eq!(get("k").as_deref(), Some("5"));
    assert_eq!(
        get("schema_version").as_deref(),
        Some(firstkd::schema::SCHEMA_VERSION_1)
    );
    assert_eq!(get("logprob_dtype").as_deref(), Some("float16"));
    assert_eq!(get("num_parts"), Some(manifest.parts.len().to_string()));
    assert_eq!(
        get("label_rows"),
        Some(manifest.rows(Table::Labels).to_string())
    );
    assert_eq!(get("temperature"), None);
    assert_eq!(r.num_rows(), 6);
    let r = session
        .sql("SELECT sum(labels_rows), count(*) FROM parts()")
        .unwrap();
    assert_eq!(scalar(&r, 0) as u64, manifest.rows(Table::Labels));
    assert_eq!(scalar(&r, 1) as usize, manifest.parts.len());
}

#[test]
fn unlisted_parquet_file_is_not_counted() {
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    // A valid Parquet file with the right schema, but not in the manifest.
    std::fs::copy(
        dir.join(&manifest.parts[0].labels.file),
        dir.join("labels/part-99999.parquet"),
    )
    .unwrap();
    std::fs::copy(
        dir.join(&manifest.parts[0].labels.file),
        dir.join("labels/.part-00099.parquet.tmp"),
    )
    .unwrap();
    let session = open(&dir);
    let r = session.sql("SELECT count(*) FROM labels").unwrap();
    assert_eq!(scalar(&r, 0) as u64, manifest.rows(Table::Labels));
    let r = session.sql("SELECT count(*) FROM tokens").unwrap();
    assert_eq!(scalar(&r, 0) as u64, manifest.rows(Table::Labels));
}

#[test]
fn incomplete_store_refused_unless_allowed() {
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let path = dir.join("manifest.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["complete"] = serde_json::Value::Bool(false);
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    let d = dir.to_str().unwrap();
    let out = firstkd(&["sql", d, "SELECT count(*) AS n FROM labels"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("incomplete"), "{}", text(&out));
    let out = firstkd(&[
        "sql",
        d,
        "--allow-incomplete",
        "--format",
        "csv",
        "SELECT count(*) AS n FROM labels",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("n\n{}\n", manifest.rows(Table::Labels))
    );
}

#[test]
fn output_formats_parse_back() {
    let tmp = tempdir();
    let (dir, _) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let d = dir.to_str().unwrap();
    let q = "SELECT sample_id, position, topk_ids, topk_probs, target_is_top1 FROM tokens \
             ORDER BY sample_id, position LIMIT 37";
    // Table.
    let out = firstkd(&["sql", d, q]);
    assert!(out.status.success(), "{}", text(&out));
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(t.contains("| sample_id") && t.contains("37 row(s)"), "{t}");
    // CSV: header + 37 rows, list columns quoted as text.
    let out = firstkd(&["sql", d, "--format", "csv", q]);
    assert!(out.status.success(), "{}", text(&out));
    let csv = String::from_utf8_lossy(&out.stdout).to_string();
    let mut reader =
        arrow::csv::ReaderBuilder::new(std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("sample_id", DataType::UInt64, false),
            arrow::datatypes::Field::new("position", DataType::UInt32, false),
            arrow::datatypes::Field::new("topk_ids", DataType::Utf8, false),
            arrow::datatypes::Field::new("topk_probs", DataType::Utf8, false),
            arrow::datatypes::Field::new("target_is_top1", DataType::Boolean, false),
        ])))
        .with_header(true)
        .build(std::io::Cursor::new(csv.clone()))
        .unwrap();
    let batch = reader.next().unwrap().unwrap();
    assert_eq!(batch.num_rows(), 37);
    assert!(csv.lines().next().unwrap() == "sample_id,position,topk_ids,topk_probs,target_is_top1");
    let ids = batch.column(2).as_string::<i32>().value(0);
    assert!(ids.starts_with('[') && ids.split(',').count() == 5, "{ids}");
    // JSON lines.
    let out = firstkd(&["sql", d, "--format", "jsonl", q]);
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 37);
    assert_eq!(lines[0]["topk_probs"].as_array().unwrap().len(), 5);
    let p: f64 = lines[0]["topk_probs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!(p > 0.0 && p <= 1.0 + 1e-3);
    // Parquet.
    let file = tmp.path().join("out.parquet");
    let out = firstkd(&[
        "sql",
        d,
        "--format",
        "parquet",
        "--output",
        file.to_str().unwrap(),
        q,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("wrote 37 row(s)"), "{}", text(&out));
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(&file).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 37);
    assert_eq!(batches[0].schema().field(3).name(), "topk_probs");
    // Parquet without a file is refused.
    let out = firstkd(&["sql", d, "--format", "parquet", q]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn malformed_query_exits_non_zero_with_datafusion_message() {
    let tmp = tempdir();
    let (dir, _) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let d = dir.to_str().unwrap();
    let out = firstkd(&["sql", d, "SELEC count(*) FROM labels"]);
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    assert!(
        t.contains("SQL error") || t.contains("sql parser error") || t.contains("Expected"),
        "{t}"
    );
    assert!(!t.contains("panicked"), "{t}");
    let out = firstkd(&["sql", d, "SELECT no_such_column FROM labels"]);
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    assert!(t.contains("no_such_column"), "{t}");
    // DML is refused, the store is untouched.
    let out = firstkd(&["sql", d, "COPY (SELECT 1) TO 'x.parquet'"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("DML not supported"), "{}", text(&out));
}

#[test]
fn several_statements_from_a_file() {
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let sql = tmp.path().join("q.sql");
    std::fs::write(
        &sql,
        "-- a comment; with a semicolon\n\
         CREATE VIEW v AS SELECT count(*) AS n FROM labels;\n\
         SELECT n FROM v;\n\
         SELECT 'a;b' AS s;\n",
    )
    .unwrap();
    let out = firstkd(&[
        "sql",
        dir.to_str().unwrap(),
        "--file",
        sql.to_str().unwrap(),
        "--format",
        "csv",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("n\n{}\ns\na;b\n", manifest.rows(Table::Labels))
    );
}

#[test]
fn stats_calibration_matches_calibration_module() {
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let rows = read_rows(&dir);
    let k = rows.k;
    let vocab = manifest.tokenizer.vocab_size as usize;
    let session = open(&dir);
    for (t, mode) in [
        (1.0, TemperatureMode::UniformTail),
        (1.7, TemperatureMode::Renormalized),
    ] {
        let opts = stats::StatsOptions {
            temperature: firstkd::Temperature::new(t).unwrap(),
            mode,
            ..Default::default()
        };
        let report = stats::calibration(&session, &opts).unwrap();
        let lps32: Vec<f32> = rows.lps.iter().map(|&x| x as f32).collect();
        let mut acc = CalibrationAccumulator::new(15).unwrap();
        for i in 0..rows.target.len() {
            if !rows.in_loss[i] {
                continue;
            }
            let ids = &rows.ids[i * k..(i + 1) * k];
            let pos = TopKPosition {
                logprobs: &lps32[i * k..(i + 1) * k],
                target_rank: ids.iter().position(|&id| id == rows.target[i]),
                target_logprob: rows.target_lp[i],
                vocab_size: vocab,
            };
            acc.push_topk(&pos, t, mode).unwrap();
        }
        let want = acc.finish().unwrap();
        let got = report
            .groups
            .iter()
            .find(|g| g.positions == "in_loss" && g.source.is_none())
            .unwrap();
        assert_eq!(got.report.n, want.n);
        assert_eq!(got.report.n, manifest.in_loss_rows());
        assert!((got.report.ece - want.ece).abs() < 1e-9);
        assert!((got.report.brier - want.brier).abs() < 1e-9);
        assert_eq!(got.report.adaptive_ece, want.adaptive_ece);
        let (g, w) = (got.report.nll.unwrap(), want.nll.unwrap());
        assert!((g - w).abs() < 1e-9, "{g} vs {w}");
        assert_eq!(
            got.report.bins.iter().map(|b| b.count).collect::<Vec<_>>(),
            want.bins.iter().map(|b| b.count).collect::<Vec<_>>()
        );
        // At T = 1 (uniform tail) the confidence is the stored top-1 probability, except
        // where float16 rounding pushed the stored top-k mass above 1: the module then
        // renormalises over the top-k (docs/calibration.md), a change of at most ~1e-3.
        if t == 1.0 {
            let r = session
                .sql("SELECT avg(top1_prob) FROM tokens WHERE in_loss")
                .unwrap();
            assert!((scalar(&r, 0) - got.report.mean_confidence).abs() < 1e-4);
            let r = session
                .sql("SELECT avg(top1_prob / greatest(topk_mass, 1.0)) FROM tokens WHERE in_loss")
                .unwrap();
            assert!((scalar(&r, 0) - got.report.mean_confidence).abs() < 1e-6);
        }
    }
}

#[test]
fn stats_cli_json_and_coverage() {
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let rows = read_rows(&dir);
    let k = rows.k;
    let d = dir.to_str().unwrap();
    let out = firstkd(&["stats", d, "--json", "--show-sql"]);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stats --json is JSON");
    let coverage = &json["coverage"];
    assert!(coverage["sql"].as_str().unwrap().contains("JOIN labels"));
    let total = coverage["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["positions"] == "all" && r["source"].is_null())
        .unwrap();
    assert_eq!(total["n"].as_u64().unwrap(), manifest.rows(Table::Labels));
    // Mean top-j mass and the fraction >= 0.95, from the reader.
    let n = rows.target.len();
    for j in 1..=k {
        let want: f64 = (0..n)
            .map(|i| {
                rows.lps[i * k..i * k + j]
                    .iter()
                    .map(|lp| lp.exp())
                    .sum::<f64>()
            })
            .sum::<f64>()
            / n as f64;
        let got = total["mean_mass"][j - 1].as_f64().unwrap();
        assert!((got - want).abs() < 1e-9, "top-{j}: {got} vs {want}");
    }
    let frac = (0..n)
        .filter(|&i| {
            rows.lps[i * k..(i + 1) * k]
                .iter()
                .map(|lp| lp.exp())
                .sum::<f64>()
                >= 0.95
        })
        .count() as f64
        / n as f64;
    assert!((total["frac_topk_mass_ge_095"].as_f64().unwrap() - frac).abs() < 1e-12);
    // Quantiles: within one histogram bin of the exact `percentile_cont` value, widened by
    // the gap between the two order statistics it interpolates.
    let bin = 1.0 / stats::COVERAGE_BINS as f64;
    for j in 1..=k {
        let mut masses: Vec<f64> = (0..n)
            .map(|i| {
                rows.lps[i * k..i * k + j]
                    .iter()
                    .map(|lp| lp.exp())
                    .sum::<f64>()
            })
            .collect();
        masses.sort_by(f64::total_cmp);
        for (qi, q) in stats::COVERAGE_QUANTILES.iter().enumerate() {
            let rank = q * (n - 1) as f64;
            let (lo, hi) = (masses[rank.floor() as usize], masses[rank.ceil() as usize]);
            let got = total["quantiles"][qi][j - 1].as_f64().unwrap();
            assert!(
                got >= lo - bin && got <= hi + bin,
                "quantile {q} of the top-{j} mass: {got}, exact in [{lo}, {hi}]"
            );
        }
    }
    let in_loss = coverage["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["positions"] == "in_loss" && r["source"].is_null())
        .unwrap();
    assert_eq!(in_loss["n"].as_u64().unwrap(), manifest.in_loss_rows());
    assert!(json["calibration"]["groups"].as_array().unwrap().len() >= 2);
    // Text output with SQL.
    let out = firstkd(&["stats", d, "--show-sql", "--temperature", "1.5"]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("-- SQL") && t.contains("ECE") && t.contains("reliability"),
        "{t}"
    );
    assert!(
        t.contains("topk_logprobs_at(l.topk_logprobs, 1.5, 49152)"),
        "{t}"
    );
}

/// The coverage histogram counts every in-loss position once, in the bin of its top-k mass
/// (computed here from the rows the store reader returns).
#[test]
fn coverage_histogram_matches_the_rows() {
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let counts = stats::coverage_histogram(&open(&dir), 10).unwrap();
    assert_eq!(counts.iter().sum::<u64>(), manifest.in_loss_rows());
    let mut want = vec![0u64; 10];
    let reader = StoreReader::open(&dir).unwrap();
    let cols = [
        firstkd::store::LabelColumn::InLoss,
        firstkd::store::LabelColumn::TopkLogprobs,
    ];
    for rows in reader.label_rows(&cols, 4096) {
        let rows = rows.unwrap();
        for i in (0..rows.len()).filter(|&i| rows.in_loss[i]) {
            let mass: f64 = rows.logprobs(i).iter().map(|&l| f64::from(l).exp()).sum();
            want[((mass * 10.0).floor() as usize).min(9)] += 1;
        }
    }
    assert_eq!(counts, want);
    assert!(stats::coverage_histogram(&open(&dir), 0).is_err());
}

/// The load row of docs/reliability.md at test size: past `--memory-limit`, a query that
/// cannot spill fails with a clear error (exit 2, never a panic or the OOM killer), a sort
/// spills and finishes, and with room the same query gives the right answer.
#[test]
fn queries_past_the_memory_limit_spill_or_fail_cleanly() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    let s = store.to_str().unwrap();
    let o = firstkd(&[
        "synth",
        s,
        "--rows",
        "300000",
        "--seed",
        "3",
        "--zstd-level",
        "3",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // The same store at level 19 (the default) is smaller: the level reaches the writer.
    let tight = tmp.path().join("tight");
    let o = firstkd(&[
        "synth",
        tight.to_str().unwrap(),
        "--rows",
        "300000",
        "--seed",
        "3",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let bytes = |d: &Path| {
        firstkd::store::Manifest::load(d)
            .unwrap()
            .bytes(Table::Labels)
    };
    assert!(
        bytes(&tight) < bytes(&store),
        "{} vs {}",
        bytes(&tight),
        bytes(&store)
    );
    let rows = firstkd::store::Manifest::load(&store)
        .unwrap()
        .rows(Table::Labels);
    let distinct = "SELECT count(DISTINCT sample_id * 65536 + position) AS n FROM labels";
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_firstkd"))
        .args(["sql", s, "--memory-limit", "1M", distinct])
        .env("FIRSTKD_REPORT_PEAK_RSS", "1")
        .output()
        .unwrap();
    let t = text(&o);
    // The load test reads the peak from this line (on the error path too).
    assert!(
        t.contains("firstkd: peak RSS ") && t.contains(" KiB"),
        "{t}"
    );
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    assert!(
        t.contains("Resources exhausted") && t.contains("--memory-limit"),
        "{t}"
    );
    let o = firstkd(&[
        "sql",
        s,
        "--memory-limit",
        "512M",
        "--format",
        "csv",
        distinct,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("n\n{rows}")
    );
    // A full sort under 32 MiB spills to the temporary folder and returns every row.
    let out = tmp.path().join("sorted.csv");
    let o = firstkd(&[
        "sql",
        s,
        "--memory-limit",
        "32M",
        "--format",
        "csv",
        "--output",
        out.to_str().unwrap(),
        "SELECT sample_id, position, entropy FROM labels ORDER BY entropy DESC, sample_id, position",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let lines = std::fs::read_to_string(&out).unwrap().lines().count() as u64;
    assert_eq!(lines, rows + 1);
    // `stats` under a small limit finishes or says why.
    let o = firstkd(&["stats", s, "--memory-limit", "16M"]);
    assert!(
        o.status.success() || (o.status.code() == Some(2) && text(&o).contains("--memory-limit")),
        "{}",
        text(&o)
    );
}

/// The pure-SQL calibration report of `scripts/sql_bench.py` (`calibration_sql`, DataFusion
/// spelling): `base` is read four times by `expanded`, which `bins` and `runs` both read.
const CALIBRATION_SQL: &str = "WITH base AS (
  SELECT s.source, s.split, l.in_loss, topk_mass(l.topk_logprobs, 1) AS conf,
         CASE WHEN target_rank(l.topk_ids, l.target_id) = 1 THEN 1.0 ELSE 0.0 END AS correct,
         -(CAST(l.target_logprob AS DOUBLE)) AS nll
  FROM labels l JOIN samples s ON l.sample_id = s.sample_id),
expanded AS (
  SELECT 'all' AS positions, source, split, conf, correct, nll FROM base
  UNION ALL SELECT 'in_loss', source, split, conf, correct, nll FROM base WHERE in_loss
  UNION ALL SELECT 'all', NULL, NULL, conf, correct, nll FROM base
  UNION ALL SELECT 'in_loss', NULL, NULL, conf, correct, nll FROM base WHERE in_loss),
bins AS (
  SELECT positions, source, split, count(*) AS cnt, sum(conf) AS sc, sum(correct) AS sa,
         sum(nll) AS snll
  FROM expanded GROUP BY positions, source, split, least(floor(conf * 15), 14)),
runs AS (
  SELECT positions, source, split, run, count(*) AS cnt, sum(conf) AS sc, sum(correct) AS sa
  FROM (SELECT positions, source, split, conf, correct,
               ntile(15) OVER (PARTITION BY positions, source, split ORDER BY conf, correct) AS run
        FROM expanded) r
  GROUP BY positions, source, split, run),
adaptive AS (
  SELECT positions, source, split, sum(abs(sa - sc)) / sum(cnt) AS adaptive_ece
  FROM runs GROUP BY positions, source, split)
SELECT b.positions, b.source, b.split, sum(b.cnt) AS n, sum(abs(b.sa - b.sc)) / sum(b.cnt) AS ece,
       sum(b.snll) / sum(b.cnt) AS nll, max(a.adaptive_ece) AS adaptive_ece
FROM bins b JOIN adaptive a
  ON (b.positions = a.positions) AND (b.source IS NOT DISTINCT FROM a.source)
     AND (b.split IS NOT DISTINCT FROM a.split)
GROUP BY b.positions, b.source, b.split
ORDER BY b.positions, b.source NULLS LAST, b.split NULLS LAST";

/// The cells of a CSV result (no quoting in these reports).
fn csv_rows(csv: &str) -> Vec<Vec<String>> {
    csv.lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// Two runs of the calibration query agree: the same groups, and numbers equal up to the
/// order in which sums are added.
fn assert_same_report_rows(a: &[Vec<String>], b: &[Vec<String>]) {
    assert_eq!(a.len(), b.len());
    // A header and, per positions, one row per (source, split) and the total.
    assert!(a.len() >= 5, "{a:?}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (u, v) in x.iter().zip(y) {
            match (u.parse::<f64>(), v.parse::<f64>()) {
                (Ok(u), Ok(v)) => assert!((u - v).abs() <= 1e-12 * u.abs().max(1.0), "{x:?} {y:?}"),
                _ => assert_eq!(u, v),
            }
        }
    }
}

#[test]
fn repeated_ctes_computed_once_match_inlined_ones_and_leave_no_file() {
    let tmp = tempdir();
    let (store, _) = small_store(tmp.path(), "store", LogprobDtype::Float16);
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let run = |extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_firstkd"))
            .args(["sql", store.to_str().unwrap(), "--format", "csv"])
            .args(extra)
            .arg(CALIBRATION_SQL)
            .env("TMPDIR", &scratch)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let (once, inline) = (csv_rows(&run(&[])), csv_rows(&run(&["--inline-ctes"])));
    assert_same_report_rows(&once, &inline);
    // The temporary tables went with the statement.
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
    // The same numbers as the Rust report, for the in-loss total.
    let session = open(&store);
    let report = stats::calibration(&session, &stats::StatsOptions::default()).unwrap();
    let total = report
        .groups
        .iter()
        .find(|g| g.positions == "in_loss" && g.source.is_none())
        .unwrap();
    let row = once
        .iter()
        .find(|r| r[0] == "in_loss" && r[1].is_empty())
        .unwrap();
    assert_eq!(row[3].parse::<u64>().unwrap(), total.report.n);
    assert!((row[4].parse::<f64>().unwrap() - total.report.ece).abs() < 1e-4);
}

/// `ntile` runs in bounded memory (`query::ntile`): the pure-SQL calibration query, whose
/// equal-mass bins are an `ntile(15)` over every position, finishes under a 128 MiB limit
/// (its sort spills), gives the same numbers as with room and the same adaptive ECE as the
/// Rust report.
#[test]
fn the_calibration_querys_ntile_runs_under_a_small_memory_limit() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    let s = store.to_str().unwrap();
    let o = firstkd(&[
        "synth",
        s,
        "--rows",
        "400000",
        "--seed",
        "5",
        "--dtype",
        "float16",
        "--zstd-level",
        "3",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let run = |extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_firstkd"))
            .args(["sql", s, "--format", "csv"])
            .args(extra)
            .arg(CALIBRATION_SQL)
            .env("FIRSTKD_REPORT_PEAK_RSS", "1")
            .env("TMPDIR", &scratch)
            .output()
            .unwrap();
        assert!(o.status.success(), "{extra:?}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    // Under 128 MiB the sort spills and batches are DataFusion's 8,192 rows; with room they
    // are 65,536 rows.
    let tight = csv_rows(&run(&["--memory-limit", "128M"]));
    assert_same_report_rows(&tight, &csv_rows(&run(&[])));
    // The files and spills went with the statements.
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
    let header = &tight[0];
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let report = stats::calibration(&open(&store), &stats::StatsOptions::default()).unwrap();
    let mut compared = 0;
    for g in &report.groups {
        let Some(row) = tight.iter().skip(1).find(|r| {
            r[0] == g.positions
                && r[1] == g.source.clone().unwrap_or_default()
                && r[2] == g.split.clone().unwrap_or_default()
        }) else {
            continue;
        };
        assert_eq!(row[col("n")].parse::<u64>().unwrap(), g.report.n);
        let sql: f64 = row[col("adaptive_ece")].parse().unwrap();
        let rust = g.report.adaptive_ece.unwrap();
        // The report keeps confidences as f32, the SQL as f64: near-ties may sort apart.
        assert!((sql - rust).abs() < 1e-4, "{row:?}: {sql} vs {rust}");
        compared += 1;
    }
    assert!(compared >= 4, "{compared} groups compared");
}
