//! `firstkd split`: a store into train / valid / test (or any named splits) by a hash of each
//! sample, deterministic across machines and runs.
//!
//! A sample's point in [0, 1) is the first 8 bytes (big-endian) of
//! `sha256("firstkd-split-v1\0" || key)` divided by 2^64, where the key is the sample's token
//! ids (u32 little-endian; the default, so the same text lands in the same split in every
//! store, and duplicates never straddle splits) or, with `--key record`, its source file name
//! and record index (so all windows of one long record stay together). Splits take
//! consecutive intervals of [0, 1) in the order given, each as wide as its fraction.
//! docs/sharing.md has the rule and an independent Python check.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::copy::{copy_columns, meta_of};
use super::decode::SampleRow;
use super::reader::StoreReader;
use super::writer::{Opened, StoreWriter, WriterOptions};
use crate::error::{Error, Result};

/// What a sample is hashed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SplitKey {
    /// The sample's token ids.
    #[default]
    Tokens,
    /// The sample's source file name (without directories) and record index.
    Record,
}

/// How the splits are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SplitLayout {
    /// One store per split: `OUT/<name>`.
    #[default]
    Stores,
    /// One store at `OUT` whose `split` column is rewritten.
    Column,
}

/// Named fractions, parsed from `train=0.9,valid=0.05,test=0.05`.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitSpec {
    pub splits: Vec<(String, f64)>,
}

impl SplitSpec {
    /// Parses `name=fraction,...`: names of letters, digits, `_` or `-`, distinct; fractions
    /// positive and summing to 1.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: String| Error::InvalidArgument(format!("splits {s:?}: {why}"));
        let mut splits: Vec<(String, f64)> = Vec::new();
        for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (name, frac) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("{item:?} is not name=fraction")))?;
            let name = name.trim();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(bad(format!(
                    "split name {name:?} must be letters, digits, _ or -"
                )));
            }
            let frac: f64 = frac
                .trim()
                .parse()
                .map_err(|_| bad(format!("fraction {frac:?} is not a number")))?;
            if !(frac.is_finite() && frac > 0.0 && frac <= 1.0) {
                return Err(bad(format!("fraction {frac} must be in (0, 1]")));
            }
            if splits.iter().any(|(n, _)| n == name) {
                return Err(bad(format!("split {name:?} given twice")));
            }
            splits.push((name.to_string(), frac));
        }
        if splits.is_empty() {
            return Err(bad("no splits".into()));
        }
        let sum: f64 = splits.iter().map(|(_, f)| f).sum();
        if (sum - 1.0).abs() > 1e-6 {
            return Err(bad(format!("fractions sum to {sum}, not 1")));
        }
        Ok(SplitSpec { splits })
    }

    /// The split (index) of a sample at `point` in [0, 1).
    pub fn index_of(&self, point: f64) -> usize {
        let mut upper = 0.0;
        for (i, (_, f)) in self.splits.iter().enumerate() {
            upper += f;
            if point < upper {
                return i;
            }
        }
        self.splits.len() - 1
    }
}

/// The sample's point in [0, 1) under `key` (see the module documentation).
pub fn split_point(sample: &SampleRow, key: SplitKey) -> f64 {
    let mut h = Sha256::new();
    h.update(b"firstkd-split-v1\0");
    match key {
        SplitKey::Tokens => {
            for id in &sample.input_ids {
                h.update(id.to_le_bytes());
            }
        }
        SplitKey::Record => {
            let name = Path::new(&sample.source)
                .file_name()
                .map_or(sample.source.clone(), |n| n.to_string_lossy().into_owned());
            h.update(name.as_bytes());
            h.update([0u8]);
            h.update(sample.record_index.to_le_bytes());
        }
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) as f64 / 18_446_744_073_709_551_616.0
}

/// What a split wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitReport {
    /// Per split: its name, output store and samples written by this run.
    pub outputs: Vec<(String, PathBuf, u64)>,
}

/// Splits the complete store `src` by `spec` into `out` (see [`SplitLayout`]).
pub fn split(
    src: &Path,
    out: &Path,
    spec: &SplitSpec,
    key: SplitKey,
    layout: SplitLayout,
    mut progress: impl FnMut(usize, usize),
) -> Result<SplitReport> {
    let reader = StoreReader::open(src)?;
    let m = reader.manifest().clone();
    let src_abs = std::path::absolute(src).ok();
    let targets: Vec<PathBuf> = match layout {
        SplitLayout::Stores => spec.splits.iter().map(|(n, _)| out.join(n)).collect(),
        SplitLayout::Column => vec![out.to_path_buf()],
    };
    if targets
        .iter()
        .any(|t| std::path::absolute(t).ok() == src_abs)
    {
        return Err(Error::OutputInUse {
            path: out.to_path_buf(),
            reason: "split writes new stores; give another output directory".to_string(),
        });
    }
    let rule = serde_json::json!({
        "store": src.display().to_string(),
        "key": key,
        "hash": "sha256(\"firstkd-split-v1\\0\" || key), first 8 bytes big-endian / 2^64",
        "splits": spec.splits.iter().map(|(n, f)| serde_json::json!({"name": n, "fraction": f})).collect::<Vec<_>>(),
    });
    let mut writers = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let mut meta = meta_of(&m, m.logprob_dtype);
        let mut this = rule.clone();
        if layout == SplitLayout::Stores {
            this["split"] = serde_json::json!(spec.splits[i].0);
        }
        meta.labeling = serde_json::json!({ "split_from": this, "labeling": m.labeling });
        let (writer, done) = match StoreWriter::open(target, meta, WriterOptions::default())? {
            Opened::Fresh(w) => (Some(w), 0),
            Opened::Resumed { writer, cursor } => {
                let done = cursor
                    .get("source_parts")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0) as usize;
                (Some(writer), done)
            }
            Opened::Complete(_) => (None, m.parts.len()),
        };
        writers.push((writer, done, 0u64));
    }
    let total = m.parts.len();
    let start = writers.iter().map(|w| w.1).min().unwrap_or(total);
    let columns = copy_columns(&m);
    for part in start..total {
        for joined in reader.part_labelled_samples(part..part + 1, &columns, |_| true) {
            let joined = joined?;
            let s = spec.index_of(split_point(&joined.sample, key));
            let w = match layout {
                SplitLayout::Stores => s,
                SplitLayout::Column => 0,
            };
            let (writer, done, written) = &mut writers[w];
            if let Some(writer) = writer.as_mut().filter(|_| part >= *done) {
                writer.push(
                    &joined.record(joined.sample.sample_id, &spec.splits[s].0),
                    &joined.sample_labels(),
                )?;
                *written += 1;
            }
        }
        for (writer, done, _) in writers.iter_mut() {
            if let Some(writer) = writer.as_mut().filter(|_| part >= *done) {
                writer.commit(serde_json::json!({ "source_parts": part + 1 }))?;
            }
        }
        progress(part + 1, total);
    }
    let mut outputs = Vec::new();
    for (i, (writer, _, written)) in writers.into_iter().enumerate() {
        if let Some(writer) = writer {
            let mut manifest = writer.finish(serde_json::json!({ "source_parts": total }))?;
            manifest.temperature = m.temperature.clone();
            manifest.save(&targets[i])?;
        }
        let name = match layout {
            SplitLayout::Stores => spec.splits[i].0.clone(),
            SplitLayout::Column => "(all)".to_string(),
        };
        outputs.push((name, targets[i].clone(), written));
    }
    Ok(SplitReport { outputs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_intervals_follow_their_order() {
        let s = SplitSpec::parse("train=0.9, valid=0.05,test=0.05").unwrap();
        assert_eq!(s.splits.len(), 3);
        assert_eq!(s.index_of(0.0), 0);
        assert_eq!(s.index_of(0.9), 1);
        assert_eq!(s.index_of(0.96), 2);
        assert_eq!(s.index_of(0.999_999), 2);
        for bad in [
            "",
            "train=0.5",
            "train=0.5,train=0.5",
            "a b=1",
            "x=one",
            "x=-1,y=2",
        ] {
            assert!(SplitSpec::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_point_of_a_sample_is_its_documented_hash() {
        let sample = SampleRow {
            input_ids: vec![1, 2, 3],
            ..SampleRow::default()
        };
        // python3 -c "import hashlib,struct; h=hashlib.sha256(b'firstkd-split-v1\0' +
        //   b''.join(struct.pack('<I',t) for t in [1,2,3])).digest();
        //   print(repr(int.from_bytes(h[:8],'big')/2**64))"
        let want = 0.8091756105035327;
        assert_eq!(split_point(&sample, SplitKey::Tokens), want);
        let other = SampleRow {
            input_ids: vec![1, 2, 4],
            ..SampleRow::default()
        };
        assert_ne!(split_point(&other, SplitKey::Tokens), want);
    }
}
