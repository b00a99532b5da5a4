//! `manifest.json`: what a store holds and where it came from.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::schema::{self, LogprobDtype, Table, FORMAT_NAME};
use crate::temperature::{FitObjective, TemperatureMode};

/// File name of the manifest inside a store directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The teacher that produced the labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TeacherInfo {
    /// File (or directory) name of the model, without its path.
    pub file_name: String,
    /// sha256 of the model file (for a checkpoint directory: of its weight files in name order).
    pub sha256: String,
    /// Architecture, e.g. `llama`, `qwen2`.
    pub architecture: String,
    /// Storage quantisation of the weights, e.g. `Q4_1`, `bf16`.
    pub quantization: String,
    /// dtype used for computation, e.g. `f32`.
    pub compute_dtype: String,
    /// How the weights were computed with, e.g. `dequantized-f32-cpu`.
    #[serde(default)]
    pub compute_mode: String,
}

/// The tokenizer whose ids the store holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TokenizerInfo {
    /// sha256 of a canonical serialisation of vocabulary and merges.
    pub sha256: String,
    /// Number of token ids; every id in the store is below it.
    pub vocab_size: u32,
    /// Special tokens by role (`bos`, `eos`, `pad`, ...), with id and text.
    #[serde(default)]
    pub special_tokens: BTreeMap<String, SpecialToken>,
}

/// One special token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpecialToken {
    pub id: u32,
    pub text: String,
}

/// A fitted teacher temperature, written by `firstkd calibrate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemperatureInfo {
    pub value: f64,
    /// Objective minimised: `ece` or `nll`.
    pub objective: FitObjective,
    /// How the top-k list was renormalised at each candidate T when fitting (absent in stores
    /// fitted before firstkd 0.1 recorded it here: see [`TemperatureInfo::mode`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TemperatureMode>,
    /// Which positions it was fitted on (split or held-out rule, counts).
    pub fitted_on: serde_json::Value,
    /// Metrics at T = 1 and at the fitted T.
    pub before: serde_json::Value,
    pub after: serde_json::Value,
    /// firstkd version that fitted it.
    pub fitted_by: String,
}

impl TemperatureInfo {
    /// The renormalisation the temperature was fitted with: the `mode` field, else the one
    /// older stores kept in `fitted_on.mode`, else the default (renormalized).
    pub fn mode(&self) -> TemperatureMode {
        self.mode
            .or_else(|| serde_json::from_value(self.fitted_on["mode"].clone()).ok())
            .unwrap_or_default()
    }
}

/// One Parquet file of a part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartFile {
    /// Path relative to the store directory, e.g. `labels/part-00000.parquet`.
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// One committed part: a labels file and a samples file holding the same whole samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartEntry {
    pub index: u32,
    pub labels: PartFile,
    pub samples: PartFile,
    /// Sum of `in_loss` over the part's label rows.
    pub in_loss_rows: u64,
}

impl PartEntry {
    /// The file of `table` in this part.
    pub fn file(&self, table: Table) -> &PartFile {
        match table {
            Table::Labels => &self.labels,
            Table::Samples => &self.samples,
        }
    }
}

/// The manifest of a store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `firstkd-store`.
    pub format: String,
    /// "MAJOR.MINOR"; readers refuse an unknown major version.
    pub schema_version: String,
    /// Teacher tokens kept per position.
    pub k: usize,
    /// Storage type of log-probability columns (`quantized`: the 2.0 layout).
    pub logprob_dtype: LogprobDtype,
    /// Fixed-point scales of a 2.0 store (absent in 1.0 stores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<crate::schema::Quantization>,
    /// How the tokens of each position were chosen (absent in 1.0 stores: top-k with `k`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<crate::schema::Selection>,
    /// True once the writer finished; an incomplete store is being written or was interrupted.
    pub complete: bool,
    /// firstkd version that created the store.
    pub created_by: String,
    pub teacher: TeacherInfo,
    pub tokenizer: TokenizerInfo,
    /// Fitted temperature; null until `firstkd calibrate` writes it.
    pub temperature: Option<TemperatureInfo>,
    /// How the labels were produced (inputs, sequence length, template...), free-form.
    #[serde(default)]
    pub labeling: serde_json::Value,
    /// Writer's resume cursor after the last committed part, free-form.
    #[serde(default)]
    pub cursor: serde_json::Value,
    pub parts: Vec<PartEntry>,
}

impl Manifest {
    /// Path of the manifest of the store at `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Reads and validates the manifest of the store at `dir` (format and major version).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_file(dir, MANIFEST_FILE)
    }

    /// Reads and validates the manifest at `dir/rel` (the store's, or one shard's).
    pub fn load_file(dir: &Path, rel: &str) -> Result<Self> {
        let path = dir.join(rel);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotAStore {
                    path: dir.to_path_buf(),
                    reason: if !dir.exists() {
                        "directory does not exist".into()
                    } else if rel == MANIFEST_FILE && dir.join(super::shards::SHARDS_DIR).is_dir() {
                        format!(
                            "no {MANIFEST_FILE}: a sharded store whose shards are not all complete yet ({})",
                            super::shards::progress_line(dir)
                        )
                    } else {
                        format!("no {rel}")
                    },
                })
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        // Check format and version on the raw JSON first, so a future major version
        // with different fields gets the version error, not a parse error.
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::InvalidManifest {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        match raw.get("format").and_then(|v| v.as_str()) {
            Some(FORMAT_NAME) => {}
            other => {
                return Err(Error::NotAStore {
                    path: path.clone(),
                    reason: format!("format is {other:?}, expected {FORMAT_NAME:?}"),
                })
            }
        }
        let version = raw
            .get("schema_version")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| Error::InvalidManifest {
                path: path.clone(),
                reason: "missing schema_version".into(),
            })?;
        let (major, _) = schema::check_version(&version, &path)?;
        let manifest: Manifest =
            serde_json::from_value(raw).map_err(|e| Error::InvalidManifest {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if manifest.k == 0 {
            return Err(Error::InvalidManifest {
                path,
                reason: "k must be at least 1".into(),
            });
        }
        if manifest.logprob_dtype.major() != major {
            return Err(Error::InvalidManifest {
                path,
                reason: format!(
                    "schema_version {version} with logprob_dtype {} (a {} store)",
                    manifest.logprob_dtype.name(),
                    manifest.logprob_dtype.schema_version()
                ),
            });
        }
        let selection = manifest.selection();
        if selection.max_len() != manifest.k
            || (!selection.fixed_len() && manifest.logprob_dtype != LogprobDtype::Quantized)
        {
            return Err(Error::InvalidManifest {
                path,
                reason: format!(
                    "selection {selection} with k {} and logprob_dtype {} (variable-length selections need the quantized layout)",
                    manifest.k,
                    manifest.logprob_dtype.name()
                ),
            });
        }
        let want = (major == 2).then_some(schema::Quantization::V2);
        if manifest.quantization != want {
            return Err(Error::InvalidManifest {
                path,
                reason: format!(
                    "quantization {:?}, format {version} has {:?}",
                    manifest.quantization, want
                ),
            });
        }
        Ok(manifest)
    }

    /// Writes the manifest atomically: a temporary file, fsync, rename over the old one.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_file(dir, MANIFEST_FILE)
    }

    /// Writes the manifest atomically at `dir/rel` (a temporary file beside it, fsync,
    /// rename, fsync of the folder).
    pub fn save_file(&self, dir: &Path, rel: &str) -> Result<()> {
        let path = dir.join(rel);
        let folder = path.parent().unwrap_or(dir).to_path_buf();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| MANIFEST_FILE.to_string());
        // The process id keeps two processes that commit the same manifest (two shards
        // finishing at once both write the combined store manifest) off each other's file.
        let tmp = folder.join(format!(".{name}.{}.tmp", std::process::id()));
        let text = serde_json::to_string_pretty(self)?;
        let mut file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let written = file
            .write_all(text.as_bytes())
            .and_then(|_| file.write_all(b"\n"))
            .and_then(|_| file.sync_all());
        drop(file);
        if let Err(e) = written {
            // A full disk, say: the old manifest stays, and so does nothing of this one.
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&tmp, e));
        }
        super::fault::point("manifest-tmp");
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        super::fault::point("manifest-renamed");
        sync_dir(&folder);
        Ok(())
    }

    /// How the tokens of each position were chosen.
    pub fn selection(&self) -> crate::schema::Selection {
        self.selection
            .unwrap_or(crate::schema::Selection::TopK { k: self.k })
    }

    /// Physical Arrow schema of the part files of `table`.
    pub fn table_schema(&self, table: Table) -> arrow::datatypes::SchemaRef {
        if table == Table::Labels && self.logprob_dtype == LogprobDtype::Quantized {
            let counts = matches!(self.selection(), crate::schema::Selection::Sample { .. });
            return schema::labels_schema_v2(counts);
        }
        schema::table_schema(table, self.k, self.logprob_dtype)
    }

    /// Total rows of `table` over all parts.
    pub fn rows(&self, table: Table) -> u64 {
        self.parts.iter().map(|p| p.file(table).rows).sum()
    }

    /// Total bytes of `table` over all parts.
    pub fn bytes(&self, table: Table) -> u64 {
        self.parts.iter().map(|p| p.file(table).bytes).sum()
    }

    /// Total in-loss label rows.
    pub fn in_loss_rows(&self) -> u64 {
        self.parts.iter().map(|p| p.in_loss_rows).sum()
    }
}

/// Best-effort fsync of a directory so renames inside it are durable.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
