//! The store's Arrow schemas, column names, Parquet metadata keys and version rules.
//!
//! The frozen form of these schemas lives in `schemas/*.json`; a test checks the two agree.
//! docs/format.md explains every column and key.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Major version of the store format this build writes and reads.
pub const SCHEMA_MAJOR: u32 = 1;
/// Minor version: additive, backwards-compatible changes.
pub const SCHEMA_MINOR: u32 = 0;
/// The full schema version string written into manifests and Parquet files.
pub const SCHEMA_VERSION: &str = "1.0";
/// Value of the manifest's `format` field.
pub const FORMAT_NAME: &str = "firstkd-store";
/// Default number of teacher tokens kept per position.
pub const DEFAULT_K: usize = 5;

/// Column names of the `labels` table (one row per predicted token position).
pub mod labels {
    pub const SAMPLE_ID: &str = "sample_id";
    pub const POSITION: &str = "position";
    pub const TARGET_ID: &str = "target_id";
    pub const IN_LOSS: &str = "in_loss";
    pub const TOPK_IDS: &str = "topk_ids";
    pub const TOPK_LOGPROBS: &str = "topk_logprobs";
    pub const TARGET_LOGPROB: &str = "target_logprob";
    pub const ENTROPY: &str = "entropy";
}

/// Column names of the `samples` table (one row per input sample).
pub mod samples {
    pub const SAMPLE_ID: &str = "sample_id";
    pub const SOURCE: &str = "source";
    pub const SPLIT: &str = "split";
    pub const RECORD_INDEX: &str = "record_index";
    pub const WINDOW_INDEX: &str = "window_index";
    pub const INPUT_IDS: &str = "input_ids";
    pub const PROMPT_LEN: &str = "prompt_len";
    pub const NUM_POSITIONS: &str = "num_positions";
}

/// Keys of the Parquet key-value metadata written into every part file.
pub mod meta_keys {
    pub const SCHEMA_VERSION: &str = "firstkd.schema_version";
    pub const TABLE: &str = "firstkd.table";
    pub const K: &str = "firstkd.k";
    pub const LOGPROB_DTYPE: &str = "firstkd.logprob_dtype";
    pub const TEACHER: &str = "firstkd.teacher";
    pub const TOKENIZER: &str = "firstkd.tokenizer";
    pub const WRITER_VERSION: &str = "firstkd.writer_version";
    pub const PART_INDEX: &str = "firstkd.part_index";

    /// All keys, in the order they are documented.
    pub const ALL: [&str; 8] = [
        SCHEMA_VERSION,
        TABLE,
        K,
        LOGPROB_DTYPE,
        TEACHER,
        TOKENIZER,
        WRITER_VERSION,
        PART_INDEX,
    ];
}

/// The two tables of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    Labels,
    Samples,
}

impl Table {
    /// Table name, also the name of its folder inside the store.
    pub fn name(self) -> &'static str {
        match self {
            Table::Labels => "labels",
            Table::Samples => "samples",
        }
    }

    /// Both tables.
    pub const ALL: [Table; 2] = [Table::Labels, Table::Samples];
}

/// Storage type of log-probability columns.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LogprobDtype {
    /// IEEE half precision (2 bytes): the default; max probability error is documented in docs/format.md.
    #[default]
    #[value(name = "float16", alias = "f16")]
    Float16,
    /// IEEE single precision (4 bytes).
    #[value(name = "float32", alias = "f32")]
    Float32,
}

impl LogprobDtype {
    /// Arrow type of one log-probability value.
    pub fn arrow_type(self) -> DataType {
        match self {
            LogprobDtype::Float16 => DataType::Float16,
            LogprobDtype::Float32 => DataType::Float32,
        }
    }

    /// Name used in manifests, metadata and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            LogprobDtype::Float16 => "float16",
            LogprobDtype::Float32 => "float32",
        }
    }

    /// Parses a dtype name (`float16`/`f16`, `float32`/`f32`).
    pub fn parse(s: &str) -> Result<Self> {
        crate::parse_value(s, "log-prob dtype")
    }
}

fn list_item(data_type: DataType) -> Arc<Field> {
    Arc::new(Field::new("item", data_type, false))
}

/// Arrow schema of the `labels` table for a given k and log-prob dtype.
pub fn labels_schema(k: usize, dtype: LogprobDtype) -> SchemaRef {
    let k = i32::try_from(k).unwrap_or(i32::MAX);
    Arc::new(Schema::new(vec![
        Field::new(labels::SAMPLE_ID, DataType::UInt64, false),
        Field::new(labels::POSITION, DataType::UInt32, false),
        Field::new(labels::TARGET_ID, DataType::UInt32, false),
        Field::new(labels::IN_LOSS, DataType::Boolean, false),
        Field::new(
            labels::TOPK_IDS,
            DataType::FixedSizeList(list_item(DataType::UInt32), k),
            false,
        ),
        Field::new(
            labels::TOPK_LOGPROBS,
            DataType::FixedSizeList(list_item(dtype.arrow_type()), k),
            false,
        ),
        Field::new(labels::TARGET_LOGPROB, dtype.arrow_type(), false),
        Field::new(labels::ENTROPY, DataType::Float32, false),
    ]))
}

/// Arrow schema of the `samples` table.
pub fn samples_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(samples::SAMPLE_ID, DataType::UInt64, false),
        Field::new(samples::SOURCE, DataType::Utf8, false),
        Field::new(samples::SPLIT, DataType::Utf8, false),
        Field::new(samples::RECORD_INDEX, DataType::UInt64, false),
        Field::new(samples::WINDOW_INDEX, DataType::UInt32, false),
        Field::new(
            samples::INPUT_IDS,
            DataType::List(list_item(DataType::UInt32)),
            false,
        ),
        Field::new(samples::PROMPT_LEN, DataType::UInt32, false),
        Field::new(samples::NUM_POSITIONS, DataType::UInt32, false),
    ]))
}

/// Schema of `table` for a store with the given k and dtype.
pub fn table_schema(table: Table, k: usize, dtype: LogprobDtype) -> SchemaRef {
    match table {
        Table::Labels => labels_schema(k, dtype),
        Table::Samples => samples_schema(),
    }
}

/// Parses "MAJOR.MINOR" and refuses a major version this build does not read.
pub fn check_version(found: &str, path: &Path) -> Result<(u32, u32)> {
    let unsupported = || Error::UnsupportedSchemaVersion {
        path: path.to_path_buf(),
        found: found.to_string(),
        supported: SCHEMA_MAJOR,
    };
    let (major, minor) = found.split_once('.').ok_or_else(unsupported)?;
    let major: u32 = major.parse().map_err(|_| unsupported())?;
    let minor: u32 = minor.parse().map_err(|_| unsupported())?;
    if major != SCHEMA_MAJOR {
        return Err(unsupported());
    }
    Ok((major, minor))
}

/// A portable, human-readable type name (`uint32`, `fixed_size_list<float16, k>`, ...).
/// The frozen JSON schemas use these names, with the list size written as `k`.
pub fn type_name(data_type: &DataType, k: usize) -> String {
    match data_type {
        DataType::Boolean => "bool".into(),
        DataType::UInt32 => "uint32".into(),
        DataType::UInt64 => "uint64".into(),
        DataType::Float16 => "float16".into(),
        DataType::Float32 => "float32".into(),
        DataType::Utf8 => "utf8".into(),
        DataType::List(item) => format!("list<{}>", type_name(item.data_type(), k)),
        DataType::FixedSizeList(item, n) => {
            let size = if usize::try_from(*n).ok() == Some(k) {
                "k".to_string()
            } else {
                n.to_string()
            };
            format!(
                "fixed_size_list<{}, {size}>",
                type_name(item.data_type(), k)
            )
        }
        other => format!("{other:?}"),
    }
}

/// The columns of `schema` as (name, portable type, nullable), for the frozen JSON.
pub fn describe(schema: &Schema, k: usize) -> Vec<(String, String, bool)> {
    schema
        .fields()
        .iter()
        .map(|f| {
            (
                f.name().clone(),
                type_name(f.data_type(), k),
                f.is_nullable(),
            )
        })
        .collect()
}

/// Frozen schema file as stored under `schemas/`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FrozenSchema {
    pub table: String,
    pub schema_version: String,
    pub columns: Vec<FrozenColumn>,
    #[serde(default)]
    pub parquet_metadata_keys: Vec<String>,
    #[serde(default)]
    pub notes: BTreeMap<String, String>,
}

/// One column of a frozen schema.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FrozenColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub nullable: bool,
    pub description: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frozen(table: Table) -> FrozenSchema {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas")
            .join(format!("{}.v1.json", table.name()));
        let text = std::fs::read_to_string(&path).expect("frozen schema file exists");
        serde_json::from_str(&text).expect("frozen schema parses")
    }

    #[test]
    fn rust_schemas_equal_frozen_json() {
        for table in Table::ALL {
            for dtype in [LogprobDtype::Float16, LogprobDtype::Float32] {
                let frozen = frozen(table);
                assert_eq!(frozen.table, table.name());
                assert_eq!(frozen.schema_version, SCHEMA_VERSION);
                let rust = describe(&table_schema(table, DEFAULT_K, dtype), DEFAULT_K);
                let json: Vec<(String, String, bool)> = frozen
                    .columns
                    .iter()
                    .map(|c| {
                        let t = c.type_name.replace("LOGPROB", dtype.name());
                        (c.name.clone(), t, c.nullable)
                    })
                    .collect();
                assert_eq!(rust, json, "table {} dtype {:?}", table.name(), dtype);
                let keys: Vec<&str> = frozen
                    .parquet_metadata_keys
                    .iter()
                    .map(String::as_str)
                    .collect();
                assert_eq!(keys, meta_keys::ALL.to_vec());
                assert!(frozen.columns.iter().all(|c| !c.description.is_empty()));
            }
        }
    }

    #[test]
    fn version_rules() {
        let p = Path::new("x");
        assert_eq!(check_version("1.0", p).unwrap(), (1, 0));
        assert_eq!(check_version("1.7", p).unwrap(), (1, 7));
        for bad in ["2.0", "0.9", "1", "", "one.zero", "1.x"] {
            let err = check_version(bad, p).unwrap_err().to_string();
            assert!(
                err.contains("unsupported store schema version"),
                "{bad}: {err}"
            );
        }
    }
}
