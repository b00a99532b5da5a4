//! Import of DistillKit's compressed logit Parquet (arcee-ai/DistillKit,
//! `distillkit/compression`): one row per sequence, `input_ids` list<uint64>,
//! `bytepacked_indices` and `compressed_logprobs` list<list<uint8>> (one byte string per
//! position), decoded with the `compression_config.yaml` written next to the files.
//!
//! Per position (docs/sharing.md has the formulas):
//! * ids: `k` values of `B = ceil(log2(d))` bits, one MSB-first bit stream padded to a byte;
//! * log-probs: `exact_k` values of `exact_dtype`, then the polynomial coefficients
//!   (`term_dtype`), then each residual bin (a `scale_dtype` scale and `num_elements` values
//!   of `element_bits` bits, MSB-first); the tail is `sum_j c_j phi_j(t) + residual[t]` with
//!   `phi` = `t^p`, `sqrt(t)` or `exp(t)` over `t = 0..T-1` (or `linspace(0, 1, T)` with
//!   `normalize_t`); with `delta_encoding` the values are differences, summed at the end.
//!
//! Position `i` is the distribution of the token after `input_ids[i]`. DistillKit's capture
//! appends a pad token and cuts `input_ids` to the positions, so the last position predicts
//! a token that is not in the row: it is dropped (a row with one id more than positions keeps
//! them all). DistillKit stores no loss mask: every position is in the loss.

use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, ListArray};
use arrow::datatypes::{DataType, UInt64Type};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use super::files::parquet_batches;
use super::import::{import_sequences, ImportOptions, ImportReport, Imported};
use crate::error::{Error, Result};

/// A polynomial term: a power of `t`, or `sqrt` / `exp`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Term {
    Power(u32),
    Named(String),
}

/// One residual bin.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ResidualBin {
    pub scale_dtype: String,
    pub element_bits: u32,
    pub num_elements: usize,
}

fn float32() -> String {
    "float32".to_string()
}

fn yes() -> bool {
    true
}

/// DistillKit's `DistributionQuantizationConfig`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct CompressionConfig {
    /// Vocabulary size.
    pub d: u32,
    pub k: usize,
    pub exact_k: usize,
    #[serde(default = "float32")]
    pub exact_dtype: String,
    #[serde(default)]
    pub polynomial_terms: Option<Vec<Term>>,
    #[serde(default = "float32")]
    pub term_dtype: String,
    #[serde(default)]
    pub residual_bins: Vec<ResidualBin>,
    #[serde(default = "yes")]
    pub delta_encoding: bool,
    #[serde(default)]
    pub error_diffusion: bool,
    #[serde(default)]
    pub normalize_t: bool,
}

fn dtype_width(name: &str) -> Result<usize> {
    match name {
        "float16" | "bfloat16" => Ok(2),
        "float32" => Ok(4),
        "float64" => Ok(8),
        other => Err(Error::InvalidArgument(format!(
            "DistillKit dtype {other:?} (expected float16, bfloat16, float32 or float64)"
        ))),
    }
}

fn read_float(bytes: &[u8], dtype: &str) -> f64 {
    match (dtype, bytes.len()) {
        ("float16", 2) => f64::from(f16::from_le_bytes([bytes[0], bytes[1]])),
        ("bfloat16", 2) => f64::from(bf16::from_le_bytes([bytes[0], bytes[1]])),
        ("float32", 4) => f64::from(f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
        (_, 8) => {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            f64::from_le_bytes(b)
        }
        _ => f64::NAN,
    }
}

/// `count` unsigned values of `bits` bits from an MSB-first bit stream.
pub fn unpack_bits(bytes: &[u8], bits: u32, count: usize) -> Option<Vec<u64>> {
    if bits == 0 || bits > 64 || bytes.len() * 8 < bits as usize * count {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    let mut pos = 0usize;
    for _ in 0..count {
        let mut v = 0u64;
        for _ in 0..bits {
            let bit = (bytes[pos / 8] >> (7 - pos % 8)) & 1;
            v = (v << 1) | u64::from(bit);
            pos += 1;
        }
        out.push(v);
    }
    Some(out)
}

impl CompressionConfig {
    /// Reads `compression_config.yaml` (DistillKit's capture output), or a training config's
    /// `logprob_compressor` section.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            row: None,
            reason: format!("not YAML: {e}"),
        })?;
        let section = value
            .get("teacher")
            .and_then(|t| t.get("logprob_compressor"))
            .or_else(|| value.get("logprob_compressor"))
            .unwrap_or(&value)
            .clone();
        let cfg: CompressionConfig =
            serde_yaml::from_value(section).map_err(|e| Error::Corrupt {
                path: path.to_path_buf(),
                row: None,
                reason: format!("not a DistillKit compression config: {e}"),
            })?;
        cfg.validate().map_err(|reason| Error::Corrupt {
            path: path.to_path_buf(),
            row: None,
            reason,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.d == 0 || self.k == 0 || self.exact_k > self.k {
            return Err(format!(
                "d {} k {} exact_k {}: need d > 0, k > 0, exact_k <= k",
                self.d, self.k, self.exact_k
            ));
        }
        for name in [&self.exact_dtype, &self.term_dtype] {
            dtype_width(name).map_err(|e| e.to_string())?;
        }
        let mut n = 0;
        for b in &self.residual_bins {
            dtype_width(&b.scale_dtype).map_err(|e| e.to_string())?;
            if !(1..=64).contains(&b.element_bits) || b.num_elements == 0 {
                return Err(format!("residual bin {b:?}"));
            }
            n += b.num_elements;
        }
        if n > self.k - self.exact_k {
            return Err(format!(
                "residual bins cover {n} values, more than k - exact_k = {}",
                self.k - self.exact_k
            ));
        }
        for t in self.polynomial_terms.iter().flatten() {
            if let Term::Named(s) = t {
                if s != "sqrt" && s != "exp" {
                    return Err(format!("polynomial term {s:?}"));
                }
            }
        }
        Ok(())
    }

    /// Bits per token id: `ceil(log2(d))`.
    pub fn index_bits(&self) -> u32 {
        let b = (f64::from(self.d)).log2().ceil() as u32;
        b.max(1)
    }

    /// Bytes of one position's ids.
    pub fn index_bytes(&self) -> usize {
        (self.k * self.index_bits() as usize).div_ceil(8)
    }

    /// Bytes of one position's log-probs.
    pub fn logprob_bytes(&self) -> usize {
        let terms = self.polynomial_terms.as_ref().map_or(0, Vec::len);
        let mut n = self.exact_k * dtype_width(&self.exact_dtype).unwrap_or(4)
            + terms * dtype_width(&self.term_dtype).unwrap_or(4);
        for b in &self.residual_bins {
            n += dtype_width(&b.scale_dtype).unwrap_or(4)
                + (b.num_elements * b.element_bits as usize).div_ceil(8);
        }
        n
    }

    /// Decodes one position: (ids, log-probs in the stored order).
    pub fn decode(
        &self,
        index_bytes: &[u8],
        logprob_bytes: &[u8],
    ) -> std::result::Result<(Vec<u32>, Vec<f64>), String> {
        if index_bytes.len() != self.index_bytes() || logprob_bytes.len() != self.logprob_bytes() {
            return Err(format!(
                "{} index bytes and {} log-prob bytes, the config says {} and {}",
                index_bytes.len(),
                logprob_bytes.len(),
                self.index_bytes(),
                self.logprob_bytes()
            ));
        }
        let ids = unpack_bits(index_bytes, self.index_bits(), self.k)
            .ok_or("index bytes too short")?
            .into_iter()
            .map(|v| u32::try_from(v).map_err(|_| format!("token id {v}")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut at = 0usize;
        let mut take = |n: usize| -> &[u8] {
            let s = &logprob_bytes[at..at + n];
            at += n;
            s
        };
        let we = dtype_width(&self.exact_dtype).map_err(|e| e.to_string())?;
        let mut values: Vec<f64> = (0..self.exact_k)
            .map(|_| read_float(take(we), &self.exact_dtype))
            .collect();
        let t_len = self.k - self.exact_k;
        let terms = self.polynomial_terms.clone().unwrap_or_default();
        let wt = dtype_width(&self.term_dtype).map_err(|e| e.to_string())?;
        let coeffs: Vec<f64> = terms
            .iter()
            .map(|_| read_float(take(wt), &self.term_dtype))
            .collect();
        let mut residual = Vec::with_capacity(t_len);
        for bin in &self.residual_bins {
            let ws = dtype_width(&bin.scale_dtype).map_err(|e| e.to_string())?;
            let scale = read_float(take(ws), &bin.scale_dtype);
            let packed = take((bin.num_elements * bin.element_bits as usize).div_ceil(8));
            let q = unpack_bits(packed, bin.element_bits, bin.num_elements)
                .ok_or("residual bytes too short")?;
            for v in q {
                let x = if bin.element_bits == 1 {
                    (v as f64 * 2.0 - 1.0) * scale
                } else {
                    let qmin = -(2f64.powi(bin.element_bits as i32 - 1));
                    (v as f64 + qmin) * scale
                };
                residual.push(x);
            }
        }
        residual.resize(t_len, 0.0);
        for (j, res) in residual.iter().enumerate() {
            let t = if self.normalize_t {
                if t_len > 1 {
                    j as f64 / (t_len - 1) as f64
                } else {
                    0.0
                }
            } else {
                j as f64
            };
            let fit: f64 = terms
                .iter()
                .zip(&coeffs)
                .map(|(term, c)| {
                    c * match term {
                        Term::Power(p) => t.powi(*p as i32),
                        Term::Named(s) if s == "sqrt" => t.sqrt(),
                        Term::Named(_) => t.exp(),
                    }
                })
                .sum();
            values.push(fit + res);
        }
        if self.delta_encoding {
            let mut acc = 0.0;
            for v in values.iter_mut() {
                acc += *v;
                *v = acc;
            }
        }
        Ok((ids, values))
    }
}

fn byte_rows(list: &ListArray, i: usize) -> Option<Vec<Vec<u8>>> {
    if list.is_null(i) {
        return None;
    }
    let inner = list.value(i);
    if let Some(l) = inner.as_list_opt::<i32>() {
        let vals = arrow::compute::cast(l.values(), &DataType::UInt8).ok()?;
        let vals = vals.as_primitive::<arrow::datatypes::UInt8Type>();
        return Some(
            (0..l.len())
                .map(|j| {
                    let (a, b) = (
                        l.value_offsets()[j] as usize,
                        l.value_offsets()[j + 1] as usize,
                    );
                    vals.values()[a..b].to_vec()
                })
                .collect(),
        );
    }
    let b = inner.as_binary_opt::<i32>()?;
    Some((0..b.len()).map(|j| b.value(j).to_vec()).collect())
}

/// Decodes every row of one DistillKit Parquet file into [`Imported`] sequences.
fn read_file(
    path: &Path,
    cfg: &CompressionConfig,
    each: &mut dyn FnMut(Imported) -> Result<()>,
) -> Result<()> {
    parquet_batches(path, 128, |row, batch| {
        let col = |name: &str| -> Result<&ListArray> {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_list_opt::<i32>())
                .ok_or_else(|| Error::Corrupt {
                    path: path.to_path_buf(),
                    row: None,
                    reason: format!(
                        "no list column {name:?} (DistillKit's columns: input_ids, bytepacked_indices, compressed_logprobs)"
                    ),
                })
        };
        let (ids, packed, lps) = (
            col("input_ids")?,
            col("bytepacked_indices")?,
            col("compressed_logprobs")?,
        );
        for i in 0..batch.num_rows() {
            let r = row + i as u64;
            let bad = |why: String| Error::Corrupt {
                path: path.to_path_buf(),
                row: Some(r),
                reason: why,
            };
            if ids.is_null(i) {
                return Err(bad("input_ids is null".into()));
            }
            let input = arrow::compute::cast(&ids.value(i), &DataType::UInt64)
                .map_err(|e| bad(format!("input_ids: {e}")))?;
            let input: Vec<u32> = input
                .as_primitive::<UInt64Type>()
                .values()
                .iter()
                .map(|&v| u32::try_from(v).map_err(|_| bad(format!("input id {v}"))))
                .collect::<Result<_>>()?;
            let p_rows = byte_rows(packed, i)
                .ok_or_else(|| bad("bytepacked_indices is not a list of byte strings".into()))?;
            let l_rows = byte_rows(lps, i)
                .ok_or_else(|| bad("compressed_logprobs is not a list of byte strings".into()))?;
            if p_rows.len() != l_rows.len() {
                return Err(bad(format!(
                    "{} index rows but {} log-prob rows",
                    p_rows.len(),
                    l_rows.len()
                )));
            }
            let n = match input.len() {
                l if l == p_rows.len() => l.saturating_sub(1),
                l if l == p_rows.len() + 1 => p_rows.len(),
                l => {
                    return Err(bad(format!(
                        "{l} input ids for {} positions (expected equal, or one more)",
                        p_rows.len()
                    )))
                }
            };
            if n == 0 {
                return Err(bad("a sequence needs at least 2 tokens".into()));
            }
            let mut seq = Imported {
                input_ids: input,
                prompt_len: 0,
                ids: Vec::with_capacity(n),
                logprobs: Vec::with_capacity(n),
            };
            for p in 0..n {
                let (pid, plp) = cfg
                    .decode(&p_rows[p], &l_rows[p])
                    .map_err(|why| bad(format!("position {p}: {why}")))?;
                if let Some(x) = plp.iter().find(|x| !x.is_finite()) {
                    return Err(bad(format!(
                        "position {p}: decoded log-prob {x} (an unfilled slot of the capture)"
                    )));
                }
                if let Some(&id) = pid.iter().find(|&&id| id >= cfg.d) {
                    return Err(bad(format!("position {p}: token id {id} >= d = {}", cfg.d)));
                }
                let mut entries: Vec<(u32, f32)> = pid
                    .into_iter()
                    .zip(plp.into_iter().map(|x| x.min(0.0) as f32))
                    .collect();
                entries.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                seq.ids.push(entries.iter().map(|e| e.0).collect());
                seq.logprobs.push(entries.iter().map(|e| e.1).collect());
            }
            each(seq)?;
        }
        Ok(())
    })
}

/// The Parquet files of a DistillKit output directory (`data_*.parquet`, in numeric order),
/// or the given files.
fn parquet_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(input)
                .map_err(|e| Error::io(input, e))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
                .collect();
            found.sort_by_key(|p| {
                let stem = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let num: Option<u64> = stem.rsplit('_').next().and_then(|n| n.parse().ok());
                (num.unwrap_or(u64::MAX), stem)
            });
            if found.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{}: no .parquet files",
                    input.display()
                )));
            }
            files.extend(found);
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

/// Imports DistillKit compressed logits into the new store `out`. `config`: the
/// `compression_config.yaml` (default: the one in the first input directory). The
/// vocabulary size defaults to the config's `d`.
pub fn import_distillkit(
    inputs: &[PathBuf],
    config: Option<&Path>,
    out: &Path,
    opts: &ImportOptions,
) -> Result<ImportReport> {
    if inputs.is_empty() {
        return Err(Error::InvalidArgument("no input files".into()));
    }
    let config_path = match config {
        Some(c) => c.to_path_buf(),
        None => {
            let dir = if inputs[0].is_dir() {
                inputs[0].clone()
            } else {
                inputs[0]
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default()
            };
            dir.join("compression_config.yaml")
        }
    };
    let cfg = CompressionConfig::load(&config_path)?;
    let files = parquet_files(inputs)?;
    let mut opts = opts.clone();
    if opts.tokenizer.is_none() && opts.vocab_size.is_none() {
        opts.vocab_size = Some(cfg.d);
    }
    let provenance = serde_json::json!({
        "format": "distillkit",
        "files": files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "compression_config": serde_json::to_value(&cfg)?,
        "teacher": opts.teacher.clone().unwrap_or_else(|| "unknown".into()),
    });
    import_sequences(out, &opts, provenance, "distillkit", |each| {
        for f in &files {
            read_file(f, &cfg, each)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_read_msb_first() {
        // DistillKit's tests/test_bitpack.py: [5, 3] in 3 bits packs to one byte 0b101_011_00.
        assert_eq!(unpack_bits(&[0xAC], 3, 2), Some(vec![5, 3]));
        assert_eq!(unpack_bits(&[0x12, 0x34], 16, 1), Some(vec![0x1234]));
        assert_eq!(unpack_bits(&[0xFF], 3, 3), None, "9 bits from one byte");
    }

    #[test]
    fn a_position_decodes_exact_values_fit_and_residual() {
        let cfg = CompressionConfig {
            d: 1000,
            k: 3,
            exact_k: 1,
            exact_dtype: "float32".into(),
            polynomial_terms: Some(vec![Term::Power(0), Term::Named("sqrt".into())]),
            term_dtype: "float32".into(),
            residual_bins: vec![ResidualBin {
                scale_dtype: "float32".into(),
                element_bits: 2,
                num_elements: 2,
            }],
            delta_encoding: true,
            error_diffusion: false,
            normalize_t: false,
        };
        assert_eq!(cfg.index_bits(), 10);
        assert_eq!(cfg.index_bytes(), 4);
        assert_eq!(cfg.logprob_bytes(), 4 + 8 + 4 + 1);
        // ids 1, 2, 999 in 10 bits each: 0000000001 0000000010 1111100111 00
        let ids = [0b0000_0000, 0b0100_0000, 0b0010_1111, 0b1001_1100];
        let mut lp = Vec::new();
        lp.extend_from_slice(&(-0.5f32).to_le_bytes());
        lp.extend_from_slice(&(-1.0f32).to_le_bytes()); // c0
        lp.extend_from_slice(&(-0.25f32).to_le_bytes()); // c_sqrt
        lp.extend_from_slice(&(0.125f32).to_le_bytes()); // scale
        lp.push(0b1100_0000); // q = 3, 0 -> (3 - 2) * s, (0 - 2) * s
        let (got_ids, got) = cfg.decode(&ids, &lp).unwrap();
        assert_eq!(got_ids, vec![1, 2, 999]);
        // deltas: -0.5, -1 + 0 + 0.125, -1 - 0.25 - 0.25; cumulative sums.
        let want = [-0.5, -0.5 - 0.875, -0.5 - 0.875 - 1.5];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        assert!(cfg.decode(&ids, &lp[..5]).is_err());
    }
}
