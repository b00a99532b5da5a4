//! The crate's error type. Every variant that concerns a file carries its path.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in firstkd's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is in the message, not a `source()`: `{:#}` would print it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{path}: unsupported store schema version {found} (this firstkd reads major versions {supported})")]
    UnsupportedSchemaVersion {
        path: PathBuf,
        found: String,
        supported: &'static str,
    },

    #[error("{path}: not a firstkd store: {reason}")]
    NotAStore { path: PathBuf, reason: String },

    #[error("{path}: store is incomplete ({reason}); rerun the command that wrote it to resume")]
    IncompleteStore { path: PathBuf, reason: String },

    /// A file's contents are damaged or not what the store format says; `row` is the
    /// 0-based row within that file when one row is to blame.
    #[error("{path}{}: corrupt: {reason}", row_suffix(.row))]
    Corrupt {
        path: PathBuf,
        row: Option<u64>,
        reason: String,
    },

    #[error("{path}: invalid manifest: {reason}")]
    InvalidManifest { path: PathBuf, reason: String },

    #[error("{path}: schema mismatch: {reason}")]
    SchemaMismatch { path: PathBuf, reason: String },

    #[error("{path}:{line}: {reason}")]
    InvalidRecord {
        path: PathBuf,
        line: u64,
        reason: String,
    },

    #[error("tokenizer mismatch: store has {store}, model has {model}")]
    TokenizerMismatch { store: String, model: String },

    /// A value the caller passed (an option, a spec, a file's settings) that cannot work.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// An output directory that cannot take what the command writes: not empty, or holding a
    /// store (or export) written with other settings. Nothing was written to it.
    #[error("{path}: {reason}")]
    OutputInUse { path: PathBuf, reason: String },

    /// Another live process holds the writer lock of a store or shard.
    #[error("{what}: another firstkd process (`label` or `calibrate`) is writing it now (it holds {path}); wait for it to finish or stop it, then rerun to resume")]
    Locked { what: String, path: PathBuf },

    /// A broken invariant of firstkd itself, not of the input: a bug to report.
    #[error("internal error: {0} (a bug in firstkd; please report it)")]
    Internal(String),

    #[error("{path}: parquet: {error}")]
    Parquet {
        path: PathBuf,
        error: parquet::errors::ParquetError,
    },

    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),

    #[error("datafusion: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),

    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("json: {0}")]
    Json(#[from] serde_json::Error),

    #[error("{path}: model: {reason}")]
    Model { path: PathBuf, reason: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("no training data: {0}")]
    NoTrainingData(String),

    #[error("{url}: object storage: {error}")]
    ObjectStore { url: String, error: String },

    #[error("{url}: the manifest was changed by another writer while this command ran; rerun it")]
    ConcurrentUpdate { url: String },

    #[error("training diverged at step {step}: {what} is {value}; {last_checkpoint}")]
    NonFiniteLoss {
        step: u64,
        what: String,
        value: f64,
        last_checkpoint: String,
    },
}

/// Parses the command-line spelling (name or alias) of a [`clap::ValueEnum`], so library
/// callers and the CLI accept the same words, defined once on the enum.
pub fn parse_value<T: clap::ValueEnum>(s: &str, what: &str) -> Result<T> {
    T::from_str(s, false).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|p| p.get_name().to_string())
            .collect();
        Error::InvalidArgument(format!(
            "unknown {what} {s:?} (expected {})",
            names.join(", ")
        ))
    })
}

fn row_suffix(row: &Option<u64>) -> String {
    row.map(|r| format!(": row {r}")).unwrap_or_default()
}

impl Error {
    /// Attributes a problem with a model's contents (its config or weights, reported by
    /// code that does not know the file) to the model file `path`.
    pub fn in_model(self, path: impl Into<PathBuf>) -> Self {
        match self {
            Error::InvalidArgument(reason) => Error::Model {
                path: path.into(),
                reason,
            },
            other => other,
        }
    }

    /// Wraps an io error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    /// Wraps a parquet error with the path it concerns.
    pub fn parquet(path: impl Into<PathBuf>, source: parquet::errors::ParquetError) -> Self {
        Error::Parquet {
            path: path.into(),
            error: source,
        }
    }
}
