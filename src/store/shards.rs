//! Sharded stores: N independent `label --shard i/N` jobs writing into one store.
//!
//! There is no coordination service and no lock. Each shard owns its own files: its parts are
//! named `labels/sIIIIIofNNNNN-part-PPPPP.parquet` (the same in `samples/`) and it commits to
//! its own manifest `shards/IIIII-of-NNNNN.json`, an ordinary manifest listing only its parts.
//! No writer ever replaces a file another shard wrote, so no commit can clobber another. The
//! store manifest (`manifest.json`) is written only by the commit step, [`combine`], once all
//! N shard manifests say `complete`: it lists every shard's parts (shard order, then part
//! order) and is a pure function of the shard manifests, so two shards finishing at the same
//! moment write the same bytes and either rename wins. Until then the store has no
//! `manifest.json` and every reader refuses it with the shard progress (`firstkd status`).
//! docs/scale-out.md describes the protocol and the races it survives.

use std::path::Path;
use std::time::SystemTime;

use super::manifest::{Manifest, MANIFEST_FILE};
use crate::error::{Error, Result};

/// Folder of a sharded store holding one manifest per shard.
pub const SHARDS_DIR: &str = "shards";

/// Shard `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Slot {
    pub index: u64,
    pub count: u64,
}

impl Slot {
    /// Shard `index` of `count`; `None` for `count` 1 (an unsharded store).
    pub fn of(index: u64, count: u64) -> Result<Option<Slot>> {
        if count == 0 || index >= count {
            return Err(Error::InvalidArgument(format!(
                "shard {index}/{count}: need 0 <= i < n"
            )));
        }
        if count > 99_999 {
            return Err(Error::InvalidArgument(format!(
                "shard {index}/{count}: at most 99999 shards"
            )));
        }
        Ok((count > 1).then_some(Slot { index, count }))
    }

    /// Prefix of this shard's part file names.
    pub fn file_prefix(&self) -> String {
        format!("s{:05}of{:05}-", self.index, self.count)
    }

    /// This shard's manifest, relative to the store folder.
    pub fn manifest_rel(&self) -> String {
        format!("{SHARDS_DIR}/{:05}-of-{:05}.json", self.index, self.count)
    }

    /// The slot of a shard manifest's file name (`IIIII-of-NNNNN.json`).
    pub fn from_file_name(name: &str) -> Option<Slot> {
        let stem = name.strip_suffix(".json")?;
        let (i, n) = stem.split_once("-of-")?;
        let slot = Slot {
            index: i.parse().ok()?,
            count: n.parse().ok()?,
        };
        (slot.index < slot.count && slot.manifest_rel().ends_with(name)).then_some(slot)
    }
}

/// One shard's state as its manifest records it.
#[derive(Debug)]
pub struct ShardState {
    pub slot: Slot,
    /// The shard's manifest, or why it could not be read.
    pub manifest: std::result::Result<Manifest, String>,
    /// When its manifest was last replaced (its last commit).
    pub modified: Option<SystemTime>,
}

/// Every shard manifest under `dir/shards/`, in shard order.
pub fn scan(dir: &Path) -> Result<Vec<ShardState>> {
    let sub = dir.join(SHARDS_DIR);
    let entries = match std::fs::read_dir(&sub) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&sub, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&sub, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(slot) = Slot::from_file_name(&name) else {
            continue;
        };
        let rel = slot.manifest_rel();
        out.push(ShardState {
            slot,
            manifest: Manifest::load_file(dir, &rel).map_err(|e| e.to_string()),
            modified: entry.metadata().ok().and_then(|m| m.modified().ok()),
        });
    }
    out.sort_by_key(|s| s.slot);
    Ok(out)
}

/// "2 of 4 shards complete" (best effort, for error messages).
pub fn progress_line(dir: &Path) -> String {
    match scan(dir) {
        Ok(shards) if !shards.is_empty() => {
            let count = shards[0].slot.count;
            let done = shards
                .iter()
                .filter(|s| s.manifest.as_ref().is_ok_and(|m| m.complete))
                .count();
            format!(
                "{done} of {count} shards complete, {} started; `firstkd status` shows each",
                shards.len()
            )
        }
        Ok(_) => "no shard has started".into(),
        Err(e) => e.to_string(),
    }
}

/// The labelling settings without the shard: what every shard of one store shares.
pub fn unsharded_labeling(labeling: &serde_json::Value) -> serde_json::Value {
    let mut v = labeling.clone();
    if let Some(map) = v.as_object_mut() {
        map.remove("shard");
        map.remove("shards");
    }
    v
}

/// The manifest a writer of `slot` commits to: `manifest.json` for a whole store, else the
/// shard's own.
pub fn manifest_rel(slot: Option<Slot>) -> String {
    slot.map_or_else(|| MANIFEST_FILE.to_string(), |s| s.manifest_rel())
}

/// Refuses a shard `slot` for a store whose other shards were started with another count.
pub fn check_count(dir: &Path, slot: Slot) -> Result<()> {
    for s in scan(dir)? {
        if s.slot.count != slot.count {
            return Err(Error::OutputInUse {
                path: dir.to_path_buf(),
                reason: format!(
                    "holds shards of a {}-way run ({}); this run is shard {}/{}: use the same n for every shard of a store",
                    s.slot.count,
                    s.slot.manifest_rel(),
                    slot.index,
                    slot.count,
                ),
            });
        }
    }
    Ok(())
}

/// The store manifest of a sharded store whose shards are all complete: every shard's parts,
/// renumbered in shard order. `None` while a shard is missing or incomplete.
pub fn combined(dir: &Path, count: u64) -> Result<Option<Manifest>> {
    let shards = scan(dir)?;
    let mut manifests = Vec::new();
    for s in shards {
        if s.slot.count != count {
            return Err(Error::OutputInUse {
                path: dir.to_path_buf(),
                reason: format!(
                    "holds shards of a {}-way and a {count}-way run",
                    s.slot.count,
                ),
            });
        }
        let m = s.manifest.map_err(|reason| Error::InvalidManifest {
            path: dir.join(s.slot.manifest_rel()),
            reason,
        })?;
        if !m.complete {
            return Ok(None);
        }
        manifests.push((s.slot, m));
    }
    if manifests.len() as u64 != count {
        return Ok(None);
    }
    let (first_slot, first) = &manifests[0];
    let shared = unsharded_labeling(&first.labeling);
    let mut out = first.clone();
    out.parts.clear();
    let mut skipped = 0u64;
    for (slot, m) in &manifests {
        let mismatch = super::merge::incompatibility(first, m)
            .map(|(field, a, b)| format!("{field}: {a} vs {b}"))
            .or_else(|| {
                (unsharded_labeling(&m.labeling) != shared)
                    .then(|| "labelling settings".to_string())
            });
        if let Some(what) = mismatch {
            return Err(Error::OutputInUse {
                path: dir.to_path_buf(),
                reason: format!(
                    "shards {} and {} were labelled with different settings ({what})",
                    first_slot.manifest_rel(),
                    slot.manifest_rel(),
                ),
            });
        }
        skipped = skipped.max(m.cursor["records_skipped"].as_u64().unwrap_or(0));
        for part in &m.parts {
            let mut part = part.clone();
            part.index = out.parts.len() as u32;
            out.parts.push(part);
        }
    }
    let mut labeling = shared;
    if let Some(map) = labeling.as_object_mut() {
        map.insert("shards".into(), serde_json::json!(count));
    }
    out.labeling = labeling;
    out.cursor = serde_json::json!({ "shards": count, "records_skipped": skipped });
    out.temperature = None;
    out.complete = true;
    Ok(Some(out))
}

/// The commit step: writes `manifest.json` when every one of the `count` shards is complete
/// (a store manifest already there is kept as it is: `calibrate` may have added to it).
/// Returns the store manifest, or `None` while shards are still being written.
pub fn combine(dir: &Path, count: u64) -> Result<Option<Manifest>> {
    if Manifest::path(dir).exists() {
        return Manifest::load(dir).map(Some);
    }
    let Some(manifest) = combined(dir, count)? else {
        return Ok(None);
    };
    manifest.save_file(dir, MANIFEST_FILE)?;
    Ok(Some(manifest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_round_trip() {
        let s = Slot::of(3, 12).unwrap().unwrap();
        assert_eq!(s.manifest_rel(), "shards/00003-of-00012.json");
        assert_eq!(s.file_prefix(), "s00003of00012-");
        assert_eq!(Slot::from_file_name("00003-of-00012.json"), Some(s));
        assert_eq!(Slot::from_file_name("3-of-12.json"), None);
        assert_eq!(Slot::from_file_name("00012-of-00012.json"), None);
        assert_eq!(Slot::from_file_name(".00003-of-00012.json.tmp"), None);
        assert!(Slot::of(0, 1).unwrap().is_none());
        assert!(Slot::of(2, 2).is_err());
        assert!(Slot::of(0, 0).is_err());
    }
}
