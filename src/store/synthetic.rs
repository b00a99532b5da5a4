//! Seeded synthetic stores with realistic label distributions, for tests and benchmarks.
//!
//! Each position draws a "true" next-token distribution: k descending logits with
//! exponential gaps plus a tail bucket holding the rest of the vocabulary. The stored
//! (teacher) distribution is that one sharpened by `overconfidence` (logits multiplied,
//! the tail treated as V - k equal tokens), so `overconfidence > 1` gives an over-confident
//! teacher whose fitted temperature should come out above 1. The next token is drawn from
//! the *true* distribution, so calibration metrics behave as on a real teacher.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::manifest::{Manifest, TeacherInfo, TokenizerInfo};
use super::writer::{SampleLabels, SampleRecord, StoreMeta, StoreWriter, WriterOptions};
use crate::error::{Error, Result};
use crate::schema::LogprobDtype;

/// Settings of a synthetic store.
#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    /// Stop after at least this many label rows.
    pub label_rows: u64,
    pub seed: u64,
    pub k: usize,
    pub vocab_size: u32,
    pub logprob_dtype: LogprobDtype,
    /// Sharpening of the stored distribution relative to the truth (1 = calibrated).
    pub overconfidence: f64,
    pub min_len: usize,
    pub max_len: usize,
    /// Fraction of samples in the `valid` split.
    pub valid_fraction: f64,
    /// Label rows per part.
    pub part_rows: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            label_rows: 100_000,
            seed: 0,
            k: 5,
            vocab_size: 49152,
            logprob_dtype: LogprobDtype::Quantized,
            overconfidence: 1.5,
            min_len: 64,
            max_len: 512,
            valid_fraction: 0.1,
            part_rows: 1 << 20,
        }
    }
}

const SOURCES: [&str; 3] = ["synthetic-chat", "synthetic-mc", "synthetic-text"];

/// Store metadata describing a synthetic store.
pub fn synthetic_meta(cfg: &SyntheticConfig) -> StoreMeta {
    StoreMeta {
        k: cfg.k,
        selection: crate::schema::Selection::TopK { k: cfg.k },
        logprob_dtype: cfg.logprob_dtype,
        teacher: TeacherInfo {
            file_name: "synthetic".into(),
            sha256: String::new(),
            architecture: "synthetic".into(),
            quantization: "none".into(),
            compute_dtype: "f64".into(),
            compute_mode: "synthetic".into(),
        },
        tokenizer: TokenizerInfo {
            sha256: "synthetic".into(),
            vocab_size: cfg.vocab_size,
            special_tokens: Default::default(),
        },
        labeling: serde_json::json!({
            "kind": "synthetic",
            "seed": cfg.seed,
            "overconfidence": cfg.overconfidence,
            "min_len": cfg.min_len,
            "max_len": cfg.max_len,
            "valid_fraction": cfg.valid_fraction,
        }),
    }
}

fn exponential(rng: &mut StdRng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

/// Labels of one position: (top-k ids, stored top-k log-probs, target id, stored target
/// log-prob, stored entropy).
struct Position {
    ids: Vec<u32>,
    lps: Vec<f32>,
    target: u32,
    target_lp: f32,
    entropy: f32,
}

fn draw_position(rng: &mut StdRng, cfg: &SyntheticConfig) -> Position {
    let k = cfg.k;
    let tail_tokens = f64::from(cfg.vocab_size) - k as f64;
    // True logits: descending with exponential gaps; the first gap varies most.
    let mut z = Vec::with_capacity(k + 1);
    z.push(0.0f64);
    for j in 1..k {
        let mean = if j == 1 { 2.5 } else { 0.6 };
        z.push(z[j - 1] - exponential(rng, mean));
    }
    // Tail bucket: total weight relative to the k-th token, log-uniform in [0.02, 20].
    let c = (rng.random::<f64>() * (20f64 / 0.02).ln()).exp() * 0.02;
    let tail_log_weight = z[k - 1] + c.ln();
    let log_softmax = |logits: &[f64]| -> Vec<f64> {
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        logits.iter().map(|x| x - lse).collect()
    };
    z.push(tail_log_weight);
    let truth = log_softmax(&z);
    // Stored (teacher) distribution: logits sharpened; tail as V - k equal tokens.
    let s = cfg.overconfidence;
    let per_tail_token = tail_log_weight - tail_tokens.ln();
    let mut sharp: Vec<f64> = z[..k].iter().map(|x| x * s).collect();
    sharp.push(per_tail_token * s + tail_tokens.ln());
    let stored = log_softmax(&sharp);
    let tail_token_lp = stored[k] - tail_tokens.ln();
    let entropy =
        -stored[..k].iter().map(|lp| lp.exp() * lp).sum::<f64>() - stored[k].exp() * tail_token_lp;
    // Distinct ids, skewed towards frequent (small) ids.
    let mut ids = Vec::with_capacity(k);
    while ids.len() < k {
        let u: f64 = rng.random();
        let id = ((u * u * u) * f64::from(cfg.vocab_size)) as u32;
        let id = id.min(cfg.vocab_size - 1);
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    // Next token from the true distribution.
    let u: f64 = rng.random();
    let mut acc = 0.0;
    let mut pick = k;
    for (j, lp) in truth.iter().enumerate() {
        acc += lp.exp();
        if u < acc {
            pick = j;
            break;
        }
    }
    let (target, target_lp) = if pick < k {
        (ids[pick], stored[pick])
    } else {
        let target = loop {
            let id = rng.random_range(0..cfg.vocab_size);
            if !ids.contains(&id) {
                break id;
            }
        };
        // Tail tokens differ around the uniform value, never above the k-th.
        let noise = -exponential(rng, 1.0);
        (target, (tail_token_lp + 1.0 + noise).min(stored[k - 1]))
    };
    Position {
        ids,
        lps: stored[..k].iter().map(|&x| x as f32).collect(),
        target,
        target_lp: target_lp as f32,
        entropy: entropy as f32,
    }
}

/// Generates a synthetic store at `dir` (which must not exist or be empty).
pub fn generate(dir: &Path, cfg: &SyntheticConfig, opts: WriterOptions) -> Result<Manifest> {
    if cfg.k == 0 || cfg.vocab_size as usize <= cfg.k + 1 {
        return Err(Error::InvalidArgument(format!(
            "synthetic store needs 1 <= k < vocab_size - 1 (k {}, vocab {})",
            cfg.k, cfg.vocab_size
        )));
    }
    if cfg.min_len < 2 || cfg.max_len < cfg.min_len {
        return Err(Error::InvalidArgument(format!(
            "synthetic lengths need 2 <= min_len <= max_len (got {}..{})",
            cfg.min_len, cfg.max_len
        )));
    }
    if !(cfg.overconfidence.is_finite() && cfg.overconfidence > 0.0) {
        return Err(Error::InvalidArgument("overconfidence must be > 0".into()));
    }
    let mut writer = StoreWriter::create(dir, synthetic_meta(cfg), opts)?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let (mut rows, mut sample_id) = (0u64, 0u64);
    while rows < cfg.label_rows {
        let len = rng.random_range(cfg.min_len..=cfg.max_len);
        let prompt_len = (len as f64 * rng.random_range(0.2..0.6)) as u32;
        let source = SOURCES[rng.random_range(0..SOURCES.len())];
        let split = if rng.random::<f64>() < cfg.valid_fraction {
            "valid"
        } else {
            "train"
        };
        let mut input_ids = Vec::with_capacity(len);
        input_ids.push(rng.random_range(0..cfg.vocab_size));
        let mut labels = SampleLabels::default();
        for _ in 0..len - 1 {
            let p = draw_position(&mut rng, cfg);
            input_ids.push(p.target);
            labels.topk_ids.extend_from_slice(&p.ids);
            labels.topk_logprobs.extend_from_slice(&p.lps);
            labels.target_logprobs.push(p.target_lp);
            labels.entropy.push(p.entropy);
        }
        let record = SampleRecord {
            sample_id,
            source: source.into(),
            split: split.into(),
            record_index: sample_id,
            window_index: 0,
            input_ids,
            prompt_len,
        };
        writer.push(&record, &labels)?;
        rows += (len - 1) as u64;
        sample_id += 1;
        if writer.pending_rows() >= cfg.part_rows {
            writer.commit(serde_json::json!({ "samples_done": sample_id }))?;
        }
    }
    writer.finish(serde_json::json!({ "samples_done": sample_id }))
}
