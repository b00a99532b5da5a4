//! Crash tests that really crash `firstkd label` on the real SmolLM2-135M teacher: the process
//! aborts at every dangerous point of the commit protocol (the fault-injection hook,
//! `FIRSTKD_FAULT`, src/store/fault.rs), at seeded random visits of those points, and under
//! `SIGKILL` at seeded random instants; after each, the same command is run again and the
//! store must equal an uninterrupted run row for row and file for file, verify clean, and hold
//! no temporary or unlisted file. docs/reliability.md lists what this observed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use firstkd::store::fault::{FAULT_ENV, FAULT_LOG_ENV, POINTS};
use firstkd::store::{verify, Manifest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::util::{files_below as files, label_args, label_rows, teacher_path, tempdir, text};

fn args(model: &Path, out: &Path) -> Vec<String> {
    let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/chat.jsonl");
    // One sequence per part: four parts, so a crash can land between commits.
    label_args(model, out, &input, &["--part-sequences", "1"])
}

fn command(model: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_firstkd"));
    c.args(args(model, out))
        .env_remove(FAULT_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// What a finished store is made of: its files (the lock file aside) and each part's sha256.
fn shape(dir: &Path) -> (Vec<String>, Vec<(String, String)>) {
    let listed = Manifest::load(dir)
        .unwrap()
        .parts
        .iter()
        .map(|p| (p.labels.sha256.clone(), p.samples.sha256.clone()))
        .collect();
    let files = files(dir)
        .into_iter()
        .filter(|f| f != "writer.lock")
        .collect();
    (files, listed)
}

struct Outcome {
    crashed: bool,
    parts_before_rerun: usize,
}

/// Runs `crash` (a started child to be crashed or killed), then the same command again, and
/// checks the store against the uninterrupted one.
fn crash_and_resume(
    model: &Path,
    dir: &Path,
    full: &Path,
    crash: impl FnOnce(Command) -> std::process::Output,
) -> Outcome {
    let out = crash(command(model, dir));
    let crashed = !out.status.success();
    let what = dir.display().to_string();
    // A crashed run leaves either an incomplete store that does not verify, or, when it
    // died after the rename of the final manifest, a complete store that does.
    let (parts_before_rerun, complete) = match Manifest::load(dir) {
        Ok(m) => (m.parts.len(), m.complete),
        Err(_) => (0, false),
    };
    if crashed && dir.exists() {
        let clean = verify(dir).map(|r| r.is_clean()).unwrap_or(false);
        assert_eq!(
            clean, complete,
            "{what}: complete {complete} but verify clean {clean}"
        );
        if complete {
            assert_eq!(
                label_rows(dir),
                label_rows(full),
                "{what}: complete but rows differ"
            );
        }
    }
    let rerun = command(model, dir).output().unwrap();
    assert!(rerun.status.success(), "{what}: {}", text(&rerun));
    assert!(verify(dir).unwrap().is_clean(), "{what}");
    assert_eq!(label_rows(dir), label_rows(full), "{what}: rows differ");
    assert_eq!(shape(dir), shape(full), "{what}: files differ");
    Outcome {
        crashed,
        parts_before_rerun,
    }
}

fn aborted(out: &std::process::Output) -> bool {
    use std::os::unix::process::ExitStatusExt;
    out.status.signal() == Some(6)
}

#[test]
fn crashes_at_every_commit_point_and_at_random_instants_lose_and_duplicate_nothing() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    let full = tmp.path().join("full");
    let started = Instant::now();
    let o = command(&model, &full).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let run_time = started.elapsed();

    // How often each point is passed by one uninterrupted run (the hook's log): a visit past
    // the last one cannot crash, and the seeded cases below draw from the real range.
    let log = tmp.path().join("visits.log");
    let counted = tmp.path().join("counted");
    let o = command(&model, &counted)
        .env(FAULT_LOG_ENV, &log)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let logged = std::fs::read_to_string(&log).unwrap();
    let visits = |point: &str| logged.lines().filter(|l| *l == point).count() as u64;
    let mut cases: Vec<(String, u64)> = Vec::new();
    let mut counts = Vec::new();
    for point in POINTS {
        let n = visits(point);
        assert!(n >= 2, "{point} is passed {n} times");
        counts.push((point, n));
        // The dangerous points deliberately: the first visit (for the manifest, while the
        // store is being created), the second (the first part's commit) and the last.
        for visit in [1, 2, n] {
            cases.push((point.to_string(), visit));
        }
    }
    // Twenty seeded random (point, visit) pairs.
    let mut rng = StdRng::seed_from_u64(15);
    for _ in 0..20 {
        let (point, n) = counts[rng.random_range(0..counts.len())];
        cases.push((point.to_string(), rng.random_range(1..=n)));
    }
    let mut crashes = 0;
    for (i, (point, n)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("fault-{i}"));
        let outcome = crash_and_resume(&model, &dir, &full, |mut c| {
            let out = c.env(FAULT_ENV, format!("{point}:{n}")).output().unwrap();
            assert!(aborted(&out), "{point}:{n} did not abort: {}", text(&out));
            out
        });
        assert!(outcome.crashed);
        crashes += 1;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // SIGKILL at seeded random instants over the length of a whole run (forward passes
    // included, which no fault point covers).
    let mut kills = 0;
    for i in 0..6 {
        let dir = tmp.path().join(format!("kill-{i}"));
        let at = run_time.mul_f64(rng.random_range(0.05..0.95));
        let outcome = crash_and_resume(&model, &dir, &full, |mut c| {
            let mut child = c.spawn().unwrap();
            std::thread::sleep(at);
            child.kill().ok();
            child.wait_with_output().unwrap()
        });
        kills += usize::from(outcome.crashed);
        eprintln!(
            "kill at {:?}: crashed {}, {} parts committed before the rerun",
            at, outcome.crashed, outcome.parts_before_rerun
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!(
        "{crashes} fault-point crashes and {kills} kills, each resumed to the uninterrupted \
         store (an uninterrupted run took {run_time:?}; visits per run: {counts:?}); 0 rows \
         lost, 0 duplicated"
    );
}

/// Power loss, not only process death: the system calls of a real `label` run, recorded with
/// `strace -y`, make each commit durable in the order docs/reliability.md states. Every
/// renamed file was fsynced before its rename; every renamed part's folder is fsynced before
/// the next manifest rename; every manifest rename is followed by an fsync of the store
/// folder; and the store folder's entry in its parent is fsynced once it exists.
#[test]
fn commits_fsync_files_then_rename_then_fsync_folders() {
    let Some(model) = teacher_path() else { return };
    if Command::new("strace").arg("-V").output().is_err() {
        assert!(
            !crate::util::in_ci(),
            "strace is missing (scripts/test.sh installs it)"
        );
        eprintln!("skipping: strace is not installed");
        return;
    }
    let tmp = tempdir();
    let dir = tmp.path().join("store");
    let log = tmp.path().join("strace.log");
    let o = Command::new("strace")
        .args([
            "-f",
            "-y",
            "-qq",
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2",
        ])
        .arg("-o")
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_firstkd"))
        .args(args(&model, &dir))
        .env_remove(FAULT_ENV)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // (call, first path) per line: `fsync(5</a/b>) = 0`, `rename("/a/.x.tmp", "/a/x") = 0`.
    let events: Vec<(String, String, String)> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let l = l.split_once(' ').map_or(l, |(_, rest)| rest).trim();
            let (call, rest) = l.split_once('(')?;
            if call.starts_with("fsync") || call.starts_with("fdatasync") {
                let path = rest.split_once('<')?.1.split_once('>')?.0;
                Some(("fsync".into(), path.to_string(), String::new()))
            } else {
                let mut quoted = rest.split('"').skip(1).step_by(2);
                let (from, to) = (quoted.next()?, quoted.next()?);
                Some(("rename".into(), from.to_string(), to.to_string()))
            }
        })
        .collect();
    let parent = |p: &str| {
        Path::new(p)
            .parent()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let store = dir.to_string_lossy().into_owned();
    let mut synced_files = std::collections::HashSet::new();
    let mut folders_to_sync = std::collections::HashSet::new();
    let (mut parts, mut manifests) = (0, 0);
    for (i, (call, a, b)) in events.iter().enumerate() {
        match call.as_str() {
            "fsync" => {
                synced_files.insert(a.clone());
                folders_to_sync.remove(a);
            }
            _ => {
                assert!(
                    synced_files.contains(a),
                    "{a} renamed before it was fsynced"
                );
                if b.ends_with(".parquet") {
                    parts += 1;
                    folders_to_sync.insert(parent(b));
                } else if b.ends_with("manifest.json") {
                    manifests += 1;
                    assert!(
                        folders_to_sync.is_empty(),
                        "manifest renamed before {folders_to_sync:?} were fsynced"
                    );
                    assert_eq!(
                        events.get(i + 1).map(|e| (e.0.as_str(), e.1.as_str())),
                        Some(("fsync", store.as_str())),
                        "the store folder is fsynced right after the manifest rename"
                    );
                }
            }
        }
    }
    assert_eq!(parts, 2 * 4, "four parts of two files each");
    assert!(manifests >= 5, "a manifest per commit, {manifests} seen");
    assert!(
        synced_files.contains(&parent(&store)),
        "the store folder's parent is fsynced"
    );
}

/// Four `label --shard i/4` processes into one store at the same time, crashed at seeded
/// random (point, visit) pairs and one of them SIGKILLed at a random instant in each round;
/// every unfinished shard is rerun (all at once again) until the store is committed. The
/// store verifies clean, equals one process's run row for row and holds no temporary file.
#[test]
fn concurrent_shards_crashed_in_rounds_equal_one_process() {
    let Some(model) = teacher_path() else { return };
    let Some(input) = firstkd::testing::require_shared("data/alpaca_en_demo/alpaca_en_demo.json")
    else {
        return;
    };
    let tmp = tempdir();
    let base = [
        "--format",
        "alpaca",
        "--limit",
        "16",
        "--part-sequences",
        "1",
    ];
    let shard_args = |out: &Path, shard: Option<usize>| {
        let spec = shard.map(|i| format!("{i}/4"));
        let mut extra: Vec<&str> = base.to_vec();
        if let Some(s) = &spec {
            extra.extend(["--shard", s.as_str()]);
        }
        label_args(&model, out, &input, &extra)
    };
    let bin = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_firstkd"));
        c.env_remove(FAULT_ENV)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let full = tmp.path().join("full");
    let o = bin().args(shard_args(&full, None)).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));

    let store = tmp.path().join("sharded");
    let mut rng = StdRng::seed_from_u64(17);
    let mut unfinished: Vec<usize> = (0..4).collect();
    let (mut crashes, mut kills, mut rounds) = (0, 0, 0);
    while !unfinished.is_empty() {
        rounds += 1;
        assert!(
            rounds <= 8,
            "shards {unfinished:?} still unfinished after 7 rounds"
        );
        // The last allowed round runs without faults.
        let faulty = rounds < 7;
        let victim = unfinished[rng.random_range(0..unfinished.len())];
        let mut children = Vec::new();
        for &i in &unfinished {
            let mut c = bin();
            c.args(shard_args(&store, Some(i)));
            if faulty && i != victim {
                let point = POINTS[rng.random_range(0..POINTS.len())];
                c.env(FAULT_ENV, format!("{point}:{}", rng.random_range(1..=5)));
            }
            children.push((i, c.spawn().unwrap()));
        }
        if faulty {
            std::thread::sleep(std::time::Duration::from_millis(
                rng.random_range(300..3000),
            ));
            if let Some((_, child)) = children.iter_mut().find(|(i, _)| *i == victim) {
                if child.try_wait().unwrap().is_none() {
                    child.kill().unwrap();
                    kills += 1;
                }
            }
        }
        let mut still = Vec::new();
        for (i, child) in children {
            let o = child.wait_with_output().unwrap();
            if o.status.success() {
                continue;
            }
            use std::os::unix::process::ExitStatusExt;
            let signal = o.status.signal();
            assert!(
                matches!(signal, Some(6) | Some(9)),
                "shard {i}/4 failed without a crash: {}",
                text(&o)
            );
            crashes += usize::from(signal == Some(6));
            still.push(i);
        }
        unfinished = still;
    }
    let m = Manifest::load(&store).unwrap();
    assert!(
        m.complete,
        "all shards finished but the store is not committed"
    );
    assert_eq!(m.parts.len(), 16);
    assert!(verify(&store).unwrap().is_clean());
    assert_eq!(label_rows(&store), label_rows(&full), "rows differ");
    let left: Vec<String> = files(&store)
        .into_iter()
        .filter(|f| f.rsplit('/').next().is_some_and(|n| n.starts_with('.')))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    eprintln!(
        "4 concurrent shards: {crashes} fault-point crashes and {kills} kills over {rounds} \
         rounds; the store equals one process's run"
    );
}
