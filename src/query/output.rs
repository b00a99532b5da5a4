//! Writing query results: an aligned text table, CSV, JSON lines or a Parquet file.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use arrow::util::pretty::pretty_format_batches_with_schema;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};

/// Output format of query results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned text table (collects each result in memory before printing it).
    #[default]
    Table,
    /// CSV with a header row; list columns are written as text such as `[1, 2, 3]`.
    Csv,
    /// One JSON object per row (lists as JSON arrays).
    #[value(alias = "json", alias = "ndjson")]
    Jsonl,
    /// A zstd-compressed Parquet file (needs a file path; one result only).
    Parquet,
}

impl OutputFormat {
    /// Parses `table`, `csv`, `jsonl` (or `json`), `parquet`.
    pub fn parse(s: &str) -> Result<Self> {
        crate::parse_value(s, "output format")
    }
}

/// Where results go.
pub enum Destination<'a> {
    /// A text stream (table, CSV, JSON lines).
    Stream(&'a mut dyn Write),
    /// A file path (any format; required for Parquet).
    File(PathBuf),
}

enum Sink<'a> {
    Stream(&'a mut dyn Write),
    File {
        path: PathBuf,
        file: Option<std::io::BufWriter<File>>,
    },
}

/// Writes the results of one or more statements, batch by batch.
///
/// Call [`ResultWriter::start`] with each statement's schema, [`ResultWriter::write`] for each
/// of its batches, and [`ResultWriter::finish`] at the end. Statements whose result has no
/// columns (`CREATE VIEW`, `SET`) write nothing.
pub struct ResultWriter<'a> {
    format: OutputFormat,
    sink: Sink<'a>,
    schema: Option<SchemaRef>,
    pending: Vec<RecordBatch>,
    results: usize,
    rows: usize,
    parquet: Option<ArrowWriter<File>>,
    parquet_path: Option<PathBuf>,
}

impl<'a> ResultWriter<'a> {
    /// A writer of `format` to `destination`. Parquet needs a file destination.
    pub fn new(format: OutputFormat, destination: Destination<'a>) -> Result<Self> {
        let sink = match destination {
            Destination::Stream(_) if format == OutputFormat::Parquet => {
                return Err(Error::InvalidArgument(
                    "Parquet output needs a file to write to, not a stream".into(),
                ))
            }
            Destination::Stream(w) => Sink::Stream(w),
            Destination::File(path) => Sink::File { path, file: None },
        };
        Ok(ResultWriter {
            format,
            sink,
            schema: None,
            pending: Vec::new(),
            results: 0,
            rows: 0,
            parquet: None,
            parquet_path: None,
        })
    }

    /// Rows written so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Results (statements with columns) written so far.
    pub fn results(&self) -> usize {
        self.results
    }

    fn text_out(&mut self) -> Result<&mut dyn Write> {
        match &mut self.sink {
            Sink::Stream(w) => Ok(&mut **w),
            Sink::File { path, file } => {
                if file.is_none() {
                    let f = File::create(&*path).map_err(|e| Error::io(&*path, e))?;
                    *file = Some(std::io::BufWriter::new(f));
                }
                match file {
                    Some(f) => Ok(f),
                    None => Err(Error::Internal("output file not open".into())),
                }
            }
        }
    }

    fn path(&self) -> &Path {
        match &self.sink {
            Sink::File { path, .. } => path,
            Sink::Stream(_) => Path::new("<stdout>"),
        }
    }

    /// Begins the result of a new statement.
    pub fn start(&mut self, schema: &SchemaRef) -> Result<()> {
        self.flush_table()?;
        if schema.fields().is_empty() {
            self.schema = None;
            return Ok(());
        }
        self.results += 1;
        self.schema = Some(Arc::clone(schema));
        match self.format {
            OutputFormat::Table => {}
            OutputFormat::Csv => {
                // The header, also for an empty result.
                let empty = RecordBatch::new_empty(Arc::clone(schema));
                self.write_csv(&empty, true)?;
            }
            OutputFormat::Jsonl => {}
            OutputFormat::Parquet => {
                if self.results > 1 {
                    return Err(Error::InvalidArgument(
                        "Parquet output holds one result; the SQL has several statements \
                         returning rows"
                            .into(),
                    ));
                }
                let path = self.path().to_path_buf();
                let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
                let props = WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::default()))
                    .build();
                let writer = ArrowWriter::try_new(file, Arc::clone(schema), Some(props))
                    .map_err(|e| Error::parquet(&path, e))?;
                self.parquet = Some(writer);
                self.parquet_path = Some(path);
            }
        }
        Ok(())
    }

    /// Writes one batch of the current statement's result.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if self.schema.is_none() || batch.num_columns() == 0 {
            return Ok(());
        }
        self.rows += batch.num_rows();
        match self.format {
            OutputFormat::Table => self.pending.push(batch.clone()),
            OutputFormat::Csv => self.write_csv(batch, false)?,
            OutputFormat::Jsonl => {
                let out = self.text_out()?;
                let mut writer = arrow::json::LineDelimitedWriter::new(out);
                writer.write(batch)?;
                writer.finish()?;
            }
            OutputFormat::Parquet => {
                let path = self.parquet_path.clone().unwrap_or_default();
                if let Some(w) = self.parquet.as_mut() {
                    w.write(batch).map_err(|e| Error::parquet(&path, e))?;
                }
            }
        }
        Ok(())
    }

    fn write_csv(&mut self, batch: &RecordBatch, header: bool) -> Result<()> {
        let batch = nested_as_text(batch)?;
        let out = self.text_out()?;
        let mut writer = arrow::csv::WriterBuilder::new()
            .with_header(header)
            .build(out);
        if header || batch.num_rows() > 0 {
            writer.write(&batch)?;
        }
        Ok(())
    }

    fn flush_table(&mut self) -> Result<()> {
        if self.format != OutputFormat::Table {
            return Ok(());
        }
        let Some(schema) = self.schema.take() else {
            return Ok(());
        };
        let batches = std::mem::take(&mut self.pending);
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let table = pretty_format_batches_with_schema(schema, &batches)?;
        let first = self.results <= 1;
        let out = self.text_out()?;
        if !first {
            writeln!(out).map_err(|e| Error::io("<output>", e))?;
        }
        writeln!(out, "{table}").map_err(|e| Error::io("<output>", e))?;
        writeln!(out, "{rows} row(s)").map_err(|e| Error::io("<output>", e))?;
        Ok(())
    }

    /// Ends the output: prints a pending table, closes a Parquet file, flushes.
    pub fn finish(mut self) -> Result<()> {
        self.flush_table()?;
        if let Some(writer) = self.parquet.take() {
            let path = self.parquet_path.clone().unwrap_or_default();
            writer.close().map_err(|e| Error::parquet(&path, e))?;
        }
        let path = self.path().to_path_buf();
        match &mut self.sink {
            Sink::Stream(w) => w.flush().map_err(|e| Error::io(&path, e))?,
            Sink::File { file: Some(f), .. } => f.flush().map_err(|e| Error::io(&path, e))?,
            Sink::File { file: None, .. } => {}
        }
        Ok(())
    }
}

/// `batch` with every nested column (lists, structs) replaced by its text form, for CSV.
pub fn nested_as_text(batch: &RecordBatch) -> Result<RecordBatch> {
    if !batch.columns().iter().any(|c| c.data_type().is_nested()) {
        return Ok(batch.clone());
    }
    let options = FormatOptions::default().with_null("");
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if column.data_type().is_nested() {
            let formatter = ArrayFormatter::try_new(column.as_ref(), &options)?;
            let text: StringArray = (0..column.len())
                .map(|i| {
                    if column.is_null(i) {
                        None
                    } else {
                        Some(formatter.value(i).to_string())
                    }
                })
                .collect();
            fields.push(Field::new(field.name(), DataType::Utf8, true));
            columns.push(Arc::new(text));
        } else {
            fields.push(field.as_ref().clone());
            columns.push(Arc::clone(column));
        }
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}
