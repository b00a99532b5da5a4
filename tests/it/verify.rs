//! verify catches each corruption with a clear message naming the file (and row).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, AsArray, BooleanArray, FixedSizeListArray, Float16Array, Float32Array, RecordBatch,
    UInt32Array, UInt64Array,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Float32Type, UInt32Type, UInt64Type};
use firstkd::schema::{LogprobDtype, Table};
use firstkd::store::{sha256_file, verify, Manifest, StoreReader};
use firstkd::Error;
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::util::{read_parquet, small_store, tempdir};

/// The labels table of one part as plain vectors.
struct Cols {
    sample_id: Vec<u64>,
    position: Vec<u32>,
    target: Vec<u32>,
    in_loss: Vec<bool>,
    ids: Vec<u32>,
    lps: Vec<f32>,
    tlp: Vec<f32>,
    ent: Vec<f32>,
}

fn to_cols(b: &RecordBatch) -> Cols {
    let f32s = |a: &ArrayRef| {
        cast(a, &DataType::Float32)
            .unwrap()
            .as_primitive::<Float32Type>()
            .values()
            .to_vec()
    };
    Cols {
        sample_id: b.column(0).as_primitive::<UInt64Type>().values().to_vec(),
        position: b.column(1).as_primitive::<UInt32Type>().values().to_vec(),
        target: b.column(2).as_primitive::<UInt32Type>().values().to_vec(),
        in_loss: b
            .column(3)
            .as_boolean()
            .iter()
            .map(|x| x.unwrap())
            .collect(),
        ids: b
            .column(4)
            .as_fixed_size_list()
            .values()
            .as_primitive::<UInt32Type>()
            .values()
            .to_vec(),
        lps: f32s(b.column(5).as_fixed_size_list().values()),
        tlp: f32s(b.column(6)),
        ent: b.column(7).as_primitive::<Float32Type>().values().to_vec(),
    }
}

fn to_batch(c: Cols, like: &RecordBatch, k: i32, dtype: LogprobDtype) -> RecordBatch {
    let lp = |v: Vec<f32>| -> ArrayRef {
        match dtype {
            LogprobDtype::Float16 => Arc::new(Float16Array::from(
                v.into_iter().map(half::f16::from_f32).collect::<Vec<_>>(),
            )),
            LogprobDtype::Float32 => Arc::new(Float32Array::from(v)),
            LogprobDtype::Quantized => panic!("these edits are of 1.0 files"),
        }
    };
    let list = |values: ArrayRef| -> ArrayRef {
        let f = Arc::new(Field::new("item", values.data_type().clone(), false));
        Arc::new(FixedSizeListArray::try_new(f, k, values, None).unwrap())
    };
    RecordBatch::try_new(
        like.schema(),
        vec![
            Arc::new(UInt64Array::from(c.sample_id)),
            Arc::new(UInt32Array::from(c.position)),
            Arc::new(UInt32Array::from(c.target)),
            Arc::new(BooleanArray::from(c.in_loss)),
            list(Arc::new(UInt32Array::from(c.ids))),
            list(lp(c.lps)),
            lp(c.tlp),
            Arc::new(Float32Array::from(c.ent)),
        ],
    )
    .unwrap()
}

/// Rewrites part `index` of `table` with `batch` and metadata `kv`, updating the manifest so
/// only the content (not the checksum) is wrong.
fn replace_part(dir: &Path, index: usize, table: Table, batch: &RecordBatch, kv: Vec<KeyValue>) {
    let mut m = Manifest::load(dir).unwrap();
    let rel = m.parts[index].file(table).file.clone();
    let path = dir.join(&rel);
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(kv))
        .build();
    let mut w =
        ArrowWriter::try_new(File::create(&path).unwrap(), batch.schema(), Some(props)).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
    let entry = match table {
        Table::Labels => &mut m.parts[index].labels,
        Table::Samples => &mut m.parts[index].samples,
    };
    entry.bytes = std::fs::metadata(&path).unwrap().len();
    entry.sha256 = sha256_file(&path).unwrap();
    entry.rows = batch.num_rows() as u64;
    m.save(dir).unwrap();
}

/// Builds a store, mutates one labels row of part 1, and returns verify's messages.
fn corrupt_row(mutate: impl Fn(&mut Cols, usize, usize)) -> Vec<String> {
    let report = rewrite_row(mutate);
    assert!(!report.is_clean());
    report.problems.iter().map(|p| p.to_string()).collect()
}

fn rewrite_row(mutate: impl Fn(&mut Cols, usize, usize)) -> firstkd::store::VerifyReport {
    let tmp = tempdir();
    let (dir, m) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let path = dir.join(&m.parts[1].labels.file);
    let (batch, kv) = read_parquet(&path);
    let mut cols = to_cols(&batch);
    mutate(&mut cols, 10, m.k);
    let batch = to_batch(cols, &batch, m.k as i32, m.logprob_dtype);
    replace_part(&dir, 1, Table::Labels, &batch, kv);
    verify(&dir).unwrap()
}

fn assert_found(messages: &[String], needle: &str) {
    assert!(
        messages
            .iter()
            .any(|m| m.contains(needle) && m.contains("labels/part-00001.parquet row ")),
        "expected {needle:?} with file and row in {messages:#?}"
    );
}

#[test]
fn clean_store_verifies() {
    let tmp = tempdir();
    let (dir, m) = small_store(tmp.path(), "s", LogprobDtype::Float32);
    let report = verify(&dir).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.label_rows_checked, m.rows(Table::Labels));
    assert_eq!(report.sample_rows_checked, m.rows(Table::Samples));
}

#[test]
fn rewrite_without_change_stays_clean() {
    // Guards the corruption tests below: the rewrite helper alone must not trip verify.
    let report = rewrite_row(|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.problems);
}

#[test]
fn detects_order_violation() {
    let m = corrupt_row(|c, r, k| c.lps.swap(r * k, r * k + 1));
    assert_found(&m, "not descending");
}

#[test]
fn detects_id_out_of_vocab() {
    assert_found(
        &corrupt_row(|c, r, k| c.ids[r * k + 4] = 49152),
        "outside vocabulary",
    );
}

#[test]
fn detects_repeated_id() {
    assert_found(
        &corrupt_row(|c, r, k| c.ids[r * k + 1] = c.ids[r * k]),
        "repeated",
    );
}

#[test]
fn detects_positive_logprob() {
    assert_found(
        &corrupt_row(|c, r, k| c.lps[r * k] = 0.5),
        "is not a finite value <= 0",
    );
}

#[test]
fn detects_mass_above_one() {
    assert_found(
        &corrupt_row(|c, r, k| {
            c.lps[r * k..(r + 1) * k].copy_from_slice(&[-0.1, -0.2, -0.3, -0.4, -0.5])
        }),
        "probability mass",
    );
}

#[test]
fn detects_position_gap() {
    assert_found(&corrupt_row(|c, r, _| c.position[r] += 1), "position");
}

#[test]
fn detects_target_mismatch() {
    assert_found(
        &corrupt_row(|c, r, _| c.target[r] = (c.target[r] + 1) % 49152),
        "target_id",
    );
}

#[test]
fn detects_wrong_loss_mask() {
    assert_found(
        &corrupt_row(|c, r, _| c.in_loss[r] = !c.in_loss[r]),
        "in_loss",
    );
}

#[test]
fn detects_nan() {
    assert_found(&corrupt_row(|c, r, _| c.ent[r] = f32::NAN), "entropy");
}

#[test]
fn detects_nan_and_infinite_logprobs() {
    // The first top-k log-prob, the last one and the target's, each NaN or infinite: every
    // case is a verify problem naming the part and the row, none passes as a label.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let found = corrupt_row(|c, r, _| c.lps[r * 5] = bad);
        assert!(!found.is_empty(), "{bad} as the first log-prob");
        assert!(
            found
                .iter()
                .any(|m| m.contains("labels/part-00001.parquet row ")),
            "{bad}: {found:?}"
        );
        let found = corrupt_row(|c, r, k| c.lps[r * k + k - 1] = bad);
        assert!(!found.is_empty(), "{bad} as the last log-prob");
        let found = corrupt_row(|c, r, _| c.tlp[r] = bad);
        assert!(!found.is_empty(), "{bad} as the target log-prob");
    }
}

#[test]
fn detects_truncated_part() {
    let tmp = tempdir();
    let (dir, m) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let path = dir.join(&m.parts[1].labels.file);
    let len = std::fs::metadata(&path).unwrap().len();
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let report = verify(&dir).unwrap();
    let text: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        text.iter()
            .any(|t| t.contains("labels/part-00001.parquet") && t.contains("truncated")),
        "{text:?}"
    );
    // The reader refuses the store when it opens it (the size is not the manifest's), naming
    // the file; a part cut short with the size kept fails in the decoder instead.
    let err = StoreReader::open(&dir).unwrap_err();
    assert!(
        err.to_string().contains("part-00001") && err.to_string().contains("bytes"),
        "{err}"
    );
}

#[test]
fn detects_flipped_byte() {
    let tmp = tempdir();
    let (dir, m) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let path = dir.join(&m.parts[0].samples.file);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let report = verify(&dir).unwrap();
    assert!(report
        .problems
        .iter()
        .any(|p| p.file == "samples/part-00000.parquet" && p.message.contains("sha256")));
}

#[test]
fn detects_missing_and_extra_parts() {
    let tmp = tempdir();
    let (dir, m) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    std::fs::remove_file(dir.join(&m.parts[2].labels.file)).unwrap();
    std::fs::copy(
        dir.join(&m.parts[0].samples.file),
        dir.join("samples/part-00099.parquet"),
    )
    .unwrap();
    let report = verify(&dir).unwrap();
    let text: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        text.iter()
            .any(|t| t.contains("labels/part-00002.parquet: missing")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("samples/part-00099.parquet: extra file")),
        "{text:?}"
    );
}

#[test]
fn detects_wrong_row_count_in_manifest() {
    let tmp = tempdir();
    let (dir, _) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let mut m = Manifest::load(&dir).unwrap();
    m.parts[0].labels.rows += 1;
    m.save(&dir).unwrap();
    let report = verify(&dir).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.message.contains("manifest says")),
        "{:?}",
        report.problems
    );
}

#[test]
fn refuses_unknown_major_version_in_manifest() {
    let tmp = tempdir();
    let (dir, _) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"schema_version\": \"1.0\"", "\"schema_version\": \"3.0\"");
    std::fs::write(&path, text).unwrap();
    assert!(matches!(
        StoreReader::open(&dir),
        Err(Error::UnsupportedSchemaVersion { .. })
    ));
    let report = verify(&dir).unwrap();
    assert!(report.problems[0]
        .message
        .contains("unsupported store schema version 3.0"));
}

#[test]
fn refuses_unknown_major_version_in_parquet_metadata() {
    let tmp = tempdir();
    let (dir, m) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let path = dir.join(&m.parts[0].labels.file);
    let (batch, kv) = read_parquet(&path);
    let kv = kv
        .into_iter()
        .map(|e| {
            if e.key == "firstkd.schema_version" {
                KeyValue::new(e.key, "3.1".to_string())
            } else {
                e
            }
        })
        .collect();
    replace_part(&dir, 0, Table::Labels, &batch, kv);
    let report = verify(&dir).unwrap();
    assert!(report
        .problems
        .iter()
        .any(|p| p.file == "labels/part-00000.parquet"
            && p.message.contains("unsupported store schema version 3.1")));
    let reader = StoreReader::open(&dir).unwrap();
    let first = reader
        .batches(Table::Labels, None, 100)
        .unwrap()
        .next()
        .unwrap();
    assert!(matches!(first, Err(Error::UnsupportedSchemaVersion { .. })));
}

#[test]
fn detects_garbage_manifest_and_non_store() {
    let tmp = tempdir();
    let (dir, _) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    std::fs::write(dir.join("manifest.json"), b"{ not json").unwrap();
    let report = verify(&dir).unwrap();
    assert!(report.problems[0].message.contains("invalid manifest"));
    let report = verify(&tmp.path().join("nothing-here")).unwrap();
    assert!(report.problems[0].message.contains("does not exist"));
}
