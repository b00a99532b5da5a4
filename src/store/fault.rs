//! Fault injection for the crash tests: with `FIRSTKD_FAULT=POINT` (or `POINT:N`) in the
//! environment, the process aborts (SIGABRT: no unwinding, no destructors, no flushing, like a
//! `kill -9`) the N-th time (default the first) the writer reaches the named point. The points
//! are the windows a timed kill rarely hits:
//!
//! | point | where |
//! |---|---|
//! | `part-write` | a part's temporary files hold some record batches, not yet closed |
//! | `part-closed` | the labels file is closed and fsynced, not yet renamed |
//! | `part-renamed` | the labels file has its final name, the samples file not yet |
//! | `manifest-pending` | both part files are in place, the manifest does not list them yet |
//! | `manifest-tmp` | the manifest's temporary file is written and fsynced, not renamed |
//! | `manifest-renamed` | the manifest is renamed into place, its folder not yet fsynced |
//!
//! and, for `distill` ([`TRAIN_POINTS`]):
//!
//! | point | where |
//! |---|---|
//! | `train-step` | an optimizer step has changed the weights in memory, its metrics line is not written |
//! | `checkpoint-tmp` | a checkpoint's `.tmp` folder holds the model, not yet the optimizer state |
//! | `checkpoint-written` | the `.tmp` folder is complete and fsynced, not renamed |
//! | `checkpoint-aside` | a folder being replaced (`final/`) is renamed to `.old`, the new one not yet in place |
//! | `checkpoint-renamed` | the new folder is in place, old checkpoints not yet pruned |
//!
//! With `FIRSTKD_FAULT_LOG=FILE` each visit appends the point's name to FILE (how the tests
//! learn how often a run passes each point). Without either variable a point costs one
//! initialised `OnceLock` read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable naming the point.
pub const FAULT_ENV: &str = "FIRSTKD_FAULT";

/// The environment variable naming a file that logs every visit.
pub const FAULT_LOG_ENV: &str = "FIRSTKD_FAULT_LOG";

/// Every point, in the order a commit passes them.
pub const POINTS: [&str; 6] = [
    "part-write",
    "part-closed",
    "part-renamed",
    "manifest-pending",
    "manifest-tmp",
    "manifest-renamed",
];

/// The points of `distill`'s steps and checkpoint writes.
pub const TRAIN_POINTS: [&str; 5] = [
    "train-step",
    "checkpoint-tmp",
    "checkpoint-written",
    "checkpoint-aside",
    "checkpoint-renamed",
];

fn armed() -> Option<&'static (String, u64)> {
    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(FAULT_ENV).ok()?;
            let (name, n) = match spec.split_once(':') {
                Some((name, n)) => (name.to_string(), n.parse().ok()?),
                None => (spec, 1),
            };
            Some((name, n))
        })
        .as_ref()
}

static REACHED: AtomicU64 = AtomicU64::new(0);

fn log_file() -> Option<&'static std::path::PathBuf> {
    static LOG: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    LOG.get_or_init(|| std::env::var_os(FAULT_LOG_ENV).map(Into::into))
        .as_ref()
}

/// Aborts the process here when `FIRSTKD_FAULT` names `point` and this is its N-th visit.
pub(crate) fn point(point: &str) {
    if let Some(path) = log_file() {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{point}");
        }
    }
    let Some((name, n)) = armed() else { return };
    if name == point && REACHED.fetch_add(1, Ordering::Relaxed) + 1 == *n {
        eprintln!("{FAULT_ENV}: aborting at {point} (visit {n})");
        std::process::abort();
    }
}
