//! Scale-out: N `label --shard i/N` processes at the same time into one store, local and on a
//! real S3 server (SeaweedFS, started by scripts/test.sh through scripts/s3-server.sh), with a
//! shard killed mid-way and resumed; the result equals a single-process run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use firstkd::store::{verify, Manifest, SampleColumn, StoreReader};

use crate::util::{firstkd, in_ci, label_rows, teacher_path, tempdir, text, Rows};

/// The input of these tests: 16 Alpaca records, one sequence each.
fn alpaca() -> Option<PathBuf> {
    firstkd::testing::require_shared("data/alpaca_en_demo/alpaca_en_demo.json")
}

fn label_args(model: &Path, input: &Path, out: &str, shard: Option<&str>) -> Vec<String> {
    let mut a: Vec<String> = [
        "label",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--format",
        "alpaca",
        "--limit",
        "16",
        "--part-sequences",
        "1",
        "--out",
        out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(s) = shard {
        a.push("--shard".into());
        a.push(s.into());
    }
    a
}

fn spawn(args: &[String], env: &[(String, String)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_firstkd"))
        .args(args)
        .envs(env.iter().cloned())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start firstkd")
}

fn run(args: &[String], env: &[(String, String)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_firstkd"))
        .args(args)
        .envs(env.iter().cloned())
        .output()
        .expect("run firstkd")
}

/// Every label row with its sample rows' tokens, sorted by (sample_id, position).
fn rows(dir: &Path) -> (Rows, Vec<(u64, Vec<u32>, u64)>) {
    let out = label_rows(dir);
    let reader = StoreReader::open(dir).unwrap();
    let mut samples: Vec<_> = reader
        .sample_rows(&SampleColumn::ALL)
        .map(|s| {
            let s = s.unwrap();
            (s.sample_id, s.input_ids, s.record_index)
        })
        .collect();
    samples.sort_by_key(|s| s.0);
    (out, samples)
}

/// Files whose name starts with '.' (temporary files) anywhere under `dir`.
fn temporary_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with('.') {
                found.push(e.path());
            }
        }
    }
    found
}

fn status_json(store: &str, env: &[(String, String)]) -> serde_json::Value {
    let o = run(
        &[
            "status".to_string(),
            store.to_string(),
            "--json".to_string(),
        ],
        env,
    );
    if !o.status.success() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}

/// Starts four shards at once, SIGKILLs shard 2 once it has committed a part but is not
/// done, lets the others finish, checks the store is refused as uncommitted, resumes shard 2
/// and returns the outputs of the resumed run.
fn four_shards_with_a_kill(
    model: &Path,
    input: &Path,
    store: &str,
    env: &[(String, String)],
) -> String {
    let mut children: Vec<Child> = (0..4)
        .map(|i| {
            spawn(
                &label_args(model, input, store, Some(&format!("{i}/4"))),
                env,
            )
        })
        .collect();
    let start = Instant::now();
    let mut killed = false;
    while start.elapsed() < Duration::from_secs(300) {
        let s = status_json(store, env);
        let shard2 = s["shards"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["shard"] == "2/4").cloned());
        if let Some(r) = shard2 {
            if r["state"] == "writing" && r["parts"].as_u64().unwrap_or(0) >= 1 {
                children[2].kill().unwrap(); // SIGKILL
                killed = true;
                break;
            }
            if r["state"] == "complete" {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(killed, "shard 2 was killed mid-way (4 parts of 1 sequence)");
    let mut outputs = Vec::new();
    for (i, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        if i != 2 {
            assert!(o.status.success(), "shard {i}/4: {}", text(&o));
        }
        outputs.push(text(&o));
    }
    // Three of four done: not a store yet, and the readers say why.
    let s = status_json(store, env);
    assert_eq!(s["committed"], false, "{s}");
    assert_eq!(s["shard_count"], 4, "{s}");
    let o = run(&["verify".to_string(), store.to_string()], env);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("3 of 4 shards complete") || text(&o).contains("not all complete"),
        "{}",
        text(&o)
    );
    // Another shard count into the same store is refused.
    let o = run(&label_args(model, input, store, Some("0/3")), env);
    assert!(!o.status.success());
    assert!(text(&o).contains("4-way run"), "{}", text(&o));
    // Resume the killed shard with the same command.
    let o = run(&label_args(model, input, store, Some("2/4")), env);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("resumed"), "{t}");
    assert!(t.contains("all 4 shards complete"), "{t}");
    let s = status_json(store, env);
    assert_eq!(s["committed"], true, "{s}");
    assert_eq!(s["total"]["parts"], 16, "{s}");
    t
}

#[test]
fn four_concurrent_shards_with_a_kill_equal_one_process() {
    let (Some(model), Some(input)) = (teacher_path(), alpaca()) else {
        return;
    };
    let tmp = tempdir();
    let full = tmp.path().join("full");
    let o = run(
        &label_args(&model, &input, full.to_str().unwrap(), None),
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));

    let sharded = tmp.path().join("sharded");
    four_shards_with_a_kill(&model, &input, sharded.to_str().unwrap(), &[]);
    assert!(verify(&sharded).unwrap().is_clean());
    assert_eq!(rows(&sharded), rows(&full));
    assert_eq!(temporary_files(&sharded), Vec::<PathBuf>::new());
    // Spark and the other engines read `labels/*.parquet`: every shard's parts are there.
    let m = Manifest::load(&sharded).unwrap();
    assert!(m
        .parts
        .iter()
        .all(|p| p.labels.file.starts_with("labels/s0000")));
    assert_eq!(m.labeling["shards"], 4);
    spark_agrees_with_stats(&sharded);
    // A second run of a finished shard changes nothing.
    let before = std::fs::read(sharded.join("manifest.json")).unwrap();
    let o = run(
        &label_args(&model, &input, sharded.to_str().unwrap(), Some("1/4")),
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(sharded.join("manifest.json")).unwrap(),
        before
    );
}

/// Spark (local mode) and DuckDB read the store's Parquet parts through the documented decode
/// views and count the same positions with the same mean top-5 mass as `firstkd stats`.
fn spark_agrees_with_stats(store: &Path) {
    let has = Command::new("python3")
        .args(["-c", "import pyspark"])
        .output()
        .is_ok_and(|o| o.status.success())
        && Command::new("java")
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !has {
        assert!(
            !in_ci(),
            "pyspark and java are installed by scripts/test.sh"
        );
        eprintln!("skipping the Spark check: no pyspark or java");
        return;
    }
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let code = r#"
import sys, json
sys.path.insert(0, sys.argv[1])
import read_store as rs
from pyspark.sql import SparkSession
store = sys.argv[2]
spark = (SparkSession.builder.master('local[1]').appName('firstkd')
         .config('spark.ui.showConsoleProgress', 'false').getOrCreate())
spark.read.parquet(*rs.part_files(store, 'labels')).createOrReplaceTempView('stored_labels')
spark.read.parquet(*rs.part_files(store, 'samples')).createOrReplaceTempView('samples')
spark.sql(rs.sql_text('spark', store))
q = 'SELECT count(*) AS n, avg(aggregate(topk_logprobs, 0D, (a, x) -> a + exp(x))) AS mass FROM labels'
out = {}
for name, where in [('all', ''), ('in_loss', ' WHERE in_loss')]:
    r = spark.sql(q + where).collect()[0]
    out[name] = [r['n'], r['mass']]
spark.stop()
import duckdb
con = duckdb.connect()
con.execute(rs.sql_text('duckdb', store))
dq = 'SELECT count(*), avg(list_sum(list_transform(topk_logprobs, lambda x: exp(x)))) FROM labels'
out['duckdb'] = {name: list(con.execute(dq + where).fetchone())
                 for name, where in [('all', ''), ('in_loss', ' WHERE in_loss')]}
print(json.dumps(out))
"#;
    let o = Command::new("python3")
        .args([
            "-c",
            code,
            scripts.to_str().unwrap(),
            store.to_str().unwrap(),
        ])
        .output()
        .expect("python3");
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("json");
    let spark: serde_json::Value = serde_json::from_str(line).unwrap();
    let o = firstkd(&["stats", store.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for positions in ["all", "in_loss"] {
        let row = stats["coverage"]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["positions"] == positions && r["source"].is_null())
            .expect("an overall coverage row");
        assert_eq!(
            spark[positions][0], row["n"],
            "{positions}: {spark} vs {row}"
        );
        let (a, b) = (
            spark[positions][1].as_f64().unwrap(),
            row["mean_mass"][4].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-6, "{positions}: Spark {a} vs stats {b}");
        let duck = &spark["duckdb"][positions];
        assert_eq!(duck[0], row["n"], "{positions}: DuckDB {duck} vs {row}");
        let d = duck[1].as_f64().unwrap();
        assert!((d - b).abs() < 1e-6, "{positions}: DuckDB {d} vs stats {b}");
        eprintln!(
            "Spark / DuckDB vs firstkd stats, {positions}: n {}, mean top-5 mass {a:.6} / {d:.6} vs {b:.6}",
            row["n"]
        );
    }
}

/// Equal JSON, numbers within `tol` (relative to max(1, |x|)).
fn json_close(a: &serde_json::Value, b: &serde_json::Value, tol: f64) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= tol * x.abs().max(1.0)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_close(x, y, tol))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_close(v, w, tol)))
        }
        _ => a == b,
    }
}

/// The S3 test server's environment (scripts/s3-server.sh wrote it; scripts/test.sh exports
/// it). None (skip) outside CI when no server runs.
fn s3_env() -> Option<Vec<(String, String)>> {
    if std::env::var("FIRSTKD_S3_TEST").is_err() {
        assert!(
            !in_ci(),
            "no S3 test server: scripts/test.sh starts one (scripts/s3-server.sh)"
        );
        eprintln!("skipping: no S3 test server (run through scripts/test.sh)");
        return None;
    }
    let vars = [
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
    ];
    Some(
        vars.iter()
            .map(|v| (v.to_string(), std::env::var(v).unwrap_or_default()))
            .collect(),
    )
}

/// [`s3_env`] with the local copies of remote stores in `dir/cache` (this test's folder).
fn s3_env_cached_in(dir: &Path) -> Option<Vec<(String, String)>> {
    let mut env = s3_env()?;
    env.push((
        "FIRSTKD_CACHE_DIR".into(),
        dir.join("cache").display().to_string(),
    ));
    Some(env)
}

/// Runs Python with the test server's environment.
fn python(code: &str, args: &[&str]) -> String {
    let o = Command::new("python3")
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("python3");
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn create_bucket(name: &str) {
    python(
        "import boto3, os, sys\n\
         boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL']).create_bucket(Bucket=sys.argv[1])",
        &[name],
    );
}

#[test]
fn sharded_labelling_into_s3_resumes_verifies_and_trains() {
    let (Some(model), Some(input)) = (teacher_path(), alpaca()) else {
        return;
    };
    let tmp = tempdir();
    let Some(env) = s3_env_cached_in(tmp.path()) else {
        return;
    };
    // One fresh bucket per test run.
    let bucket = fresh_bucket("sharded");
    let url = format!("s3://{bucket}/corpus/v1");
    let url = url.as_str();
    let full = tmp.path().join("full");
    let o = run(
        &label_args(&model, &input, full.to_str().unwrap(), None),
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));

    four_shards_with_a_kill(&model, &input, url, &env);
    let o = run(&["verify".into(), url.into()], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).starts_with("ok: 16 part(s)"), "{}", text(&o));

    // Every row equals the single-process run.
    let remote = {
        for (k, v) in &env {
            std::env::set_var(k, v);
        }
        firstkd::store::remote::Remote::open(url).unwrap()
    };
    let (dir, _) = remote.pull().unwrap();
    assert_eq!(rows(&dir), rows(&full));

    // stats from S3 equal stats of the local store.
    let stats = |store: &str| {
        let o = run(&["stats".into(), store.into(), "--json".into()], &env);
        assert!(o.status.success(), "{}", text(&o));
        let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v.as_object_mut().unwrap().remove("store");
        v
    };
    // The same rows (checked above) in another part order: sums differ in the last bits;
    // the quantiles (histogram counts) do not depend on the order, and are compared on
    // their own within 1e-9.
    let (mut remote_stats, mut local_stats) = (stats(url), stats(full.to_str().unwrap()));
    let take_quantiles = |v: &mut serde_json::Value| -> Vec<serde_json::Value> {
        let rows = v["coverage"]["rows"].as_array_mut().unwrap();
        rows.iter_mut()
            .map(|r| r.as_object_mut().unwrap().remove("quantiles").unwrap())
            .collect()
    };
    let (remote_q, local_q) = (
        take_quantiles(&mut remote_stats),
        take_quantiles(&mut local_stats),
    );
    assert!(
        json_close(&remote_stats, &local_stats, 1e-4),
        "{remote_stats}\nvs\n{local_stats}"
    );
    assert!(
        json_close(&remote_q.into(), &local_q.clone().into(), 1e-9),
        "quantiles: {local_q:?}"
    );

    // pyarrow's own S3 filesystem reads the same parts.
    let m = Manifest::load(&dir).unwrap();
    let got = python(
        "import os, sys, pyarrow.fs as pf, pyarrow.parquet as pq\n\
         u = os.environ['AWS_ENDPOINT_URL'].split('://')\n\
         fs = pf.S3FileSystem(endpoint_override=u[1], scheme=u[0], region='us-east-1')\n\
         files = [f.path for f in fs.get_file_info(pf.FileSelector(sys.argv[1], recursive=False)) if f.path.endswith('.parquet')]\n\
         t = pq.ParquetDataset(files, filesystem=fs).read(columns=['in_loss'])\n\
         print(len(files), t.num_rows, sum(t.column('in_loss').to_pylist()))",
        &[&format!("{bucket}/corpus/v1/labels")],
    );
    assert_eq!(
        got.trim(),
        format!(
            "{} {} {}",
            m.parts.len(),
            m.rows(firstkd::schema::Table::Labels),
            m.in_loss_rows()
        )
    );

    // calibrate writes the temperature back to the remote manifest.
    let o = run(
        &[
            "calibrate".into(),
            url.into(),
            "--held-out-fraction".into(),
            "0.3".into(),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let (dir, _) = remote.pull().unwrap();
    let t = Manifest::load(&dir).unwrap().temperature.expect("fitted T");
    assert!(t.value > 0.0);

    // A distillation streams the store from S3, part by part within a disk limit of three
    // parts, and trains exactly as on a local copy of the same store.
    let (dir, _) = remote.pull().unwrap();
    let m = Manifest::load(&dir).unwrap();
    let largest = m
        .parts
        .iter()
        .map(|p| p.labels.bytes + p.samples.bytes)
        .max()
        .unwrap();
    let limit = 3 * largest;
    let cfg = tmp.path().join("student.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true,
        })
        .to_string(),
    )
    .unwrap();
    let distill = |store: &str, out: &Path| {
        let o = run(
            &[
                "distill".into(),
                "--store".into(),
                store.into(),
                "--init".into(),
                format!("random:{}", cfg.display()),
                // About one and a half epochs: 16 parts, 2 windows of 128 per step.
                "--steps".into(),
                "24".into(),
                "--batch-tokens".into(),
                "256".into(),
                "--max-seq-len".into(),
                "128".into(),
                "--shuffle-buffer".into(),
                "4".into(),
                "--read-ahead".into(),
                "1".into(),
                "--stream-disk".into(),
                limit.to_string(),
                "--quiet".into(),
                "--out".into(),
                out.display().to_string(),
            ],
            &env,
        );
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    // A killed reader's stream folder is removed by the next reader.
    let dead = dir.parent().unwrap().join("stream-999999999");
    std::fs::create_dir_all(dead.join("labels")).unwrap();
    std::fs::write(dead.join("labels/left.parquet"), "x").unwrap();
    let streamed = distill(url, &tmp.path().join("run-s3"));
    assert!(!dead.exists(), "a dead reader's stream folder is left");
    let local = distill(dir.to_str().unwrap(), &tmp.path().join("run-local"));
    assert!(!local.contains("streamed"), "{local}");
    let line = streamed
        .lines()
        .find(|l| l.starts_with("streamed s3://"))
        .unwrap_or_else(|| panic!("no stream report: {streamed}"));
    eprintln!("{line}");
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    // "streamed URL: F part fetch(es), B bytes; at most P bytes ... (limit L), E part(s) ..."
    let tail = &numbers[numbers.len() - 5..];
    let (fetches, peak, evictions) = (tail[0], tail[2], tail[4]);
    assert!(peak <= limit, "{line}");
    assert!(fetches >= m.parts.len() as u64 && evictions > 0, "{line}");
    for file in ["model.safetensors", "config.json"] {
        let a = std::fs::read(tmp.path().join("run-s3/final").join(file)).unwrap();
        let b = std::fs::read(tmp.path().join("run-local/final").join(file)).unwrap();
        assert!(
            a == b,
            "final/{file} differs between the S3 and the local run"
        );
    }
    // export streams the store too, and writes what it writes from a local copy.
    let export = |store: &str, out: &Path| {
        let o = run(
            &[
                "export".into(),
                store.into(),
                out.display().to_string(),
                // JSON lines carry only the rows (Parquet files also name the store).
                "--file-format".into(),
                "jsonl".into(),
                "--read-ahead".into(),
                "1".into(),
                "--stream-disk".into(),
                limit.to_string(),
            ],
            &env,
        );
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    let said = export(url, &tmp.path().join("export-s3"));
    assert!(said.contains("streamed s3://"), "{said}");
    export(dir.to_str().unwrap(), &tmp.path().join("export-local"));
    let data = |d: &str| store_files(&tmp.path().join(d).join("data"));
    assert!(!data("export-s3").is_empty());
    assert!(
        data("export-s3") == data("export-local"),
        "the exported files differ between the S3 and the local store"
    );
    // Nothing is left in the stream folder once the run ends.
    let cache = tmp.path().join("cache/object-store");
    let left: Vec<String> = crate::util::files_below(&cache)
        .into_iter()
        .filter(|p| p.contains("/stream-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A fresh bucket for one test.
fn fresh_bucket(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let bucket = format!("firstkd-{what}-{}-{nanos}", std::process::id());
    create_bucket(&bucket);
    bucket
}

/// Every file of a local store, by path relative to it, with its bytes.
fn store_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    crate::util::files_below(dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(dir.join(&p)).unwrap();
            (p, bytes)
        })
        .collect()
}

#[test]
fn copy_moves_a_store_to_s3_and_back_with_multipart_parts_and_a_profile() {
    let tmp = tempdir();
    let Some(env) = s3_env_cached_in(tmp.path()) else {
        return;
    };
    // One part of more than 16 MiB (uploaded in several requests) and a small one.
    let src = tmp.path().join("src");
    let o = run(
        &[
            "synth".into(),
            src.display().to_string(),
            "--rows".into(),
            "1100000".into(),
            "--part-rows".into(),
            "1000000".into(),
            "--dtype".into(),
            "float32".into(),
            "--zstd-level".into(),
            "1".into(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let m = Manifest::load(&src).unwrap();
    assert!(m.parts.len() >= 2);
    assert!(
        m.parts[0].labels.bytes > 16 << 20,
        "the first part is {} bytes; the test needs one above the multipart threshold",
        m.parts[0].labels.bytes
    );
    let bucket = fresh_bucket("copy");
    let url = format!("s3://{bucket}/stores/synth");
    let copy = |from: &str, to: &str, env: &[(String, String)]| {
        run(&["copy".into(), from.into(), to.into()], env)
    };
    let o = copy(src.to_str().unwrap(), &url, &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 already there"), "{}", text(&o));
    // The server holds the whole parts: verify reads them back and checks every sha256.
    let o = run(&["verify".into(), url.clone()], &env);
    assert!(o.status.success(), "{}", text(&o));
    // The same copy again is a no-op.
    let o = copy(src.to_str().unwrap(), &url, &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("already holds this store"),
        "{}",
        text(&o)
    );
    // Bucket to bucket, then back to a local folder: the same files, byte for byte.
    let url2 = format!("s3://{}/copied", fresh_bucket("copy2"));
    let o = copy(&url, &url2, &env);
    assert!(o.status.success(), "{}", text(&o));
    let back = tmp.path().join("back");
    let o = copy(&url2, back.to_str().unwrap(), &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        store_files(&back) == store_files(&src),
        "the copied store differs"
    );
    // An interrupted copy resumes: a folder holding one part file of the store.
    let partial = tmp.path().join("partial");
    let first = &m.parts[1].labels.file;
    std::fs::create_dir_all(partial.join("labels")).unwrap();
    std::fs::copy(src.join(first), partial.join(first)).unwrap();
    // ... and the temporary file of a killed copy, which is deleted.
    let stale = partial.join("labels/.part.parquet.999999999.download");
    std::fs::write(&stale, "half").unwrap();
    let o = copy(&url, partial.to_str().unwrap(), &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("1 already there"), "{}", text(&o));
    assert!(!stale.exists(), "a killed copy's temporary file is left");
    assert!(store_files(&partial) == store_files(&src));
    // A folder holding something else is refused and left alone.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let o = copy(&url, other.to_str().unwrap(), &env);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("notes.txt"), "{}", text(&o));
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1);

    // Credentials from a named profile of the shared files instead of the environment.
    let get = |k: &str| {
        env.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let creds = tmp.path().join("aws-credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n\
             [firstkd-test]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            get("AWS_ACCESS_KEY_ID"),
            get("AWS_SECRET_ACCESS_KEY")
        ),
    )
    .unwrap();
    let config = tmp.path().join("aws-config");
    std::fs::write(
        &config,
        format!(
            "[profile firstkd-test]\nregion = {}\nendpoint_url = {}\n",
            get("AWS_REGION"),
            get("AWS_ENDPOINT_URL")
        ),
    )
    .unwrap();
    let with_profile = |profile: &str| {
        Command::new(env!("CARGO_BIN_EXE_firstkd"))
            .args(["inspect", &url])
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_REGION")
            .env("FIRSTKD_CACHE_DIR", tmp.path().join("cache"))
            .env("AWS_SHARED_CREDENTIALS_FILE", &creds)
            .env("AWS_CONFIG_FILE", &config)
            .env("AWS_PROFILE", profile)
            .output()
            .unwrap()
    };
    let o = with_profile("firstkd-test");
    assert!(o.status.success(), "{}", text(&o));
    let o = with_profile("nobody");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("AWS profile \"nobody\" is in none of"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_bad_store_url_is_a_clear_error() {
    let o = firstkd(&["verify", "gs://bucket/store"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("unsupported store URL scheme"),
        "{}",
        text(&o)
    );
    let o = firstkd(&["status", "/nonexistent/store"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("not a firstkd store"), "{}", text(&o));
}
