use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;
use firstkd::schema::Table;
use firstkd::store::remote::Location;
use firstkd::store::shards;
use firstkd::store::Manifest;

/// Arguments of `firstkd status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Store: a directory or `s3://bucket/prefix`.
    pub store: PathBuf,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct Row {
    shard: String,
    state: String,
    parts: usize,
    samples: u64,
    label_rows: u64,
    /// Resume cursor: every sequence of the shard below it is committed.
    next_seq: Option<u64>,
    /// Seconds since the Unix epoch of the last commit.
    last_commit: Option<u64>,
}

fn row(shard: String, m: &Manifest, modified: Option<SystemTime>) -> Row {
    Row {
        shard,
        state: if m.complete { "complete" } else { "writing" }.into(),
        parts: m.parts.len(),
        samples: m.rows(Table::Samples),
        label_rows: m.rows(Table::Labels),
        next_seq: m.cursor["next_seq"]
            .as_u64()
            .filter(|&n| !m.complete && n != u64::MAX),
        last_commit: modified
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs()),
    }
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let (dir, times): (PathBuf, HashMap<String, SystemTime>) = match Location::parse(&args.store)? {
        Location::Local(dir) => (dir, HashMap::new()),
        Location::Remote(remote) => remote
            .pull_status()
            .with_context(|| format!("reading {}", remote.url()))?,
    };
    let modified = |rel: &str| {
        times.get(rel).copied().or_else(|| {
            std::fs::metadata(dir.join(rel))
                .and_then(|m| m.modified())
                .ok()
        })
    };
    let shard_states = shards::scan(&dir)?;
    let store = if Manifest::path(&dir).exists() {
        Some(Manifest::load(&dir).with_context(|| format!("reading {}", args.store.display()))?)
    } else {
        None
    };
    if store.is_none() && shard_states.is_empty() {
        anyhow::bail!(
            "{}: not a firstkd store (no manifest.json and no shards/)",
            args.store.display()
        );
    }
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    for s in &shard_states {
        let name = format!("{}/{}", s.slot.index, s.slot.count);
        match &s.manifest {
            Ok(m) => rows.push(row(name, m, modified(&s.slot.manifest_rel()))),
            Err(e) => problems.push(format!("shard {name}: {e}")),
        }
    }
    let count = shard_states.first().map(|s| s.slot.count);
    let committed = store.as_ref().is_some_and(|m| m.complete);
    let summary = match (&store, count) {
        (Some(m), _) => row("store".into(), m, modified("manifest.json")),
        (None, Some(n)) => Row {
            shard: "store".into(),
            state: format!(
                "not committed: {} of {n} shards complete",
                rows.iter().filter(|r| r.state == "complete").count()
            ),
            parts: rows.iter().map(|r| r.parts).sum(),
            samples: rows.iter().map(|r| r.samples).sum(),
            label_rows: rows.iter().map(|r| r.label_rows).sum(),
            next_seq: None,
            last_commit: rows.iter().filter_map(|r| r.last_commit).max(),
        },
        (None, None) => anyhow::bail!("{}: not a firstkd store", args.store.display()),
    };
    if args.json {
        let v = serde_json::json!({
            "store": args.store.display().to_string(),
            "committed": committed,
            "shard_count": count,
            "shards": rows,
            "total": summary,
            "problems": problems,
        });
        serde_json::to_writer_pretty(&mut *out, &v)?;
        writeln!(out)?;
        return Ok(0);
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ago = |t: Option<u64>| {
        t.map_or("-".to_string(), |t| {
            format!("{} s ago", now.saturating_sub(t))
        })
    };
    let mut table = Vec::new();
    for r in rows.iter().chain(std::iter::once(&summary)) {
        table.push(vec![
            r.shard.clone(),
            r.state.clone(),
            r.parts.to_string(),
            r.samples.to_string(),
            r.label_rows.to_string(),
            r.next_seq.map_or("-".into(), |n| n.to_string()),
            ago(r.last_commit),
        ]);
    }
    let header: Vec<String> = [
        "shard",
        "state",
        "parts",
        "samples",
        "label rows",
        "next seq",
        "last commit",
    ]
    .map(String::from)
    .to_vec();
    super::print_table(&header, &table, 2, out)?;
    for p in &problems {
        writeln!(out, "problem: {p}")?;
    }
    Ok(if problems.is_empty() { 0 } else { 1 })
}
