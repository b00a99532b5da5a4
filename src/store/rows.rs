//! The typed read side of the store: rows decoded once, by column name, into plain vectors.
//!
//! Every consumer of a store (calibration, verification, the trainer, examples) reads through
//! here, so a new physical layout of the store is one change in `store/`:
//!
//! * [`LabelRows`] / [`SampleRow`] (in `store::decode`): the decoded rows of the two tables;
//! * [`StoreReader::label_rows`] / [`StoreReader::sample_rows`]: whole-store streams, each
//!   part checked against the manifest before its rows are read;
//! * [`read_label_file`] / [`read_sample_file`]: one file, without the manifest checks (for
//!   `verify`, which reports those itself);
//! * [`StoreReader::labelled_samples`] (in `store::join`): each sample with its label rows.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;

use std::collections::HashMap;

use super::decode::{
    corrupt, decode_labels, decode_labels_v2, decode_samples, physical_label_names, LabelColumn,
    LabelRows, SampleColumn, SampleRow, V2Inputs,
};
use super::reader::StoreReader;
use crate::error::{Error, Result};
use crate::schema::{Quantization, Table};

/// Record batches of one Parquet file with a running row number, errors naming the file.
struct FileBatches {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
    next_row: u64,
}

impl FileBatches {
    /// Opens `path` projected on `names` (found by name in the file's own schema).
    fn open(path: &Path, names: &[&str], batch_rows: usize) -> Result<Self> {
        let builder = super::reader::open_parquet(path)?;
        Self::from_builder(path, builder, names, batch_rows)
    }

    fn from_builder(
        path: &Path,
        builder: ParquetRecordBatchReaderBuilder<File>,
        names: &[&str],
        batch_rows: usize,
    ) -> Result<Self> {
        let schema = builder.schema().clone();
        let indices = names
            .iter()
            .map(|name| {
                schema
                    .index_of(name)
                    .map_err(|_| corrupt(path, 0, format!("no column {name}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(batch_rows.max(1))
            .build()
            .map_err(|e| Error::parquet(path, e))?;
        Ok(FileBatches {
            path: path.to_path_buf(),
            reader,
            next_row: 0,
        })
    }

    /// The next batch and the file row number of its first row.
    fn next_batch(&mut self) -> Option<Result<(RecordBatch, u64)>> {
        let batch = match self.reader.next()? {
            Ok(b) => b,
            Err(e) => {
                return Some(Err(corrupt(
                    &self.path,
                    self.next_row,
                    format!("reading rows: {e}"),
                )))
            }
        };
        let first = self.next_row;
        self.next_row += batch.num_rows() as u64;
        Some(Ok((batch, first)))
    }
}

/// `Iterator::next` of a fallible stream whose `advance` returns `Ok(None)` at its end: the
/// stream stops for good after its first error.
macro_rules! next_or_stop {
    ($self:ident) => {{
        if $self.failed {
            return None;
        }
        let item = $self.advance().transpose();
        $self.failed = matches!(item, Some(Err(_)));
        item
    }};
}
pub(crate) use next_or_stop;

/// Walks record batches of files in order: store parts (checked against the manifest when
/// opened) or files read as they are.
struct Files {
    files: std::vec::IntoIter<(PathBuf, Option<usize>)>,
    store: Option<StoreReader>,
    table: Table,
    names: Vec<&'static str>,
    batch_rows: usize,
    current: Option<FileBatches>,
}

impl Files {
    fn new(
        files: Vec<(PathBuf, Option<usize>)>,
        store: Option<StoreReader>,
        table: Table,
        names: Vec<&'static str>,
        batch_rows: usize,
    ) -> Self {
        Files {
            files: files.into_iter(),
            store,
            table,
            names,
            batch_rows,
            current: None,
        }
    }

    /// The next batch, the file row number of its first row and the file's path.
    fn next_batch(&mut self) -> Result<Option<(RecordBatch, u64, PathBuf)>> {
        loop {
            if let Some(current) = self.current.as_mut() {
                match current.next_batch() {
                    Some(batch) => {
                        let (batch, first) = batch?;
                        return Ok(Some((batch, first, current.path.clone())));
                    }
                    None => self.current = None,
                }
            }
            let Some((path, part)) = self.files.next() else {
                return Ok(None);
            };
            self.current = Some(match (&self.store, part) {
                (Some(store), Some(part)) => {
                    let builder = store.checked_builder(part, self.table)?;
                    FileBatches::from_builder(&path, builder, &self.names, self.batch_rows)?
                }
                _ => FileBatches::open(&path, &self.names, self.batch_rows)?,
            });
        }
    }
}

/// Label rows of one or more files in order, `batch_rows` at a time.
pub struct LabelRowIter {
    files: Files,
    columns: Vec<LabelColumn>,
    k: usize,
    /// Set for a 2.0 store: the scales, and the inputs of the current part's samples.
    quant: Option<Quantization>,
    fixed_len: bool,
    inputs: HashMap<u64, Vec<u32>>,
    inputs_of: Option<PathBuf>,
    failed: bool,
}

/// The samples file of the same part as a labels file (`labels/part-N` -> `samples/part-N`).
pub fn samples_file_of(labels_path: &Path) -> PathBuf {
    let name = labels_path.file_name().unwrap_or_default();
    labels_path.parent().and_then(Path::parent).map_or_else(
        || PathBuf::from(name),
        |dir| dir.join(Table::Samples.name()).join(name),
    )
}

impl LabelRowIter {
    fn new(
        files: Files,
        columns: &[LabelColumn],
        k: usize,
        (quant, fixed_len): (Option<Quantization>, bool),
    ) -> Self {
        LabelRowIter {
            files,
            columns: columns.to_vec(),
            k,
            quant,
            fixed_len,
            inputs: HashMap::new(),
            inputs_of: None,
            failed: false,
        }
    }

    fn advance(&mut self) -> Result<Option<LabelRows>> {
        let Some((batch, first, path)) = self.files.next_batch()? else {
            return Ok(None);
        };
        let Some(quant) = self.quant else {
            return decode_labels(&batch, &self.columns, self.k, &path, first).map(Some);
        };
        let samples_path = samples_file_of(&path);
        let needs_inputs = self.columns.iter().any(|c| c.needs_inputs());
        if needs_inputs && self.inputs_of.as_deref() != Some(path.as_path()) {
            self.inputs.clear();
            let columns = [SampleColumn::SampleId, SampleColumn::InputIds];
            for row in read_sample_file(&samples_path, &columns) {
                let row = row?;
                self.inputs.insert(row.sample_id, row.input_ids);
            }
            self.inputs_of = Some(path.clone());
        }
        let v2 = V2Inputs {
            quant,
            fixed_len: self.fixed_len,
            inputs: &self.inputs,
            samples_path: &samples_path,
        };
        decode_labels_v2(&batch, &self.columns, self.k, &path, first, v2).map(Some)
    }
}

impl Iterator for LabelRowIter {
    type Item = Result<LabelRows>;

    fn next(&mut self) -> Option<Self::Item> {
        next_or_stop!(self)
    }
}

/// Sample rows of one or more files in order.
pub struct SampleRowIter {
    files: Files,
    columns: Vec<SampleColumn>,
    pending: std::vec::IntoIter<SampleRow>,
    failed: bool,
}

impl SampleRowIter {
    fn new(files: Files, columns: &[SampleColumn]) -> Self {
        SampleRowIter {
            files,
            columns: columns.to_vec(),
            pending: Vec::new().into_iter(),
            failed: false,
        }
    }

    fn advance(&mut self) -> Result<Option<SampleRow>> {
        loop {
            if let Some(row) = self.pending.next() {
                return Ok(Some(row));
            }
            let Some((batch, first, path)) = self.files.next_batch()? else {
                return Ok(None);
            };
            self.pending = decode_samples(&batch, &self.columns, &path, first)?.into_iter();
        }
    }
}

impl Iterator for SampleRowIter {
    type Item = Result<SampleRow>;

    fn next(&mut self) -> Option<Self::Item> {
        next_or_stop!(self)
    }
}

fn sample_names(columns: &[SampleColumn]) -> Vec<&'static str> {
    columns.iter().map(|c| c.name()).collect()
}

/// Rows decoded per batch of a samples file.
const SAMPLE_BATCH_ROWS: usize = 8192;

/// Reads one labels file as it is, without comparing it with a manifest (`quant`: the
/// store's 2.0 scales, `None` for a 1.0 store). The 2.0 target columns are decoded with the
/// samples file of the same part.
pub fn read_label_file(
    path: &Path,
    k: usize,
    quant: Option<Quantization>,
    columns: &[LabelColumn],
    batch_rows: usize,
) -> LabelRowIter {
    read_label_file_as(path, k, (quant, true), columns, batch_rows)
}

/// [`read_label_file`] for a store whose lists may vary in length (`fixed_len` false: a
/// top-p or sample selection).
pub fn read_label_file_as(
    path: &Path,
    k: usize,
    (quant, fixed_len): (Option<Quantization>, bool),
    columns: &[LabelColumn],
    batch_rows: usize,
) -> LabelRowIter {
    let files = vec![(path.to_path_buf(), None)];
    let names = physical_label_names(columns, quant.is_some());
    let files = Files::new(files, None, Table::Labels, names, batch_rows);
    LabelRowIter::new(files, columns, k, (quant, fixed_len))
}

/// Reads one samples file as it is, without comparing it with a manifest.
pub fn read_sample_file(path: &Path, columns: &[SampleColumn]) -> SampleRowIter {
    let files = vec![(path.to_path_buf(), None)];
    let names = sample_names(columns);
    let files = Files::new(files, None, Table::Samples, names, SAMPLE_BATCH_ROWS);
    SampleRowIter::new(files, columns)
}

impl StoreReader {
    fn files(&self, table: Table, parts: std::ops::Range<usize>) -> Vec<(PathBuf, Option<usize>)> {
        let parts = parts.start.min(self.manifest().parts.len())
            ..parts.end.min(self.manifest().parts.len());
        parts
            .map(|i| {
                (
                    self.dir().join(&self.manifest().parts[i].file(table).file),
                    Some(i),
                )
            })
            .collect()
    }

    /// Label rows of every committed part, in order; each part's metadata and schema are
    /// checked against the manifest before its rows are read.
    pub fn label_rows(&self, columns: &[LabelColumn], batch_rows: usize) -> LabelRowIter {
        self.part_label_rows(0..usize::MAX, columns, batch_rows)
    }

    /// Label rows of the committed parts in `parts` (indices into the manifest's list).
    pub fn part_label_rows(
        &self,
        parts: std::ops::Range<usize>,
        columns: &[LabelColumn],
        batch_rows: usize,
    ) -> LabelRowIter {
        let files = self.files(Table::Labels, parts);
        let quant = self.manifest().quantization;
        let names = physical_label_names(columns, quant.is_some());
        let files = Files::new(files, Some(self.clone()), Table::Labels, names, batch_rows);
        let fixed = self.manifest().selection().fixed_len();
        LabelRowIter::new(files, columns, self.manifest().k, (quant, fixed))
    }

    /// Sample rows of every committed part, in order (checked like [`Self::label_rows`]).
    pub fn sample_rows(&self, columns: &[SampleColumn]) -> SampleRowIter {
        self.part_sample_rows(0..usize::MAX, columns)
    }

    /// Sample rows of the committed parts in `parts`.
    pub fn part_sample_rows(
        &self,
        parts: std::ops::Range<usize>,
        columns: &[SampleColumn],
    ) -> SampleRowIter {
        let files = self.files(Table::Samples, parts);
        let names = sample_names(columns);
        let files = Files::new(
            files,
            Some(self.clone()),
            Table::Samples,
            names,
            SAMPLE_BATCH_ROWS,
        );
        SampleRowIter::new(files, columns)
    }
}
