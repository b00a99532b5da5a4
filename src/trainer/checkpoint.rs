//! Checkpoints: a Hugging Face-compatible model directory (`config.json` + `model.safetensors`
//! with the usual tensor names) plus, for resuming, `optimizer.safetensors` (AdamW moments) and
//! `trainer_state.json` (step, data position, settings fingerprint).
//!
//! A checkpoint is written into `NAME.tmp`, made durable and renamed into place, so an
//! interrupted save never leaves a directory that looks complete ([`write_atomically`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::init::load_pretrained;
use super::model::Student;
use crate::error::{Error, Result};
use crate::store::fault;
use crate::store::manifest::sync_dir;

/// Model weights file name.
pub const MODEL_FILE: &str = "model.safetensors";
/// Model config file name.
pub const CONFIG_FILE: &str = "config.json";
/// Optimizer moments file name.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Trainer state file name.
pub const STATE_FILE: &str = "trainer_state.json";
/// Version of `trainer_state.json`.
pub const STATE_VERSION: u32 = 1;

/// Everything besides weights and moments needed to continue a run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Format version of this file.
    pub version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Micro-batches taken from the data stream so far (the stream is replayed up to here).
    pub batches_consumed: u64,
    /// Input tokens trained on so far.
    pub tokens_seen: u64,
    /// AdamW's update count (bias correction).
    pub optimizer_steps: u64,
    /// The settings that determine the run's arithmetic; a resume must match them.
    pub fingerprint: serde_json::Value,
    /// Loss of every completed step, in order. Written as decimal strings (Rust's shortest
    /// round-trip form) because serde_json's default number parser can be off by one unit in
    /// the last place for 17-digit values; plain numbers are accepted too.
    #[serde(with = "exact_f64s")]
    pub losses: Vec<f64>,
}

/// `Vec<f64>` as JSON strings that parse back to the identical bits.
mod exact_f64s {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(values: &[f64], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(values.iter().map(|v| v.to_string()))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Text(String),
        Number(f64),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Vec::<Value>::deserialize(d)?
            .into_iter()
            .map(|v| match v {
                Value::Number(x) => Ok(x),
                Value::Text(t) => t
                    .parse::<f64>()
                    .map_err(|e| D::Error::custom(format!("loss {t:?}: {e}"))),
            })
            .collect()
    }
}

/// Compares a fingerprint read back from `trainer_state.json` with a freshly computed one,
/// after putting the fresh one through the same JSON text round trip (so a float that
/// serde_json parses one unit off in the last place still compares equal to itself).
pub fn same_fingerprint(stored: &serde_json::Value, current: &serde_json::Value) -> bool {
    let normalised = serde_json::to_string(current)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    normalised.as_ref() == Some(stored)
}

fn json_err(path: &Path, e: serde_json::Error) -> Error {
    Error::InvalidManifest {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Writes `config.json` and `model.safetensors` for `student` into `dir` (created).
pub fn write_model_files(student: &Student, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut cfg = student.config().clone();
    cfg.torch_dtype = "float32".into();
    if cfg.architectures.is_empty() {
        cfg.architectures = vec![if cfg.model_type == "qwen2" {
            "Qwen2ForCausalLM".into()
        } else {
            "LlamaForCausalLM".into()
        }];
    }
    let cfg_path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| json_err(&cfg_path, e))?;
    write_file(&cfg_path, text.as_bytes())?;
    let weights: HashMap<String, Tensor> = student
        .weights()
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let path = dir.join(MODEL_FILE);
    candle_core::safetensors::save(&weights, &path).map_err(|e| Error::Model {
        path: path.clone(),
        reason: format!("writing safetensors: {e}"),
    })?;
    readable_by_all(&path)
}

/// The safetensors writer creates its file owner-only (0600, through a temporary file); a
/// checkpoint is meant to be shared, so it gets the mode of the other files (0644).
fn readable_by_all(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(path, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Folder of a run directory holding the tokenizer files copied into every checkpoint.
pub const TOKENIZER_DIR: &str = "tokenizer";

/// Writes the init source's tokenizer files into `<out>/tokenizer/` (once per run).
pub fn stash_tokenizer_files(out: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    let dir = out.join(TOKENIZER_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    for (name, bytes) in files {
        write_file(&dir.join(name), bytes)?;
    }
    Ok(())
}

/// Copies `<out>/tokenizer/*` (if any) into a model directory, so a checkpoint is a complete
/// Hugging Face model (weights, config and tokenizer) that `firstkd eval` can load.
pub fn copy_tokenizer_files(out: &Path, dir: &Path) -> Result<()> {
    let src = out.join(TOKENIZER_DIR);
    let Ok(entries) = std::fs::read_dir(&src) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&src, e))?;
        let to = dir.join(entry.file_name());
        std::fs::copy(entry.path(), &to).map_err(|e| Error::io(&to, e))?;
    }
    Ok(())
}

/// `dir` with `.SUFFIX` appended to its name (`step-00000004.tmp`).
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}.{suffix}", dir.display()))
}

/// Flushes every file of a (flat) folder and then the folder itself to the disk.
fn sync_folder(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_file() {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&path, e))?;
        }
    }
    sync_dir(dir);
    Ok(())
}

/// Atomically replaces `dir` with the output of `fill`. `fill` writes into `dir.tmp`; its
/// files and the folder are fsynced, a previous `dir` is moved aside to `dir.old`, `dir.tmp`
/// is renamed to `dir`, the parent folder is fsynced and only then is `dir.old` deleted. A
/// kill at any instant leaves either the old or the new `dir`, or the old one as `dir.old`,
/// which [`recover_interrupted`] puts back.
pub fn write_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = sibling(dir, "tmp");
    let old = sibling(dir, "old");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    if let Err(e) = fill(&tmp).and_then(|()| sync_folder(&tmp)) {
        // A full disk, say: the previous folder stays, and nothing of this one.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    fault::point("checkpoint-written");
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        fault::point("checkpoint-aside");
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent);
    }
    fault::point("checkpoint-renamed");
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// Cleans up after a run killed while it wrote a checkpoint or the final model: a folder
/// moved aside (`NAME.old`) whose replacement never arrived is put back, one whose
/// replacement is in place is deleted, and half-written `NAME.tmp` and half-deleted
/// `NAME.deleting` folders are deleted.
/// Returns what it did, one line per folder.
pub fn recover_interrupted(out: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for root in [out.to_path_buf(), out.join("checkpoints")] {
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&root, e))?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let ours = name.starts_with("step-") || name.starts_with("final.");
            if !ours || !path.is_dir() {
                continue;
            }
            if name.ends_with(".tmp") || name.ends_with(".deleting") {
                std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
                done.push(format!("removed the unfinished {name}"));
            } else if let Some(base) = name.strip_suffix(".old") {
                let target = root.join(base);
                if target.exists() {
                    std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
                    done.push(format!("removed {name}, replaced by {base}"));
                } else {
                    std::fs::rename(&path, &target).map_err(|e| Error::io(&path, e))?;
                    done.push(format!("restored {base} from {name}"));
                }
            }
        }
    }
    Ok(done)
}

/// Saves a full checkpoint (model, tokenizer files of the run `out`, optimizer moments, state)
/// to `dir`.
pub fn save_checkpoint(
    out: &Path,
    dir: &Path,
    student: &Student,
    optimizer: &HashMap<String, Tensor>,
    state: &TrainerState,
) -> Result<()> {
    write_atomically(dir, |tmp| {
        write_model_files(student, tmp)?;
        copy_tokenizer_files(out, tmp)?;
        fault::point("checkpoint-tmp");
        let opt_path = tmp.join(OPTIMIZER_FILE);
        let cpu: HashMap<String, Tensor> = optimizer
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        candle_core::safetensors::save(&cpu, &opt_path).map_err(|e| Error::Model {
            path: opt_path.clone(),
            reason: format!("writing safetensors: {e}"),
        })?;
        let state_path = tmp.join(STATE_FILE);
        let text = serde_json::to_string_pretty(state).map_err(|e| json_err(&state_path, e))?;
        write_file(&state_path, text.as_bytes())
    })
}

/// Loads a student from a model directory written by [`write_model_files`] (or any HF
/// Llama/Qwen2 safetensors directory).
pub fn load_model(dir: &Path, device: &Device) -> Result<Student> {
    let (cfg, weights, _) = load_pretrained(dir, None)?;
    Student::from_weights(cfg, weights, device).map_err(|e| e.in_model(dir))
}

/// Reads a checkpoint's trainer state and optimizer moments.
pub fn load_state(dir: &Path) -> Result<(TrainerState, HashMap<String, Tensor>)> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let state: TrainerState = serde_json::from_slice(&bytes).map_err(|e| json_err(&path, e))?;
    if state.version != STATE_VERSION {
        return Err(Error::InvalidManifest {
            path,
            reason: format!(
                "trainer state version {} (this firstkd reads {STATE_VERSION})",
                state.version
            ),
        });
    }
    let opt_path = dir.join(OPTIMIZER_FILE);
    let moments =
        candle_core::safetensors::load(&opt_path, &Device::Cpu).map_err(|e| Error::Model {
            path: opt_path.clone(),
            reason: format!("reading safetensors: {e}"),
        })?;
    Ok((state, moments))
}

/// Directory of the checkpoint after `step` steps under a run directory.
pub fn checkpoint_dir(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:08}"))
}

/// Complete checkpoints under a run directory, sorted by step.
pub fn list_checkpoints(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = out.join("checkpoints");
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&root).map_err(|e| Error::io(&root, e))? {
        let path = entry.map_err(|e| Error::io(&root, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if path.join(STATE_FILE).exists() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Deletes all but the newest `keep` checkpoints.
pub fn prune_checkpoints(out: &Path, keep: usize) -> Result<()> {
    let all = list_checkpoints(out)?;
    let excess = all.len().saturating_sub(keep.max(1));
    for (_, path) in all.into_iter().take(excess) {
        // Renamed first, so a kill halfway through the deletion leaves no folder that
        // looks like a checkpoint.
        let doomed = sibling(&path, "deleting");
        std::fs::rename(&path, &doomed).map_err(|e| Error::io(&path, e))?;
        std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn trainer_state_round_trips_losses_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut losses: Vec<f64> = (0..2000).map(|_| rng.random::<f64>() * 3.0).collect();
        losses.extend([1.0852670922743535, 1.0517910144947193, 0.0, 1e-300]);
        let state = TrainerState {
            version: STATE_VERSION,
            step: 3,
            batches_consumed: 6,
            tokens_seen: 100,
            optimizer_steps: 3,
            fingerprint: serde_json::json!({"lr": 0.1f64 + 0.2f64, "t": 1.5637963082385543f64}),
            losses: losses.clone(),
        };
        let text = serde_json::to_string(&state).unwrap();
        let back: TrainerState = serde_json::from_str(&text).unwrap();
        assert!(back
            .losses
            .iter()
            .zip(&losses)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(back.losses.len(), losses.len());
        assert!(same_fingerprint(&back.fingerprint, &state.fingerprint));
        assert!(!same_fingerprint(
            &back.fingerprint,
            &serde_json::json!({"lr": 0.3, "t": 1.5637963082385543f64})
        ));
        // Files written before losses were strings still load.
        let old = text.replace(&format!("\"{}\"", losses[0]), &losses[0].to_string());
        assert_ne!(old, text);
        let back: TrainerState = serde_json::from_str(&old).unwrap();
        assert_eq!(back.losses.len(), losses.len());
    }
}
