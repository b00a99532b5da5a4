//! One writer per store (or per shard of a sharded store): an advisory lock on a file beside
//! the manifest the writer commits to, held for the writer's lifetime.
//!
//! The lock is the operating system's (`flock` on Linux through `File::try_lock`): it is
//! released when the process ends, however it ends, so a writer killed with SIGKILL leaves a
//! lock file that no longer locks anything and never blocks a resume. It guards writers on one
//! machine (or one shared file system that supports `flock`); two machines writing the same
//! shard of a store on object storage are not detected.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// File name of the lock of an unsharded store's writer.
pub const WRITER_LOCK: &str = "writer.lock";

/// A held writer lock; dropping it releases the lock.
#[derive(Debug)]
pub struct WriterLock {
    _file: File,
    pub path: PathBuf,
}

/// Takes the lock at `path` (created if missing) or fails at once, naming `what`, when
/// another process holds it.
pub fn lock(path: &Path, what: &str) -> Result<WriterLock> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(WriterLock {
            _file: file,
            path: path.to_path_buf(),
        }),
        Err(TryLockError::WouldBlock) => Err(Error::Locked {
            what: what.to_string(),
            path: path.to_path_buf(),
        }),
        Err(TryLockError::Error(e)) => Err(Error::io(path, e)),
    }
}

/// The lock file of the writer of `slot` in the store at `dir` (`None`: the whole store).
pub fn lock_path(dir: &Path, slot: Option<super::shards::Slot>) -> PathBuf {
    match slot {
        Some(s) => dir.join(s.manifest_rel().replace(".json", ".lock")),
        None => dir.join(WRITER_LOCK),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_a_released_lock_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("writer.lock");
        let held = lock(&path, "store").unwrap();
        let err = lock(&path, "store").unwrap_err().to_string();
        assert!(
            err.contains("another firstkd process (`label` or `calibrate`) is writing"),
            "{err}"
        );
        drop(held);
        lock(&path, "store").unwrap();
    }
}
