use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use firstkd::query::output::{Destination, OutputFormat, ResultWriter};
use firstkd::query::{QueryOptions, QuerySession, ScriptEvent};

/// Arguments of `firstkd sql`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Store directory.
    pub store: PathBuf,
    /// SQL to run (several statements separated by `;`). Tables: labels, samples; view:
    /// tokens; table functions: manifest(), parts(). See docs/sql.md.
    pub query: Option<String>,
    /// Read the SQL from this file instead (statements separated by `;`).
    #[arg(long, short = 'f', conflicts_with = "query")]
    pub file: Option<PathBuf>,
    /// Output format: table, csv, jsonl or parquet.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
    /// Write the results to this file instead of stdout (required for parquet).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Query the committed parts of a store whose writer has not finished.
    #[arg(long)]
    pub allow_incomplete: bool,
    /// Memory for sorts, aggregates and joins (bytes, or with K, M, G); past it they spill
    /// to the temporary folder or the query fails with a clear error. Default: half the
    /// machine's (or the cgroup's) memory.
    #[arg(long, value_parser = super::parse_bytes)]
    pub memory_limit: Option<usize>,
    /// Inline every WITH query at each of its references (DataFusion's own planning) instead
    /// of computing one that is referenced more than once once, into temporary files. Use it
    /// when the references filter a large CTE down to little.
    #[arg(long)]
    pub inline_ctes: bool,
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let store = super::StoreDir::open(&args.store)?;
    let sql = match (&args.query, &args.file) {
        (Some(q), None) => q.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading SQL from {}", path.display()))?,
        _ => bail!("give a query or --file FILE"),
    };
    let format = args.format;
    let options = QueryOptions {
        allow_incomplete: args.allow_incomplete,
        memory_limit: args.memory_limit,
        inline_ctes: args.inline_ctes,
        ..QueryOptions::default()
    };
    let session = QuerySession::open(&store.dir, &options)
        .with_context(|| format!("opening {}", args.store.display()))?;
    let destination = match &args.output {
        Some(path) => Destination::File(path.clone()),
        None => Destination::Stream(&mut *out),
    };
    let mut writer = ResultWriter::new(format, destination)?;
    session
        .run_script(&sql, &mut |event| match event {
            ScriptEvent::Start(_, schema) => writer.start(schema),
            ScriptEvent::Batch(_, batch) => writer.write(batch),
        })
        .map_err(query_error)?;
    let (rows, results) = (writer.rows(), writer.results());
    writer.finish()?;
    if let Some(path) = &args.output {
        writeln!(
            out,
            "wrote {rows} row(s) from {results} result(s) to {}",
            path.display()
        )?;
    }
    Ok(0)
}

/// A DataFusion error as one line (its Display already holds the causes; anyhow's `{:#}`
/// would repeat them). Other errors keep their chain, so a broken pipe is still recognised.
pub fn query_error(err: firstkd::Error) -> anyhow::Error {
    match err {
        firstkd::Error::DataFusion(_) if err.to_string().contains("Resources exhausted") => {
            anyhow::anyhow!(
                "{err}\nthe query needs more memory than --memory-limit allows \
                 (default: half the machine's); raise it, or narrow the query"
            )
        }
        firstkd::Error::DataFusion(_) => anyhow::anyhow!("{err}"),
        other => other.into(),
    }
}
