//! Table functions over the manifest: `manifest()` (key/value rows) and `parts()` (one row
//! per committed part).

use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl};
use datafusion::common::{plan_err, Result};
use datafusion::datasource::{MemTable, TableProvider};

use crate::schema::Table;
use crate::store::Manifest;

/// SQL name of the key/value manifest table function.
pub const MANIFEST_FN: &str = "manifest";
/// SQL name of the per-part table function.
pub const PARTS_FN: &str = "parts";

/// The manifest flattened to `(key, value)` rows: nested keys joined with `.`, list items
/// as `name[i]`, values as text (strings unquoted, JSON `null` as SQL NULL, empty objects
/// and lists as `{}` / `[]`), followed by the derived totals `num_parts`, `label_rows`,
/// `sample_rows`, `in_loss_rows`.
pub fn manifest_rows(manifest: &Manifest) -> Vec<(String, Option<String>)> {
    let mut rows = Vec::new();
    match serde_json::to_value(manifest) {
        Ok(value) => flatten("", &value, &mut rows),
        Err(e) => rows.push(("error".into(), Some(e.to_string()))),
    }
    rows.push(("num_parts".into(), Some(manifest.parts.len().to_string())));
    rows.push((
        "label_rows".into(),
        Some(manifest.rows(Table::Labels).to_string()),
    ));
    rows.push((
        "sample_rows".into(),
        Some(manifest.rows(Table::Samples).to_string()),
    ));
    rows.push((
        "in_loss_rows".into(),
        Some(manifest.in_loss_rows().to_string()),
    ));
    rows
}

fn flatten(prefix: &str, value: &serde_json::Value, rows: &mut Vec<(String, Option<String>)>) {
    use serde_json::Value;
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, v) in map {
                let key = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&key, v, rows);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, rows);
            }
        }
        Value::Null => rows.push((prefix.to_string(), None)),
        Value::String(s) => rows.push((prefix.to_string(), Some(s.clone()))),
        other => rows.push((prefix.to_string(), Some(other.to_string()))),
    }
}

fn no_arguments(name: &str, args: &TableFunctionArgs) -> Result<()> {
    if !args.exprs().is_empty() {
        return plan_err!("{name}() takes no arguments");
    }
    Ok(())
}

fn mem_table(batch: RecordBatch) -> Result<Arc<dyn TableProvider>> {
    Ok(Arc::new(MemTable::try_new(
        batch.schema(),
        vec![vec![batch]],
    )?))
}

/// `manifest()`: see [`manifest_rows`].
#[derive(Debug)]
pub struct ManifestFunction {
    manifest: Arc<Manifest>,
}

impl ManifestFunction {
    /// The table function for `manifest`.
    pub fn new(manifest: Arc<Manifest>) -> Self {
        ManifestFunction { manifest }
    }
}

impl TableFunctionImpl for ManifestFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        no_arguments(MANIFEST_FN, &args)?;
        let rows = manifest_rows(&self.manifest);
        let schema = Arc::new(Schema::new(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("value", DataType::Utf8, true),
        ]));
        let keys: StringArray = rows.iter().map(|(k, _)| Some(k.as_str())).collect();
        let values: StringArray = rows.iter().map(|(_, v)| v.as_deref()).collect();
        let columns: Vec<ArrayRef> = vec![Arc::new(keys), Arc::new(values)];
        mem_table(RecordBatch::try_new(schema, columns)?)
    }
}

/// `parts()`: one row per committed part with its files, row counts, sizes and checksums.
#[derive(Debug)]
pub struct PartsFunction {
    manifest: Arc<Manifest>,
}

impl PartsFunction {
    /// The table function for `parts`.
    pub fn new(manifest: Arc<Manifest>) -> Self {
        PartsFunction { manifest }
    }
}

impl TableFunctionImpl for PartsFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        no_arguments(PARTS_FN, &args)?;
        let parts = &self.manifest.parts;
        let mut fields = vec![Field::new("part", DataType::UInt32, false)];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(UInt32Array::from_iter_values(
            parts.iter().map(|p| p.index),
        ))];
        for table in Table::ALL {
            let name = table.name();
            fields.push(Field::new(format!("{name}_file"), DataType::Utf8, false));
            fields.push(Field::new(format!("{name}_rows"), DataType::UInt64, false));
            fields.push(Field::new(format!("{name}_bytes"), DataType::UInt64, false));
            fields.push(Field::new(format!("{name}_sha256"), DataType::Utf8, false));
            let file = |f: fn(&crate::store::PartFile) -> &str| -> ArrayRef {
                Arc::new(StringArray::from_iter_values(
                    parts.iter().map(|p| f(p.file(table))),
                ))
            };
            columns.push(file(|f| f.file.as_str()));
            columns.push(Arc::new(UInt64Array::from_iter_values(
                parts.iter().map(|p| p.file(table).rows),
            )));
            columns.push(Arc::new(UInt64Array::from_iter_values(
                parts.iter().map(|p| p.file(table).bytes),
            )));
            columns.push(file(|f| f.sha256.as_str()));
        }
        fields.push(Field::new("in_loss_rows", DataType::UInt64, false));
        columns.push(Arc::new(UInt64Array::from_iter_values(
            parts.iter().map(|p| p.in_loss_rows),
        )));
        let schema = Arc::new(Schema::new(fields));
        mem_table(RecordBatch::try_new(schema, columns)?)
    }
}
