//! Copying samples with their labels from one store into a writer: what `convert`, `merge`
//! and `split` share. Label rows are read through the checked join
//! ([`StoreReader::labelled_samples`]) and pushed whole, so a copy re-checks every invariant
//! the writer enforces, and re-encoding a decoded quantized row gives the same bytes.

use super::decode::LabelColumn;
use super::join::LabelledSample;
use super::manifest::Manifest;
use super::writer::{SampleLabels, SampleRecord, StoreMeta};
use crate::schema::{LogprobDtype, Selection};

/// The label columns a copy reads from a store described by `manifest`.
pub fn copy_columns(manifest: &Manifest) -> Vec<LabelColumn> {
    let mut columns = vec![
        LabelColumn::TopkIds,
        LabelColumn::TopkLogprobs,
        LabelColumn::TargetLogprob,
        LabelColumn::Entropy,
    ];
    if matches!(manifest.selection(), Selection::Sample { .. }) {
        columns.push(LabelColumn::TopkCounts);
    }
    columns
}

/// The writer settings that reproduce `manifest`'s store in `dtype`.
pub fn meta_of(manifest: &Manifest, dtype: LogprobDtype) -> StoreMeta {
    StoreMeta {
        k: manifest.k,
        selection: manifest.selection(),
        logprob_dtype: dtype,
        teacher: manifest.teacher.clone(),
        tokenizer: manifest.tokenizer.clone(),
        labeling: manifest.labeling.clone(),
    }
}

impl LabelledSample {
    /// The sample as the writer takes it, with id `sample_id` and split `split`.
    pub fn record(&self, sample_id: u64, split: &str) -> SampleRecord {
        let s = &self.sample;
        SampleRecord {
            sample_id,
            source: s.source.clone(),
            split: split.to_string(),
            record_index: s.record_index,
            window_index: s.window_index,
            input_ids: s.input_ids.clone(),
            prompt_len: s.prompt_len,
        }
    }

    /// The labels as the writer takes them (read with [`copy_columns`]).
    pub fn sample_labels(&self) -> SampleLabels {
        let rows = &self.labels;
        let mut out = SampleLabels {
            topk_ids: rows.topk_ids.clone(),
            topk_logprobs: rows.topk_logprobs.clone(),
            counts: rows.topk_counts.clone(),
            target_logprobs: rows.target_logprob.clone(),
            entropy: rows.entropy.clone(),
            ..SampleLabels::default()
        };
        if !rows.offsets.is_empty() {
            out.lengths = (0..rows.len()).map(|i| rows.ids(i).len() as u32).collect();
        }
        out
    }
}
