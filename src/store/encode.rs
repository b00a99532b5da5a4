//! What the writer puts into a part: per-sample checks, the canonical order of each row, and
//! the Arrow arrays of both tables in either layout (1.0 fixed-size lists of log-probs, 2.0
//! variable lists of quantized probabilities).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float16Array, Float32Array, ListArray, StringArray,
    UInt16Array, UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use half::f16;

use super::manifest::Manifest;
use super::writer::{Buffers, SampleLabels, SampleRecord};
use crate::error::{Error, Result};
use crate::schema::{LogprobDtype, Selection};

/// Rounds log-probs to the stored dtype and orders each row by descending log-prob, ties by
/// smaller id, so rounding can never break the store's ordering invariant.
pub(super) fn canonicalize(ids: &mut [u32], lps: &mut [f32], k: usize, dtype: LogprobDtype) {
    if dtype == LogprobDtype::Float16 {
        for lp in lps.iter_mut() {
            *lp = f16::from_f32(*lp).to_f32();
        }
    }
    for (row_ids, row_lps) in ids.chunks_mut(k).zip(lps.chunks_mut(k)) {
        for i in 1..k {
            let mut j = i;
            while j > 0
                && (row_lps[j] > row_lps[j - 1]
                    || (row_lps[j] == row_lps[j - 1] && row_ids[j] < row_ids[j - 1]))
            {
                row_lps.swap(j, j - 1);
                row_ids.swap(j, j - 1);
                j -= 1;
            }
        }
    }
}

/// [`sort_quantized`] carrying each entry's draw count along.
pub(super) fn sort_quantized_with(ids: &mut [u32], qs: &mut [u16], counts: &mut [u16]) {
    let mut row: Vec<(u16, u32, u16)> =
        (0..ids.len()).map(|j| (qs[j], ids[j], counts[j])).collect();
    row.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (j, (q, id, c)) in row.into_iter().enumerate() {
        qs[j] = q;
        ids[j] = id;
        counts[j] = c;
    }
}

/// Orders a quantized row by descending stored probability, ties by smaller id.
pub(super) fn sort_quantized(ids: &mut [u32], qs: &mut [u16]) {
    let mut row: Vec<(u16, u32)> = qs.iter().copied().zip(ids.iter().copied()).collect();
    row.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (j, (q, id)) in row.into_iter().enumerate() {
        qs[j] = q;
        ids[j] = id;
    }
}

pub(super) fn validate(
    sample: &SampleRecord,
    labels: &SampleLabels,
    k: usize,
    selection: Selection,
    vocab: u32,
) -> Result<()> {
    let bad = |reason: String| {
        Err(Error::InvalidArgument(format!(
            "sample {} (source {}, record {}): {reason}",
            sample.sample_id, sample.source, sample.record_index
        )))
    };
    let len = sample.input_ids.len();
    if len < 2 {
        return bad(format!("needs at least 2 tokens, has {len}"));
    }
    let n = len - 1;
    if sample.prompt_len as usize > len {
        return bad(format!("prompt_len {} > length {len}", sample.prompt_len));
    }
    let entries = if labels.lengths.is_empty() {
        if !selection.fixed_len() {
            return bad(format!(
                "selection {selection} needs a list length per position"
            ));
        }
        n * k
    } else {
        if labels.lengths.len() != n {
            return bad(format!(
                "{} list lengths for {n} positions",
                labels.lengths.len()
            ));
        }
        if let Some(l) = labels.lengths.iter().find(|&&l| l == 0 || l as usize > k) {
            return bad(format!("a list of {l} entries (1..={k} allowed)"));
        }
        if selection.fixed_len() && labels.lengths.iter().any(|&l| l as usize != k) {
            return bad(format!("top-k lists must have {k} entries"));
        }
        labels.lengths.iter().map(|&l| l as usize).sum()
    };
    if labels.topk_ids.len() != entries || labels.topk_logprobs.len() != entries {
        return bad(format!(
            "top-k arrays have {} ids / {} log-probs, expected {entries} ({n} positions, k={k})",
            labels.topk_ids.len(),
            labels.topk_logprobs.len(),
        ));
    }
    match selection {
        Selection::Sample { draws, .. } => {
            if labels.counts.len() != entries {
                return bad(format!(
                    "{} draw counts for {entries} entries",
                    labels.counts.len()
                ));
            }
            let mut at = 0;
            for &l in &labels.lengths {
                let row = &labels.counts[at..at + l as usize];
                let total: u32 = row.iter().map(|&c| u32::from(c)).sum();
                if total != draws || row.contains(&0) {
                    return bad(format!("draw counts {row:?} do not add up to {draws}"));
                }
                at += l as usize;
            }
        }
        _ if !labels.counts.is_empty() => {
            return bad("draw counts given for a selection that does not sample".into());
        }
        _ => {}
    }
    if labels.target_logprobs.len() != n || labels.entropy.len() != n {
        return bad(format!(
            "{} target log-probs / {} entropies for {n} positions",
            labels.target_logprobs.len(),
            labels.entropy.len()
        ));
    }
    if vocab > 0 {
        if let Some(id) = sample
            .input_ids
            .iter()
            .chain(&labels.topk_ids)
            .find(|&&id| id >= vocab)
        {
            return bad(format!("token id {id} outside vocabulary of {vocab}"));
        }
    }
    let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
    if !finite(&labels.topk_logprobs)
        || !finite(&labels.target_logprobs)
        || !finite(&labels.entropy)
    {
        return bad("non-finite (NaN or infinite) log-prob or entropy".into());
    }
    Ok(())
}

pub(super) fn fixed_list(values: ArrayRef, k: usize) -> Result<ArrayRef> {
    let field = Arc::new(Field::new("item", values.data_type().clone(), false));
    let size =
        i32::try_from(k).map_err(|_| Error::Internal(format!("k {k} does not fit a list size")))?;
    Ok(Arc::new(FixedSizeListArray::try_new(
        field, size, values, None,
    )?))
}

pub(super) fn logprob_array(values: &[f32], dtype: LogprobDtype) -> ArrayRef {
    match dtype {
        LogprobDtype::Float32 | LogprobDtype::Quantized => {
            Arc::new(Float32Array::from(values.to_vec()))
        }
        LogprobDtype::Float16 => Arc::new(Float16Array::from(
            values.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(),
        )),
    }
}

/// A list column whose row `i` has `lengths[i]` values.
pub(super) fn var_list(values: ArrayRef, lengths: &[usize]) -> Result<ArrayRef> {
    let field = Arc::new(Field::new("item", values.data_type().clone(), false));
    let offsets = OffsetBuffer::from_lengths(lengths.iter().copied());
    Ok(Arc::new(ListArray::try_new(field, offsets, values, None)?))
}

pub(super) fn labels_batch(
    b: &mut Buffers,
    schema: &SchemaRef,
    m: &Manifest,
) -> Result<RecordBatch> {
    if m.quantization.is_some() {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(std::mem::take(&mut b.sample_id))),
            Arc::new(UInt32Array::from(std::mem::take(&mut b.position))),
            Arc::new(BooleanArray::from(std::mem::take(&mut b.in_loss))),
            var_list(
                Arc::new(UInt32Array::from(std::mem::take(&mut b.topk_ids))),
                &b.lengths,
            )?,
            var_list(
                Arc::new(UInt16Array::from(std::mem::take(&mut b.topk_q))),
                &b.lengths,
            )?,
            Arc::new(UInt16Array::from(std::mem::take(&mut b.target_q))),
            Arc::new(UInt16Array::from(std::mem::take(&mut b.entropy_q))),
        ];
        let mut columns = columns;
        if matches!(m.selection(), Selection::Sample { .. }) {
            columns.push(var_list(
                Arc::new(UInt16Array::from(std::mem::take(&mut b.topk_counts))),
                &b.lengths,
            )?);
        }
        b.lengths.clear();
        b.target_id.clear();
        return Ok(RecordBatch::try_new(schema.clone(), columns)?);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(std::mem::take(&mut b.sample_id))),
        Arc::new(UInt32Array::from(std::mem::take(&mut b.position))),
        Arc::new(UInt32Array::from(std::mem::take(&mut b.target_id))),
        Arc::new(BooleanArray::from(std::mem::take(&mut b.in_loss))),
        fixed_list(
            Arc::new(UInt32Array::from(std::mem::take(&mut b.topk_ids))),
            m.k,
        )?,
        fixed_list(logprob_array(&b.topk_logprobs, m.logprob_dtype), m.k)?,
        logprob_array(&b.target_logprob, m.logprob_dtype),
        Arc::new(Float32Array::from(std::mem::take(&mut b.entropy))),
    ];
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

pub(super) fn samples_batch(b: Buffers, schema: &SchemaRef) -> Result<RecordBatch> {
    let item = Arc::new(Field::new(
        "item",
        arrow::datatypes::DataType::UInt32,
        false,
    ));
    let offsets = OffsetBuffer::new(b.s_offsets.into());
    let input_ids = ListArray::try_new(
        item,
        offsets,
        Arc::new(UInt32Array::from(b.s_input_ids)),
        None,
    )?;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(b.s_sample_id)),
        Arc::new(StringArray::from(b.s_source)),
        Arc::new(StringArray::from(b.s_split)),
        Arc::new(UInt64Array::from(b.s_record_index)),
        Arc::new(UInt32Array::from(b.s_window_index)),
        Arc::new(input_ids),
        Arc::new(UInt32Array::from(b.s_prompt_len)),
        Arc::new(UInt32Array::from(b.s_num_positions)),
    ];
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}
