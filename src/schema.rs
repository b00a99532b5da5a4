//! The store's Arrow schemas, column names, Parquet metadata keys and version rules.
//!
//! The frozen form of these schemas lives in `schemas/*.json`; a test checks the two agree.
//! docs/format.md explains every column and key.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Major versions of the store format this build reads (and writes: 2 for the quantized
/// layout, 1 for float16 / float32 log-probs).
pub const SCHEMA_MAJORS: [u32; 2] = [1, 2];
/// Said in the error for any other major version.
pub const SUPPORTED_MAJORS: &str = "1 and 2";
/// Schema version of a store with float16 or float32 log-prob columns.
pub const SCHEMA_VERSION_1: &str = "1.0";
/// Schema version of a store in the quantized layout (the default).
pub const SCHEMA_VERSION_2: &str = "2.0";
/// Value of the manifest's `format` field.
pub const FORMAT_NAME: &str = "firstkd-store";
/// Default number of teacher tokens kept per position.
pub const DEFAULT_K: usize = 5;

/// Column names of the `labels` table (one row per predicted token position).
pub mod labels {
    pub const SAMPLE_ID: &str = "sample_id";
    pub const POSITION: &str = "position";
    pub const TARGET_ID: &str = "target_id";
    pub const IN_LOSS: &str = "in_loss";
    pub const TOPK_IDS: &str = "topk_ids";
    pub const TOPK_LOGPROBS: &str = "topk_logprobs";
    pub const TARGET_LOGPROB: &str = "target_logprob";
    pub const ENTROPY: &str = "entropy";
}

/// Physical column names of the 2.0 (quantized) `labels` files that differ from the logical
/// table; `sample_id`, `position`, `in_loss` and `topk_ids` keep their names.
pub mod labels_v2 {
    pub const TOPK_PROBS_Q: &str = "topk_probs_q";
    pub const TARGET_LOGPROB_Q: &str = "target_logprob_q";
    pub const ENTROPY_Q: &str = "entropy_q";
    /// Only in stores labelled with `--select sample:N`: draws of each id.
    pub const TOPK_COUNTS: &str = "topk_counts";
}

/// The fixed-point scales of the 2.0 layout (part of the format: a reader refuses others).
///
/// * `topk_probs_q`: probability `q / PROB_SCALE`; `q = 0` stands for a probability below
///   half a step and decodes as `ZERO_PROB_UNITS / PROB_SCALE`. The writer rounds each row
///   by largest remainder, so every probability is within `1 / PROB_SCALE` (9.8e-4) of the
///   float32 value and the row's total (hence the tail mass) within half a step (4.9e-4).
/// * `target_logprob_q`: `-q / LOGPROB_SCALE` nats, null when the target is in the list.
/// * `entropy_q`: `q / ENTROPY_SCALE` nats.
pub mod quant {
    pub const PROB_SCALE: u32 = 1024;
    pub const ZERO_PROB_UNITS: f64 = 0.001;
    pub const LOGPROB_SCALE: u32 = 256;
    pub const ENTROPY_SCALE: u32 = 64;
}

/// The 2.0 scales as recorded in manifests and Parquet metadata.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantization {
    pub prob_scale: u32,
    pub zero_prob_units: f64,
    pub logprob_scale: u32,
    pub entropy_scale: u32,
}

impl Quantization {
    /// The scales of format 2.0.
    pub const V2: Quantization = Quantization {
        prob_scale: quant::PROB_SCALE,
        zero_prob_units: quant::ZERO_PROB_UNITS,
        logprob_scale: quant::LOGPROB_SCALE,
        entropy_scale: quant::ENTROPY_SCALE,
    };

    /// Probability of a stored `q`.
    pub fn prob(&self, q: u16) -> f64 {
        let units = if q == 0 {
            self.zero_prob_units
        } else {
            f64::from(q)
        };
        units / f64::from(self.prob_scale)
    }

    /// Log-probability of a stored `q`.
    pub fn logprob(&self, q: u16) -> f32 {
        self.prob(q).ln() as f32
    }

    /// Stored value of a target log-prob `lp <= 0`.
    pub fn target_q(&self, lp: f32) -> u16 {
        let q = (-f64::from(lp) * f64::from(self.logprob_scale)).round();
        q.clamp(0.0, f64::from(u16::MAX)) as u16
    }

    /// Target log-prob of a stored value.
    pub fn target_logprob(&self, q: u16) -> f32 {
        -(f64::from(q) / f64::from(self.logprob_scale)) as f32
    }

    /// Stored value of an entropy (nats, >= 0).
    pub fn entropy_q(&self, h: f32) -> u16 {
        let q = (f64::from(h) * f64::from(self.entropy_scale)).round();
        q.clamp(0.0, f64::from(u16::MAX)) as u16
    }

    /// Entropy of a stored value.
    pub fn entropy(&self, q: u16) -> f32 {
        (f64::from(q) / f64::from(self.entropy_scale)) as f32
    }

    /// Quantizes one row of full-vocabulary log-probs (any order) into `out`, by largest
    /// remainder: each probability within one step of `exp(lp)`, the row total within half
    /// a step, and the units never more than `prob_scale`.
    pub fn quantize_row(&self, lps: &[f32], out: &mut [u16]) {
        let scale = f64::from(self.prob_scale);
        let exact: Vec<f64> = lps.iter().map(|&l| f64::from(l).exp() * scale).collect();
        for (q, &x) in out.iter_mut().zip(&exact) {
            *q = x.round().clamp(0.0, scale) as u16;
        }
        let value = |q: u16| {
            if q == 0 {
                self.zero_prob_units
            } else {
                f64::from(q)
            }
        };
        let exact_sum: f64 = exact.iter().sum();
        // Each step moves one entry by about one unit towards the exact total; an entry is
        // moved at most once, so it stays within one unit of its exact value.
        for _ in 0..2 * out.len() + 1 {
            let sum: f64 = out.iter().map(|&q| value(q)).sum();
            let units: u32 = out.iter().map(|&q| u32::from(q)).sum();
            let err = sum - exact_sum;
            if err > 0.5 || units > self.prob_scale {
                let pick = (0..out.len()).filter(|&j| out[j] > 0).max_by(|&a, &b| {
                    (value(out[a]) - exact[a]).total_cmp(&(value(out[b]) - exact[b]))
                });
                match pick {
                    Some(j) => out[j] -= 1,
                    None => break,
                }
            } else if err < -0.5 && units < self.prob_scale {
                let pick = (0..out.len())
                    .filter(|&j| f64::from(out[j]) < scale)
                    .max_by(|&a, &b| {
                        (exact[a] - value(out[a])).total_cmp(&(exact[b] - value(out[b])))
                    });
                match pick {
                    Some(j) => out[j] += 1,
                    None => break,
                }
            } else {
                break;
            }
        }
    }
}

/// Column names of the `samples` table (one row per input sample).
pub mod samples {
    pub const SAMPLE_ID: &str = "sample_id";
    pub const SOURCE: &str = "source";
    pub const SPLIT: &str = "split";
    pub const RECORD_INDEX: &str = "record_index";
    pub const WINDOW_INDEX: &str = "window_index";
    pub const INPUT_IDS: &str = "input_ids";
    pub const PROMPT_LEN: &str = "prompt_len";
    pub const NUM_POSITIONS: &str = "num_positions";
}

/// Keys of the Parquet key-value metadata written into every part file.
pub mod meta_keys {
    pub const SCHEMA_VERSION: &str = "firstkd.schema_version";
    pub const TABLE: &str = "firstkd.table";
    pub const K: &str = "firstkd.k";
    pub const LOGPROB_DTYPE: &str = "firstkd.logprob_dtype";
    pub const TEACHER: &str = "firstkd.teacher";
    pub const TOKENIZER: &str = "firstkd.tokenizer";
    pub const WRITER_VERSION: &str = "firstkd.writer_version";
    pub const PART_INDEX: &str = "firstkd.part_index";
    /// Only in 2.0 files: the fixed-point scales ([`super::Quantization`]) as JSON.
    pub const QUANTIZATION: &str = "firstkd.quantization";

    /// All keys, in the order they are documented.
    pub const ALL: [&str; 8] = [
        SCHEMA_VERSION,
        TABLE,
        K,
        LOGPROB_DTYPE,
        TEACHER,
        TOKENIZER,
        WRITER_VERSION,
        PART_INDEX,
    ];
}

/// How the teacher's tokens are chosen per position (`label --select`, recorded in the
/// manifest). Every mode also keeps the full-vocabulary target log-prob and the entropy, and
/// the stored probabilities are the teacher's own, so the tail mass is `1 - sum`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Selection {
    /// The `k` most probable tokens.
    TopK { k: usize },
    /// The smallest set of most probable tokens whose mass reaches `p`, at most `max`.
    TopP { p: f64, max: usize },
    /// Sparse Logit Sampling: `draws` draws with replacement from the teacher's distribution
    /// at `temperature`, stored as the distinct ids with their counts (the estimate of a
    /// token's probability is count / draws), seeded per (store seed, sample id, position).
    Sample {
        draws: u32,
        temperature: f64,
        seed: u64,
    },
}

impl Selection {
    /// Longest list a position can have (the manifest's `k`).
    pub fn max_len(&self) -> usize {
        match *self {
            Selection::TopK { k } => k,
            Selection::TopP { max, .. } => max,
            Selection::Sample { draws, .. } => draws as usize,
        }
    }

    /// Whether every list has exactly `max_len` items.
    pub fn fixed_len(&self) -> bool {
        matches!(self, Selection::TopK { .. })
    }

    /// Parses `top-k:K`, `top-p:P,max=K` or `sample:N[,t=T][,seed=S]`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "selection {s:?}: {why} (expected top-k:K, top-p:P,max=K or sample:N[,t=T][,seed=S])"
            ))
        };
        let (mode, rest) = s.split_once(':').ok_or_else(|| bad("no ':'"))?;
        let mut parts = rest.split(',');
        let first = parts.next().unwrap_or_default().trim();
        let mut named = std::collections::HashMap::new();
        for p in parts {
            let (key, value) = p
                .split_once('=')
                .ok_or_else(|| bad("options are key=value"))?;
            named.insert(key.trim().to_string(), value.trim().to_string());
        }
        let take =
            |named: &mut std::collections::HashMap<String, String>, key: &str| named.remove(key);
        let sel = match mode.trim() {
            "top-k" => {
                let k: usize = first.parse().map_err(|_| bad("K is not a whole number"))?;
                Selection::TopK { k }
            }
            "top-p" => {
                let p: f64 = first.parse().map_err(|_| bad("P is not a number"))?;
                let max = take(&mut named, "max").ok_or_else(|| bad("top-p needs max=K"))?;
                let max: usize = max.parse().map_err(|_| bad("max is not a whole number"))?;
                if !(p > 0.0 && p <= 1.0) {
                    return Err(bad("P must be in (0, 1]"));
                }
                Selection::TopP { p, max }
            }
            "sample" => {
                let draws: u32 = first.parse().map_err(|_| bad("N is not a whole number"))?;
                let temperature = match take(&mut named, "t") {
                    Some(t) => t.parse().map_err(|_| bad("t is not a number"))?,
                    None => 1.0,
                };
                let seed = match take(&mut named, "seed") {
                    Some(v) => v.parse().map_err(|_| bad("seed is not a whole number"))?,
                    None => 0,
                };
                if !(temperature > 0.0 && f64::is_finite(temperature)) {
                    return Err(bad("t must be positive"));
                }
                if draws > u32::from(u16::MAX) {
                    return Err(bad("at most 65535 draws"));
                }
                Selection::Sample {
                    draws,
                    temperature,
                    seed,
                }
            }
            _ => return Err(bad("unknown mode")),
        };
        if let Some(key) = named.keys().next() {
            return Err(bad(&format!("unknown option {key}")));
        }
        if sel.max_len() == 0 {
            return Err(bad("lists need at least one token"));
        }
        Ok(sel)
    }
}

impl std::fmt::Display for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Selection::TopK { k } => write!(f, "top-k:{k}"),
            Selection::TopP { p, max } => write!(f, "top-p:{p},max={max}"),
            Selection::Sample {
                draws,
                temperature,
                seed,
            } => write!(f, "sample:{draws},t={temperature},seed={seed}"),
        }
    }
}

/// The two tables of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    Labels,
    Samples,
}

impl Table {
    /// Table name, also the name of its folder inside the store.
    pub fn name(self) -> &'static str {
        match self {
            Table::Labels => "labels",
            Table::Samples => "samples",
        }
    }

    /// Both tables.
    pub const ALL: [Table; 2] = [Table::Labels, Table::Samples];
}

/// Storage type of log-probability columns.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LogprobDtype {
    /// Store format 2.0, the default: probabilities in steps of 1/1024 (each within 1e-3 of
    /// float32, the tail mass within 5e-4), target log-prob and entropy as fixed point;
    /// readable by Spark, pyarrow, DuckDB and polars (docs/format.md)
    #[default]
    #[value(name = "quantized", alias = "q")]
    Quantized,
    /// IEEE half precision (2 bytes), format 1.0 (Spark 4 cannot read float16 columns)
    #[value(name = "float16", alias = "f16")]
    Float16,
    /// IEEE single precision (4 bytes).
    #[value(name = "float32", alias = "f32")]
    Float32,
}

impl LogprobDtype {
    /// Arrow type of one log-probability value.
    pub fn arrow_type(self) -> DataType {
        match self {
            LogprobDtype::Float16 => DataType::Float16,
            LogprobDtype::Float32 | LogprobDtype::Quantized => DataType::Float32,
        }
    }

    /// Schema version of a store written with this dtype.
    pub fn schema_version(self) -> &'static str {
        match self {
            LogprobDtype::Quantized => SCHEMA_VERSION_2,
            LogprobDtype::Float16 | LogprobDtype::Float32 => SCHEMA_VERSION_1,
        }
    }

    /// Major schema version of a store written with this dtype.
    pub fn major(self) -> u32 {
        match self {
            LogprobDtype::Quantized => 2,
            LogprobDtype::Float16 | LogprobDtype::Float32 => 1,
        }
    }

    /// Name used in manifests, metadata and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            LogprobDtype::Float16 => "float16",
            LogprobDtype::Float32 => "float32",
            LogprobDtype::Quantized => "quantized",
        }
    }

    /// Parses a dtype name (`quantized`/`q`, `float16`/`f16`, `float32`/`f32`).
    pub fn parse(s: &str) -> Result<Self> {
        crate::parse_value(s, "log-prob dtype")
    }
}

fn list_item(data_type: DataType) -> Arc<Field> {
    Arc::new(Field::new("item", data_type, false))
}

/// Physical Arrow schema of the `labels` files for a given k and log-prob dtype (for
/// `quantized`, the 2.0 layout; the logical table is the same for every dtype).
pub fn labels_schema(k: usize, dtype: LogprobDtype) -> SchemaRef {
    if dtype == LogprobDtype::Quantized {
        return labels_schema_v2(false);
    }
    let k = i32::try_from(k).unwrap_or(i32::MAX);
    Arc::new(Schema::new(vec![
        Field::new(labels::SAMPLE_ID, DataType::UInt64, false),
        Field::new(labels::POSITION, DataType::UInt32, false),
        Field::new(labels::TARGET_ID, DataType::UInt32, false),
        Field::new(labels::IN_LOSS, DataType::Boolean, false),
        Field::new(
            labels::TOPK_IDS,
            DataType::FixedSizeList(list_item(DataType::UInt32), k),
            false,
        ),
        Field::new(
            labels::TOPK_LOGPROBS,
            DataType::FixedSizeList(list_item(dtype.arrow_type()), k),
            false,
        ),
        Field::new(labels::TARGET_LOGPROB, dtype.arrow_type(), false),
        Field::new(labels::ENTROPY, DataType::Float32, false),
    ]))
}

/// Physical schema of 2.0 `labels` files: `target_id` is `input_ids[position + 1]` of the
/// sample and not stored; lists are variable-length (every list of a top-k store has k
/// items); log-probs, target log-prob and entropy are fixed point ([`Quantization::V2`]).
pub fn labels_schema_v2(counts: bool) -> SchemaRef {
    let mut fields = vec![
        Field::new(labels::SAMPLE_ID, DataType::UInt64, false),
        Field::new(labels::POSITION, DataType::UInt32, false),
        Field::new(labels::IN_LOSS, DataType::Boolean, false),
        Field::new(
            labels::TOPK_IDS,
            DataType::List(list_item(DataType::UInt32)),
            false,
        ),
        Field::new(
            labels_v2::TOPK_PROBS_Q,
            DataType::List(list_item(DataType::UInt16)),
            false,
        ),
        Field::new(labels_v2::TARGET_LOGPROB_Q, DataType::UInt16, true),
        Field::new(labels_v2::ENTROPY_Q, DataType::UInt16, false),
    ];
    if counts {
        fields.push(Field::new(
            labels_v2::TOPK_COUNTS,
            DataType::List(list_item(DataType::UInt16)),
            false,
        ));
    }
    Arc::new(Schema::new(fields))
}

/// Arrow schema of the `samples` table.
pub fn samples_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(samples::SAMPLE_ID, DataType::UInt64, false),
        Field::new(samples::SOURCE, DataType::Utf8, false),
        Field::new(samples::SPLIT, DataType::Utf8, false),
        Field::new(samples::RECORD_INDEX, DataType::UInt64, false),
        Field::new(samples::WINDOW_INDEX, DataType::UInt32, false),
        Field::new(
            samples::INPUT_IDS,
            DataType::List(list_item(DataType::UInt32)),
            false,
        ),
        Field::new(samples::PROMPT_LEN, DataType::UInt32, false),
        Field::new(samples::NUM_POSITIONS, DataType::UInt32, false),
    ]))
}

/// Schema of `table` for a store with the given k and dtype.
pub fn table_schema(table: Table, k: usize, dtype: LogprobDtype) -> SchemaRef {
    match table {
        Table::Labels => labels_schema(k, dtype),
        Table::Samples => samples_schema(),
    }
}

/// Parses "MAJOR.MINOR" and refuses a major version this build does not read.
pub fn check_version(found: &str, path: &Path) -> Result<(u32, u32)> {
    let unsupported = || Error::UnsupportedSchemaVersion {
        path: path.to_path_buf(),
        found: found.to_string(),
        supported: SUPPORTED_MAJORS,
    };
    let (major, minor) = found.split_once('.').ok_or_else(unsupported)?;
    let major: u32 = major.parse().map_err(|_| unsupported())?;
    let minor: u32 = minor.parse().map_err(|_| unsupported())?;
    if !SCHEMA_MAJORS.contains(&major) {
        return Err(unsupported());
    }
    Ok((major, minor))
}

/// A portable, human-readable type name (`uint32`, `fixed_size_list<float16, k>`, ...).
/// The frozen JSON schemas use these names, with the list size written as `k`.
pub fn type_name(data_type: &DataType, k: usize) -> String {
    match data_type {
        DataType::Boolean => "bool".into(),
        DataType::UInt16 => "uint16".into(),
        DataType::UInt32 => "uint32".into(),
        DataType::UInt64 => "uint64".into(),
        DataType::Float16 => "float16".into(),
        DataType::Float32 => "float32".into(),
        DataType::Utf8 => "utf8".into(),
        DataType::List(item) => format!("list<{}>", type_name(item.data_type(), k)),
        DataType::FixedSizeList(item, n) => {
            let size = if usize::try_from(*n).ok() == Some(k) {
                "k".to_string()
            } else {
                n.to_string()
            };
            format!(
                "fixed_size_list<{}, {size}>",
                type_name(item.data_type(), k)
            )
        }
        other => format!("{other:?}"),
    }
}

/// The columns of `schema` as (name, portable type, nullable), for the frozen JSON.
pub fn describe(schema: &Schema, k: usize) -> Vec<(String, String, bool)> {
    schema
        .fields()
        .iter()
        .map(|f| {
            (
                f.name().clone(),
                type_name(f.data_type(), k),
                f.is_nullable(),
            )
        })
        .collect()
}

/// Frozen schema file as stored under `schemas/`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FrozenSchema {
    pub table: String,
    pub schema_version: String,
    pub columns: Vec<FrozenColumn>,
    #[serde(default)]
    pub parquet_metadata_keys: Vec<String>,
    #[serde(default)]
    pub notes: BTreeMap<String, String>,
}

/// One column of a frozen schema.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FrozenColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub nullable: bool,
    pub description: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frozen(table: Table, major: u32) -> FrozenSchema {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas")
            .join(format!("{}.v{major}.json", table.name()));
        let text = std::fs::read_to_string(&path).expect("frozen schema file exists");
        serde_json::from_str(&text).expect("frozen schema parses")
    }

    #[test]
    fn rust_schemas_equal_frozen_json() {
        for table in Table::ALL {
            for dtype in [
                LogprobDtype::Float16,
                LogprobDtype::Float32,
                LogprobDtype::Quantized,
            ] {
                let major = dtype.major();
                // 2.0 changed only the labels files; samples keep the 1.0 schema.
                let file_major = if table == Table::Samples { 1 } else { major };
                let frozen = frozen(table, file_major);
                assert_eq!(frozen.table, table.name());
                if table == Table::Labels {
                    assert_eq!(frozen.schema_version, dtype.schema_version());
                }
                let rust = describe(&table_schema(table, DEFAULT_K, dtype), DEFAULT_K);
                let json: Vec<(String, String, bool)> = frozen
                    .columns
                    .iter()
                    .map(|c| {
                        let t = c.type_name.replace("LOGPROB", dtype.name());
                        (c.name.clone(), t, c.nullable)
                    })
                    .collect();
                assert_eq!(rust, json, "table {} dtype {:?}", table.name(), dtype);
                let keys: Vec<&str> = frozen
                    .parquet_metadata_keys
                    .iter()
                    .map(String::as_str)
                    .collect();
                let mut want = meta_keys::ALL.to_vec();
                if file_major == 2 {
                    want.push(meta_keys::QUANTIZATION);
                }
                assert_eq!(keys, want);
                assert!(frozen.columns.iter().all(|c| !c.description.is_empty()));
            }
        }
    }

    #[test]
    fn quantized_rows_keep_every_probability_and_the_total_within_bounds() {
        let q = Quantization::V2;
        let step = 1.0 / f64::from(q.prob_scale);
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut worst = (0.0f64, 0.0f64);
        for case in 0..20_000 {
            // Rows from very peaked (one token near 1, the rest below a step) to flat.
            let sharp = 1.0 + 40.0 * next() * next();
            let raw: Vec<f64> = (0..5).map(|_| next().powf(sharp)).collect();
            let total: f64 = raw.iter().sum::<f64>() / (0.05 + 0.95 * next());
            let mut lps: Vec<f32> = raw
                .iter()
                .map(|r| ((r / total).max(1e-30)).ln() as f32)
                .collect();
            if case % 7 == 0 {
                lps = vec![-1e-7, -20.0, -21.0, -22.0, -30.0];
            }
            let mut out = [0u16; 5];
            q.quantize_row(&lps, &mut out);
            let exact: Vec<f64> = lps.iter().map(|&l| f64::from(l).exp()).collect();
            let got: Vec<f64> = out.iter().map(|&v| q.prob(v)).collect();
            for (a, b) in exact.iter().zip(&got) {
                worst.0 = worst.0.max((a - b).abs());
            }
            let sum_err = (exact.iter().sum::<f64>() - got.iter().sum::<f64>()).abs();
            worst.1 = worst.1.max(sum_err);
            let units: u32 = out.iter().map(|&v| u32::from(v)).sum();
            assert!(units <= q.prob_scale, "{lps:?} -> {out:?}");
        }
        assert!(worst.0 <= step + 1e-12 && worst.0 < 1e-3, "{worst:?}");
        assert!(worst.1 <= step / 2.0 + 1e-9, "{worst:?}");
        assert_eq!(q.target_logprob(q.target_q(-3.0)), -3.0);
        assert_eq!(q.target_q(-1e9), u16::MAX);
        assert!((q.entropy(q.entropy_q(2.345)) - 2.345).abs() <= 0.5 / 64.0);
    }

    #[test]
    fn version_rules() {
        let p = Path::new("x");
        assert_eq!(check_version("1.0", p).unwrap(), (1, 0));
        assert_eq!(check_version("1.7", p).unwrap(), (1, 7));
        assert_eq!(check_version("2.0", p).unwrap(), (2, 0));
        for bad in ["3.0", "0.9", "1", "", "one.zero", "1.x"] {
            let err = check_version(bad, p).unwrap_err().to_string();
            assert!(
                err.contains("unsupported store schema version"),
                "{bad}: {err}"
            );
        }
    }
}
