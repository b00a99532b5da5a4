//! Replays the fuzzers' committed inputs on the stable toolchain, without cargo-fuzz: every
//! file of `fuzz/corpus/TARGET/` (the minimised corpus of the fuzz runs) and
//! `fuzz/regressions/TARGET/` (inputs that once crashed a target, kept after the fix), and
//! the built-in seeds, go through the same bodies the fuzz targets run
//! (`firstkd::fuzzing`). None may panic.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use firstkd::fuzzing::{run, seeds, Fixtures, TARGETS};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn fuzz_corpora_and_regressions_replay_without_a_panic() {
    let Some(fx) = Fixtures::get() else { return };
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut counts = Vec::new();
    for target in TARGETS {
        let corpus = inputs(&fuzz.join("corpus").join(target));
        let regressions = inputs(&fuzz.join("regressions").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target} is empty: the fuzz runs' corpus is committed there"
        );
        for file in corpus.iter().chain(&regressions) {
            let data = std::fs::read(file).unwrap();
            let ran = catch_unwind(AssertUnwindSafe(|| run(target, fx, &data)));
            assert!(ran.is_ok(), "{target} panicked on {}", file.display());
        }
        for (i, data) in seeds(target, fx).iter().enumerate() {
            let ran = catch_unwind(AssertUnwindSafe(|| run(target, fx, data)));
            assert!(ran.is_ok(), "{target} panicked on built-in seed {i}");
        }
        counts.push((target, corpus.len(), regressions.len()));
    }
    let _ = std::fs::remove_dir_all(&fx.root);
    eprintln!("replayed (target, corpus files, regressions): {counts:?}");
}

/// Writes the built-in seeds to `fuzz/seeds/TARGET/` for a fuzz run to start from
/// (docs/reliability.md, "Fuzzing"): `cargo test --release --test it -- --ignored write_fuzz_seeds`.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let Some(fx) = Fixtures::get() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    for target in TARGETS {
        let dir = root.join(target);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, data) in seeds(target, fx).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), data).unwrap();
        }
    }
}
