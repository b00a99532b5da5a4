//! The writer's files: a part finished under its final name (fsynced, renamed, the folder
//! fsynced), files no manifest lists removed on resume, and the check that a store being
//! resumed was written with the same settings.

/// An error naming every setting in which `meta` differs from the existing `manifest`.
use std::fs::File;
use std::path::Path;

use parquet::arrow::ArrowWriter;

use super::super::manifest::{sync_dir, Manifest, PartFile};
use super::super::sha256_file;
use super::super::shards::Slot;
use super::{slot_prefix, StoreMeta};
use crate::error::{Error, Result};
use crate::schema::Table;

pub(super) fn check_same_settings(dir: &Path, manifest: &Manifest, meta: &StoreMeta) -> Result<()> {
    let mut diffs = Vec::new();
    if manifest.k != meta.k {
        diffs.push(format!("k {} vs {}", manifest.k, meta.k));
    }
    if manifest.logprob_dtype != meta.logprob_dtype {
        diffs.push(format!(
            "logprob dtype {} vs {}",
            manifest.logprob_dtype.name(),
            meta.logprob_dtype.name()
        ));
    }
    if manifest.selection() != meta.selection {
        diffs.push(format!(
            "selection {} vs {}",
            manifest.selection(),
            meta.selection
        ));
    }
    if manifest.teacher != meta.teacher {
        let (a, b) = (&manifest.teacher, &meta.teacher);
        let mut what = Vec::new();
        if a.sha256 != b.sha256 || a.file_name != b.file_name {
            what.push(format!("model {} vs {}", a.file_name, b.file_name));
        }
        if a.compute_dtype != b.compute_dtype || a.compute_mode != b.compute_mode {
            what.push(format!("compute {} vs {}", a.compute_mode, b.compute_mode));
        }
        if what.is_empty() {
            what.push("model description".to_string());
        }
        diffs.push(format!("teacher: {}", what.join(", ")));
    }
    if manifest.tokenizer != meta.tokenizer {
        diffs.push("tokenizer".into());
    }
    if manifest.labeling != meta.labeling {
        diffs.push(format!(
            "labelling settings {} vs {}",
            manifest.labeling, meta.labeling
        ));
    }
    if !diffs.is_empty() {
        return Err(Error::OutputInUse {
                path: dir.to_path_buf(),
                reason: format!(
                    "existing store was written with different settings ({}); use a new output directory",
                    diffs.join("; "),
                ),
            });
    }
    Ok(())
}

pub(super) fn finish_file(
    writer: ArrowWriter<File>,
    tmp: &Path,
    name: &str,
    dir: &Path,
) -> Result<PartFile> {
    let file = writer.into_inner().map_err(|e| Error::parquet(tmp, e))?;
    file.sync_all().map_err(|e| Error::io(tmp, e))?;
    drop(file);
    super::super::fault::point("part-closed");
    let folder = tmp.parent().unwrap_or(dir);
    let final_path = folder.join(name);
    std::fs::rename(tmp, &final_path).map_err(|e| Error::io(&final_path, e))?;
    sync_dir(folder);
    let bytes = std::fs::metadata(&final_path)
        .map_err(|e| Error::io(&final_path, e))?
        .len();
    let relative = final_path
        .strip_prefix(dir)
        .unwrap_or(&final_path)
        .to_string_lossy()
        .replace('\\', "/");
    Ok(PartFile {
        file: relative,
        rows: 0,
        bytes,
        sha256: sha256_file(&final_path)?,
    })
}

/// Removes files in the table folders that the manifest does not list (temporary files of an
/// interrupted part, or a part renamed but never recorded). A shard's writer removes only its
/// own files: the other shards' are theirs.
pub(super) fn remove_uncommitted(
    dir: &Path,
    manifest: &Manifest,
    slot: Option<Slot>,
) -> Result<()> {
    let prefix = slot_prefix(slot);
    let listed: std::collections::HashSet<&str> = manifest
        .parts
        .iter()
        .flat_map(|p| [p.labels.file.as_str(), p.samples.file.as_str()])
        .collect();
    for table in Table::ALL {
        let sub = dir.join(table.name());
        std::fs::create_dir_all(&sub).map_err(|e| Error::io(&sub, e))?;
        for entry in std::fs::read_dir(&sub).map_err(|e| Error::io(&sub, e))? {
            let entry = entry.map_err(|e| Error::io(&sub, e))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            let own = file.starts_with(&prefix) || file.starts_with(&format!(".{prefix}"));
            let name = format!("{}/{file}", table.name());
            if own && !listed.contains(name.as_str()) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
    }
    remove_dead_manifest_temporaries(dir)?;
    remove_dead_manifest_temporaries(&dir.join(super::super::shards::SHARDS_DIR))
}

/// Whether `pid` (decimal text) names a process that is known to be dead: false for text
/// that is not a process id and where liveness cannot be told (no `/proc`).
pub(crate) fn process_is_dead(pid: &str) -> bool {
    let proc = Path::new("/proc");
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && proc.is_dir()
        && !proc.join(pid).exists()
}

/// Removes the temporary manifests (`.NAME.json.PID.tmp`, see [`Manifest::save_file`]) that
/// a process killed between writing and renaming one left in `folder`. A file whose process
/// is still alive (another shard committing now) is left alone; where liveness cannot be told
/// (no `/proc`), nothing is removed.
pub(crate) fn remove_dead_manifest_temporaries(folder: &Path) -> Result<()> {
    if !folder.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))? {
        let entry = entry.map_err(|e| Error::io(folder, e))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let pid = file
            .strip_prefix('.')
            .and_then(|f| f.strip_suffix(".tmp"))
            .and_then(|f| f.rsplit_once(".json."))
            .map(|(_, pid)| pid);
        if pid.is_some_and(process_is_dead) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}
