//! `firstkd inspect`: what a store holds, where it came from, and what it costs on disk.

use std::path::Path;

use serde::Serialize;

use super::manifest::Manifest;
use crate::error::{Error, Result};
use crate::schema::Table;

/// Summary of a store.
#[derive(Debug, Clone, Serialize)]
pub struct StoreSummary {
    pub path: String,
    pub manifest: Manifest,
    pub parts: usize,
    pub samples: u64,
    pub label_rows: u64,
    pub in_loss_rows: u64,
    pub labels_bytes: u64,
    pub samples_bytes: u64,
    /// Every file under the store directory, manifest included.
    pub bytes_on_disk: u64,
    /// Labels table bytes per label row (token position).
    pub labels_bytes_per_token: f64,
    /// All bytes on disk per label row.
    pub total_bytes_per_token: f64,
}

/// Summarises the store at `dir` from its manifest and the files on disk.
pub fn summarize(dir: &Path) -> Result<StoreSummary> {
    let manifest = Manifest::load(dir)?;
    let bytes_on_disk = dir_size(dir)?;
    let label_rows = manifest.rows(Table::Labels);
    let per = |bytes: u64| {
        if label_rows == 0 {
            0.0
        } else {
            bytes as f64 / label_rows as f64
        }
    };
    Ok(StoreSummary {
        path: dir.display().to_string(),
        parts: manifest.parts.len(),
        samples: manifest.rows(Table::Samples),
        label_rows,
        in_loss_rows: manifest.in_loss_rows(),
        labels_bytes: manifest.bytes(Table::Labels),
        samples_bytes: manifest.bytes(Table::Samples),
        bytes_on_disk,
        labels_bytes_per_token: per(manifest.bytes(Table::Labels)),
        total_bytes_per_token: per(bytes_on_disk),
        manifest,
    })
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let meta = entry.metadata().map_err(|e| Error::io(entry.path(), e))?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// Human-readable byte count.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}
