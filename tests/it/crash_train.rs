//! Crash tests of `firstkd distill` and `firstkd calibrate`: the process aborts at each
//! dangerous point of a training step and of a checkpoint write (`FIRSTKD_FAULT`,
//! src/store/fault.rs), at seeded random visits of them, and under `SIGKILL` at seeded random
//! instants. After each, `distill --resume` must end with the same weights, optimizer state,
//! trainer state and metrics as an uninterrupted run with the same seed, bit for bit, and
//! leave no temporary folder; `calibrate`'s manifest must stay readable and whole at every
//! instant. docs/reliability.md lists what this observed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use firstkd::store::fault::{FAULT_ENV, FAULT_LOG_ENV, TRAIN_POINTS};
use firstkd::store::{verify, Manifest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::util::{files_below as files, firstkd, tempdir, text};

fn aborted(out: &Output) -> bool {
    use std::os::unix::process::ExitStatusExt;
    out.status.signal() == Some(6)
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_firstkd"));
    c.env_remove(FAULT_ENV)
        .env_remove(FAULT_LOG_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// A synthetic store (vocabulary 512, several parts, a validation split) and a config for a
/// random student small enough that a step takes milliseconds.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let store = dir.join("store");
    let o = firstkd(&[
        "synth",
        store.to_str().unwrap(),
        "--rows",
        "30000",
        "--vocab",
        "512",
        "--seed",
        "4",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let config = dir.join("student.json");
    let json = serde_json::json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
    });
    std::fs::write(&config, json.to_string()).unwrap();
    (store, config)
}

const STEPS: u64 = 12;

fn distill(store: &Path, config: &Path, out: &Path, resume: bool) -> Command {
    let init = format!("random:{}", config.display());
    let mut c = bin();
    c.args(["distill", "--store"])
        .arg(store)
        .args(["--init", &init, "--loss", "first", "--temperature", "1.5"])
        .args(["--steps", &STEPS.to_string(), "--batch-tokens", "512"])
        .args(["--max-seq-len", "128", "--lr", "2e-3", "--warmup", "2"])
        .args(["--seed", "9", "--valid-every", "4", "--valid-batches", "2"])
        .args([
            "--checkpoint-every",
            "3",
            "--keep-checkpoints",
            "2",
            "--quiet",
        ])
        .arg("--out")
        .arg(out);
    if resume {
        c.arg("--resume");
    }
    c
}

/// What a finished run is: every file's bytes (weights, optimizer moments, trainer state
/// with every loss), except `metrics.jsonl`, whose lines hold timings; of those, everything
/// but the timings.
fn finished_run(out: &Path) -> Vec<(String, Vec<u8>)> {
    files(out)
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(out.join(&f)).unwrap();
            if f != "metrics.jsonl" {
                return (f, bytes);
            }
            let lines: Vec<String> = String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v.as_object_mut().unwrap().remove("tokens_per_s");
                    v.to_string()
                })
                .collect();
            (f, lines.join("\n").into_bytes())
        })
        .collect()
}

/// Crashes a run with `crash`, then runs `--resume` (once, or twice when `again` crashes the
/// first resume too) and compares the result with the uninterrupted run.
fn crash_and_resume(
    store: &Path,
    config: &Path,
    out: &Path,
    full: &[(String, Vec<u8>)],
    crash: impl FnOnce(Command) -> Output,
) -> bool {
    let o = crash(distill(store, config, out, false));
    let crashed = !o.status.success();
    let what = out.display();
    let o = distill(store, config, out, true).output().unwrap();
    assert!(o.status.success(), "{what}: {}", text(&o));
    let got = finished_run(out);
    let names = |r: &[(String, Vec<u8>)]| r.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got), names(full), "{what}: files differ");
    for ((name, a), (_, b)) in got.iter().zip(full) {
        assert!(a == b, "{what}: {name} differs from the uninterrupted run");
    }
    crashed
}

#[test]
fn distill_killed_in_steps_and_checkpoint_writes_resumes_to_the_same_weights() {
    let tmp = tempdir();
    let (store, config) = setup(tmp.path());
    let reference = tmp.path().join("full");
    let o = distill(&store, &config, &reference, false)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let full = finished_run(&reference);
    assert!(full.iter().any(|(n, _)| n == "final/model.safetensors"));
    assert!(full
        .iter()
        .any(|(n, _)| n == "checkpoints/step-00000012/optimizer.safetensors"));

    // How often one uninterrupted run passes each point.
    // Its length (a second run, with warm caches like the runs below) spreads the kills.
    let log = tmp.path().join("visits.log");
    let started = Instant::now();
    let o = distill(&store, &config, &tmp.path().join("counted"), false)
        .env(FAULT_LOG_ENV, &log)
        .output()
        .unwrap();
    let run_time = started.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    let logged = std::fs::read_to_string(&log).unwrap();
    let visits = |point: &str| logged.lines().filter(|l| *l == point).count() as u64;
    assert_eq!(visits("train-step"), STEPS);
    let mut cases: Vec<(String, u64)> = Vec::new();
    let mut counts = Vec::new();
    for point in TRAIN_POINTS {
        let n = visits(point);
        if n == 0 {
            // `checkpoint-aside` is only passed when a folder is replaced (below).
            continue;
        }
        counts.push((point, n));
        let mut deliberate = vec![1, 2, n];
        deliberate.dedup();
        cases.extend(deliberate.into_iter().map(|v| (point.to_string(), v)));
    }
    let mut rng = StdRng::seed_from_u64(15);
    for _ in 0..10 {
        let (point, n) = counts[rng.random_range(0..counts.len())];
        cases.push((point.to_string(), rng.random_range(1..=n)));
    }
    let mut crashes = 0;
    for (i, (point, n)) in cases.iter().enumerate() {
        let out = tmp.path().join(format!("fault-{i}"));
        let crashed = crash_and_resume(&store, &config, &out, &full, |mut c| {
            let o = c.env(FAULT_ENV, format!("{point}:{n}")).output().unwrap();
            assert!(aborted(&o), "{point}:{n} did not abort: {}", text(&o));
            o
        });
        crashes += usize::from(crashed);
        std::fs::remove_dir_all(&out).unwrap();
    }

    // A resume of a finished run rewrites `final/`; a crash while the old one is set aside
    // must not lose it.
    let out = tmp.path().join("aside");
    assert!(distill(&store, &config, &out, false)
        .status()
        .unwrap()
        .success());
    let o = distill(&store, &config, &out, true)
        .env(FAULT_ENV, "checkpoint-aside")
        .output()
        .unwrap();
    assert!(aborted(&o), "checkpoint-aside did not abort: {}", text(&o));
    assert!(out.join("final.old").exists() && !out.join("final").exists());
    let o = distill(&store, &config, &out, true).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        finished_run(&out) == full,
        "aside: differs after the resume"
    );
    crashes += 1;

    // SIGKILL at seeded random moments inside the run: once `metrics.jsonl` holds a seeded
    // number of steps (at most 10 of 12), after a seeded delay of up to 2% of a warm run (a step, a
    // validation or a checkpoint write is under way), whatever the machine's load.
    let mut kills = 0;
    let mut instants = Vec::new();
    for i in 0..8 {
        let out = tmp.path().join(format!("kill-{i}"));
        let after_steps = rng.random_range(1..STEPS - 1);
        let delay = run_time.mul_f64(rng.random_range(0.0..0.02));
        let metrics = out.join("metrics.jsonl");
        let crashed = crash_and_resume(&store, &config, &out, &full, |mut c| {
            let mut child = c.spawn().unwrap();
            while child.try_wait().unwrap().is_none() {
                let steps = std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count());
                if steps as u64 >= after_steps {
                    std::thread::sleep(delay);
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            child.kill().ok();
            child.wait_with_output().unwrap()
        });
        kills += usize::from(crashed);
        instants.push((after_steps, delay));
        std::fs::remove_dir_all(&out).unwrap();
    }
    eprintln!(
        "distill: {crashes} fault-point crashes and {kills} of 8 kills (after (steps, delay) \
         {instants:?}) each \
         resumed to the uninterrupted run's files bit for bit (an uninterrupted run took \
         {run_time:?}; visits per run: {counts:?})"
    );
    assert!(kills >= 6, "most kills must land inside the run");
}

/// `calibrate` writes the manifest of a finished store. Killed at any instant, the store's
/// manifest is readable, the store verifies clean, the temperature is either the old one or
/// the fitted one, and a rerun gives the uninterrupted result and leaves no temporary file.
#[test]
fn calibrate_killed_at_any_instant_leaves_a_whole_manifest() {
    let tmp = tempdir();
    let (store, _) = setup(tmp.path());
    let calibrate = |dir: &Path| {
        let mut c = bin();
        c.arg("calibrate").arg(dir);
        c
    };
    let copy = |name: &str| {
        let to = tmp.path().join(name);
        let o = Command::new("cp")
            .arg("-r")
            .arg(&store)
            .arg(&to)
            .output()
            .unwrap();
        assert!(o.status.success());
        to
    };
    let full = copy("full");
    let started = Instant::now();
    let o = calibrate(&full).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let run_time = started.elapsed();
    let fitted = Manifest::load(&full).unwrap().temperature.unwrap().value;
    let store_files = files(&full);

    let check = |dir: &Path, crashed: &Output| {
        let what = dir.display();
        let m = Manifest::load(dir).unwrap_or_else(|e| panic!("{what}: manifest unreadable: {e}"));
        assert!(m.complete, "{what}");
        if let Some(t) = &m.temperature {
            assert_eq!(t.value, fitted, "{what}: a temperature from nowhere");
        }
        let report = verify(dir).unwrap();
        assert!(
            report.problems.iter().all(|p| p.file.ends_with(".tmp")),
            "{what}: {:?} after {}",
            report.problems,
            text(crashed)
        );
        let o = calibrate(dir).output().unwrap();
        assert!(o.status.success(), "{what}: {}", text(&o));
        assert_eq!(
            Manifest::load(dir).unwrap().temperature.unwrap().value,
            fitted
        );
        assert!(verify(dir).unwrap().is_clean(), "{what}");
        assert_eq!(files(dir), store_files, "{what}: left-over files");
    };
    // One writer of a manifest at a time: while another process holds the store's lock,
    // `calibrate` is refused and the manifest is left alone.
    let locked = copy("locked");
    let before = std::fs::read(locked.join("manifest.json")).unwrap();
    let held = firstkd::store::lock::lock(&locked.join("writer.lock"), "test").unwrap();
    let o = calibrate(&locked).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("is writing it now"), "{}", text(&o));
    assert_eq!(std::fs::read(locked.join("manifest.json")).unwrap(), before);
    drop(held);

    let mut crashes = 0;
    for point in ["manifest-tmp", "manifest-renamed"] {
        let dir = copy(point);
        let o = calibrate(&dir).env(FAULT_ENV, point).output().unwrap();
        assert!(aborted(&o), "{point} did not abort: {}", text(&o));
        check(&dir, &o);
        crashes += 1;
    }
    let mut rng = StdRng::seed_from_u64(16);
    let mut kills = 0;
    for i in 0..6 {
        let dir = copy(&format!("kill-{i}"));
        let at = run_time.mul_f64(rng.random_range(0.05..1.0));
        let mut child = calibrate(&dir).spawn().unwrap();
        std::thread::sleep(at.max(Duration::from_millis(1)));
        child.kill().ok();
        let o = child.wait_with_output().unwrap();
        kills += usize::from(!o.status.success());
        check(&dir, &o);
    }
    eprintln!(
        "calibrate: {crashes} fault-point crashes and {kills} of 6 kills (a run took \
         {run_time:?}); the manifest was whole after each"
    );
}
