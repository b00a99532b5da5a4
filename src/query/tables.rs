//! The `labels` and `samples` tables: DataFusion listing tables over exactly the part files
//! a store's manifest lists.

use std::path::Path;
use std::sync::Arc;

use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{MemTable, TableProvider};

use crate::error::{Error, Result};
use crate::schema::Table;
use crate::store::StoreReader;

/// A table provider for `table` of the store: a Parquet listing table over the manifest's
/// part files (never a directory listing, so unlisted or temporary files are ignored), with
/// the store's exact schema. Every part is checked first by the store reader's rules
/// (schema version, table, k, dtype, columns); an empty store gives an empty table.
pub fn table_provider(reader: &StoreReader, table: Table) -> Result<Arc<dyn TableProvider>> {
    let schema = reader.schema(table);
    let manifest = reader.manifest();
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
