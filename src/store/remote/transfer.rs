//! `firstkd copy`: a committed store copied between a local folder and object storage (either
//! way, or between two buckets), parts first and the manifest last, so the copy is a store only
//! once every part is in place, and an interrupted copy resumes by skipping the parts already
//! there.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use object_store::PutMode;

use super::{write_atomic, Location};
use crate::error::{Error, Result};
use crate::schema::Table;
use crate::store::manifest::{Manifest, PartFile, MANIFEST_FILE};
use crate::store::shards::SHARDS_DIR;
use crate::store::writer::files::process_is_dead;

/// A folder of this process for manifests and parts in transit, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("firstkd-copy-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Scratch(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What [`copy_store`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    pub parts: usize,
    /// Part files copied by this run.
    pub copied: usize,
    /// Part files already at the destination (a resumed copy).
    pub skipped: usize,
    /// Bytes copied by this run.
    pub bytes: u64,
    /// The destination already held this store.
    pub already_complete: bool,
}

fn name_of(loc: &Location) -> String {
    match loc {
        Location::Local(dir) => dir.display().to_string(),
        Location::Remote(r) => r.url.clone(),
    }
}

fn in_use(loc: &Location, reason: String) -> Error {
    Error::OutputInUse {
        path: PathBuf::from(name_of(loc)),
        reason,
    }
}

/// The source's manifest bytes: a complete store (a sharded one once it is committed).
fn source_manifest(src: &Location, scratch: &Path) -> Result<(Vec<u8>, Manifest)> {
    let bytes = match src {
        Location::Local(dir) => {
            // Opening checks that every listed part is there with its size.
            crate::store::StoreReader::open(dir)?;
            let path = Manifest::path(dir);
            std::fs::read(&path).map_err(|e| Error::io(&path, e))?
        }
        Location::Remote(r) => match r.get_bytes(MANIFEST_FILE)? {
            Some((bytes, _)) => bytes.to_vec(),
            None => return Err(r.missing_manifest()?),
        },
    };
    write_atomic(scratch, MANIFEST_FILE, &bytes)?;
    let manifest = Manifest::load(scratch)?;
    if !manifest.complete {
        return Err(Error::IncompleteStore {
            path: PathBuf::from(name_of(src)),
            reason: "only a complete store is copied; finish labelling it first".into(),
        });
    }
    for file in manifest.parts.iter().flat_map(|p| [&p.labels, &p.samples]) {
        super::check_inside(&name_of(src), file)?;
    }
    Ok((bytes, manifest))
}

/// Part files already at the destination with their listed size, or `None` when the
/// destination already holds exactly this store. Refuses a destination holding anything else.
fn existing(dst: &Location, bytes: &[u8], manifest: &Manifest) -> Result<Option<HashSet<String>>> {
    let listed: std::collections::HashMap<&str, u64> = manifest
        .parts
        .iter()
        .flat_map(|p| [&p.labels, &p.samples])
        .map(|f| (f.file.as_str(), f.bytes))
        .collect();
    let mut found = Vec::new();
    match dst {
        Location::Local(dir) => {
            let path = Manifest::path(dir);
            if path.exists() {
                let there = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
                if there == bytes {
                    return Ok(None);
                }
                return Err(in_use(dst, "it holds another store".into()));
            }
            if dir.exists() {
                for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
                    let entry = entry.map_err(|e| Error::io(dir, e))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let sub = entry.path();
                    if !Table::ALL.iter().any(|t| t.name() == name) || !sub.is_dir() {
                        return Err(in_use(
                            dst,
                            format!("it holds {name}, not a part of this store"),
                        ));
                    }
                    for file in std::fs::read_dir(&sub).map_err(|e| Error::io(&sub, e))? {
                        let file = file.map_err(|e| Error::io(&sub, e))?;
                        let len = file.metadata().map_err(|e| Error::io(&sub, e))?.len();
                        found.push((
                            format!("{name}/{}", file.file_name().to_string_lossy()),
                            len,
                        ));
                    }
                }
            }
        }
        Location::Remote(r) => {
            if let Some((there, _)) = r.get_bytes(MANIFEST_FILE)? {
                if there.as_ref() == bytes {
                    return Ok(None);
                }
                return Err(in_use(dst, "it holds another store".into()));
            }
            if !r.list(SHARDS_DIR)?.is_empty() {
                return Err(in_use(dst, "a sharded store is being written there".into()));
            }
            for (rel, _, len) in r.list("")? {
                found.push((rel, len));
            }
        }
    }
    let mut have = HashSet::new();
    for (rel, len) in found {
        let file_name = rel.rsplit('/').next().unwrap_or_default();
        // Temporary files of a copy: an interrupted one's are deleted, a live one's left.
        if let Some(pid) = file_name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".download"))
            .and_then(|n| n.rsplit_once('.'))
            .map(|(_, pid)| pid)
        {
            if let Location::Local(dir) = dst {
                if process_is_dead(pid) {
                    let path = dir.join(&rel);
                    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                }
            }
            continue;
        }
        match listed.get(rel.as_str()) {
            Some(&want) if want == len => {
                have.insert(rel);
            }
            Some(_) => {} // cut short: copied again
            None => {
                return Err(in_use(
                    dst,
                    format!("it holds {rel}, not a part of this store"),
                ))
            }
        }
    }
    Ok(Some(have))
}

/// Copies one part file from `src` to `dst`, checked against its sha256 when it lands locally.
fn copy_file(src: &Location, dst: &Location, file: &PartFile, scratch: &Path) -> Result<()> {
    let check = |path: &Path, shown: String| -> Result<()> {
        let sum = crate::store::sha256_file(path)?;
        if sum != file.sha256 {
            let _ = std::fs::remove_file(path);
            return Err(Error::Corrupt {
                path: PathBuf::from(shown),
                row: None,
                reason: format!("sha256 is {sum}, manifest says {}", file.sha256),
            });
        }
        Ok(())
    };
    match (src, dst) {
        (Location::Local(from), Location::Local(to)) => {
            let dest = to.join(&file.file);
            let folder = dest.parent().unwrap_or(to);
            std::fs::create_dir_all(folder).map_err(|e| Error::io(folder, e))?;
            let tmp = folder.join(format!(
                ".{}.{}.download",
                dest.file_name().unwrap_or_default().to_string_lossy(),
                std::process::id()
            ));
            let source = from.join(&file.file);
            std::fs::copy(&source, &tmp).map_err(|e| Error::io(&source, e))?;
            check(&tmp, source.display().to_string())?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&tmp, e))?;
            std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))
        }
        (Location::Remote(r), Location::Local(to)) => {
            let dest = to.join(&file.file);
            r.download(&file.file, &dest)?;
            check(&dest, format!("{}/{}", r.url, file.file))
        }
        (Location::Local(from), Location::Remote(w)) => {
            let source = from.join(&file.file);
            check(&source, source.display().to_string())?;
            w.upload(&file.file, &source)
        }
        (Location::Remote(r), Location::Remote(w)) => {
            let tmp = scratch.join(&file.file);
            r.download(&file.file, &tmp)?;
            check(&tmp, format!("{}/{}", r.url, file.file))?;
            let uploaded = w.upload(&file.file, &tmp);
            let _ = std::fs::remove_file(&tmp);
            uploaded
        }
    }
}

/// Copies the complete store at `src` to `dst` (a local folder or `s3://bucket/prefix`, empty
/// or holding an interrupted copy of the same store). Every part file is checked against the
/// manifest's sha256 on the way; the manifest is written last (created with `If-None-Match`
/// on object storage). `progress(done, total)` counts part files.
pub fn copy_store(
    src: &Location,
    dst: &Location,
    mut progress: impl FnMut(usize, usize),
) -> Result<CopyReport> {
    let same = match (src, dst) {
        (Location::Local(a), Location::Local(b)) => {
            a == b || (b.exists() && a.canonicalize().ok() == b.canonicalize().ok())
        }
        (Location::Remote(a), Location::Remote(b)) => a.url == b.url,
        _ => false,
    };
    if same {
        return Err(Error::InvalidArgument(format!(
            "{}: the source and the destination are the same store",
            name_of(src)
        )));
    }
    let scratch = Scratch::new()?;
    let (bytes, manifest) = source_manifest(src, scratch.path())?;
    let files: Vec<&PartFile> = manifest
        .parts
        .iter()
        .flat_map(|p| [&p.labels, &p.samples])
        .collect();
    let mut report = CopyReport {
        parts: manifest.parts.len(),
        ..CopyReport::default()
    };
    let Some(have) = existing(dst, &bytes, &manifest)? else {
        report.already_complete = true;
        report.skipped = files.len();
        return Ok(report);
    };
    if let Location::Local(dir) = dst {
        for table in Table::ALL {
            let sub = dir.join(table.name());
            std::fs::create_dir_all(&sub).map_err(|e| Error::io(&sub, e))?;
        }
    }
    for table in Table::ALL {
        let sub = scratch.path().join(table.name());
        std::fs::create_dir_all(&sub).map_err(|e| Error::io(&sub, e))?;
    }
    for (i, file) in files.iter().enumerate() {
        progress(i, files.len());
        if have.contains(&file.file) {
            report.skipped += 1;
            continue;
        }
        copy_file(src, dst, file, scratch.path())?;
        report.copied += 1;
        report.bytes += file.bytes;
    }
    progress(files.len(), files.len());
    match dst {
        Location::Local(dir) => {
            let tmp = dir.join(format!(".{MANIFEST_FILE}.{}.tmp", std::process::id()));
            let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            f.write_all(&bytes)
                .and_then(|()| f.sync_all())
                .map_err(|e| Error::io(&tmp, e))?;
            let path = Manifest::path(dir);
            std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
            if let Ok(folder) = std::fs::File::open(dir) {
                let _ = folder.sync_all();
            }
        }
        Location::Remote(w) => {
            if !w.put_mode(MANIFEST_FILE, bytes.clone(), PutMode::Create)? {
                // Created meanwhile by another copy: fine if it is the same store.
                let there = w.get_bytes(MANIFEST_FILE)?.map(|(b, _)| b.to_vec());
                if there.as_deref() != Some(bytes.as_slice()) {
                    return Err(Error::ConcurrentUpdate {
                        url: format!("{}/{MANIFEST_FILE}", w.url),
                    });
                }
            }
        }
    }
    Ok(report)
}
