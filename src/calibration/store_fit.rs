//! Fitting the teacher temperature on a store's held-out positions (`firstkd calibrate`).
//!
//! Held-out positions: those of samples in the requested split (default `valid`) when the
//! store has any; otherwise a deterministic fraction of samples chosen by a hash of the
//! sample id, so the same store always gives the same held-out set. The fit reads only the
//! columns it needs, streaming, and writes the result into `manifest.json` (atomically);
//! the Parquet parts are not rewritten.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use super::temperature::{fit_temperature, FitObjective, FitOptions, TemperatureFit, TopKPosition};
use crate::error::{Error, Result};
use crate::store::{LabelColumn, Manifest, SampleColumn, StoreReader, TemperatureInfo};

/// Which positions the temperature is fitted on.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOut {
    /// Use the samples of this split when the store has any.
    pub split: String,
    /// Otherwise this fraction of samples, chosen by hash of the sample id.
    pub fraction: f64,
    /// Only positions in the loss (response tokens).
    pub in_loss_only: bool,
    /// Stop after this many positions (streaming order).
    pub max_positions: usize,
}

impl Default for HeldOut {
    fn default() -> Self {
        HeldOut {
            split: "valid".into(),
            fraction: 0.1,
            in_loss_only: true,
            max_positions: 2_000_000,
        }
    }
}

/// Result of fitting on a store.
#[derive(Debug, Clone, Serialize)]
pub struct StoreFit {
    pub fit: TemperatureFit,
    /// Description of the held-out data (rule, samples, positions).
    pub fitted_on: serde_json::Value,
}

/// Deterministic membership of the hash-selected held-out set (splitmix64 of the id).
pub fn hash_held_out(sample_id: u64, fraction: f64) -> bool {
    let mut z = sample_id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

/// Fits the temperature of the store at `dir` on its held-out positions.
pub fn fit_store(
    dir: &Path,
    held_out: &HeldOut,
    objective: FitObjective,
    options: &FitOptions,
) -> Result<StoreFit> {
    if !(held_out.fraction > 0.0 && held_out.fraction <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "held-out fraction {} must be in (0, 1]",
            held_out.fraction
        )));
    }
    let reader = StoreReader::open(dir)?;
    let vocab = reader.manifest().tokenizer.vocab_size as usize;
    let k = reader.manifest().k;
    // Which samples are held out.
    let mut split_of: HashMap<u64, bool> = HashMap::new();
    for row in reader.sample_rows(&[SampleColumn::SampleId, SampleColumn::Split]) {
        let row = row?;
        split_of.insert(row.sample_id, row.split == held_out.split);
    }
    let use_split = split_of.values().any(|&v| v);
    let chosen = |id: u64| {
        if use_split {
            split_of.get(&id).copied().unwrap_or(false)
        } else {
            hash_held_out(id, held_out.fraction)
        }
    };
    let held_samples = split_of.keys().filter(|&&id| chosen(id)).count();

    let (mut logprobs, mut ranks, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    let columns = [
        LabelColumn::SampleId,
        LabelColumn::TargetId,
        LabelColumn::InLoss,
        LabelColumn::TopkIds,
        LabelColumn::TopkLogprobs,
        LabelColumn::TargetLogprob,
    ];
    'outer: for rows in reader.label_rows(&columns, 65536) {
        let rows = rows?;
        for i in 0..rows.len() {
            if !chosen(rows.sample_id[i]) || (held_out.in_loss_only && !rows.in_loss[i]) {
                continue;
            }
            logprobs.extend_from_slice(rows.logprobs(i));
            let target = rows.target_id[i];
            ranks.push(rows.ids(i).iter().position(|&t| t == target));
            targets.push(rows.target_logprob[i]);
            if ranks.len() >= held_out.max_positions {
                break 'outer;
            }
        }
    }
    if ranks.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no held-out positions to fit on (split {:?} absent and hash fraction {} selected none{})",
            dir.display(),
            held_out.split,
            held_out.fraction,
            if held_out.in_loss_only { ", in-loss positions only" } else { "" }
        )));
    }
    let positions: Vec<TopKPosition<'_>> = ranks
        .iter()
        .enumerate()
        .map(|(j, &target_rank)| TopKPosition {
            logprobs: &logprobs[j * k..(j + 1) * k],
            target_rank,
            target_logprob: targets[j],
            vocab_size: vocab,
        })
        .collect();
    let fit = fit_temperature(&positions, objective, options)?;
    let fitted_on = serde_json::json!({
        "rule": if use_split { format!("split = {:?}", held_out.split) } else { format!("hash(sample_id) < {}", held_out.fraction) },
        "samples": held_samples,
        "positions": positions.len(),
        "in_loss_only": held_out.in_loss_only,
        "mode": fit.mode,
    });
    Ok(StoreFit { fit, fitted_on })
}

/// Writes a fit into the store's manifest (atomically; the parts are untouched).
pub fn record_fit(dir: &Path, store_fit: &StoreFit) -> Result<Manifest> {
    // One writer of the manifest at a time; a `calibrate` killed while it wrote one left a
    // temporary file that nobody else will remove.
    let lock_path = crate::store::lock::lock_path(dir, None);
    let _lock = crate::store::lock::lock(&lock_path, &dir.display().to_string())?;
    crate::store::writer::remove_dead_manifest_temporaries(dir)?;
    let mut manifest = Manifest::load(dir)?;
    manifest.temperature = Some(TemperatureInfo {
        value: store_fit.fit.temperature,
        objective: store_fit.fit.objective,
        mode: Some(store_fit.fit.mode),
        fitted_on: store_fit.fitted_on.clone(),
        before: serde_json::to_value(&store_fit.fit.before)?,
        after: serde_json::to_value(&store_fit.fit.after)?,
        fitted_by: format!("firstkd {}", crate::VERSION),
    });
    manifest.save(dir)?;
    Ok(manifest)
}
