//! SQL over a store through DataFusion.
//!
//! [`QuerySession::open`] registers, from exactly the parts listed in the store's manifest:
//!
//! * the tables `labels` and `samples` (an unlisted or uncommitted Parquet file in the store's
//!   folders is never read);
//! * the view `tokens`: `labels` plus derived per-token columns (`topk_probs`, `topk_mass`,
//!   `tail_mass`, `top1_prob`, `target_prob`, `target_rank`, `target_is_top1`,
//!   `target_in_topk`);
//! * the scalar functions of [`udf`] (`topk_probs`, `topk_mass`, `topk_probs_at`,
//!   `top1_prob_at`, `target_rank`);
//! * the table functions `manifest()` (the manifest as key/value rows) and `parts()` (one row
//!   per committed part).
//!
//! Queries run on a tokio runtime owned by the session, so callers stay synchronous.
//! docs/sql.md documents every column and function with examples.

pub mod manifest_fn;
pub mod materialize;
pub mod ntile;
pub mod output;
pub mod stats;
pub mod tables;
pub mod udf;

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext};
use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::DataFrame;
use datafusion::sql::parser::{DFParserBuilder, Statement};
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::store::{Manifest, StoreReader};

/// Name of the derived per-token view.
pub const TOKENS_VIEW: &str = "tokens";

/// Rows per batch between operators (DataFusion's `datafusion.execution.batch_size`; its own
/// default is 8,192) under a memory limit of at least [`LARGE_BATCH_MIN_MEMORY`]. Larger
/// batches mean fewer sorted runs to merge and less per-batch work in the window and
/// aggregate operators: the pure-SQL calibration query over 10^7 rows ran in 16.4 s instead
/// of 20.5 s (docs/benchmarks.md). `SET datafusion.execution.batch_size` changes it for a
/// session.
pub const DEFAULT_BATCH_SIZE: usize = 65_536;

/// Below this memory limit batches keep DataFusion's 8,192 rows: each operator that spills
/// gets an equal share of the limit, and under 128 MiB a sort's share no longer held one
/// batch of 65,536 rows (the calibration query failed there instead of spilling).
pub const LARGE_BATCH_MIN_MEMORY: usize = 1 << 30;

/// The batch size for a session under `memory_limit` bytes.
pub fn default_batch_size(memory_limit: usize) -> usize {
    if memory_limit >= LARGE_BATCH_MIN_MEMORY {
        DEFAULT_BATCH_SIZE
    } else {
        8_192
    }
}

/// How to open a store for querying.
#[derive(Debug, Clone, Default)]
pub struct QueryOptions {
    /// Read the committed parts of a store whose writer has not finished (`complete = false`).
    pub allow_incomplete: bool,
    /// DataFusion target partitions (threads per query); 0 = number of CPUs.
    pub target_partitions: usize,
    /// Memory for the operators that buffer (sorts, hash aggregates and joins), in bytes;
    /// past it they spill to the temporary folder or, when they cannot, the query fails with
    /// a "resources exhausted" error. None: [`default_memory_limit`].
    pub memory_limit: Option<usize>,
    /// Inline every common table expression at each reference, as DataFusion plans it,
    /// instead of computing one that is referenced more than once (and does work) once into
    /// temporary files ([`materialize`]). Inlining lets filters reach into the CTE; computing
    /// once avoids rescanning the store for each reference.
    pub inline_ctes: bool,
}

/// Half the memory this process may use: the smaller of the machine's total memory and the
/// cgroup limit (`/sys/fs/cgroup/memory.max`), halved; 4 GiB when neither can be read.
pub fn default_memory_limit() -> usize {
    fn kib_line(text: &str, key: &str) -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| kib_line(&t, "MemTotal:"))
        .map(|kib| kib * 1024);
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    let limit = match (total, cgroup) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => 8 << 30,
    };
    usize::try_from(limit / 2).unwrap_or(usize::MAX)
}

/// A DataFusion session over one store.
pub struct QuerySession {
    ctx: SessionContext,
    inline_ctes: bool,
    /// The memory pool's limit; a quarter of it may hold materialised CTEs.
    memory_limit: usize,
    runtime: tokio::runtime::Runtime,
    reader: StoreReader,
}

impl std::fmt::Debug for QuerySession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuerySession")
            .field("store", &self.reader.dir())
            .finish_non_exhaustive()
    }
}

/// The result of one statement, fully collected.
#[derive(Debug, Clone)]
pub struct QueryResult {
    /// Output schema (also for an empty result).
    pub schema: SchemaRef,
    /// Result rows.
    pub batches: Vec<RecordBatch>,
}

impl QueryResult {
    /// Total number of rows.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// Splits a text holding several `;`-separated SQL statements into statements, using
/// DataFusion's parser (so a `;` inside a string literal or comment does not split).
/// Returns the statements re-rendered as SQL text.
pub fn split_statements(sql: &str) -> Result<Vec<String>> {
    let statements = parse_statements(sql)?;
    Ok(statements.iter().map(ToString::to_string).collect())
}

fn parse_statements(sql: &str) -> Result<Vec<Statement>> {
    let mut parser = DFParserBuilder::new(sql).build()?;
    Ok(parser.parse_statements()?.into_iter().collect())
}

impl QuerySession {
    /// Opens the store at `dir`: checks the manifest and every listed part (schema version,
    /// table, k, dtype, columns) by the store reader's rules, then registers tables, the
    /// `tokens` view, the functions and the table functions.
    pub fn open(dir: &Path, options: &QueryOptions) -> Result<Self> {
        let reader = if options.allow_incomplete {
            StoreReader::open_allow_incomplete(dir)?
        } else {
            StoreReader::open(dir)?
        };
        let limit = options.memory_limit.unwrap_or_else(default_memory_limit);
        let mut config = SessionConfig::new()
            .with_information_schema(true)
            .with_batch_size(default_batch_size(limit));
        if options.target_partitions > 0 {
            config = config.with_target_partitions(options.target_partitions);
        }
        // A fair pool: each operator that can spill gets an equal share, so one sort cannot
        // take all of it and leave another partition's sort or merge none (DataFusion's
        // greedy default failed the calibration query under 2 GiB that way).
        let pool = TrackConsumersPool::new(
            FairSpillPool::new(limit),
            NonZeroUsize::MIN.saturating_add(4),
        );
        let runtime_env = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(pool))
            .build_arc()?;
        let ctx = SessionContext::new_with_config_rt(config, runtime_env);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io(dir, e))?;
        let session = QuerySession {
            ctx,
            inline_ctes: options.inline_ctes,
            memory_limit: limit,
            runtime,
            reader,
        };
        session.register()?;
        Ok(session)
    }

    fn register(&self) -> Result<()> {
        for table in crate::schema::Table::ALL {
            let provider = tables::table_provider(&self.reader, table)?;
            self.ctx.register_table(table.name(), provider)?;
        }
        for f in udf::all_udfs() {
            self.ctx.register_udf(f);
        }
        let manifest = Arc::new(self.reader.manifest().clone());
        self.ctx.register_udtf(
            manifest_fn::MANIFEST_FN,
            Arc::new(manifest_fn::ManifestFunction::new(Arc::clone(&manifest))),
        );
        self.ctx.register_udtf(
            manifest_fn::PARTS_FN,
            Arc::new(manifest_fn::PartsFunction::new(manifest)),
        );
        self.runtime
            .block_on(async { self.ctx.sql(&tokens_view_sql()).await?.collect().await })?;
        Ok(())
    }

    /// The store's manifest.
    pub fn manifest(&self) -> &Manifest {
        self.reader.manifest()
    }

    /// The underlying DataFusion context (for callers that need more than SQL text).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Plans one statement. DDL (`CREATE VIEW ...`) and `SET` are allowed and act on this
    /// session only; DML (`INSERT`, `COPY`) is refused so a query can never write into the
    /// store. A CTE referenced more than once is computed here, once (see [`materialize`]);
    /// the returned guard holds its temporary table and must live until the result is read.
    fn plan(&self, statement: Statement) -> Result<(DataFrame, Option<materialize::Materialized>)> {
        self.runtime.block_on(async {
            let state = self.ctx.state();
            let plan = state.statement_to_plan(statement).await?;
            SQLOptions::new().with_allow_dml(false).verify_plan(&plan)?;
            // Before the materialisation: the rewrite plans an ntile's input twice, and an
            // input that does work is then computed once.
            let plan = ntile::rewrite_ntile(plan)?;
            let (plan, guard) = if self.inline_ctes {
                (plan, None)
            } else {
                materialize::materialize_repeated(&self.ctx, plan, self.memory_limit / 4).await?
            };
            Ok((self.ctx.execute_logical_plan(plan).await?, guard))
        })
    }

    fn single_statement(&self, sql: &str) -> Result<Statement> {
        let mut statements = parse_statements(sql)?;
        match statements.len() {
            1 => Ok(statements.remove(0)),
            n => Err(Error::InvalidArgument(format!(
                "expected exactly one SQL statement, found {n} (use run_script for several)"
            ))),
        }
    }

    /// Runs one statement and collects its result.
    pub fn sql(&self, sql: &str) -> Result<QueryResult> {
        let statement = self.single_statement(sql)?;
        self.collect(statement)
    }

    fn collect(&self, statement: Statement) -> Result<QueryResult> {
        let (df, _guard) = self.plan(statement)?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let batches = self.runtime.block_on(df.collect())?;
        Ok(QueryResult { schema, batches })
    }

    /// Runs one statement and hands each result batch to `f` as it is produced (bounded
    /// memory for large results). Returns the output schema.
    pub fn for_each_batch(
        &self,
        sql: &str,
        mut f: impl FnMut(&RecordBatch) -> Result<()>,
    ) -> Result<SchemaRef> {
        let statement = self.single_statement(sql)?;
        self.stream_statement(statement, &mut f)
    }

    fn stream_statement(
        &self,
        statement: Statement,
        f: &mut dyn FnMut(&RecordBatch) -> Result<()>,
    ) -> Result<SchemaRef> {
        let (df, _guard) = self.plan(statement)?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        self.runtime.block_on(async {
            let mut stream = df.execute_stream().await?;
            while let Some(batch) = stream.next().await {
                f(&batch?)?;
            }
            Ok::<(), Error>(())
        })?;
        Ok(schema)
    }

    /// Runs every `;`-separated statement of `script` in order, reporting each statement's
    /// schema and then its batches to `on_event`. Returns the number of statements. Nothing
    /// runs if the script does not parse; a statement that fails stops the script.
    pub fn run_script(
        &self,
        script: &str,
        on_event: &mut dyn FnMut(ScriptEvent<'_>) -> Result<()>,
    ) -> Result<usize> {
        let statements = parse_statements(script)?;
        if statements.is_empty() {
            return Err(Error::InvalidArgument("no SQL statement given".into()));
        }
        let n = statements.len();
        for (i, statement) in statements.into_iter().enumerate() {
            let (df, _guard) = self.plan(statement)?;
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            on_event(ScriptEvent::Start(i, &schema))?;
            self.runtime.block_on(async {
                let mut stream = df.execute_stream().await?;
                while let Some(batch) = stream.next().await {
                    on_event(ScriptEvent::Batch(i, &batch?))?;
                }
                Ok::<(), Error>(())
            })?;
        }
        Ok(n)
    }
}

/// What [`QuerySession::run_script`] reports.
#[derive(Debug)]
pub enum ScriptEvent<'a> {
    /// Statement `i` (0-based) starts; its result has this schema (no columns for DDL).
    Start(usize, &'a SchemaRef),
    /// A batch of statement `i`'s result.
    Batch(usize, &'a RecordBatch),
}

/// The SQL that defines the `tokens` view.
pub fn tokens_view_sql() -> String {
    format!(
        "CREATE VIEW {TOKENS_VIEW} AS SELECT \
           sample_id, position, target_id, in_loss, topk_ids, topk_logprobs, target_logprob, entropy, \
           topk_probs(topk_logprobs) AS topk_probs, \
           topk_mass(topk_logprobs) AS topk_mass, \
           1.0 - topk_mass(topk_logprobs) AS tail_mass, \
           topk_mass(topk_logprobs, 1) AS top1_prob, \
           exp(CAST(target_logprob AS DOUBLE)) AS target_prob, \
           target_rank(topk_ids, target_id) AS target_rank, \
           coalesce(target_rank(topk_ids, target_id) = 1, false) AS target_is_top1, \
           target_rank(topk_ids, target_id) IS NOT NULL AS target_in_topk \
         FROM labels"
    )
}
