//! The `labels` and `samples` tables: DataFusion listing tables over exactly the part files
//! a store's manifest lists.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::catalog::Session;
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{MemTable, TableProvider, TableType};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::ExecutionPlan;

use crate::error::{Error, Result};
use crate::schema::{labels_schema, LogprobDtype, Selection, Table};
use crate::store::{LabelColumn, LabelRows, StoreReader};

/// A table provider for `table` of the store: a Parquet listing table over the manifest's
/// part files (never a directory listing, so unlisted or temporary files are ignored), with
/// the store's exact schema. Every part is checked first by the store reader's rules
/// (schema version, table, k, dtype, columns); an empty store gives an empty table.
pub fn table_provider(reader: &StoreReader, table: Table) -> Result<Arc<dyn TableProvider>> {
    let schema = reader.schema(table);
    let manifest = reader.manifest();
    if table == Table::Labels && manifest.quantization.is_some() {
        return Ok(Arc::new(DecodedLabels::new(reader)?));
    }
    if manifest.parts.is_empty() {
        return Ok(Arc::new(MemTable::try_new(schema, vec![vec![]])?));
    }
    let mut urls = Vec::with_capacity(manifest.parts.len());
    for (i, part) in manifest.parts.iter().enumerate() {
        // Opening the part runs the reader's metadata and schema checks on its footer.
        reader.checked_builder(i, table)?;
        let path = reader.dir().join(&part.file(table).file);
        urls.push(file_url(&path)?);
    }
    let format = ParquetFormat::default();
    let options = ListingOptions::new(Arc::new(format)).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema);
    Ok(Arc::new(ListingTable::try_new(config)?))
}

/// A `file://` URL naming exactly one file. Built from the absolute path directly rather
/// than parsed, so characters such as `*` or `[` in a store path are never taken as a glob.
fn file_url(path: &Path) -> Result<ListingTableUrl> {
    let absolute = std::path::absolute(path).map_err(|e| Error::io(path, e))?;
    let url = url::Url::from_file_path(&absolute).map_err(|()| {
        Error::InvalidArgument(format!(
            "cannot turn {} into a file URL",
            absolute.display()
        ))
    })?;
    Ok(ListingTableUrl::try_new(url, None)?)
}

/// The logical `labels` table of a 2.0 store: the stored fixed-point columns decoded by the
/// store's typed reader (so SQL sees exactly the 1.0 table, log-probs as float32), one
/// DataFusion partition per target partition (a run of consecutive parts each), decoding only
/// the columns a query reads.
#[derive(Debug)]
pub struct DecodedLabels {
    reader: StoreReader,
    schema: SchemaRef,
}

impl DecodedLabels {
    /// The table over the committed parts of `reader` (every part checked first).
    pub fn new(reader: &StoreReader) -> Result<Self> {
        for i in 0..reader.manifest().parts.len() {
            reader.checked_builder(i, Table::Labels)?;
        }
        let m = reader.manifest();
        let schema = if m.selection().fixed_len() {
            labels_schema(m.k, LogprobDtype::Float32)
        } else {
            // Top-p and sample stores: variable-length lists, and the draws of a sample store.
            let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, false)));
            let mut fields: Vec<Field> = labels_schema(m.k, LogprobDtype::Float32)
                .fields()
                .iter()
                .map(|f| match f.data_type() {
                    DataType::FixedSizeList(item, _) => {
                        Field::new(f.name(), list(item.data_type().clone()), false)
                    }
                    _ => f.as_ref().clone(),
                })
                .collect();
            if matches!(m.selection(), Selection::Sample { .. }) {
                fields.push(Field::new(
                    crate::schema::labels_v2::TOPK_COUNTS,
                    list(DataType::UInt16),
                    false,
                ));
            }
            Arc::new(arrow::datatypes::Schema::new(fields))
        };
        Ok(DecodedLabels {
            reader: reader.clone(),
            schema,
        })
    }
}

#[async_trait::async_trait]
impl TableProvider for DecodedLabels {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let indices: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let columns: Vec<LabelColumn> = indices
            .iter()
            .map(|&i| {
                LabelColumn::ALL
                    .get(i)
                    .copied()
                    .unwrap_or(LabelColumn::TopkCounts)
            })
            .collect();
        let schema = Arc::new(self.schema.project(&indices)?);
        // One stream per target partition, each reading a run of consecutive parts: a stream
        // per part would give a 100-part store 100 sorts or aggregations side by side, each
        // with its own buffers.
        let parts = self.reader.manifest().parts.len();
        let streams = state.config().target_partitions().clamp(1, parts.max(1));
        let partitions: Vec<Arc<dyn PartitionStream>> = (0..streams)
            .map(|i| {
                Arc::new(LabelPart {
                    reader: self.reader.clone(),
                    parts: i * parts / streams..(i + 1) * parts / streams,
                    columns: columns.clone(),
                    schema: Arc::clone(&schema),
                }) as Arc<dyn PartitionStream>
            })
            .collect();
        let exec = StreamingTableExec::try_new(schema, partitions, None, [], false, limit)?;
        Ok(Arc::new(exec))
    }
}

/// Consecutive committed parts of a [`DecodedLabels`] table, decoded `columns` only.
#[derive(Debug)]
struct LabelPart {
    reader: StoreReader,
    parts: std::ops::Range<usize>,
    columns: Vec<LabelColumn>,
    schema: SchemaRef,
}

impl PartitionStream for LabelPart {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = Arc::clone(&self.schema);
        let columns = self.columns.clone();
        let rows = self
            .reader
            .part_label_rows(self.parts.clone(), &columns, 8192);
        let batches = rows.map(move |rows| {
            rows.and_then(|rows| logical_batch(&rows, &columns, &schema))
                .map_err(|e| DataFusionError::External(Box::new(e)))
        });
        Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            futures::stream::iter(batches),
        ))
    }
}

/// Decoded rows as a batch of the logical `labels` table (projected on `columns`).
fn logical_batch(
    rows: &LabelRows,
    columns: &[LabelColumn],
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let k = i32::try_from(rows.k)
        .map_err(|_| Error::Internal(format!("k {} does not fit a list size", rows.k)))?;
    let list = |values: ArrayRef| -> Result<ArrayRef> {
        let field = Arc::new(Field::new("item", values.data_type().clone(), false));
        if rows.offsets.is_empty() {
            return Ok(Arc::new(FixedSizeListArray::try_new(
                field, k, values, None,
            )?));
        }
        let offsets =
            arrow::buffer::OffsetBuffer::from_lengths(rows.offsets.windows(2).map(|w| w[1] - w[0]));
        Ok(Arc::new(arrow::array::ListArray::try_new(
            field, offsets, values, None,
        )?))
    };
    let arrays = columns
        .iter()
        .map(|c| -> Result<ArrayRef> {
            Ok(match c {
                LabelColumn::SampleId => Arc::new(UInt64Array::from(rows.sample_id.clone())),
                LabelColumn::Position => Arc::new(UInt32Array::from(rows.position.clone())),
                LabelColumn::TargetId => Arc::new(UInt32Array::from(rows.target_id.clone())),
                LabelColumn::InLoss => Arc::new(BooleanArray::from(rows.in_loss.clone())),
                LabelColumn::TopkIds => list(Arc::new(UInt32Array::from(rows.topk_ids.clone())))?,
                LabelColumn::TopkLogprobs => {
                    list(Arc::new(Float32Array::from(rows.topk_logprobs.clone())))?
                }
                LabelColumn::TargetLogprob => {
                    Arc::new(Float32Array::from(rows.target_logprob.clone()))
                }
                LabelColumn::Entropy => Arc::new(Float32Array::from(rows.entropy.clone())),
                LabelColumn::TopkCounts => list(Arc::new(arrow::array::UInt16Array::from(
                    rows.topk_counts.clone(),
                )))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let options = RecordBatchOptions::new().with_row_count(Some(rows.len()));
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        arrays,
        &options,
    )?)
}
