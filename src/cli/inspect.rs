use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use firstkd::store::inspect::{human_bytes, summarize};

/// Arguments of `firstkd inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Store directory.
    pub store: PathBuf,
    /// Print the summary (with the whole manifest) as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let store = super::StoreDir::open(&args.store)?;
    let s =
        summarize(&store.dir).with_context(|| format!("inspecting {}", args.store.display()))?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &s)?;
        writeln!(out)?;
        return Ok(0);
    }
    let m = &s.manifest;
    let t = &m.teacher;
    writeln!(out, "store            {}", s.path)?;
    writeln!(
        out,
        "format           {} v{} ({})",
        m.format,
        m.schema_version,
        if m.complete { "complete" } else { "INCOMPLETE" }
    )?;
    writeln!(out, "created by       {}", m.created_by)?;
    writeln!(out, "k                {}", m.k)?;
    writeln!(out, "selection        {}", m.selection())?;
    writeln!(out, "log-prob dtype   {}", m.logprob_dtype.name())?;
    writeln!(
        out,
        "teacher          {} ({}, {}, compute {} {})",
        t.file_name, t.architecture, t.quantization, t.compute_dtype, t.compute_mode
    )?;
    writeln!(out, "teacher sha256   {}", t.sha256)?;
    writeln!(
        out,
        "tokenizer        vocab {} sha256 {}",
        m.tokenizer.vocab_size, m.tokenizer.sha256
    )?;
    for (role, tok) in &m.tokenizer.special_tokens {
        writeln!(out, "  {role:<14} {} {:?}", tok.id, tok.text)?;
    }
    match &m.temperature {
        Some(temp) => writeln!(
            out,
            "temperature      {:.4} (objective {}, fitted by {})",
            temp.value, temp.objective, temp.fitted_by
        )?,
        None => writeln!(out, "temperature      not fitted (run firstkd calibrate)")?,
    }
    writeln!(out, "parts            {}", s.parts)?;
    writeln!(out, "samples          {}", s.samples)?;
    writeln!(
        out,
        "label rows       {} ({} in loss)",
        s.label_rows, s.in_loss_rows
    )?;
    writeln!(out, "labels size      {}", human_bytes(s.labels_bytes))?;
    writeln!(out, "samples size     {}", human_bytes(s.samples_bytes))?;
    writeln!(out, "on disk          {}", human_bytes(s.bytes_on_disk))?;
    writeln!(
        out,
        "bytes/token      {:.3} (labels), {:.3} (all files)",
        s.labels_bytes_per_token, s.total_bytes_per_token
    )?;
    if !m.labeling.is_null() {
        writeln!(out, "labelling        {}", m.labeling)?;
    }
    Ok(0)
}
