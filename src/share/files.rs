//! Files of an export or import: Parquet or JSON Lines, written under a temporary name and
//! renamed when complete; rows of one sequence read back from either.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, ListArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};

/// File format of an export or an import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// zstd Parquet.
    #[default]
    Parquet,
    /// JSON Lines, one object per sequence.
    Jsonl,
}

impl FileFormat {
    /// File name extension.
    pub fn extension(self) -> &'static str {
        match self {
            FileFormat::Parquet => "parquet",
            FileFormat::Jsonl => "jsonl",
        }
    }

    /// The format of `path` by its extension (`.parquet`, `.jsonl` / `.json`).
    pub fn of_path(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("parquet") => Ok(FileFormat::Parquet),
            Some("jsonl") | Some("json") => Ok(FileFormat::Jsonl),
            _ => Err(Error::InvalidArgument(format!(
                "{}: expected a .parquet or .jsonl file",
                path.display()
            ))),
        }
    }
}

/// A file being written: under `.<name>.tmp` until [`OutFile::finish`] renames it.
pub(crate) enum OutFile {
    Parquet {
        writer: Box<ArrowWriter<File>>,
        tmp: PathBuf,
        path: PathBuf,
    },
    Jsonl {
        writer: BufWriter<File>,
        tmp: PathBuf,
        path: PathBuf,
    },
}

/// The temporary name of `path`.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

impl OutFile {
    /// Creates `path` (as its temporary file) in `format`; Parquet gets `schema`, zstd and
    /// the key-value `metadata`.
    pub(crate) fn create(
        path: &Path,
        format: FileFormat,
        schema: &SchemaRef,
        metadata: Vec<(String, String)>,
        row_group_rows: usize,
    ) -> Result<Self> {
        let tmp = tmp_path(path);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(match format {
            FileFormat::Parquet => {
                let level = ZstdLevel::try_new(6).map_err(|e| Error::parquet(&tmp, e))?;
                let props = WriterProperties::builder()
                    .set_compression(Compression::ZSTD(level))
                    .set_max_row_group_row_count(Some(row_group_rows.max(1)))
                    .set_key_value_metadata(Some(
                        metadata
                            .into_iter()
                            .map(|(k, v)| KeyValue::new(k, v))
                            .collect(),
                    ))
                    .set_created_by(format!("firstkd {}", crate::VERSION))
                    .build();
                let writer = ArrowWriter::try_new(file, schema.clone(), Some(props))
                    .map_err(|e| Error::parquet(&tmp, e))?;
                OutFile::Parquet {
                    writer: Box::new(writer),
                    tmp,
                    path: path.to_path_buf(),
                }
            }
            FileFormat::Jsonl => OutFile::Jsonl {
                writer: BufWriter::new(file),
                tmp,
                path: path.to_path_buf(),
            },
        })
    }

    /// Appends a batch (Parquet) or its rows as JSON objects (JSON Lines).
    pub(crate) fn write(
        &mut self,
        batch: &RecordBatch,
        json_rows: &[serde_json::Value],
    ) -> Result<()> {
        match self {
            OutFile::Parquet { writer, tmp, .. } => {
                writer.write(batch).map_err(|e| Error::parquet(&*tmp, e))
            }
            OutFile::Jsonl { writer, tmp, .. } => {
                for row in json_rows {
                    serde_json::to_writer(&mut *writer, row)
                        .map_err(|e| Error::io(&*tmp, std::io::Error::other(e)))?;
                    writer.write_all(b"\n").map_err(|e| Error::io(&*tmp, e))?;
                }
                Ok(())
            }
        }
    }

    /// Closes, syncs and renames the file into place; returns its final path.
    pub(crate) fn finish(self) -> Result<PathBuf> {
        let (file, tmp, path) = match self {
            OutFile::Parquet { writer, tmp, path } => {
                let file = writer.into_inner().map_err(|e| Error::parquet(&tmp, e))?;
                (file, tmp, path)
            }
            OutFile::Jsonl { writer, tmp, path } => {
                let file = writer
                    .into_inner()
                    .map_err(|e| Error::io(&tmp, e.into_error()))?;
                (file, tmp, path)
            }
        };
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }
}

/// One sequence of an axolotl-style KD dataset, as read from a file.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct KdRow {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub target_token_ids: Vec<Vec<i64>>,
    pub target_logprobs: Vec<Vec<f64>>,
    pub target_mask: Vec<Vec<i64>>,
}

fn list_column<'a>(batch: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a ListArray> {
    let col = batch.column_by_name(name).ok_or_else(|| Error::Corrupt {
        path: path.to_path_buf(),
        row: None,
        reason: format!("no column {name:?}"),
    })?;
    col.as_list_opt::<i32>().ok_or_else(|| Error::Corrupt {
        path: path.to_path_buf(),
        row: None,
        reason: format!("column {name:?} is {}, expected a list", col.data_type()),
    })
}

fn cast_to(values: &ArrayRef, to: &DataType, path: &Path, name: &str) -> Result<ArrayRef> {
    arrow::compute::cast(values, to).map_err(|e| Error::Corrupt {
        path: path.to_path_buf(),
        row: None,
        reason: format!("column {name:?}: {e}"),
    })
}

fn flat<T: arrow::datatypes::ArrowPrimitiveType>(
    list: &ListArray,
    i: usize,
    to: &DataType,
    path: &Path,
    name: &str,
    row: u64,
) -> Result<Vec<T::Native>> {
    if list.is_null(i) {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            row: Some(row),
            reason: format!("{name} is null"),
        });
    }
    let values = cast_to(&list.value(i), to, path, name)?;
    let values = values.as_primitive::<T>();
    if values.null_count() > 0 {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            row: Some(row),
            reason: format!("{name} holds nulls"),
        });
    }
    Ok(values.values().to_vec())
}

fn nested<T: arrow::datatypes::ArrowPrimitiveType>(
    list: &ListArray,
    i: usize,
    to: &DataType,
    path: &Path,
    name: &str,
    row: u64,
) -> Result<Vec<Vec<T::Native>>> {
    if list.is_null(i) {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            row: Some(row),
            reason: format!("{name} is null"),
        });
    }
    let inner = list.value(i);
    let inner = inner.as_list_opt::<i32>().ok_or_else(|| Error::Corrupt {
        path: path.to_path_buf(),
        row: Some(row),
        reason: format!("{name} is not a list of lists"),
    })?;
    (0..inner.len())
        .map(|j| flat::<T>(inner, j, to, path, name, row))
        .collect()
}

/// Calls `each(first row, batch)` for the record batches of the Parquet file `path`; a batch
/// that cannot be decoded is `Corrupt` at its first row.
pub(crate) fn parquet_batches(
    path: &Path,
    batch_rows: usize,
    mut each: impl FnMut(u64, &RecordBatch) -> Result<()>,
) -> Result<()> {
    let reader = crate::store::reader::open_parquet(path)?
        .with_batch_size(batch_rows)
        .build()
        .map_err(|e| Error::parquet(path, e))?;
    let mut row = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            row: Some(row),
            reason: e.to_string(),
        })?;
        each(row, &batch)?;
        row += batch.num_rows() as u64;
    }
    Ok(())
}

/// Reads every sequence of an axolotl-style KD dataset file (Parquet or JSON Lines), calling
/// `each(row number, row)` in file order.
pub(crate) fn read_kd_rows(
    path: &Path,
    mut each: impl FnMut(u64, KdRow) -> Result<()>,
) -> Result<()> {
    match FileFormat::of_path(path)? {
        FileFormat::Parquet => parquet_batches(path, 256, |row, batch| {
            let cols = [
                "input_ids",
                "labels",
                "target_token_ids",
                "target_logprobs",
                "target_mask",
            ]
            .map(|n| list_column(batch, n, path));
            let [ids, labels, tids, tlps, tmask] = cols;
            let (ids, labels, tids, tlps, tmask) = (ids?, labels?, tids?, tlps?, tmask?);
            let (i64t, f64t) = (DataType::Int64, DataType::Float64);
            for i in 0..batch.num_rows() {
                let r = row + i as u64;
                each(
                    r,
                    KdRow {
                        input_ids: flat::<Int64Type>(ids, i, &i64t, path, "input_ids", r)?,
                        labels: flat::<Int64Type>(labels, i, &i64t, path, "labels", r)?,
                        target_token_ids: nested::<Int64Type>(
                            tids,
                            i,
                            &i64t,
                            path,
                            "target_token_ids",
                            r,
                        )?,
                        target_logprobs: nested::<Float64Type>(
                            tlps,
                            i,
                            &f64t,
                            path,
                            "target_logprobs",
                            r,
                        )?,
                        target_mask: nested::<Int64Type>(tmask, i, &i64t, path, "target_mask", r)?,
                    },
                )?;
            }
            Ok(())
        }),
        FileFormat::Jsonl => {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            for (row, line) in BufReader::new(file).lines().enumerate() {
                let row = row as u64;
                let line = line.map_err(|e| Error::io(path, e))?;
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value =
                    serde_json::from_str(&line).map_err(|e| Error::Corrupt {
                        path: path.to_path_buf(),
                        row: Some(row),
                        reason: format!("not JSON: {e}"),
                    })?;
                each(row, kd_row_from_json(&v, path, row)?)?;
            }
            Ok(())
        }
    }
}

fn kd_row_from_json(v: &serde_json::Value, path: &Path, row: u64) -> Result<KdRow> {
    let bad = |what: String| Error::Corrupt {
        path: path.to_path_buf(),
        row: Some(row),
        reason: what,
    };
    let get = |name: &str| v.get(name).ok_or_else(|| bad(format!("no field {name:?}")));
    // A JSON list whose elements `conv` reads, or an error naming the field.
    fn list_of<T>(
        x: &serde_json::Value,
        name: &str,
        what: &str,
        conv: impl Fn(&serde_json::Value) -> Option<T>,
        bad: &dyn Fn(String) -> Error,
    ) -> Result<Vec<T>> {
        x.as_array()
            .ok_or_else(|| bad(format!("{name} is not a list")))?
            .iter()
            .map(|e| conv(e).ok_or_else(|| bad(format!("{name} holds {e}, not {what}"))))
            .collect()
    }
    let ints = |x: &serde_json::Value, name: &str| {
        list_of(x, name, "an integer", serde_json::Value::as_i64, &bad)
    };
    let floats = |x: &serde_json::Value, name: &str| {
        list_of(x, name, "a number", serde_json::Value::as_f64, &bad)
    };
    let rows = |name: &str| -> Result<&Vec<serde_json::Value>> {
        get(name)?
            .as_array()
            .ok_or_else(|| bad(format!("{name} is not a list")))
    };
    Ok(KdRow {
        input_ids: ints(get("input_ids")?, "input_ids")?,
        labels: ints(get("labels")?, "labels")?,
        target_token_ids: rows("target_token_ids")?
            .iter()
            .map(|r| ints(r, "target_token_ids"))
            .collect::<Result<_>>()?,
        target_logprobs: rows("target_logprobs")?
            .iter()
            .map(|r| floats(r, "target_logprobs"))
            .collect::<Result<_>>()?,
        target_mask: rows("target_mask")?
            .iter()
            .map(|r| ints(r, "target_mask"))
            .collect::<Result<_>>()?,
    })
}

/// The Arrow schema of axolotl's pre-tokenized KD rows.
pub(crate) fn kd_schema() -> SchemaRef {
    let ints = || DataType::List(Arc::new(Field::new("item", DataType::Int32, false)));
    let nested = |t: DataType| {
        DataType::List(Arc::new(Field::new(
            "item",
            DataType::List(Arc::new(Field::new("item", t, false))),
            false,
        )))
    };
    Arc::new(arrow::datatypes::Schema::new(vec![
        Field::new("input_ids", ints(), false),
        Field::new("attention_mask", ints(), false),
        Field::new("labels", ints(), false),
        Field::new("target_token_ids", nested(DataType::Int32), false),
        Field::new("target_logprobs", nested(DataType::Float32), false),
        Field::new("target_mask", nested(DataType::Int32), false),
    ]))
}
