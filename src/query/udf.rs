//! Scalar SQL functions over top-k columns.
//!
//! | function | returns |
//! |---|---|
//! | `topk_probs(lp)` | list of `exp(lp_i)` (same list kind and length as `lp`), float64 |
//! | `topk_mass(lp)` / `topk_mass(lp, j)` | `sum exp(lp_i)` over all / the first `j` entries |
//! | `topk_logprobs_at(lp, T)` | `log_softmax(lp / T)` over the list: temperature `T`, renormalised over the top-k |
//! | `topk_logprobs_at(lp, T, V)` | temperature `T` with the tail mass `1 - sum exp(lp)` modelled as `V - k` equal tokens (uniform tail; exact at `T = 1`) |
//! | `topk_probs_at(lp, T [, V])` | `exp` of `topk_logprobs_at(lp, T [, V])` |
//! | `top1_prob_at(lp, T [, V])` | the largest entry of `topk_probs_at(lp, T [, V])` |
//! | `target_rank(ids, target)` | 1-based position of `target` in `ids`, NULL when absent |
//!
//! `lp` may be a `fixed_size_list` or `list` of float16, float32 or float64: values are
//! widened to float64 before any arithmetic. A NULL input row gives a NULL output row.
//! `T` must be finite and positive, `j` at least 1, `V` at least the list length; otherwise
//! the query fails. The temperature math is the one of
//! [`crate::calibration::rescaled_topk_logprobs`] (`Renormalized` without `V`, `UniformTail`
//! with `V`); a unit test checks the two agree.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float64Array, ListArray, UInt32Array, UInt64Array,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type, Int64Type, UInt64Type};
use datafusion::common::{exec_err, plan_err, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// All functions of this module, ready to register.
pub fn all_udfs() -> Vec<ScalarUDF> {
    [
        Function::TopkProbs,
        Function::TopkMass,
        Function::TopkLogprobsAt,
        Function::TopkProbsAt,
        Function::Top1ProbAt,
        Function::TargetRank,
    ]
    .into_iter()
    .map(|f| ScalarUDF::new_from_impl(TopkUdf::new(f)))
    .collect()
}

/// Which function a [`TopkUdf`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Function {
    /// `topk_probs(lp)`.
    TopkProbs,
    /// `topk_mass(lp [, j])`.
    TopkMass,
    /// `topk_logprobs_at(lp, T [, V])`.
    TopkLogprobsAt,
    /// `topk_probs_at(lp, T [, V])`.
    TopkProbsAt,
    /// `top1_prob_at(lp, T [, V])`.
    Top1ProbAt,
    /// `target_rank(ids, target)`.
    TargetRank,
}

impl Function {
    /// SQL name.
    pub fn name(self) -> &'static str {
        match self {
            Function::TopkProbs => "topk_probs",
            Function::TopkMass => "topk_mass",
            Function::TopkLogprobsAt => "topk_logprobs_at",
            Function::TopkProbsAt => "topk_probs_at",
            Function::Top1ProbAt => "top1_prob_at",
            Function::TargetRank => "target_rank",
        }
    }
}

/// One of the top-k scalar functions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopkUdf {
    function: Function,
    signature: Signature,
}

impl TopkUdf {
    /// The function `function`.
    pub fn new(function: Function) -> Self {
        TopkUdf {
            function,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

fn is_float(t: &DataType) -> bool {
    matches!(t, DataType::Float16 | DataType::Float32 | DataType::Float64)
}

fn list_item(t: &DataType) -> Option<&DataType> {
    match t {
        DataType::FixedSizeList(f, _) | DataType::List(f) => Some(f.data_type()),
        _ => None,
    }
}

fn float_item() -> FieldRef {
    Arc::new(Field::new_list_field(DataType::Float64, true))
}

/// The output list type for probabilities computed from a log-prob list of type `t`.
fn probs_list_type(t: &DataType) -> DataType {
    match t {
        DataType::FixedSizeList(_, k) => DataType::FixedSizeList(float_item(), *k),
        _ => DataType::List(float_item()),
    }
}

impl ScalarUDFImpl for TopkUdf {
    fn name(&self) -> &str {
        self.function.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let name = self.function.name();
        let logprob_list = |t: &DataType| -> Result<DataType> {
            match list_item(t) {
                Some(item) if is_float(item) => Ok(t.clone()),
                _ => plan_err!(
                    "{name}: first argument must be a list of float16/float32/float64 \
                     log-probabilities, got {t}"
                ),
            }
        };
        let numeric = |t: &DataType, to: DataType, what: &str| -> Result<DataType> {
            if t.is_numeric() || t.is_null() {
                Ok(to)
            } else {
                plan_err!("{name}: {what} must be numeric, got {t}")
            }
        };
        match (self.function, arg_types) {
            (Function::TopkProbs, [lp]) | (Function::TopkMass, [lp]) => Ok(vec![logprob_list(lp)?]),
            (Function::TopkMass, [lp, j]) => Ok(vec![
                logprob_list(lp)?,
                numeric(j, DataType::Int64, "the number of entries j")?,
            ]),
            (Function::TopkLogprobsAt | Function::TopkProbsAt | Function::Top1ProbAt, [lp, t]) => {
                Ok(vec![
                    logprob_list(lp)?,
                    numeric(t, DataType::Float64, "the temperature")?,
                ])
            }
            (
                Function::TopkLogprobsAt | Function::TopkProbsAt | Function::Top1ProbAt,
                [lp, t, v],
            ) => Ok(vec![
                logprob_list(lp)?,
                numeric(t, DataType::Float64, "the temperature")?,
                numeric(v, DataType::Float64, "the vocabulary size")?,
            ]),
            (Function::TargetRank, [ids, target]) => match list_item(ids) {
                Some(item) if item.is_integer() => Ok(vec![
                    ids.clone(),
                    numeric(target, DataType::UInt64, "the target id")?,
                ]),
                _ => plan_err!("{name}: first argument must be a list of token ids, got {ids}"),
            },
            _ => plan_err!("{name}: {}", self.usage()),
        }
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match (self.function, arg_types.first()) {
            (Function::TopkProbs | Function::TopkProbsAt | Function::TopkLogprobsAt, Some(lp)) => {
                Ok(probs_list_type(lp))
            }
            (Function::TopkMass | Function::Top1ProbAt, _) => Ok(DataType::Float64),
            (Function::TargetRank, _) => Ok(DataType::UInt32),
            (_, None) => plan_err!("{}: {}", self.function.name(), self.usage()),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let out = match (self.function, arrays.as_slice()) {
            (Function::TopkProbs, [lp]) => probs(lp)?,
            (Function::TopkLogprobsAt, [lp, t]) => rescaled(lp, t, None, Output::Logprobs)?,
            (Function::TopkLogprobsAt, [lp, t, v]) => rescaled(lp, t, Some(v), Output::Logprobs)?,
            (Function::TopkProbsAt, [lp, t]) => rescaled(lp, t, None, Output::Probs)?,
            (Function::TopkProbsAt, [lp, t, v]) => rescaled(lp, t, Some(v), Output::Probs)?,
            (Function::Top1ProbAt, [lp, t]) => rescaled(lp, t, None, Output::Top1)?,
            (Function::Top1ProbAt, [lp, t, v]) => rescaled(lp, t, Some(v), Output::Top1)?,
            (Function::TopkMass, [lp]) => mass(lp, None)?,
            (Function::TopkMass, [lp, j]) => mass(lp, Some(j))?,
            (Function::TargetRank, [ids, target]) => target_rank(ids, target)?,
            _ => return exec_err!("{}: {}", self.function.name(), self.usage()),
        };
        Ok(ColumnarValue::Array(out))
    }
}

impl TopkUdf {
    fn usage(&self) -> &'static str {
        match self.function {
            Function::TopkProbs => "usage: topk_probs(topk_logprobs)",
            Function::TopkMass => "usage: topk_mass(topk_logprobs [, j])",
            Function::TopkLogprobsAt => {
                "usage: topk_logprobs_at(topk_logprobs, temperature [, vocab_size])"
            }
            Function::TopkProbsAt => {
                "usage: topk_probs_at(topk_logprobs, temperature [, vocab_size])"
            }
            Function::Top1ProbAt => {
                "usage: top1_prob_at(topk_logprobs, temperature [, vocab_size])"
            }
            Function::TargetRank => "usage: target_rank(topk_ids, target_id)",
        }
    }
}

/// A list column viewed as per-row ranges into a flat child array.
struct Lists {
    kind: ListKind,
    len: usize,
    values: ArrayRef,
    nulls: Option<NullBuffer>,
}

enum ListKind {
    Fixed(usize),
    Var(OffsetBuffer<i32>),
}

impl Lists {
    fn new(array: &ArrayRef) -> Result<Self> {
        match array.data_type() {
            DataType::FixedSizeList(_, k) => {
                let list: &FixedSizeListArray = array.as_fixed_size_list();
                let k = usize::try_from(*k).unwrap_or(0);
                // A sliced FixedSizeListArray starts at `value_offset(0)` in its child.
                let start = if list.is_empty() {
                    0
                } else {
                    usize::try_from(list.value_offset(0)).unwrap_or(0)
                };
                Ok(Lists {
                    kind: ListKind::Fixed(k),
                    len: list.len(),
                    values: list.values().slice(start, list.len() * k),
                    nulls: list.nulls().cloned(),
                })
            }
            DataType::List(_) => {
                let list: &ListArray = array.as_list();
                Ok(Lists {
                    kind: ListKind::Var(list.offsets().clone()),
                    len: list.len(),
                    values: Arc::clone(list.values()),
                    nulls: list.nulls().cloned(),
                })
            }
            other => exec_err!("expected a list column, got {other}"),
        }
    }

    fn range(&self, row: usize) -> std::ops::Range<usize> {
        match &self.kind {
            ListKind::Fixed(k) => row * k..(row + 1) * k,
            ListKind::Var(offsets) => {
                let start = usize::try_from(offsets[row]).unwrap_or(0);
                let end = usize::try_from(offsets[row + 1]).unwrap_or(start);
                start..end
            }
        }
    }

    fn is_null(&self, row: usize) -> bool {
        self.nulls.as_ref().is_some_and(|n| n.is_null(row))
    }

    /// The child values widened to float64 (float16/float32 widen exactly).
    fn float_values(&self) -> Result<Float64Array> {
        let values = cast(&self.values, &DataType::Float64)?;
        Ok(values.as_primitive::<Float64Type>().clone())
    }

    /// A list of the same kind holding `values` (which follow this list's ranges for
    /// `Var`, or `k` per row for `Fixed`).
    fn rebuild(&self, values: Vec<f64>) -> Result<ArrayRef> {
        let values: ArrayRef = Arc::new(Float64Array::from(values));
        Ok(match &self.kind {
            ListKind::Fixed(k) => Arc::new(FixedSizeListArray::try_new(
                float_item(),
                i32::try_from(*k).unwrap_or(i32::MAX),
                values,
                self.nulls.clone(),
            )?),
            ListKind::Var(_) => {
                let lengths = (0..self.len).map(|row| self.range(row).len());
                Arc::new(ListArray::try_new(
                    float_item(),
                    OffsetBuffer::from_lengths(lengths),
                    values,
                    self.nulls.clone(),
                )?)
            }
        })
    }
}

fn temperature_at(t: &Float64Array, row: usize) -> Result<Option<f64>> {
    if t.is_null(row) {
        return Ok(None);
    }
    let value = t.value(row);
    if !(value.is_finite() && value > 0.0) {
        return exec_err!("temperature must be finite and positive, got {value}");
    }
    Ok(Some(value))
}

/// `exp(lp)` per row.
fn probs(lp: &ArrayRef) -> Result<ArrayRef> {
    let lists = Lists::new(lp)?;
    let lps = lists.float_values()?;
    let out: Vec<f64> = lps.values().iter().map(|lp| lp.exp()).collect();
    lists.rebuild(out)
}

/// What [`rescaled`] returns per row.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    Logprobs,
    Probs,
    Top1,
}

/// The rescaled top-k per row: log-probs, probs, or the top-1 probability (a float64
/// column). A NULL list, temperature or vocabulary size gives a NULL row.
fn rescaled(
    lp: &ArrayRef,
    temperature: &ArrayRef,
    vocab_size: Option<&ArrayRef>,
    output: Output,
) -> Result<ArrayRef> {
    let mut lists = Lists::new(lp)?;
    let lps = lists.float_values()?;
    let lps = lps.values();
    let temperature = cast(temperature, &DataType::Float64)?;
    let temperature = temperature.as_primitive::<Float64Type>();
    let vocab_size = vocab_size
        .map(|v| cast(v, &DataType::Float64))
        .transpose()?;
    let vocab_size = vocab_size.as_ref().map(|v| v.as_primitive::<Float64Type>());
    let mut out = Vec::with_capacity(lps.len());
    let mut top1 = Vec::with_capacity(lists.len);
    let mut valid = Vec::with_capacity(lists.len);
    let mut row_out = Vec::new();
    let mut terms = Vec::new();
    for row in 0..lists.len {
        let range = lists.range(row);
        let row_lps = &lps[range.clone()];
        let t = temperature_at(temperature, row)?;
        let v = match vocab_size {
            None => Some(None),
            Some(v) if v.is_null(row) => None,
            Some(v) => Some(Some(vocab_at(v.value(row), range.len())?)),
        };
        row_out.clear();
        let ok = match (t, v) {
            (Some(t), Some(v)) if !lists.is_null(row) => {
                rescale_row(&mut row_out, &mut terms, row_lps, t, v);
                true
            }
            _ => {
                row_out.extend(std::iter::repeat_n(0.0, range.len()));
                false
            }
        };
        valid.push(ok);
        match output {
            Output::Logprobs => out.extend_from_slice(&row_out),
            Output::Probs => out.extend(row_out.iter().map(|lp| lp.exp())),
            Output::Top1 => {
                let max = row_out.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
                top1.push((ok && !row_out.is_empty()).then(|| max.exp()));
            }
        }
    }
    if output == Output::Top1 {
        return Ok(Arc::new(Float64Array::from(top1)));
    }
    if valid.iter().any(|v| !v) {
        lists.nulls = Some(NullBuffer::from(valid));
    }
    lists.rebuild(out)
}

fn vocab_at(v: f64, k: usize) -> Result<f64> {
    if !(v.is_finite() && v >= k as f64) {
        return exec_err!("vocabulary size must be at least k = {k}, got {v}");
    }
    Ok(v)
}

/// Appends the log-probs of `lps` rescaled to temperature `t`: renormalised over the list
/// when `vocab_size` is None, else with the tail mass spread uniformly over `V - k` tokens
/// and scaled along (as `calibration::TemperatureMode::UniformTail`). Max-subtracted.
fn rescale_row(
    out: &mut Vec<f64>,
    terms: &mut Vec<f64>,
    lps: &[f64],
    t: f64,
    vocab_size: Option<f64>,
) {
    let inv_t = 1.0 / t;
    let k = lps.len();
    terms.clear();
    terms.extend(lps.iter().map(|lp| lp * inv_t));
    if let Some(v) = vocab_size {
        let tail_tokens = v - k as f64;
        let mass: f64 = lps.iter().map(|lp| lp.exp()).sum();
        let tail = 1.0 - mass;
        if tail > 0.0 && tail_tokens > 0.0 {
            let tail_lp = (tail / tail_tokens).ln();
            terms.push(tail_tokens.ln() + tail_lp * inv_t);
        }
    }
    let max = terms.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
    let log_z = max + terms.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    out.extend(terms[..k].iter().map(|x| (x - log_z).min(0.0)));
}

/// `sum exp(lp_i)` over the first `j` entries (all when `j` is None) per row.
fn mass(lp: &ArrayRef, j: Option<&ArrayRef>) -> Result<ArrayRef> {
    let lists = Lists::new(lp)?;
    let lps = lists.float_values()?;
    let lps = lps.values();
    let j = j.map(|j| cast(j, &DataType::Int64)).transpose()?;
    let j = j.as_ref().map(|j| j.as_primitive::<Int64Type>());
    let mut out = Vec::with_capacity(lists.len);
    for row in 0..lists.len {
        if lists.is_null(row) {
            out.push(None);
            continue;
        }
        let range = lists.range(row);
        let take = match j {
            None => range.len(),
            Some(j) if j.is_null(row) => {
                out.push(None);
                continue;
            }
            Some(j) => {
                let n = j.value(row);
                if n < 1 {
                    return exec_err!("topk_mass: j must be at least 1, got {n}");
                }
                usize::try_from(n).unwrap_or(usize::MAX).min(range.len())
            }
        };
        let s: f64 = lps[range.start..range.start + take]
            .iter()
            .map(|lp| lp.exp())
            .sum();
        out.push(Some(s));
    }
    Ok(Arc::new(Float64Array::from(out)))
}

/// 1-based rank of `target` in `ids` per row, NULL when absent or either side is NULL.
fn target_rank(ids: &ArrayRef, target: &ArrayRef) -> Result<ArrayRef> {
    let lists = Lists::new(ids)?;
    let id_values = cast(&lists.values, &DataType::UInt64)?;
    let id_values: &UInt64Array = id_values.as_primitive::<UInt64Type>();
    let id_values = id_values.values();
    let target = cast(target, &DataType::UInt64)?;
    let target = target.as_primitive::<UInt64Type>();
    let mut out = Vec::with_capacity(lists.len);
    for row in 0..lists.len {
        if lists.is_null(row) || target.is_null(row) {
            out.push(None);
            continue;
        }
        let wanted = target.value(row);
        let rank = id_values[lists.range(row)]
            .iter()
            .position(|&id| id == wanted)
            .and_then(|i| u32::try_from(i + 1).ok());
        out.push(rank);
    }
    Ok(Arc::new(UInt32Array::from(out)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Float16Array;
    use half::f16;

    fn fixed_f16(rows: &[[f32; 3]]) -> ArrayRef {
        let values: Vec<f16> = rows.iter().flatten().map(|&x| f16::from_f32(x)).collect();
        Arc::new(
            FixedSizeListArray::try_new(
                Arc::new(Field::new_list_field(DataType::Float16, false)),
                3,
                Arc::new(Float16Array::from(values)),
                None,
            )
            .unwrap(),
        )
    }

    fn t_array(t: f64, n: usize) -> ArrayRef {
        Arc::new(Float64Array::from(vec![t; n]))
    }

    #[test]
    fn softmax_at_one_is_renormalised_probs_and_sliced_input_works() {
        let lp = fixed_f16(&[[-0.5, -1.5, -3.0], [-0.1, -2.5, -4.0]]);
        let sliced = lp.slice(1, 1);
        let out = rescaled(&sliced, &t_array(1.0, 1), None, Output::Probs).unwrap();
        let out = out.as_fixed_size_list();
        let row = out.value(0);
        let probs = row.as_primitive::<Float64Type>().values();
        let lps: Vec<f64> = [-0.1f32, -2.5, -4.0]
            .iter()
            .map(|&x| f64::from(f16::from_f32(x).to_f32()))
            .collect();
        let total: f64 = lps.iter().map(|x| x.exp()).sum();
        for (p, lp) in probs.iter().zip(&lps) {
            assert!((p - lp.exp() / total).abs() < 1e-12);
        }
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn rescaling_agrees_with_calibration_module() {
        use crate::calibration::{rescaled_topk_logprobs, TemperatureMode};
        let rows = [
            [-0.5f32, -1.5, -3.0],
            [-0.1, -2.5, -4.0],
            [-0.01, -6.0, -7.0],
        ];
        let lp = fixed_f16(&rows);
        let vocab = 50.0;
        for t in [0.3, 1.0, 2.7] {
            for (mode, v) in [
                (TemperatureMode::Renormalized, None),
                (TemperatureMode::UniformTail, Some(t_array(vocab, 3))),
            ] {
                let out = rescaled(&lp, &t_array(t, 3), v.as_ref(), Output::Logprobs).unwrap();
                let top1 = rescaled(&lp, &t_array(t, 3), v.as_ref(), Output::Top1).unwrap();
                let out = out.as_fixed_size_list();
                for (i, row) in rows.iter().enumerate() {
                    let stored: Vec<f32> = row.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
                    let want = rescaled_topk_logprobs(&stored, vocab as usize, t, mode).unwrap();
                    let got = out.value(i);
                    let got = got.as_primitive::<Float64Type>().values();
                    for (g, w) in got.iter().zip(&want.logprobs) {
                        assert!((g - w).abs() < 1e-9, "t {t} {mode:?} row {i}: {g} vs {w}");
                    }
                    let top1 = top1.as_primitive::<Float64Type>().value(i);
                    assert!((top1 - want.logprobs[0].exp()).abs() < 1e-9);
                }
            }
        }
    }

    #[test]
    fn bad_temperature_is_an_error() {
        let lp = fixed_f16(&[[-0.5, -1.5, -3.0]]);
        for t in [0.0, -1.0, f64::NAN] {
            for output in [Output::Probs, Output::Top1] {
                assert!(rescaled(&lp, &t_array(t, 1), None, output).is_err());
            }
        }
        assert!(rescaled(&lp, &t_array(1.0, 1), Some(&t_array(2.0, 1)), Output::Probs).is_err());
    }
}
