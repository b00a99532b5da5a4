//! Distillation losses over the teacher's stored top-k, normalised per in-loss token.
//!
//! Notation for one in-loss position: teacher ids `i_1..i_k` with stored full-vocabulary
//! log-probs `l_1..l_k` (temperature 1); student logits `z` over the vocabulary `V`,
//! `lse = log sum_v exp(z_v)`. docs/trainer.md has the formulas and the reasons.
//!
//! * `first`: `t = softmax(l / T)` over the k entries (T = the store's fitted temperature);
//!   `s = softmax(z[i_1..i_k])`, which equals the student's full-vocabulary softmax gathered at
//!   the teacher ids and renormalised over them (the `lse` cancels); loss `sum_j t_j log(t_j/s_j)`.
//! * `kd`: the same with T = 1.
//! * teacher smoothing `beta` (the paper's "Distill w/ LS", for `first`, `kd` and a `mix` of
//!   them): the target becomes `(1 - beta) t + beta / k`, the renormalised top-k mixed with
//!   the uniform distribution over the same k ids.
//! * `kd-tail`: k + 1 outcomes, the k ids and "everything else": teacher `p_j = exp(l_j)`,
//!   `p_tail = 1 - sum p_j`; student `q_j = exp(z_{i_j} - lse)`, `q_tail = 1 - sum q_j`;
//!   loss `sum_j p_j log(p_j/q_j) + p_tail log(p_tail/q_tail)`, zero iff the student matches the
//!   teacher on the k ids (and hence on the tail).
//! * `ce`: `-(1-eps) log q_target - eps * mean_v log q_v` (label smoothing `eps`).
//! * `mix`: `alpha * kd_loss + (1 - alpha) * ce`, kd_loss one of the three above.
//!
//! Only `kd-tail` and `ce` need the full-vocabulary normaliser; they compute logits a chunk of
//! positions at a time. `first` and `kd` never build a vocabulary-sized tensor: they gather the
//! k output-matrix rows of the teacher ids and take k dot products per position.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::temperature::Temperature;

/// Floor for probabilities inside a logarithm (the student's tail mass).
const PROB_FLOOR: f64 = 1e-12;

/// Which distillation target the kd part of a loss uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum KdKind {
    /// Top-k renormalised, teacher at the fitted temperature.
    First,
    /// Top-k renormalised, T = 1.
    Kd,
    /// k ids plus a tail bucket, T = 1.
    KdTail,
    /// Sparse Logit Sampling: KL from the sampled ids' importance weights to the student's
    /// full-vocabulary distribution (stores labelled with `--select sample:N`).
    Sampled,
}

/// The loss to train with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// [`KdKind::First`].
    First,
    /// [`KdKind::Kd`].
    Kd,
    /// [`KdKind::KdTail`].
    KdTail,
    /// Cross-entropy on the actual next tokens.
    Ce,
    /// `alpha * kd + (1 - alpha) * ce`.
    Mix,
    /// [`KdKind::Sampled`].
    Sampled,
    /// Online full KD: KL from the teacher's full next-token distribution, computed in the
    /// loop (`TrainOptions::teacher`), to the student's (no stored labels are read).
    Online,
}

impl LossKind {
    /// Parses `first`, `kd`, `kd-tail`, `ce`, `mix`, `sampled` or `online`.
    pub fn parse(s: &str) -> Result<Self> {
        crate::parse_value(s, "loss")
    }
}

impl KdKind {
    /// Parses `first`, `kd`, `kd-tail` or `sampled`.
    pub fn parse(s: &str) -> Result<Self> {
        crate::parse_value(s, "kd loss")
    }
}

/// A fully specified loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossSpec {
    /// The loss.
    pub kind: LossKind,
    /// Teacher temperature for `first` (ignored otherwise).
    pub temperature: Temperature,
    /// Weight of the kd part in `mix`.
    pub alpha: f64,
    /// The kd part of `mix`.
    pub mix_kd: KdKind,
    /// Label smoothing of `ce` (0 = none).
    pub label_smoothing: f64,
    /// Smoothing of the teacher's renormalised top-k target towards uniform over the k ids
    /// (`first`/`kd`; 0 = none).
    #[serde(default)]
    pub teacher_smoothing: f64,
}

impl LossSpec {
    /// The kd part, if any.
    pub fn kd(&self) -> Option<KdKind> {
        match self.kind {
            LossKind::First => Some(KdKind::First),
            LossKind::Kd => Some(KdKind::Kd),
            LossKind::KdTail => Some(KdKind::KdTail),
            LossKind::Ce => None,
            LossKind::Mix => Some(self.mix_kd),
            LossKind::Sampled => Some(KdKind::Sampled),
            LossKind::Online => None,
        }
    }

    /// Whether the cross-entropy part is used.
    pub fn uses_ce(&self) -> bool {
        matches!(self.kind, LossKind::Ce | LossKind::Mix)
    }

    /// Whether the full-vocabulary normaliser (chunked logits) is needed.
    pub fn needs_full_vocab(&self) -> bool {
        self.uses_ce() || matches!(self.kd(), Some(KdKind::KdTail) | Some(KdKind::Sampled))
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(Error::InvalidArgument(format!(
                "alpha {} must be in [0, 1]",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(Error::InvalidArgument(format!(
                "label smoothing {} must be in [0, 1)",
                self.label_smoothing
            )));
        }
        if !(0.0..=1.0).contains(&self.teacher_smoothing) {
            return Err(Error::InvalidArgument(format!(
                "teacher smoothing {} must be in [0, 1]",
                self.teacher_smoothing
            )));
        }
        if self.teacher_smoothing > 0.0
            && !matches!(self.kd(), Some(KdKind::First) | Some(KdKind::Kd))
        {
            return Err(Error::InvalidArgument(
                "teacher smoothing applies to the top-k losses first and kd (or a mix of them)"
                    .to_string(),
            ));
        }
        Ok(())
    }
}

/// Student quantities per in-loss position, from which every loss is computed.
#[derive(Debug, Clone)]
pub struct StudentRows {
    /// Logits at the teacher ids `[n, k]`.
    pub topk_logits: Tensor,
    /// Full-vocabulary log-normaliser `[n]` (kd-tail, ce).
    pub lse: Option<Tensor>,
    /// Logit of the actual next token `[n]` (ce).
    pub target_logit: Option<Tensor>,
    /// Mean logit over the vocabulary `[n]` (ce with label smoothing).
    pub mean_logit: Option<Tensor>,
}

/// Computes [`StudentRows`] from hidden states `[n, hidden]` and the output matrix
/// `[vocab, hidden]`. Full logits, when needed, are built `chunk_rows` positions at a time.
pub fn student_rows(
    hidden: &Tensor,
    output: &Tensor,
    topk_ids: &Tensor,
    targets: &Tensor,
    spec: &LossSpec,
    chunk_rows: usize,
) -> Result<StudentRows> {
    let (n, k) = topk_ids.dims2()?;
    let h = hidden.dim(1)?;
    if !spec.needs_full_vocab() {
        // k dot products per row; no [n, vocab] tensor.
        let rows = output
            .index_select(&topk_ids.flatten_all()?, 0)?
            .reshape((n, k, h))?;
        let topk_logits = rows.broadcast_mul(&hidden.unsqueeze(1)?)?.sum(D::Minus1)?;
        return Ok(StudentRows {
            topk_logits,
            lse: None,
            target_logit: None,
            mean_logit: None,
        });
    }
    let chunk = chunk_rows.max(1);
    let (mut zk, mut lse, mut zt, mut zm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let rows = hidden.narrow(0, start, len)?;
        let logits = if rows.device().is_cpu() && rows.dtype() == candle_core::DType::F32 {
            super::fused::linear(&rows, output)?
        } else {
            rows.matmul(&output.t()?)?
        };
        let stats = rows_from_logits(
            &logits,
            &topk_ids.narrow(0, start, len)?,
            &targets.narrow(0, start, len)?,
            spec.label_smoothing > 0.0,
        )?;
        zk.push(stats.topk_logits);
        lse.extend(stats.lse);
        zt.extend(stats.target_logit);
        zm.extend(stats.mean_logit);
        start += len;
    }
    let cat = |v: Vec<Tensor>| -> Result<Option<Tensor>> {
        if v.is_empty() {
            Ok(None)
        } else {
            Ok(Some(Tensor::cat(&v, 0)?))
        }
    };
    Ok(StudentRows {
        topk_logits: Tensor::cat(&zk, 0)?,
        lse: cat(lse)?,
        target_logit: cat(zt)?,
        mean_logit: cat(zm)?,
    })
}

/// [`StudentRows`] from full logits `[n, vocab]`.
pub fn rows_from_logits(
    logits: &Tensor,
    topk_ids: &Tensor,
    targets: &Tensor,
    with_mean: bool,
) -> Result<StudentRows> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max)?
        .squeeze(D::Minus1)?;
    let topk_logits = logits.gather(&topk_ids.contiguous()?, D::Minus1)?;
    let target_logit = logits
        .gather(&targets.unsqueeze(1)?.contiguous()?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let mean_logit = if with_mean {
        Some(logits.mean(D::Minus1)?)
    } else {
        None
    };
    Ok(StudentRows {
        topk_logits,
        lse: Some(lse),
        target_logit: Some(target_logit),
        mean_logit,
    })
}

fn need<'a>(t: &'a Option<Tensor>, what: &str) -> Result<&'a Tensor> {
    t.as_ref()
        .ok_or_else(|| Error::Internal(format!("loss needs the student's {what}")))
}

/// Per-row `first`/`kd` loss `[n]`: KL(t || softmax(z_topk)) with
/// `t = (1 - beta) softmax(l/T) + beta / k` (`beta` = teacher smoothing, 0 for none).
pub fn topk_kl_rows(
    topk_logits: &Tensor,
    topk_logprobs: &Tensor,
    temperature: f64,
    smoothing: f64,
) -> Result<Tensor> {
    let log_t = teacher_log_targets(topk_logprobs, temperature, smoothing)?;
    let log_s = candle_nn::ops::log_softmax(topk_logits, D::Minus1)?;
    Ok((log_t.exp()? * (log_t - log_s)?)?.sum(D::Minus1)?)
}

/// The `first`/`kd` target `[n, k]` as log-probabilities: `log((1 - beta) softmax(l/T) + beta / k)`
/// over each row's k stored log-probs (`beta` = teacher smoothing, 0 for none). What the
/// student is trained towards; `firstkd export` bakes the same distribution in.
pub fn teacher_log_targets(
    topk_logprobs: &Tensor,
    temperature: f64,
    smoothing: f64,
) -> Result<Tensor> {
    let log_t = candle_nn::ops::log_softmax(&(topk_logprobs / temperature)?, D::Minus1)?;
    if smoothing == 0.0 {
        return Ok(log_t);
    }
    let k = topk_logprobs.dim(D::Minus1)? as f64;
    Ok(log_t.exp()?.affine(1.0 - smoothing, smoothing / k)?.log()?)
}

/// Per-row `kd-tail` loss `[n]` over k + 1 outcomes. A teacher whose stored top-k mass exceeds
/// 1 (float16 rounding) is scaled down to mass 1 with an empty tail.
pub fn tail_kl_rows(topk_logits: &Tensor, lse: &Tensor, topk_logprobs: &Tensor) -> Result<Tensor> {
    let mass = topk_logprobs.exp()?.sum_keepdim(D::Minus1)?;
    let log_scale = mass.maximum(1.0)?.log()?;
    let log_p = topk_logprobs.broadcast_sub(&log_scale)?;
    let p = log_p.exp()?;
    let p_tail = p.sum(D::Minus1)?.affine(-1.0, 1.0)?.maximum(0.0)?;
    let log_p_tail = p_tail.maximum(PROB_FLOOR)?.log()?;
    let log_q = topk_logits.broadcast_sub(&lse.unsqueeze(1)?)?;
    let q_tail = log_q
        .exp()?
        .sum(D::Minus1)?
        .affine(-1.0, 1.0)?
        .maximum(PROB_FLOOR)?;
    let head = (p * (log_p - log_q)?)?.sum(D::Minus1)?;
    let tail = (p_tail * (log_p_tail - q_tail.log()?)?)?;
    Ok((head + tail)?)
}

/// Per-row `sampled` loss `[n]`: `sum_j w_j (log w_j - log q_j)` with the importance
/// weights `w_j = exp(log_w_j)` of the sampled ids (summing to 1; padding entries have
/// `log_w = -1e9`, weight 0) and the student's full-vocabulary `log q_j = z_j - lse`. Its
/// expectation over the teacher's draws is the full-distribution KL up to a constant
/// (Sparse Logit Sampling, Anshumann et al. 2025).
pub fn sampled_kl_rows(topk_logits: &Tensor, lse: &Tensor, log_w: &Tensor) -> Result<Tensor> {
    let log_q = topk_logits.broadcast_sub(&lse.unsqueeze(1)?)?;
    Ok((log_w.exp()? * (log_w - log_q)?)?.sum(D::Minus1)?)
}

/// Per-row online full KD `[n]`: `sum_v p_v (log p_v - log q_v)` over the whole vocabulary,
/// teacher logits `teacher_logits` (constant), student logits `student_logits`, both `[n, V]`.
pub fn full_kl_rows(teacher_logits: &Tensor, student_logits: &Tensor) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(&teacher_logits.detach(), D::Minus1)?;
    let log_q = candle_nn::ops::log_softmax(student_logits, D::Minus1)?;
    Ok((log_p.exp()? * (log_p - log_q)?)?.sum(D::Minus1)?)
}

/// Per-row cross-entropy `[n]` with label smoothing `eps` (uniform over the vocabulary).
pub fn ce_rows(rows: &StudentRows, eps: f64) -> Result<Tensor> {
    let lse = need(&rows.lse, "log-normaliser")?;
    let nll = (lse - need(&rows.target_logit, "target logit")?)?;
    if eps == 0.0 {
        return Ok(nll);
    }
    let smooth = (lse - need(&rows.mean_logit, "mean logit")?)?;
    Ok(((nll * (1.0 - eps))? + (smooth * eps)?)?)
}

/// Log-prob of the entries padding a list shorter than k (top-p and sample stores).
pub const PAD_LOGPROB: f32 = -1e9;

/// `topk_logits` with [`PAD_LOGPROB`] added where `topk_logprobs` marks padding, so padding
/// entries carry no student mass in any loss (the teacher's weight there is already 0).
pub fn mask_padding(topk_logits: &Tensor, topk_logprobs: &Tensor) -> Result<Tensor> {
    let pad = topk_logprobs
        .le(f64::from(PAD_LOGPROB) / 2.0)?
        .to_dtype(topk_logits.dtype())?;
    Ok((topk_logits + (pad * f64::from(PAD_LOGPROB))?)?)
}

/// Per-row loss `[n]` for `spec`.
pub fn loss_rows(rows: &StudentRows, topk_logprobs: &Tensor, spec: &LossSpec) -> Result<Tensor> {
    let kd = match spec.kd() {
        None => None,
        Some(KdKind::First) => Some(topk_kl_rows(
            &rows.topk_logits,
            topk_logprobs,
            spec.temperature.get(),
            spec.teacher_smoothing,
        )?),
        Some(KdKind::Kd) => Some(topk_kl_rows(
            &rows.topk_logits,
            topk_logprobs,
            1.0,
            spec.teacher_smoothing,
        )?),
        Some(KdKind::KdTail) => Some(tail_kl_rows(
            &rows.topk_logits,
            need(&rows.lse, "log-normaliser")?,
            topk_logprobs,
        )?),
        Some(KdKind::Sampled) => Some(sampled_kl_rows(
            &rows.topk_logits,
            need(&rows.lse, "log-normaliser")?,
            topk_logprobs,
        )?),
    };
    match (spec.kind, kd) {
        (LossKind::Ce, _) => ce_rows(rows, spec.label_smoothing),
        (LossKind::Mix, Some(kd)) => {
            let ce = ce_rows(rows, spec.label_smoothing)?;
            Ok(((kd * spec.alpha)? + (ce * (1.0 - spec.alpha))?)?)
        }
        (_, Some(kd)) => Ok(kd),
        (LossKind::Online, None) => Err(Error::Internal(
            "the online loss is computed from the teacher's logits (batch_loss)".into(),
        )),
        (_, None) => Err(Error::Internal("loss has no kd part".into())),
    }
}

/// Mean loss over the rows of full logits `[n, vocab]` (for tests and evaluation).
pub fn mean_loss_from_logits(
    logits: &Tensor,
    topk_ids: &Tensor,
    topk_logprobs: &Tensor,
    targets: &Tensor,
    spec: &LossSpec,
) -> Result<f32> {
    let mut rows = rows_from_logits(logits, topk_ids, targets, spec.label_smoothing > 0.0)?;
    let topk_logprobs = topk_logprobs.to_dtype(DType::F32)?;
    rows.topk_logits = mask_padding(&rows.topk_logits, &topk_logprobs)?;
    let per_row = loss_rows(&rows, &topk_logprobs, spec)?;
    Ok(per_row.mean_all()?.to_scalar::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn spec(kind: LossKind) -> LossSpec {
        LossSpec {
            kind,
            temperature: Temperature::new(1.7).unwrap(),
            alpha: 0.3,
            mix_kd: KdKind::First,
            label_smoothing: 0.0,
            teacher_smoothing: 0.0,
        }
    }

    // Inputs shared with the numpy reference below: 3 positions, vocabulary 8, k = 3.
    const LOGITS: [[f32; 8]; 3] = [
        [0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, -2.0],
        [1.0, 1.0, -1.0, 3.0, 0.0, 0.5, -0.75, 0.1],
        [-0.3, 0.8, 0.2, -1.2, 2.2, 0.0, 1.1, -0.6],
    ];
    const IDS: [[u32; 3]; 3] = [[2, 4, 0], [3, 0, 1], [4, 6, 1]];
    const LPS: [[f32; 3]; 3] = [[-0.4, -1.5, -2.5], [-0.1, -3.0, -3.2], [-0.9, -1.0, -2.0]];
    const TARGETS: [u32; 3] = [4, 3, 7];

    fn inputs() -> (Tensor, Tensor, Tensor, Tensor) {
        let d = &Device::Cpu;
        (
            Tensor::new(&LOGITS, d).unwrap(),
            Tensor::new(&IDS, d).unwrap(),
            Tensor::new(&LPS, d).unwrap(),
            Tensor::new(&TARGETS, d).unwrap(),
        )
    }

    fn loss(spec: &LossSpec) -> f32 {
        let (z, ids, lps, t) = inputs();
        mean_loss_from_logits(&z, &ids, &lps, &t, spec).unwrap()
    }

    /* Independent reference (numpy 1.x/2.x), printed values pasted into the test:

    import numpy as np
    Z = np.array([[0.5,-1.0,2.0,0.0,1.5,-0.5,0.25,-2.0],[1.0,1.0,-1.0,3.0,0.0,0.5,-0.75,0.1],
                  [-0.3,0.8,0.2,-1.2,2.2,0.0,1.1,-0.6]], dtype=np.float64)
    ids = np.array([[2,4,0],[3,0,1],[4,6,1]]); L = np.array([[-0.4,-1.5,-2.5],[-0.1,-3.0,-3.2],[-0.9,-1.0,-2.0]])
    tg = np.array([4,3,7]); T = 1.7; a = 0.3; eps = 0.1
    def lsm(x): m = x.max(-1, keepdims=True); return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    logq = lsm(Z)                                       # student full-vocabulary log-probs
    def topk(T):
        lt = lsm(L / T); g = np.take_along_axis(logq, ids, 1)
        ls = g - np.log(np.exp(g).sum(1, keepdims=True))  # gathered, renormalised over the k ids
        return (np.exp(lt) * (lt - ls)).sum(1).mean()
    p = np.exp(L); pt = 1 - p.sum(1); q = np.exp(np.take_along_axis(logq, ids, 1)); qt = 1 - q.sum(1)
    tail = ((p * (L - np.log(q))).sum(1) + pt * (np.log(pt) - np.log(qt))).mean()
    ce = -logq[np.arange(3), tg].mean()
    ce_s = ((1 - eps) * -logq[np.arange(3), tg] - eps * logq.mean(1)).mean()
    print(*map(float, [topk(T), topk(1.0), tail, ce, ce_s, a * topk(T) + (1 - a) * ce]))
    # 0.042042857794265365 0.06530191319971869 0.17512277764281334 1.7424150852565201
    # 1.844081751923187 1.2323034170178435
    */
    #[test]
    fn padded_entries_change_no_loss() {
        // Row lists of 2 real entries, padded to 3 with id 0 and PAD_LOGPROB, give the loss
        // of the 2-entry lists.
        let d = &Device::Cpu;
        let (z, _, _, t) = inputs();
        let ids2 = Tensor::new(&[[2u32, 4], [3, 5], [4, 6]], d).unwrap();
        let lps2 = Tensor::new(&[[-0.4f32, -1.5], [-0.1, -3.0], [-0.9, -1.0]], d).unwrap();
        let ids3 = Tensor::new(&[[2u32, 4, 0], [3, 5, 0], [4, 6, 0]], d).unwrap();
        let p = PAD_LOGPROB;
        let lps3 = Tensor::new(&[[-0.4f32, -1.5, p], [-0.1, -3.0, p], [-0.9, -1.0, p]], d).unwrap();
        for kind in [
            LossKind::First,
            LossKind::Kd,
            LossKind::KdTail,
            LossKind::Sampled,
            LossKind::Mix,
        ] {
            let s = spec(kind);
            let a = mean_loss_from_logits(&z, &ids2, &lps2, &t, &s).unwrap();
            let b = mean_loss_from_logits(&z, &ids3, &lps3, &t, &s).unwrap();
            assert!((a - b).abs() < 1e-6, "{kind:?}: {a} vs {b}");
            assert!(a.is_finite());
        }
    }

    #[test]
    fn losses_match_numpy() {
        let close = |got: f32, want: f64, what: &str| {
            assert!(
                (got as f64 - want).abs() < 1e-5,
                "{what}: got {got}, numpy {want}"
            );
        };
        close(loss(&spec(LossKind::First)), 0.042042857794265365, "first");
        close(loss(&spec(LossKind::Kd)), 0.06530191319971869, "kd");
        close(
            loss(&spec(LossKind::KdTail)),
            0.17512277764281334,
            "kd-tail",
        );
        close(loss(&spec(LossKind::Ce)), 1.7424150852565201, "ce");
        let smoothed = LossSpec {
            label_smoothing: 0.1,
            ..spec(LossKind::Ce)
        };
        close(loss(&smoothed), 1.844081751923187, "ce eps 0.1");
        close(loss(&spec(LossKind::Mix)), 1.2323034170178435, "mix");
        // sampled: L as log-weights, `w = np.exp(L); (w * (L - take(logq, ids))).sum(1).mean()`
        // with logq and ids as above -> 0.22321519115843755.
        close(
            loss(&spec(LossKind::Sampled)),
            0.22321519115843755,
            "sampled",
        );
        // Teacher smoothing (numpy, same inputs: t = (1 - b) * exp(lsm(L / T)) + b / 3 in
        // topk() above): T = 1, b = 0.1 -> 0.0461901104170831; T = 1.7, b = 0.2 ->
        // 0.06170987343861467.
        let kd_ls = LossSpec {
            teacher_smoothing: 0.1,
            ..spec(LossKind::Kd)
        };
        close(
            loss(&kd_ls),
            0.0461901104170831,
            "kd, teacher smoothing 0.1",
        );
        let first_ls = LossSpec {
            teacher_smoothing: 0.2,
            ..spec(LossKind::First)
        };
        close(
            loss(&first_ls),
            0.06170987343861467,
            "first, teacher smoothing 0.2",
        );
        let bad = LossSpec {
            teacher_smoothing: 0.1,
            ..spec(LossKind::Ce)
        };
        assert!(
            bad.validate().is_err(),
            "teacher smoothing on ce must be refused"
        );
    }

    #[test]
    fn kd_tail_is_zero_when_student_equals_teacher() {
        // Student logits = teacher log-probs on the ids, the tail mass spread over the rest.
        let d = &Device::Cpu;
        let lps = [-0.3f32, -1.9, -2.4];
        let vocab = 10;
        let tail: f32 = 1.0 - lps.iter().map(|l| l.exp()).sum::<f32>();
        let mut z = vec![(tail / (vocab - 3) as f32).ln(); vocab];
        let ids = [7u32, 2, 5];
        for (i, l) in ids.iter().zip(lps) {
            z[*i as usize] = l;
        }
        let logits = Tensor::from_vec(z, (1, vocab), d).unwrap();
        let ids_t = Tensor::new(&[ids], d).unwrap();
        let lps_t = Tensor::new(&[lps], d).unwrap();
        let tg = Tensor::new(&[7u32], d).unwrap();
        let got =
            mean_loss_from_logits(&logits, &ids_t, &lps_t, &tg, &spec(LossKind::KdTail)).unwrap();
        assert!(got.abs() < 1e-6, "{got}");
        // first/kd are zero too when the student's top-k logits equal the teacher's log-probs.
        let got = mean_loss_from_logits(&logits, &ids_t, &lps_t, &tg, &spec(LossKind::Kd)).unwrap();
        assert!(got.abs() < 1e-6, "{got}");
    }

    #[test]
    fn gathered_path_equals_full_logits_path() {
        // student_rows without full logits (first/kd) vs with them: same top-k logits and loss.
        let d = &Device::Cpu;
        let hidden = Tensor::new(&[[0.1f32, -0.2, 0.3, 0.05], [0.4, 0.0, -0.1, 0.2]], d).unwrap();
        let output = Tensor::arange(0f32, 32.0, d)
            .unwrap()
            .reshape((8, 4))
            .unwrap()
            .sin()
            .unwrap();
        let ids = Tensor::new(&[[1u32, 5, 2], [7, 0, 3]], d).unwrap();
        let lps = Tensor::new(&[[-0.2f32, -2.0, -3.0], [-0.5, -1.5, -1.6]], d).unwrap();
        let tg = Tensor::new(&[1u32, 4], d).unwrap();
        let s = spec(LossKind::First);
        let fast = student_rows(&hidden, &output, &ids, &tg, &s, 1).unwrap();
        let full = student_rows(&hidden, &output, &ids, &tg, &spec(LossKind::Mix), 1).unwrap();
        let a = loss_rows(&fast, &lps, &s)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = loss_rows(&full, &lps, &s)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }
}
