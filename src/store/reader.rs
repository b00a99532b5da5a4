//! Opening a store for reading: the manifest, checked part files, and raw record batches in
//! file order (the typed rows most code wants are in `store::rows`).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;

use super::manifest::Manifest;
use crate::error::{Error, Result};
use crate::schema::{self, meta_keys, Table};

/// Where a store's part files come from when they are not all in its folder: a store on
/// object storage read part by part ([`super::stream::RemoteParts`]).
pub trait PartSource: Send + Sync + std::fmt::Debug {
    /// Opens the file of `table` in committed part `part` (at `path`, in the store folder),
    /// fetching and checking it first when it is not there.
    fn open(&self, part: usize, table: Table, path: &Path) -> Result<File>;

    /// What the store is called in messages (its URL).
    fn name(&self) -> &str;
}

/// A store opened for reading.
#[derive(Debug, Clone)]
pub struct StoreReader {
    dir: PathBuf,
    manifest: Manifest,
    source: Option<Arc<dyn PartSource>>,
}

impl StoreReader {
    /// Opens a complete store; refuses an unknown major schema version or an incomplete store.
    pub fn open(dir: &Path) -> Result<Self> {
        let reader = Self::open_allow_incomplete(dir)?;
        if !reader.manifest.complete {
            return Err(Error::IncompleteStore {
                path: dir.to_path_buf(),
                reason: format!(
                    "manifest says complete = false after {} committed part(s)",
                    reader.manifest.parts.len()
                ),
            });
        }
        Ok(reader)
    }

    /// Opens a store that may still be being written; only committed parts are read.
    pub fn open_allow_incomplete(dir: &Path) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        check_part_sizes(dir, &manifest)?;
        Ok(StoreReader {
            dir: dir.to_path_buf(),
            manifest,
            source: None,
        })
    }

    /// Opens a complete store whose folder holds its manifest and whose parts come from
    /// `source` as they are read (checked by it against the manifest's sizes and sha256).
    pub fn open_with_source(dir: &Path, source: Arc<dyn PartSource>) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        if !manifest.complete {
            return Err(Error::IncompleteStore {
                path: PathBuf::from(source.name()),
                reason: format!(
                    "manifest says complete = false after {} committed part(s)",
                    manifest.parts.len()
                ),
            });
        }
        Ok(StoreReader {
            dir: dir.to_path_buf(),
            manifest,
            source: Some(source),
        })
    }

    /// The store directory (for a store read through a [`PartSource`], the local folder
    /// its parts are fetched into).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store as messages name it: its folder, or its URL when read from object storage.
    pub fn name(&self) -> PathBuf {
        match &self.source {
            Some(source) => PathBuf::from(source.name()),
            None => self.dir.clone(),
        }
    }

    /// The store's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Full schema of `table` in this store.
    pub fn schema(&self, table: Table) -> SchemaRef {
        self.manifest.table_schema(table)
    }

    /// Absolute paths of the committed part files of `table`, in order.
    pub fn part_paths(&self, table: Table) -> Vec<PathBuf> {
        self.manifest
            .parts
            .iter()
            .map(|p| self.dir.join(&p.file(table).file))
            .collect()
    }

    /// Streams `table` in file order. `columns` selects columns by name (None = all);
    /// `batch_size` is the maximum rows per batch.
    pub fn batches(
        &self,
        table: Table,
        columns: Option<&[&str]>,
        batch_size: usize,
    ) -> Result<BatchIter> {
        let full = self.schema(table);
        let indices = match columns {
            None => (0..full.fields().len()).collect(),
            Some(names) => names
                .iter()
                .map(|name| {
                    full.index_of(name).map_err(|_| {
                        Error::InvalidArgument(format!(
                            "table {} has no column {name:?}",
                            table.name()
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(BatchIter {
            reader: self.clone(),
            table,
            indices,
            batch_size: batch_size.max(1),
            next_part: 0,
            current: None,
        })
    }

    /// Opens the file of `table` in committed part `part` (an index into the manifest's
    /// parts), checking its metadata and schema against the manifest before any row is read.
    pub fn checked_builder(
        &self,
        part: usize,
        table: Table,
    ) -> Result<ParquetRecordBatchReaderBuilder<File>> {
        let entry = self.manifest.parts.get(part).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: part {part} of {} is not committed",
                self.dir.display(),
                self.manifest.parts.len()
            ))
        })?;
        let path = self.dir.join(&entry.file(table).file);
        let builder = match &self.source {
            Some(source) => open_parquet_file(&path, source.open(part, table, &path)?)?,
            None => open_parquet(&path)?,
        };
        check_part_metadata(&path, &builder, table, &self.manifest)?;
        check_part_schema(&path, builder.schema(), &self.schema(table))?;
        Ok(builder)
    }

    /// Opens one part file of `table` (checked as [`Self::checked_builder`]) as raw record
    /// batches of the columns at `indices`.
    pub fn open_part(
        &self,
        part: usize,
        table: Table,
        indices: &[usize],
        batch_size: usize,
    ) -> Result<ParquetRecordBatchReader> {
        let builder = self.checked_builder(part, table)?;
        let path = self.dir.join(&self.manifest.parts[part].file(table).file);
        let mask = ProjectionMask::roots(builder.parquet_schema(), indices.iter().copied());
        builder
            .with_projection(mask)
            .with_batch_size(batch_size)
            .build()
            .map_err(|e| Error::parquet(&path, e))
    }
}

/// Opens a Parquet file for reading, refusing a footer whose column chunks do not lie inside
/// the file (a negative offset or length, or one past the end). The `parquet` crate asserts
/// on a negative one while it reads (found by the `store_files` fuzz target), so a damaged
/// footer would otherwise panic the reader instead of being reported.
pub fn open_parquet(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    open_parquet_file(path, file)
}

/// [`open_parquet`] on a file already open (`path` names it in messages).
pub fn open_parquet_file(path: &Path, file: File) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let builder = crate::runtime::guarded(|| ParquetRecordBatchReaderBuilder::try_new(file))
        .map_err(|message| Error::Corrupt {
            path: path.to_path_buf(),
            row: None,
            reason: format!("malformed Parquet footer (the decoder stopped: {message})"),
        })?
        .map_err(|e| Error::parquet(path, e))?;
    for (g, group) in builder.metadata().row_groups().iter().enumerate() {
        for (c, chunk) in group.columns().iter().enumerate() {
            let start = chunk
                .dictionary_page_offset()
                .unwrap_or(chunk.data_page_offset());
            let size = chunk.compressed_size();
            let inside = start >= 0
                && size >= 0
                && (start as u64)
                    .checked_add(size as u64)
                    .is_some_and(|end| end <= len);
            if !inside {
                return Err(Error::Corrupt {
                    path: path.to_path_buf(),
                    row: None,
                    reason: format!(
                        "the footer puts column chunk {c} of row group {g} at bytes \
                         {start}..+{size}, outside the file's {len} bytes"
                    ),
                });
            }
        }
    }
    Ok(builder)
}

/// Key-value metadata of a Parquet file as a map.
pub fn file_key_values(builder: &ParquetRecordBatchReaderBuilder<File>) -> HashMap<String, String> {
    builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kvs| {
            kvs.iter()
                .filter_map(|kv| kv.value.clone().map(|v| (kv.key.clone(), v)))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks that every listed part file exists with the size the manifest records: one `stat`
/// per file, so a part replaced by another store's (or cut short) is refused before any row
/// is read. `verify` checks the sha256 too.
fn check_part_sizes(dir: &Path, manifest: &Manifest) -> Result<()> {
    for file in manifest.parts.iter().flat_map(|p| [&p.labels, &p.samples]) {
        let path = dir.join(&file.file);
        let len = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        if len != file.bytes {
            return Err(Error::Corrupt {
                path,
                row: None,
                reason: format!(
                    "the file is {len} bytes but the manifest lists {} bytes: not the part \
                     this store committed (`firstkd verify` tells more)",
                    file.bytes
                ),
            });
        }
    }
    Ok(())
}

/// Checks a part's key-value metadata against the manifest: version first, then table and k.
pub fn check_part_metadata(
    path: &Path,
    builder: &ParquetRecordBatchReaderBuilder<File>,
    table: Table,
    manifest: &Manifest,
) -> Result<()> {
    let kv = file_key_values(builder);
    let mismatch = |reason: String| Error::SchemaMismatch {
        path: path.to_path_buf(),
        reason,
    };
    let version = kv
        .get(meta_keys::SCHEMA_VERSION)
        .ok_or_else(|| mismatch(format!("no {} metadata", meta_keys::SCHEMA_VERSION)))?;
    let (major, _) = schema::check_version(version, path)?;
    if major != manifest.logprob_dtype.major() {
        return Err(mismatch(format!(
            "metadata {} is {version:?}, manifest says {}",
            meta_keys::SCHEMA_VERSION,
            manifest.schema_version
        )));
    }
    if let Some(q) = manifest.quantization {
        let found = kv
            .get(meta_keys::QUANTIZATION)
            .and_then(|v| serde_json::from_str::<schema::Quantization>(v).ok());
        if found != Some(q) {
            return Err(mismatch(format!(
                "metadata {} is {:?}, manifest expects {q:?}",
                meta_keys::QUANTIZATION,
                kv.get(meta_keys::QUANTIZATION)
            )));
        }
    }
    let expect = [
        (meta_keys::TABLE, table.name().to_string()),
        (meta_keys::K, manifest.k.to_string()),
        (
            meta_keys::LOGPROB_DTYPE,
            manifest.logprob_dtype.name().to_string(),
        ),
    ];
    for (key, want) in expect {
        match kv.get(key) {
            Some(found) if *found == want => {}
            found => {
                return Err(mismatch(format!(
                    "metadata {key} is {found:?}, manifest expects {want:?}"
                )))
            }
        }
    }
    Ok(())
}

/// Checks that a part's Arrow schema has exactly the expected fields.
pub fn check_part_schema(path: &Path, found: &SchemaRef, expected: &SchemaRef) -> Result<()> {
    let describe = |s: &SchemaRef| -> Vec<String> {
        s.fields()
            .iter()
            .map(|f| {
                format!(
                    "{}: {} (nullable {})",
                    f.name(),
                    f.data_type(),
                    f.is_nullable()
                )
            })
            .collect()
    };
    let (found, expected) = (describe(found), describe(expected));
    if found != expected {
        return Err(Error::SchemaMismatch {
            path: path.to_path_buf(),
            reason: format!(
                "columns are [{}], expected [{}]",
                found.join(", "),
                expected.join(", ")
            ),
        });
    }
    Ok(())
}

/// Iterator over the record batches of one table, part after part.
pub struct BatchIter {
    reader: StoreReader,
    table: Table,
    indices: Vec<usize>,
    batch_size: usize,
    next_part: usize,
    current: Option<(PathBuf, ParquetRecordBatchReader)>,
}

impl Iterator for BatchIter {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((path, current)) = self.current.as_mut() {
                match current.next() {
                    Some(Ok(batch)) => return Some(Ok(batch)),
                    Some(Err(e)) => {
                        let err = Error::Arrow(e);
                        let path = path.clone();
                        self.current = None;
                        self.next_part = usize::MAX;
                        return Some(Err(Error::Corrupt {
                            path,
                            row: None,
                            reason: format!("reading rows: {err}"),
                        }));
                    }
                    None => self.current = None,
                }
            }
            let part = self.reader.manifest.parts.get(self.next_part)?;
            let path = self.reader.dir.join(&part.file(self.table).file);
            let index = self.next_part;
            self.next_part += 1;
            match self
                .reader
                .open_part(index, self.table, &self.indices, self.batch_size)
            {
                Ok(r) => self.current = Some((path, r)),
                Err(e) => {
                    self.next_part = usize::MAX;
                    return Some(Err(e));
                }
            }
        }
    }
}
