//! The typed read side (`store::rows`, `store::join`) on damaged and hostile parts: every
//! problem is an `Error::Corrupt` naming the file and the row, never a panic.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema};
use firstkd::schema::{LogprobDtype, Table};
use firstkd::store::{read_label_file, LabelColumn, SampleColumn, StoreReader};
use firstkd::Error;
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::util::{read_parquet, small_store, tempdir};

/// Replaces `path` with `batch`, keeping the file's key-value metadata, and records its new
/// size and sha256 in the store's manifest the way a writer would (readers refuse a part
/// whose size is not the manifest's before they decode a row; these tests are about what the
/// decoder finds).
fn write_file(path: &Path, batch: &RecordBatch, kv: Vec<KeyValue>) {
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(kv))
        .build();
    let mut w =
        ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
    let Some(store) = path.parent().and_then(Path::parent) else {
        return;
    };
    let Ok(mut m) = firstkd::store::Manifest::load(store) else {
        return;
    };
    for part in &mut m.parts {
        for file in [&mut part.labels, &mut part.samples] {
            if store.join(&file.file) == path {
                file.bytes = std::fs::metadata(path).unwrap().len();
                file.sha256 = firstkd::digest::sha256_file(path).unwrap();
            }
        }
    }
    m.save(store).unwrap();
}

/// `batch` with column `name` replaced by `array` of type `field`.
fn with_column(batch: &RecordBatch, name: &str, array: ArrayRef, field: Field) -> RecordBatch {
    let i = batch.schema().index_of(name).unwrap();
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    cols[i] = array;
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields[i] = field;
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
}

fn first_labels_file(dir: &Path) -> PathBuf {
    let reader = StoreReader::open(dir).unwrap();
    dir.join(&reader.manifest().parts[0].labels.file)
}

fn expect_corrupt<T: std::fmt::Debug>(
    result: Result<T, Error>,
    path: &Path,
) -> (Option<u64>, String) {
    match result {
        Err(Error::Corrupt {
            path: p,
            row,
            reason,
        }) => {
            assert_eq!(p, path, "the error names the file");
            (row, reason)
        }
        other => panic!("expected Corrupt for {}, got {other:?}", path.display()),
    }
}

fn collect_labels(path: &Path, k: usize) -> Result<Vec<firstkd::store::LabelRows>, Error> {
    read_label_file(path, k, None, &LabelColumn::ALL, 500).collect()
}

#[test]
fn a_mistyped_column_names_the_file_and_column() {
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let path = first_labels_file(&dir);
    let (batch, kv) = read_parquet(&path);
    // sample_id as int64 instead of uint64.
    let i = batch.schema().index_of("sample_id").unwrap();
    let ids = arrow::compute::cast(batch.column(i), &DataType::Int64).unwrap();
    let field = Field::new("sample_id", DataType::Int64, false);
    let bad = with_column(&batch, "sample_id", ids, field);
    write_file(&path, &bad, kv);
    let (row, reason) = expect_corrupt(collect_labels(&path, manifest.k), &path);
    assert_eq!(row, Some(0));
    assert!(
        reason.contains("sample_id") && reason.contains("Int64"),
        "{reason}"
    );
    // Through the store, the manifest check refuses the part before any row is read.
    let reader = StoreReader::open(&dir).unwrap();
    let err = reader
        .label_rows(&[LabelColumn::SampleId], 100)
        .collect::<Result<Vec<_>, _>>()
        .unwrap_err();
    assert!(matches!(err, Error::SchemaMismatch { .. }), "{err}");
}

#[test]
fn a_null_names_its_row() {
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "s", LogprobDtype::Float32);
    let path = first_labels_file(&dir);
    let (batch, kv) = read_parquet(&path);
    let i = batch.schema().index_of("position").unwrap();
    let n = batch.num_rows();
    let null_at = 1234.min(n - 1);
    let positions: UInt32Array = (0..n)
        .map(|r| {
            let v = batch
                .column(i)
                .as_any()
                .downcast_ref::<UInt32Array>()
                .unwrap()
                .value(r);
            (r != null_at).then_some(v)
        })
        .collect();
    let field = Field::new("position", DataType::UInt32, true);
    let bad = with_column(&batch, "position", Arc::new(positions), field);
    write_file(&path, &bad, kv);
    let (row, reason) = expect_corrupt(collect_labels(&path, manifest.k), &path);
    assert_eq!(row, Some(null_at as u64), "{reason}");
    assert!(reason.contains("position is null"), "{reason}");
}

#[test]
fn top_k_lists_of_the_wrong_length_are_refused() {
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let path = first_labels_file(&dir);
    let (row, reason) = expect_corrupt(collect_labels(&path, manifest.k + 1), &path);
    assert_eq!(row, Some(0));
    assert!(
        reason.contains("lists of 5") && reason.contains("k is 6"),
        "{reason}"
    );
}

#[test]
fn a_missing_column_is_named() {
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let path = first_labels_file(&dir);
    let (batch, kv) = read_parquet(&path);
    let mut batch = batch;
    batch.remove_column(batch.schema().index_of("entropy").unwrap());
    write_file(&path, &batch, kv);
    let (_, reason) = expect_corrupt(collect_labels(&path, manifest.k), &path);
    assert!(reason.contains("no column entropy"), "{reason}");
    // Columns that are there still read.
    let ok: Result<Vec<_>, _> =
        read_label_file(&path, manifest.k, None, &[LabelColumn::TopkIds], 500).collect();
    assert!(ok
        .unwrap()
        .iter()
        .all(|r| r.topk_ids.len() == r.len() * manifest.k));
}

/// Rewrites the first labels part keeping its metadata and schema, with `edit` applied to
/// the row indices (so the manifest checks pass and only the join can notice).
fn edit_label_rows(dir: &Path, edit: impl Fn(&mut Vec<u32>)) -> PathBuf {
    let path = first_labels_file(dir);
    let (batch, kv) = read_parquet(&path);
    let mut take: Vec<u32> = (0..batch.num_rows() as u32).collect();
    edit(&mut take);
    let take = UInt32Array::from(take);
    let cols: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c, &take, None).unwrap())
        .collect();
    write_file(
        &path,
        &RecordBatch::try_new(batch.schema(), cols).unwrap(),
        kv,
    );
    path
}

fn join_error(dir: &Path) -> Error {
    let reader = StoreReader::open(dir).unwrap();
    reader
        .labelled_samples(&[LabelColumn::TopkIds], |_| true)
        .collect::<Result<Vec<_>, _>>()
        .unwrap_err()
}

#[test]
fn the_join_names_a_label_row_out_of_step() {
    let tmp = tempdir();
    let (dir, _) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    // Drop row 5: the first sample's position 5 is missing.
    let path = edit_label_rows(&dir, |rows| {
        rows.remove(5);
    });
    let (row, reason) = expect_corrupt(Err::<(), _>(join_error(&dir)), &path);
    assert_eq!(row, Some(5), "{reason}");
    assert!(
        reason.contains("out of step") && reason.contains("position 5"),
        "{reason}"
    );
}

#[test]
fn the_join_refuses_label_rows_left_over() {
    let tmp = tempdir();
    let (dir, _) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    // Repeat the last row: a label row after the part's last sample.
    let path = edit_label_rows(&dir, |rows| {
        let last = *rows.last().unwrap();
        rows.push(last);
    });
    let (row, reason) = expect_corrupt(Err::<(), _>(join_error(&dir)), &path);
    let rows = read_parquet(&path).0.num_rows() as u64;
    assert_eq!(row, Some(rows - 1), "{reason}");
    assert!(reason.contains("after the last sample"), "{reason}");
}

#[test]
fn the_join_names_a_sample_whose_labels_end_early() {
    let tmp = tempdir();
    let (dir, _) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    edit_label_rows(&dir, |rows| {
        rows.pop();
    });
    let reader = StoreReader::open(&dir).unwrap();
    let samples = dir.join(&reader.manifest().parts[0].samples.file);
    let (row, reason) = expect_corrupt(Err::<(), _>(join_error(&dir)), &samples);
    let n = reader
        .part_sample_rows(0..1, &[SampleColumn::SampleId])
        .count() as u64;
    assert_eq!(row, Some(n - 1), "the last sample is named: {reason}");
    assert!(reason.contains("labels end inside sample"), "{reason}");
}

#[test]
fn samples_decode_by_name_with_row_numbers() {
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "s", LogprobDtype::Float16);
    let reader = StoreReader::open(&dir).unwrap();
    let rows: Vec<_> = reader
        .sample_rows(&SampleColumn::ALL)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len() as u64, manifest.rows(Table::Samples));
    for r in &rows {
        assert_eq!(r.input_ids.len(), r.num_positions as usize + 1);
        assert!(r.split == "train" || r.split == "valid", "{}", r.split);
    }
    // Row numbers restart at 0 in each part's file.
    let first = reader
        .part_sample_rows(1..2, &[SampleColumn::SampleId])
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(first.row, 0);
    // Only the columns asked for are filled.
    let ids: Vec<_> = reader
        .sample_rows(&[SampleColumn::SampleId])
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(ids
        .iter()
        .all(|r| r.input_ids.is_empty() && r.split.is_empty()));
}

/// A 2.0 (quantized) labels file with one edit; returns what reading all columns gives.
fn edit_v2(
    edit: impl Fn(&RecordBatch) -> RecordBatch,
) -> (PathBuf, Result<Vec<firstkd::store::LabelRows>, Error>) {
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "q", LogprobDtype::Quantized);
    let path = first_labels_file(&dir);
    let (batch, kv) = read_parquet(&path);
    write_file(&path, &edit(&batch), kv);
    let rows = read_v2(&path, &manifest, &LabelColumn::ALL);
    // Keep the directory alive while the rows are read.
    drop(tmp);
    (path, rows)
}

/// Every row of one 2.0 labels file, decoded with the store's scales.
fn read_v2(
    path: &Path,
    manifest: &firstkd::store::Manifest,
    columns: &[LabelColumn],
) -> Result<Vec<firstkd::store::LabelRows>, Error> {
    read_label_file(path, manifest.k, manifest.quantization, columns, 500).collect()
}

#[test]
fn a_quantized_file_with_a_contradictory_target_column_names_the_file_and_row() {
    use arrow::array::{AsArray, UInt16Array};
    use arrow::datatypes::UInt16Type;
    // Set target_logprob_q on the first row whose target is in the list (it must be null).
    let (path, rows) = edit_v2(|b| {
        let t = b
            .column_by_name("target_logprob_q")
            .unwrap()
            .as_primitive::<UInt16Type>();
        let row = (0..t.len())
            .find(|&i| t.is_null(i))
            .expect("a target in its list");
        let values: UInt16Array = (0..t.len())
            .map(|i| {
                if i == row {
                    Some(7)
                } else {
                    (!t.is_null(i)).then(|| t.value(i))
                }
            })
            .collect();
        with_column(
            b,
            "target_logprob_q",
            Arc::new(values),
            Field::new("target_logprob_q", DataType::UInt16, true),
        )
    });
    let (row, reason) = expect_corrupt(rows, &path);
    assert!(
        row.is_some() && reason.contains("is set but the target"),
        "{row:?} {reason}"
    );

    // Null where the target is outside the list: nothing to decode the log-prob from.
    let (path, rows) = edit_v2(|b| {
        let n = b.num_rows();
        let values: UInt16Array = (0..n).map(|_| None::<u16>).collect();
        with_column(
            b,
            "target_logprob_q",
            Arc::new(values),
            Field::new("target_logprob_q", DataType::UInt16, true),
        )
    });
    let (_, reason) = expect_corrupt(rows, &path);
    assert!(reason.contains("is null but the target"), "{reason}");
}

#[test]
fn a_quantized_file_with_a_short_list_or_missing_samples_names_the_file() {
    use arrow::array::{AsArray, ListArray, UInt16Array};
    use arrow::buffer::OffsetBuffer;
    // The probability list of row 3 loses an item.
    let (path, rows) = edit_v2(|b| {
        let l = b.column_by_name("topk_probs_q").unwrap().as_list::<i32>();
        let mut lengths: Vec<usize> = (0..l.len()).map(|i| l.value_length(i) as usize).collect();
        lengths[3] -= 1;
        let total: usize = lengths.iter().sum();
        let item = Arc::new(Field::new("item", DataType::UInt16, false));
        let values = l.values().as_primitive::<arrow::datatypes::UInt16Type>();
        let values = UInt16Array::from(values.values()[..total].to_vec());
        let list = ListArray::new(
            item,
            OffsetBuffer::from_lengths(lengths),
            Arc::new(values),
            None,
        );
        let field = b.schema().field_with_name("topk_probs_q").unwrap().clone();
        with_column(b, "topk_probs_q", Arc::new(list), field)
    });
    let (row, reason) = expect_corrupt(rows, &path);
    assert_eq!(row, Some(3), "{reason}");
    assert!(reason.contains("list of 4"), "{reason}");

    // Without its samples file a 2.0 labels file cannot give its targets: a clean error.
    let tmp = tempdir();
    let (dir, manifest) = small_store(tmp.path(), "q", LogprobDtype::Quantized);
    let path = first_labels_file(&dir);
    let samples = dir.join("samples").join(path.file_name().unwrap());
    std::fs::remove_file(&samples).unwrap();
    let err = read_v2(&path, &manifest, &LabelColumn::ALL)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(samples.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    // Columns that do not need the targets still read.
    let targetless = [
        LabelColumn::TopkIds,
        LabelColumn::TopkLogprobs,
        LabelColumn::Entropy,
    ];
    let ok = read_v2(&path, &manifest, &targetless);
    assert!(ok.is_ok(), "{ok:?}");
}
