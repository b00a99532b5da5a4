//! Common table expressions referenced more than once are computed once.
//!
//! DataFusion inlines a `WITH` query at every reference, so a CTE read by four branches of a
//! `UNION ALL` and then by two later CTEs runs eight times (each time scanning and joining the
//! store again). [`materialize_repeated`] finds, in a planned statement, every subquery that
//! appears at least twice and does real work (a join, aggregate, window, sort, limit or
//! `DISTINCT`), runs it once and replaces each occurrence with a scan of the result.
//! Innermost first: a repeated CTE that reads another repeated CTE reads its result. DuckDB
//! and PostgreSQL materialise such CTEs in the same way.
//!
//! The result is held in memory while it fits a budget (a quarter of the session's memory
//! limit for all of a statement's CTEs, reserved from the session's memory pool, so the
//! other operators see it). Past the budget it goes to temporary Arrow IPC files instead,
//! one per output partition, written as the batches arrive, so memory stays bounded.
//! Reading batches held in memory costs nothing; writing and reading the files costs a copy
//! each way (docs/benchmarks.md measures the difference on the calibration query).
//!
//! The held batches, their reservation and the files (in a temporary folder) are owned by
//! the returned [`Materialized`]; dropping it removes the tables from the session, frees
//! the memory and removes the files from disk. Recursive queries and `EXPLAIN` are left as
//! DataFusion plans them.

use std::collections::HashMap;
use std::io::BufWriter;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arrow::ipc::writer::FileWriter;
use arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
use datafusion::common::Column;
use datafusion::datasource::file_format::options::ArrowReadOptions;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SessionContext;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::DataFrame;
use futures::StreamExt;

use crate::error::{Error, Result};

/// Prefix of the temporary tables' names (never a name a store registers).
const TABLE_PREFIX: &str = "__firstkd_cte_";

/// Prefix of the temporary folders in `$TMPDIR`, followed by the writing process's id.
const FOLDER_PREFIX: &str = "firstkd-cte-";

/// Removes the folders that killed processes left in `$TMPDIR` (a process that ends in any
/// other way removes its own). Best effort: a folder that cannot be read or removed is left,
/// and the statement goes on.
fn remove_dead_folders() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(FOLDER_PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .map(|(pid, _)| pid);
        if pid.is_some_and(crate::store::writer::files::process_is_dead) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The temporary tables of one statement; dropping this deregisters them and deletes their
/// files.
pub struct Materialized {
    ctx: SessionContext,
    tables: Vec<String>,
    /// Names of the tables held in memory (a subset of `tables`).
    in_memory: Vec<String>,
    dir: tempfile::TempDir,
    /// The memory the held tables take, reserved from the session's pool.
    reservation: Arc<MemoryReservation>,
    /// What the held tables may still take, in bytes.
    budget: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Materialized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Materialized")
            .field("tables", &self.tables)
            .field("in_memory", &self.in_memory)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Materialized {
    /// Names of the tables written (one per materialised subquery), in the order written.
    pub fn tables(&self) -> &[String] {
        &self.tables
    }

    /// Names of the tables held in memory rather than written to files.
    pub fn in_memory(&self) -> &[String] {
        &self.in_memory
    }

    /// Bytes the tables held in memory take (reserved from the session's pool).
    pub fn held_bytes(&self) -> usize {
        self.reservation.size()
    }
}

impl Drop for Materialized {
    fn drop(&mut self) {
        for table in &self.tables {
            // A table that is already gone needs nothing; nothing else can fail here.
            let _ = self.ctx.deregister_table(table.as_str());
        }
    }
}

/// True for plan nodes whose result is worth keeping rather than recomputing. Not a union:
/// a union of scans (of the store or of CTEs already written) costs what reading a copy of
/// it would, and writing that copy costs more.
fn does_work(plan: &LogicalPlan) -> bool {
    matches!(
        plan,
        LogicalPlan::Join(_)
            | LogicalPlan::Aggregate(_)
            | LogicalPlan::Window(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::Distinct(_)
    )
}

fn subtree_contains(plan: &LogicalPlan, pred: impl Fn(&LogicalPlan) -> bool) -> bool {
    let mut found = false;
    // The closure never fails, so neither does the walk.
    let _ = plan.apply_with_subqueries(|node| {
        if pred(node) {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

fn subtree_size(plan: &LogicalPlan) -> usize {
    let mut n = 0;
    let _ = plan.apply_with_subqueries(|_| {
        n += 1;
        Ok(TreeNodeRecursion::Continue)
    });
    n
}

/// The repeated subquery to materialise next: among the `SubqueryAlias` inputs (anywhere,
/// also inside scalar, `IN` and `EXISTS` subqueries) that appear at least twice and do work,
/// the smallest (so one nested in another goes first).
fn next_candidate(plan: &LogicalPlan) -> Option<Arc<LogicalPlan>> {
    let mut counts: HashMap<Arc<LogicalPlan>, usize> = HashMap::new();
    let mut order: Vec<Arc<LogicalPlan>> = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::SubqueryAlias(alias) = node {
            let count = counts.entry(Arc::clone(&alias.input)).or_insert(0);
            if *count == 0 {
                order.push(Arc::clone(&alias.input));
            }
            *count += 1;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    order
        .into_iter()
        .filter(|p| counts.get(p).copied().unwrap_or(0) >= 2)
        .filter(|p| subtree_contains(p, does_work))
        // A subquery that reads an outer query's columns cannot be run on its own.
        .filter(|p| !p.contains_outer_reference())
        .min_by_key(|p| subtree_size(p))
}

/// Rewrites `plan` so that each subquery it repeats (see the module docs) is computed once.
/// Results are held in memory up to `memory_budget` bytes in all (0: always files).
/// Returns the plan unchanged and `None` when there is nothing to materialise.
pub async fn materialize_repeated(
    ctx: &SessionContext,
    mut plan: LogicalPlan,
    memory_budget: usize,
) -> Result<(LogicalPlan, Option<Materialized>)> {
    if matches!(
        plan,
        LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) | LogicalPlan::Ddl(_)
    ) || subtree_contains(&plan, |p| matches!(p, LogicalPlan::RecursiveQuery(_)))
    {
        return Ok((plan, None));
    }
    let mut done: Option<Materialized> = None;
    while let Some(target) = next_candidate(&plan) {
        if done.is_none() {
            remove_dead_folders();
            let dir = tempfile::Builder::new()
                .prefix(&format!("{FOLDER_PREFIX}{}-", std::process::id()))
                .tempdir()
                .map_err(|e| Error::io(std::env::temp_dir(), e))?;
            let reservation = MemoryConsumer::new("firstkd materialised CTE")
                .register(&ctx.runtime_env().memory_pool);
            done = Some(Materialized {
                ctx: ctx.clone(),
                tables: Vec::new(),
                in_memory: Vec::new(),
                dir,
                reservation: Arc::new(reservation),
                budget: Arc::new(AtomicUsize::new(memory_budget)),
            });
        }
        let Some(state) = done.as_mut() else {
            return Err(Error::Internal("CTE state missing".into()));
        };
        let name = format!("{TABLE_PREFIX}{}", state.tables.len());
        let folder = state.dir.path().join(&name);
        std::fs::create_dir(&folder).map_err(|e| Error::io(&folder, e))?;
        let schema = Arc::new(target.schema().as_arrow().clone());
        let held = Holder {
            reservation: Arc::clone(&state.reservation),
            budget: Arc::clone(&state.budget),
        };
        let written = write_partitions(
            ctx,
            target.as_ref().clone(),
            &folder,
            Arc::clone(&schema),
            &held,
        )
        .await?;
        match written {
            Written::Memory(partitions) => {
                let table = MemTable::try_new(Arc::clone(&schema), partitions)?;
                ctx.register_table(name.as_str(), Arc::new(table))?;
                state.in_memory.push(name.clone());
            }
            Written::Files => {
                let url = format!("{}/", folder.display());
                ctx.register_arrow(
                    name.as_str(),
                    &url,
                    ArrowReadOptions {
                        schema: Some(schema.as_ref()),
                        ..Default::default()
                    },
                )
                .await?;
            }
        }
        state.tables.push(name.clone());
        let scan = ctx.table(name.as_str()).await?.into_unoptimized_plan();
        // Keep the original qualifiers: the scan's columns are those of `target` unqualified.
        let scan = LogicalPlanBuilder::from(scan)
            .project(
                target
                    .schema()
                    .columns()
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        Expr::Column(Column::from_name(schema.field(i).name()))
                            .alias_qualified(c.relation.clone(), c.name.clone())
                    }),
            )?
            .build()?;
        let rewritten = plan.transform_down_with_subqueries(|node| {
            if node == *target {
                Ok(Transformed::new(
                    scan.clone(),
                    true,
                    TreeNodeRecursion::Jump,
                ))
            } else {
                Ok(Transformed::no(node))
            }
        })?;
        if !rewritten.transformed {
            // The candidate came from this plan; not finding it again would loop forever.
            return Err(Error::Internal(
                "a repeated CTE was not found in the plan it came from".into(),
            ));
        }
        plan = rewritten.data;
    }
    Ok((plan, done))
}

/// Where a materialised result is held: the shared reservation and what is left of the
/// budget.
struct Holder {
    reservation: Arc<MemoryReservation>,
    budget: Arc<AtomicUsize>,
}

impl Holder {
    /// Takes `bytes` from the budget and the pool, or nothing and false.
    fn take(&self, bytes: usize) -> bool {
        let taken = self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(bytes)
            })
            .is_ok();
        if taken && self.reservation.try_grow(bytes).is_err() {
            self.give_back(bytes);
            return false;
        }
        taken
    }

    /// Returns `bytes` to the budget and the pool.
    fn give_back(&self, bytes: usize) {
        self.budget.fetch_add(bytes, Ordering::SeqCst);
        self.reservation.shrink(bytes.min(self.reservation.size()));
    }
}

/// One partition's result: its batches in memory (with the bytes they hold) or in a file.
enum Partition {
    Memory(Vec<RecordBatch>, usize),
    File,
}

/// A whole result: in memory (every partition fit), or in the folder's files.
enum Written {
    Memory(Vec<Vec<RecordBatch>>),
    Files,
}

fn file_writer(
    path: &std::path::Path,
    schema: &arrow::datatypes::SchemaRef,
) -> Result<FileWriter<BufWriter<std::fs::File>>> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    Ok(FileWriter::try_new(BufWriter::new(file), schema)?)
}

/// Runs `plan`, all partitions at once, holding each partition's batches in memory while the
/// budget lasts (an empty one always) and writing them to its own Arrow IPC file in `folder`
/// past it. When any partition went to a file, the others are written to theirs too, so the
/// result is one folder of files.
async fn write_partitions(
    ctx: &SessionContext,
    plan: LogicalPlan,
    folder: &std::path::Path,
    schema: arrow::datatypes::SchemaRef,
    holder: &Holder,
) -> Result<Written> {
    let streams = DataFrame::new(ctx.state(), plan)
        .execute_stream_partitioned()
        .await?;
    let mut tasks = Vec::with_capacity(streams.len());
    let paths: Vec<PathBuf> = (0..streams.len())
        .map(|i| folder.join(format!("part-{i}.arrow")))
        .collect();
    for (mut stream, path) in streams.into_iter().zip(paths.iter().cloned()) {
        let schema = Arc::clone(&schema);
        let holder = Holder {
            reservation: Arc::clone(&holder.reservation),
            budget: Arc::clone(&holder.budget),
        };
        tasks.push(tokio::spawn(async move {
            let (mut held, mut bytes) = (Vec::new(), 0usize);
            let mut writer = None;
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                if writer.is_none() {
                    let size = batch.get_array_memory_size();
                    if holder.take(size) {
                        bytes += size;
                        held.push(batch);
                        continue;
                    }
                    // Past the budget: what is held goes to the file, and the rest after it.
                    let mut w = file_writer(&path, &schema)?;
                    for b in held.drain(..) {
                        w.write(&b)?;
                    }
                    holder.give_back(std::mem::take(&mut bytes));
                    writer = Some(w);
                }
                if let Some(w) = writer.as_mut() {
                    w.write(&batch)?;
                }
            }
            match writer {
                Some(mut w) => {
                    w.finish()?;
                    Ok::<Partition, Error>(Partition::File)
                }
                None => Ok(Partition::Memory(held, bytes)),
            }
        }));
    }
    let mut partitions = Vec::with_capacity(tasks.len());
    let mut failed = None;
    for task in &mut tasks {
        let outcome = match task.await {
            Ok(written) => written,
            Err(e) => Err(Error::Internal(format!("a CTE writer task failed: {e}"))),
        };
        match outcome {
            Ok(p) => partitions.push(p),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failed {
        // The other partitions' work is for nothing: stop it before the folder goes.
        for task in &tasks {
            task.abort();
        }
        for p in &partitions {
            if let Partition::Memory(_, bytes) = p {
                holder.give_back(*bytes);
            }
        }
        return Err(e);
    }
    if partitions
        .iter()
        .all(|p| matches!(p, Partition::Memory(..)))
    {
        let held = partitions
            .into_iter()
            .filter_map(|p| match p {
                Partition::Memory(batches, _) => Some(batches),
                Partition::File => None,
            })
            .collect();
        return Ok(Written::Memory(held));
    }
    for (p, path) in partitions.into_iter().zip(&paths) {
        if let Partition::Memory(batches, bytes) = p {
            let mut w = file_writer(path, &schema)?;
            for b in &batches {
                w.write(b)?;
            }
            w.finish()?;
            holder.give_back(bytes);
        }
    }
    Ok(Written::Files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::execution::context::SessionConfig;

    async fn context() -> SessionContext {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
        for ddl in [
            "CREATE TABLE a AS SELECT * FROM (VALUES (1, 'x', 0.5), (2, 'y', 0.25), (3, 'x', 0.75), \
             (4, 'y', 1.0), (5, 'x', 0.125)) AS t(id, g, v)",
            "CREATE TABLE b AS SELECT * FROM (VALUES (1, 10), (2, 20), (3, 30), (4, 40), (5, 50)) \
             AS t(id, w)",
        ] {
            ctx.sql(ddl).await.unwrap().collect().await.unwrap();
        }
        ctx
    }

    /// Runs `sql` as DataFusion plans it and after [`materialize_repeated`] with no memory
    /// budget (every result to files) and with a large one (every result in memory); checks
    /// where the results went and returns both results as text and the names of the tables.
    async fn both(
        ctx: &SessionContext,
        sql: &str,
    ) -> (String, String, Vec<String>, Option<PathBuf>) {
        let inline = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let inline = pretty_format_batches(&inline).unwrap().to_string();
        let mut found = Vec::new();
        for budget in [0, 1 << 30] {
            let (out, tables, in_memory, dir) = materialized(ctx, sql, budget).await;
            assert_eq!(out, inline, "budget {budget}");
            if budget > 0 {
                assert_eq!(in_memory, tables);
            }
            found = vec![(out, tables, dir)];
        }
        let (out, tables, dir) = found.remove(0);
        (inline, out, tables, dir)
    }

    /// `sql` after [`materialize_repeated`] with `budget`: the result as text, the tables
    /// written, those held in memory and the folder (removed by then). Checks that nothing
    /// stays reserved from the pool once the guard is dropped.
    async fn materialized(
        ctx: &SessionContext,
        sql: &str,
        budget: usize,
    ) -> (String, Vec<String>, Vec<String>, Option<PathBuf>) {
        let plan = ctx.state().create_logical_plan(sql).await.unwrap();
        let (plan, guard) = materialize_repeated(ctx, plan, budget).await.unwrap();
        let out = ctx
            .execute_logical_plan(plan)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let tables = guard
            .as_ref()
            .map(|g| g.tables().to_vec())
            .unwrap_or_default();
        let in_memory = guard
            .as_ref()
            .map(|g| g.in_memory().to_vec())
            .unwrap_or_default();
        let dir = guard.as_ref().map(|g| g.dir.path().to_path_buf());
        // A table is in files exactly when it is not held in memory.
        if let Some(dir) = &dir {
            for t in &tables {
                let file = dir.join(t).join("part-0.arrow").is_file();
                assert_eq!(file, !in_memory.contains(t), "{t}, budget {budget}");
            }
        }
        drop(guard);
        assert_eq!(ctx.runtime_env().memory_pool.reserved(), 0);
        (
            pretty_format_batches(&out).unwrap().to_string(),
            tables,
            in_memory,
            dir,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repeated_ctes_are_written_once_innermost_first_and_give_the_same_rows() {
        let ctx = context().await;
        // `base` (a join) is read twice by `expanded` (a union of those two scans), which `agg`
        // (an aggregate, read twice) and `r` (a window, read once) read.
        let sql = "WITH base AS (SELECT a.g, a.v, b.w FROM a JOIN b ON a.id = b.id), \
             expanded AS (SELECT 'all' AS p, g, v, w FROM base \
                          UNION ALL SELECT 'x', g, v, w FROM base WHERE g = 'x'), \
             agg AS (SELECT p, g, sum(v) AS sv, count(*) AS n FROM expanded GROUP BY p, g), \
             r AS (SELECT p, g, w, row_number() OVER (PARTITION BY p ORDER BY v, w) AS rn \
                   FROM expanded) \
             SELECT a.p, a.g, a.sv, a.n, o.sv AS other, max(r.rn) AS m, sum(r.w) AS sw \
             FROM agg a LEFT JOIN agg o ON a.g = o.g AND a.p <> o.p \
             JOIN r ON a.p = r.p AND a.g = r.g \
             GROUP BY a.p, a.g, a.sv, a.n, o.sv ORDER BY a.p, a.g";
        let (inline, out, tables, dir) = both(&ctx, sql).await;
        assert_eq!(inline, out);
        assert!(inline.contains("| all | x | 1.375 | 3 |"), "{inline}");
        // With no memory budget both (non-empty) results go to files.
        let (_, _, in_memory, _) = materialized(&ctx, sql, 0).await;
        assert!(in_memory.is_empty(), "{in_memory:?}");
        assert_eq!(tables, vec!["__firstkd_cte_0", "__firstkd_cte_1"]);
        // Dropping the guard removes the tables and their files.
        assert!(!dir.unwrap().exists());
        for t in tables {
            assert!(!ctx.table_exist(t.as_str()).unwrap());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn single_trivial_and_recursive_ctes_are_left_inline() {
        let ctx = context().await;
        for sql in [
            // Read once.
            "WITH t AS (SELECT g, sum(v) AS s FROM a GROUP BY g) SELECT * FROM t ORDER BY g",
            // Read twice, but only a filtered scan: inlining lets each filter reach the scan.
            "WITH t AS (SELECT * FROM a WHERE v > 0.3) \
             SELECT id FROM t WHERE g = 'x' UNION ALL SELECT id FROM t WHERE g = 'y' ORDER BY id",
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 4) \
             SELECT x.n FROM c x JOIN c y ON x.n = y.n ORDER BY x.n",
        ] {
            let (inline, materialized, tables, _) = both(&ctx, sql).await;
            assert_eq!(inline, materialized, "{sql}");
            assert!(tables.is_empty(), "{sql}: {tables:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_repeated_cte_in_a_scalar_subquery_and_empty_results() {
        let ctx = context().await;
        let sql = "WITH t AS (SELECT g, max(v) AS m FROM a WHERE v > 5 GROUP BY g) \
             SELECT (SELECT count(*) FROM t) AS n, (SELECT max(m) FROM t) AS top";
        let (inline, materialized, tables, _) = both(&ctx, sql).await;
        assert_eq!(inline, materialized);
        assert_eq!(tables.len(), 1, "{tables:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_result_past_the_memory_budget_goes_to_files() {
        // Small batches, so a partition's result is many batches and the budget can run out
        // in the middle of one.
        let ctx = SessionContext::new_with_config(
            SessionConfig::new()
                .with_target_partitions(2)
                .with_batch_size(16),
        );
        ctx.sql(
            "CREATE TABLE big AS SELECT value AS id, value % 7 AS g FROM generate_series(1, 4000)",
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
        let sql = "WITH t AS (SELECT id, g, count(*) AS n FROM big GROUP BY id, g) \
             SELECT g, sum(n) AS s, (SELECT count(*) FROM t) AS all_rows FROM t \
             GROUP BY g ORDER BY g";
        let inline = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let inline = pretty_format_batches(&inline).unwrap().to_string();
        // How much the whole result takes in memory.
        let plan = ctx.state().create_logical_plan(sql).await.unwrap();
        let (_, guard) = materialize_repeated(&ctx, plan, 1 << 30).await.unwrap();
        let whole = guard.as_ref().map(Materialized::held_bytes).unwrap();
        drop(guard);
        assert!(whole > 0);
        for budget in [whole, whole / 2, 0] {
            let (out, tables, in_memory, _) = materialized(&ctx, sql, budget).await;
            assert_eq!(out, inline, "budget {budget}");
            assert_eq!(tables.len(), 1);
            assert_eq!(
                in_memory.len(),
                usize::from(budget == whole),
                "budget {budget}"
            );
        }
    }

    #[test]
    fn folders_of_dead_processes_are_removed_and_live_ones_kept() {
        let tmp = std::env::temp_dir();
        // No process has id 4294967294 (above the kernel's pid limit).
        let dead = tmp.join(format!("{FOLDER_PREFIX}4294967294-x1"));
        let live = tmp.join(format!("{FOLDER_PREFIX}{}-x1", std::process::id()));
        for d in [&dead, &live] {
            std::fs::create_dir_all(d.join("t")).unwrap();
        }
        remove_dead_folders();
        let (dead_left, live_left) = (dead.exists(), live.exists());
        std::fs::remove_dir_all(&live).unwrap();
        assert!(!dead_left && live_left);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_error_while_writing_is_returned_and_nothing_is_left() {
        let ctx = context().await;
        let sql = "WITH t AS (SELECT id, 1 / (id - id) AS z FROM a GROUP BY id) \
             SELECT * FROM t UNION ALL SELECT * FROM t";
        let plan = ctx.state().create_logical_plan(sql).await.unwrap();
        let err = materialize_repeated(&ctx, plan, 1 << 30).await.unwrap_err();
        assert!(err.to_string().contains("Divide by zero"), "{err}");
        assert!(!ctx.table_exist("__firstkd_cte_0").unwrap());
        assert_eq!(ctx.runtime_env().memory_pool.reserved(), 0);
    }
}
