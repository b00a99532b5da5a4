//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use firstkd::schema::LogprobDtype;
use firstkd::store::synthetic::{generate, SyntheticConfig};
use firstkd::store::{Manifest, WriterOptions};

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create temp dir")
}

/// A small multi-part synthetic store at `dir/name`.
pub fn small_store(dir: &Path, name: &str, dtype: LogprobDtype) -> (PathBuf, Manifest) {
    let path = dir.join(name);
    let cfg = SyntheticConfig {
        label_rows: 6_000,
        seed: 7,
        logprob_dtype: dtype,
        min_len: 20,
        max_len: 200,
        part_rows: 2_000,
        ..SyntheticConfig::default()
    };
    let opts = WriterOptions {
        batch_rows: 700,
        row_group_rows: 1000,
        ..WriterOptions::default()
    };
    let manifest = generate(&path, &cfg, opts).expect("generate synthetic store");
    assert!(manifest.parts.len() >= 3, "want several parts");
    (path, manifest)
}

/// Runs the real binary.
pub fn firstkd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_firstkd"))
        .args(args)
        .output()
        .expect("run firstkd binary")
}

/// `label --model MODEL --out OUT --input INPUT`, then `extra`.
pub fn label_args(model: &Path, out: &Path, input: &Path, extra: &[&str]) -> Vec<String> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let mut args = vec![
        "label".to_string(),
        "--model".to_string(),
        path(model),
        "--out".to_string(),
        path(out),
        "--input".to_string(),
        path(input),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// stdout + stderr as text.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// True when running under CI (missing fixtures must then fail, not skip).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The cached teacher GGUF (`FIRSTKD_TEACHER`, else the path scripts/fetch-teacher.sh
/// writes). Missing: a failure under CI, otherwise a printed skip reason and None.
pub fn teacher_path() -> Option<PathBuf> {
    firstkd::testing::require_model("smollm2-135m")
}

/// All rows and the key-value metadata of one Parquet file.
pub fn read_parquet(
    path: &Path,
) -> (
    arrow::array::RecordBatch,
    Vec<parquet::file::metadata::KeyValue>,
) {
    let file = std::fs::File::open(path).expect("open parquet file");
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("parquet footer");
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default();
    let schema = builder.schema().clone();
    let batches: Vec<_> = builder
        .build()
        .expect("parquet reader")
        .collect::<Result<_, _>>()
        .expect("parquet rows");
    (
        arrow::compute::concat_batches(&schema, &batches).expect("concat"),
        kv,
    )
}

/// Every label row keyed by (sample_id, position): (target, in_loss, ids, f32 log-probs, target lp, entropy).
pub type Rows = Vec<((u64, u32), (u32, bool, Vec<u32>, Vec<f32>, f32, f32))>;

pub fn label_rows(dir: &Path) -> Rows {
    let reader = firstkd::store::StoreReader::open(dir).unwrap();
    let mut out = Vec::new();
    for r in reader.label_rows(&firstkd::store::LabelColumn::ALL, 4096) {
        let r = r.unwrap();
        for i in 0..r.len() {
            out.push((
                (r.sample_id[i], r.position[i]),
                (
                    r.target_id[i],
                    r.in_loss[i],
                    r.ids(i).to_vec(),
                    r.logprobs(i).to_vec(),
                    r.target_logprob[i],
                    r.entropy[i],
                ),
            ));
        }
    }
    out.sort_by_key(|r| r.0);
    out
}

/// Every file below `dir`, relative, sorted.
pub fn files_below(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
