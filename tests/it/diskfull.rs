//! The file-system rows of docs/reliability.md's bad-input table: a disk that fills up while
//! `label` or `distill` writes, a read-only output folder, and a huge JSONL line. Each run
//! happens inside a private mount namespace (`unshare -rm`, so no root is needed where user
//! namespaces are allowed) on a small tmpfs that vanishes with it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use firstkd::store::{verify, Manifest};

use crate::util::{firstkd, in_ci, label_args, label_rows, teacher_path, tempdir, text};

/// Runs `script` with `sh` in a private mount namespace, with `$MNT` an empty folder it may
/// mount on. None (a skip, or a failure under CI) when no such namespace can be made here.
fn in_namespace(mnt: &Path, script: &str) -> Option<Output> {
    let probe = Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs \"$1\""])
        .arg("sh")
        .arg(mnt)
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        let why = match probe {
            Ok(o) => text(&o),
            Err(e) => e.to_string(),
        };
        assert!(!in_ci(), "cannot mount a tmpfs in a mount namespace: {why}");
        eprintln!("skipping: cannot mount a tmpfs in a mount namespace here ({why})");
        return None;
    }
    let o = Command::new("unshare")
        .args(["-rm", "sh", "-c", script])
        .env("MNT", mnt)
        .env("BIN", env!("CARGO_BIN_EXE_firstkd"))
        .output()
        .unwrap();
    Some(o)
}

/// What the namespace's script wrote to `dir/NAME` (empty when it wrote nothing).
fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// A shell word for `p`.
fn quoted(p: impl AsRef<std::ffi::OsStr>) -> String {
    format!("'{}'", p.as_ref().to_string_lossy().replace('\'', r"'\''"))
}

fn command_line(args: &[String]) -> String {
    let mut line = "\"$BIN\"".to_string();
    for a in args {
        line.push(' ');
        line.push_str(&quoted(a));
    }
    line
}

/// Total bytes of the files below `dir`.
fn bytes_below(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        total += if p.is_dir() {
            bytes_below(&p)
        } else {
            p.metadata().unwrap().len()
        };
    }
    total
}

/// Checks a failed run's report: exit 2, no panic, and the reason names `needle`.
fn refused(status: &str, log: &str, needle: &str) {
    assert_eq!(status.trim(), "2", "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains(needle), "wanted {needle:?} in: {log}");
}

#[test]
fn label_on_a_full_disk_fails_cleanly_and_resumes_when_space_is_freed() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/chat.jsonl");
    let extra = ["--part-sequences", "1"];
    let full = tmp.path().join("full");
    let args = label_args(&model, &full, &input, &extra);
    let o = firstkd(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", text(&o));
    let size = bytes_below(&full);
    let parts = Manifest::load(&full).unwrap().parts.len();
    assert!(parts >= 3);

    // A tmpfs that holds about half the store: the run fills it part-way.
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let report = tmp.path().join("report");
    std::fs::create_dir(&report).unwrap();
    let store = mnt.join("store");
    let label = command_line(&label_args(&model, &store, &input, &extra));
    let r = quoted(&report);
    let kept = quoted(tmp.path().join("kept"));
    let script = format!(
        "mount -t tmpfs -o size={half} tmpfs \"$MNT\" || exit 9
         {label} > {r}/first.log 2>&1; echo $? > {r}/first.rc
         find \"$MNT/store\" -name '.*' > {r}/temporaries.txt
         \"$BIN\" verify \"$MNT/store\" > {r}/verify.log 2>&1; echo $? > {r}/verify.rc
         cp -r \"$MNT/store\" {r}/after-failure
         mount -o remount,size=64m \"$MNT\" || exit 9
         {label} > {r}/second.log 2>&1; echo $? > {r}/second.rc
         cp -r \"$MNT/store\" {kept}",
        half = (size / 2).div_ceil(4096) * 4096,
    );
    let Some(o) = in_namespace(&mnt, &script) else {
        return;
    };
    assert!(o.status.success(), "{}", text(&o));
    let first = read(&report, "first.log");
    refused(
        &read(&report, "first.rc"),
        &first,
        "No space left on device",
    );
    assert!(first.contains(&store.display().to_string()), "{first}");
    assert_eq!(read(&report, "temporaries.txt"), "", "temporary files left");
    assert_ne!(
        read(&report, "verify.rc").trim(),
        "0",
        "a full disk's store verified"
    );
    let left = report.join("after-failure");
    assert!(Manifest::load(&left).map(|m| !m.complete).unwrap_or(true));
    assert_eq!(
        read(&report, "second.rc").trim(),
        "0",
        "{}",
        read(&report, "second.log")
    );
    let kept = tmp.path().join("kept");
    assert!(verify(&kept).unwrap().is_clean());
    assert_eq!(
        label_rows(&kept),
        label_rows(&full),
        "rows after the resume"
    );
}

#[test]
fn a_read_only_output_folder_is_refused_and_a_store_in_it_is_untouched() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/chat.jsonl");
    let extra = ["--part-sequences", "1"];
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let report = tmp.path().join("report");
    std::fs::create_dir(&report).unwrap();
    let r = quoted(&report);
    let new_store = command_line(&label_args(&model, &mnt.join("new"), &input, &extra));
    let old_store = command_line(&label_args(&model, &mnt.join("old"), &input, &extra));
    // `old` is a store interrupted after its second part: a rerun would resume it, but on a
    // read-only file system it must be refused and left as it was.
    let script = format!(
        "mount -t tmpfs -o size=64m tmpfs \"$MNT\" || exit 9
         FIRSTKD_FAULT=manifest-pending:2 {old_store} > /dev/null 2>&1
         (cd \"$MNT\" && find old -type f | sort | xargs sha256sum) > {r}/before.sums
         mount -o remount,ro \"$MNT\" || exit 9
         {new_store} > {r}/new.log 2>&1; echo $? > {r}/new.rc
         {old_store} > {r}/old.log 2>&1; echo $? > {r}/old.rc
         (cd \"$MNT\" && find old -type f | sort | xargs sha256sum) > {r}/after.sums"
    );
    let Some(o) = in_namespace(&mnt, &script) else {
        return;
    };
    assert!(o.status.success(), "{}", text(&o));
    refused(
        &read(&report, "new.rc"),
        &read(&report, "new.log"),
        "Read-only file system",
    );
    assert!(read(&report, "new.log").contains(&mnt.join("new").display().to_string()));
    refused(
        &read(&report, "old.rc"),
        &read(&report, "old.log"),
        "Read-only file system",
    );
    let before = read(&report, "before.sums");
    assert!(before.contains("manifest.json"), "{before}");
    assert_eq!(before, read(&report, "after.sums"), "the store was changed");
}

#[test]
fn distill_on_a_full_disk_fails_cleanly_and_resumes_to_the_same_weights() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    let o = firstkd(&[
        "synth",
        store.to_str().unwrap(),
        "--rows",
        "20000",
        "--vocab",
        "512",
        "--seed",
        "4",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let config = tmp.path().join("student.json");
    let cfg = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
    });
    std::fs::write(&config, cfg.to_string()).unwrap();
    let args = |out: &Path| -> Vec<String> {
        [
            "distill",
            "--store",
            store.to_str().unwrap(),
            "--init",
            &format!("random:{}", config.display()),
            "--loss",
            "kd",
            "--steps",
            "6",
            "--batch-tokens",
            "256",
            "--checkpoint-every",
            "2",
            "--keep-checkpoints",
            "1",
            "--seed",
            "2",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let full = tmp.path().join("full");
    let a = args(&full);
    let o = firstkd(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", text(&o));
    let weights = std::fs::read(full.join("final/model.safetensors")).unwrap();

    // Room for about one checkpoint: the second cannot be written beside it.
    let checkpoint = bytes_below(&full.join("checkpoints"));
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let report = tmp.path().join("report");
    std::fs::create_dir(&report).unwrap();
    let r = quoted(&report);
    let run: PathBuf = mnt.join("run");
    let first = command_line(&args(&run));
    let mut again = args(&run);
    again.push("--resume".into());
    let again = command_line(&again);
    let script = format!(
        "mount -t tmpfs -o size={room} tmpfs \"$MNT\" || exit 9
         {first} > {r}/first.log 2>&1; echo $? > {r}/first.rc
         ls -R \"$MNT/run\" > {r}/after-failure.ls
         mount -o remount,size=64m \"$MNT\" || exit 9
         {again} > {r}/second.log 2>&1; echo $? > {r}/second.rc
         cp \"$MNT/run/final/model.safetensors\" {r}/weights",
        room = (checkpoint * 3 / 2).div_ceil(4096) * 4096,
    );
    let Some(o) = in_namespace(&mnt, &script) else {
        return;
    };
    assert!(o.status.success(), "{}", text(&o));
    refused(
        &read(&report, "first.rc"),
        &read(&report, "first.log"),
        "No space left on device",
    );
    let listing = read(&report, "after-failure.ls");
    assert!(!listing.lines().any(|l| l == "final"), "{listing}");
    assert!(
        !listing
            .lines()
            .any(|l| l.trim_end_matches(':').ends_with(".tmp")),
        "a half-written checkpoint was left: {listing}"
    );
    assert_eq!(
        read(&report, "second.rc").trim(),
        "0",
        "{}",
        read(&report, "second.log")
    );
    let resumed = std::fs::read(report.join("weights")).unwrap();
    assert!(resumed == weights, "the resumed run's weights differ");
}

#[test]
fn a_huge_jsonl_line_is_refused_without_reading_it_whole() {
    let Some(model) = teacher_path() else { return };
    let tmp = tempdir();
    let input = tmp.path().join("huge.jsonl");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
        writeln!(f, "{{\"text\": \"A short first record.\"}}").unwrap();
        f.write_all(b"{\"text\": \"").unwrap();
        let block = "all work and no play ".repeat(50_000);
        for _ in 0..(100 << 20) / block.len() {
            f.write_all(block.as_bytes()).unwrap();
        }
        f.write_all(b"\"}\n").unwrap();
        writeln!(f, "{{\"text\": \"A short last record.\"}}").unwrap();
    }
    let out = tmp.path().join("out");
    let args = label_args(&model, &out, &input, &[]);
    let o = firstkd(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let t = text(&o);
    refused(
        &o.status.code().unwrap_or(-1).to_string(),
        &t,
        "huge.jsonl:2",
    );
    assert!(t.contains("longer than the limit"), "{t}");
    assert!(t.contains("--max-record-bytes"), "{t}");
    assert!(Manifest::load(&out).map(|m| !m.complete).unwrap_or(true));

    // Skipped, the records around it are labelled.
    let out = tmp.path().join("skipped");
    let args = label_args(&model, &out, &input, &["--skip-invalid"]);
    let o = firstkd(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", text(&o));
    let m = Manifest::load(&out).unwrap();
    assert!(m.complete);
    let records: std::collections::BTreeSet<u64> =
        label_rows(&out).iter().map(|r| r.0 .0).collect();
    assert_eq!(records.len(), 2, "{records:?}");
}
