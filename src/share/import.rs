//! Import of other tools' soft labels into a new store: the part every format shares
//! (learning `k` and the vocabulary, what the input cannot say, writing through the store's
//! writer, resuming), and axolotl's KD rows ([`import_axolotl`]). docs/sharing.md has the
//! rules.

use std::path::{Path, PathBuf};

use super::files::{read_kd_rows, KdRow};
use crate::error::{Error, Result};
use crate::schema::{LogprobDtype, Selection};
use crate::store::manifest::{TeacherInfo, TokenizerInfo};
use crate::store::writer::{
    Opened, SampleLabels, SampleRecord, StoreMeta, StoreWriter, WriterOptions,
};

/// Entries at or below this are padding on import.
const PAD_BELOW: f64 = -1e8;

/// Options of [`import_axolotl`] and [`super::import_distillkit`].
#[derive(Debug, Clone, PartialEq)]
pub struct ImportOptions {
    /// Layout of the new store.
    pub dtype: LogprobDtype,
    /// The tokenizer the ids belong to (`tokenizer.json` or a GGUF file): its hash and
    /// vocabulary go into the manifest. Without it the tokenizer is marked unknown.
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size when no tokenizer is given (default: largest id + 1).
    pub vocab_size: Option<u32>,
    /// Value of the `split` column of every imported sample.
    pub split: String,
    /// Name of the teacher, when known (recorded; its hash stays unknown).
    pub teacher: Option<String>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            dtype: LogprobDtype::Quantized,
            tokenizer: None,
            vocab_size: None,
            split: "train".to_string(),
            teacher: None,
        }
    }
}

/// What an import wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportReport {
    pub sequences: u64,
    pub positions: u64,
    pub k: usize,
    pub vocab_size: u32,
    pub already_complete: bool,
}

/// One imported sequence: tokens, the loss prefix and per position the real entries.
pub(crate) struct Imported {
    pub input_ids: Vec<u32>,
    pub prompt_len: u32,
    pub ids: Vec<Vec<u32>>,
    pub logprobs: Vec<Vec<f32>>,
}

/// An axolotl row as an [`Imported`] sequence.
fn imported(row: &KdRow, path: &Path, r: u64) -> Result<Imported> {
    let bad = |why: String| Error::Corrupt {
        path: path.to_path_buf(),
        row: Some(r),
        reason: why,
    };
    let l = row.input_ids.len();
    if l < 2 {
        return Err(bad(format!("{l} input ids; a sequence needs at least 2")));
    }
    if row.labels.len() != l {
        return Err(bad(format!(
            "{} labels for {l} input ids",
            row.labels.len()
        )));
    }
    let rows = row.target_token_ids.len();
    if rows < l - 1 || row.target_logprobs.len() != rows || row.target_mask.len() != rows {
        return Err(bad(format!(
            "{rows} target_token_ids rows, {} target_logprobs rows, {} target_mask rows for {l} input ids (need {} or {l}, all equal)",
            row.target_logprobs.len(),
            row.target_mask.len(),
            l - 1
        )));
    }
    let input_ids = row
        .input_ids
        .iter()
        .map(|&x| u32::try_from(x).map_err(|_| bad(format!("input id {x} is not a token id"))))
        .collect::<Result<Vec<_>>>()?;
    // in_loss[p] = labels[p + 1] != -100 must be a suffix: firstkd stores one prompt prefix.
    let trained: Vec<bool> = (0..l - 1).map(|p| row.labels[p + 1] != -100).collect();
    let first = trained.iter().position(|&t| t).unwrap_or(l - 1);
    if let Some(gap) = trained[first..].iter().position(|&t| !t) {
        return Err(bad(format!(
            "labels train positions {} and later but not {}: firstkd stores one prompt prefix \
             per sequence (split multi-turn rows into one row per trained turn)",
            first + 1,
            first + gap + 1
        )));
    }
    let mut ids = Vec::with_capacity(l - 1);
    let mut logprobs = Vec::with_capacity(l - 1);
    for p in 0..l - 1 {
        let (tids, tlps, tmask) = (
            &row.target_token_ids[p],
            &row.target_logprobs[p],
            &row.target_mask[p],
        );
        if tids.len() != tlps.len() || tmask.len() != tids.len() {
            return Err(bad(format!(
                "position {p}: {} ids, {} log-probs, {} mask entries",
                tids.len(),
                tlps.len(),
                tmask.len()
            )));
        }
        let mut entries: Vec<(u32, f32)> = Vec::with_capacity(tids.len());
        for j in 0..tids.len() {
            let lp = tlps[j];
            if lp.is_nan() || lp > 1e-4 {
                return Err(bad(format!(
                    "position {p}: log-prob {lp} is not a log-probability"
                )));
            }
            if lp <= PAD_BELOW {
                if tmask[j] != 0 {
                    return Err(bad(format!("position {p}: padding entry {j} has mask 1")));
                }
                continue;
            }
            let id = u32::try_from(tids[j]).map_err(|_| {
                bad(format!(
                    "position {p}: target id {} is not a token id",
                    tids[j]
                ))
            })?;
            entries.push((id, lp.min(0.0) as f32));
        }
        if entries.is_empty() {
            return Err(bad(format!(
                "position {p} has no teacher entries (only padding); every position but the \
                 last needs the teacher's distribution"
            )));
        }
        entries.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ids.push(entries.iter().map(|e| e.0).collect());
        logprobs.push(entries.iter().map(|e| e.1).collect());
    }
    Ok(Imported {
        input_ids,
        prompt_len: (first + 1) as u32,
        ids,
        logprobs,
    })
}

/// The writer's labels of an imported sequence: the target's log-prob where it is in the
/// list, else the upper bound `min(log tail mass, last log-prob)`; the entropy of the list
/// plus the tail as one outcome (the full distribution is not known).
pub(crate) fn imported_labels(s: &Imported) -> SampleLabels {
    let mut out = SampleLabels::default();
    for (p, (ids, lps)) in s.ids.iter().zip(&s.logprobs).enumerate() {
        let target = s.input_ids[p + 1];
        let mut mass: f64 = lps.iter().map(|&l| f64::from(l).exp()).sum();
        // A lossy encoding (DistillKit's polynomial fit) can overshoot: scale the row to mass 1.
        let scaled;
        let lps = if mass > 1.0 {
            let shift = mass.ln();
            scaled = lps
                .iter()
                .map(|&l| ((f64::from(l) - shift) as f32).min(0.0))
                .collect::<Vec<f32>>();
            mass = 1.0;
            &scaled
        } else {
            lps
        };
        let tail = (1.0 - mass).max(0.0);
        let target_lp = match ids.iter().position(|&id| id == target) {
            Some(j) => lps[j],
            None => (tail.max(1e-12).ln() as f32).min(*lps.last().unwrap_or(&0.0)),
        };
        let mut h: f64 = lps
            .iter()
            .map(|&l| {
                let l = f64::from(l);
                -l.exp() * l
            })
            .sum();
        if tail > 0.0 {
            h -= tail * tail.ln();
        }
        out.topk_ids.extend_from_slice(ids);
        out.topk_logprobs.extend_from_slice(lps);
        out.target_logprobs.push(target_lp);
        out.entropy.push(h.max(0.0) as f32);
    }
    out
}

/// The manifest's tokenizer for an import: from `path` (`tokenizer.json` or GGUF) when given.
pub(crate) fn import_tokenizer(
    path: Option<&Path>,
    vocab_size: Option<u32>,
    max_id: u32,
) -> Result<TokenizerInfo> {
    let Some(path) = path else {
        let vocab = vocab_size.unwrap_or(max_id + 1);
        if vocab <= max_id {
            return Err(Error::InvalidArgument(format!(
                "a vocabulary of {vocab} was given but the data holds token id {max_id}"
            )));
        }
        return Ok(TokenizerInfo {
            sha256: "unknown".to_string(),
            vocab_size: vocab,
            special_tokens: Default::default(),
        });
    };
    let tok = if path.extension().is_some_and(|e| e == "gguf") {
        crate::teacher::gguf_tokenizer(path)?
    } else {
        crate::tokenize::TeacherTokenizer::from_tokenizer_json(path, [None, None, None])?
    };
    let id = tok.identity();
    if id.vocab_size <= max_id {
        return Err(Error::InvalidArgument(format!(
            "{}: vocabulary of {} but the data holds token id {max_id}: not this tokenizer",
            path.display(),
            id.vocab_size
        )));
    }
    let mut special_tokens = std::collections::BTreeMap::new();
    for (role, t) in [("bos", &id.bos), ("eos", &id.eos), ("pad", &id.pad)] {
        if let Some(t) = t {
            special_tokens.insert(
                role.to_string(),
                crate::store::manifest::SpecialToken {
                    id: t.id,
                    text: t.text.clone(),
                },
            );
        }
    }
    Ok(TokenizerInfo {
        sha256: id.sha256.clone(),
        vocab_size: id.vocab_size,
        special_tokens,
    })
}

/// The manifest's teacher for an import: everything unknown but the name given.
pub(crate) fn unknown_teacher(name: Option<&str>, format: &str) -> TeacherInfo {
    TeacherInfo {
        file_name: name.unwrap_or("unknown").to_string(),
        sha256: "unknown".to_string(),
        architecture: "unknown".to_string(),
        quantization: "unknown".to_string(),
        compute_dtype: "unknown".to_string(),
        compute_mode: format!("imported from {format}"),
    }
}

/// Writes imported sequences into a new store: one pass to learn `k` and the largest id, one
/// to write. `read(each)` must call `each` for every sequence in order, the same both times.
pub(crate) fn import_sequences(
    out: &Path,
    opts: &ImportOptions,
    provenance: serde_json::Value,
    format: &str,
    mut read: impl FnMut(&mut dyn FnMut(Imported) -> Result<()>) -> Result<()>,
) -> Result<ImportReport> {
    let (mut k_min, mut k_max, mut max_id, mut sequences, mut positions) =
        (usize::MAX, 0usize, 0u32, 0u64, 0u64);
    read(&mut |s: Imported| {
        for ids in &s.ids {
            k_min = k_min.min(ids.len());
            k_max = k_max.max(ids.len());
            max_id = max_id.max(ids.iter().copied().max().unwrap_or(0));
        }
        max_id = max_id.max(s.input_ids.iter().copied().max().unwrap_or(0));
        sequences += 1;
        positions += s.ids.len() as u64;
        Ok(())
    })?;
    if sequences == 0 {
        return Err(Error::InvalidArgument(
            "the input holds no sequences; nothing to import".into(),
        ));
    }
    if k_min != k_max {
        return Err(Error::InvalidArgument(format!(
            "positions hold between {k_min} and {k_max} teacher entries; firstkd imports \
             datasets with the same number at every position (top-k)"
        )));
    }
    let selection = Selection::TopK { k: k_max };
    let tokenizer = import_tokenizer(opts.tokenizer.as_deref(), opts.vocab_size, max_id)?;
    let meta = StoreMeta {
        k: k_max,
        selection,
        logprob_dtype: opts.dtype,
        teacher: unknown_teacher(opts.teacher.as_deref(), format),
        tokenizer,
        labeling: serde_json::json!({
            "imported_from": provenance,
            "split": opts.split,
            "target_logprob": "the teacher's where the target is in the list, else the upper bound min(log tail mass, last listed log-prob)",
            "entropy": "of the listed entries plus the tail as one outcome (the full distribution is not in the input)",
            "overshoot": "a position whose listed probabilities add up to more than 1 (a lossy encoding) is scaled to 1",
        }),
    };
    let vocab_size = meta.tokenizer.vocab_size;
    let (mut writer, skip) = match StoreWriter::open(out, meta, WriterOptions::default())? {
        Opened::Complete(_) => {
            return Ok(ImportReport {
                sequences,
                positions,
                k: k_max,
                vocab_size,
                already_complete: true,
            })
        }
        // The input order is the cursor: skip what the interrupted run committed.
        Opened::Resumed { writer, cursor } => {
            let done = cursor.get("sequences").and_then(serde_json::Value::as_u64);
            (writer, done.unwrap_or(0))
        }
        Opened::Fresh(w) => (w, 0),
    };
    let mut id = 0u64;
    let split = opts.split.clone();
    read(&mut |s: Imported| {
        if id < skip {
            id += 1;
            return Ok(());
        }
        let labels = imported_labels(&s);
        let record = SampleRecord {
            sample_id: id,
            source: format.to_string(),
            split: split.clone(),
            record_index: id,
            window_index: 0,
            input_ids: s.input_ids,
            prompt_len: s.prompt_len,
        };
        writer.push(&record, &labels)?;
        id += 1;
        if writer.pending_rows() >= 1 << 20 {
            writer.commit(serde_json::json!({ "sequences": id }))?;
        }
        Ok(())
    })?;
    writer.finish(serde_json::json!({ "sequences": id }))?;
    Ok(ImportReport {
        sequences,
        positions,
        k: k_max,
        vocab_size,
        already_complete: false,
    })
}

/// Imports axolotl KD dataset files (Parquet or JSON Lines, in order) into the new store
/// `out`. Log-probs are taken as given: full-vocabulary log-probabilities of the teacher at
/// temperature 1 (a dataset exported with a baked-in temperature imports as that
/// distribution). Rows must mark one trained suffix (`labels` -100 then token ids).
pub fn import_axolotl(
    inputs: &[PathBuf],
    out: &Path,
    opts: &ImportOptions,
) -> Result<ImportReport> {
    if inputs.is_empty() {
        return Err(Error::InvalidArgument("no input files".into()));
    }
    let provenance = serde_json::json!({
        "format": "axolotl-kd",
        "files": inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "teacher": opts.teacher.clone().unwrap_or_else(|| "unknown".into()),
    });
    import_sequences(out, opts, provenance, "axolotl", |each| {
        for path in inputs {
            read_kd_rows(path, |r, row| each(imported(&row, path, r)?))?;
        }
        Ok(())
    })
}
