//! `ntile` in bounded memory.
//!
//! DataFusion evaluates `ntile(n) OVER (PARTITION BY p ORDER BY o)` with its unbounded window
//! operator: each partition is held in memory whole, because a row's bucket depends on the
//! partition's row count, and that operator cannot spill. Over a large store (the equal-mass
//! bins of a calibration report over every position) that is gigabytes, and past the memory
//! limit the query fails instead of spilling.
//!
//! [`rewrite_ntile`] plans each such `ntile` as what it computes: the partition's row count
//! (a grouped `count(*)` over the same input, which also numbers the partitions densely),
//! joined to the input on the partition keys with `NULL` equal to `NULL`; then the row's
//! number in its partition (`row_number` partitioned by that one integer, which streams over
//! the sorted input, and the sort spills); then SQL's bucket rule: with `base = rows / n` and
//! `rem = rows % n`, the first `rem` buckets hold `base + 1` rows and the rest `base`. The
//! result equals DataFusion's `ntile` row for row (the same rule, tested against it).
//!
//! Sorting on the partition number instead of the keys is most of the speed: the keys are
//! often strings (the source and split of a calibration report), and a sort on them compares
//! them byte by byte at every step, although rows of one partition always tie there.
//!
//! The window's input is planned twice (the counts and the rows); when it does real work the
//! statement's materialisation of repeated subqueries ([`super::materialize`]) computes it
//! once.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::Transformed;
use datafusion::common::{Column, NullEquality, ScalarValue};
use datafusion::functions_aggregate::count::count_all;
use datafusion::functions_window::row_number::{row_number, row_number_udwf};
use datafusion::logical_expr::expr::{WindowFunction, WindowFunctionParams};
use datafusion::logical_expr::{
    cast, col, lit, when, Expr, JoinType, LogicalPlan, LogicalPlanBuilder, Window,
    WindowFunctionDefinition,
};

use crate::error::Result;

/// Prefix of the columns the rewrite adds (never a name a store's tables use).
const PREFIX: &str = "__firstkd_ntile_";

/// Rewrites every `ntile` window function of `plan` (subqueries included) into the
/// bounded-memory form described in the module documentation. Leaves a call it cannot
/// rewrite (a non-literal or non-positive bucket count, `FILTER`, `DISTINCT`) as it is, for
/// DataFusion to plan or refuse.
pub fn rewrite_ntile(plan: LogicalPlan) -> Result<LogicalPlan> {
    let counter = std::cell::Cell::new(0usize);
    let rewritten = plan.transform_up_with_subqueries(|node| match node {
        LogicalPlan::Window(window) => {
            let id = counter.get();
            counter.set(id + 1);
            rewrite_window(window, id)
        }
        other => Ok(Transformed::no(other)),
    })?;
    Ok(rewritten.data)
}

/// An `ntile` call that can be rewritten: its bucket count and window parameters.
struct Ntile<'a> {
    buckets: i64,
    params: &'a WindowFunctionParams,
}

fn as_ntile(expr: &Expr) -> Option<Ntile<'_>> {
    let Expr::WindowFunction(f) = expr else {
        return None;
    };
    let WindowFunctionDefinition::WindowUDF(udf) = &f.fun else {
        return None;
    };
    let params = &f.params;
    if udf.name() != "ntile" || params.filter.is_some() || params.distinct {
        return None;
    }
    let [Expr::Literal(value, _)] = params.args.as_slice() else {
        return None;
    };
    let Ok(ScalarValue::Int64(Some(buckets))) = value.cast_to(&DataType::Int64) else {
        return None;
    };
    (buckets > 0).then_some(Ntile { buckets, params })
}

fn rewrite_window(
    window: Window,
    id: usize,
) -> datafusion::common::Result<Transformed<LogicalPlan>> {
    if !window.window_expr.iter().any(|e| as_ntile(e).is_some()) {
        return Ok(Transformed::no(LogicalPlan::Window(window)));
    }
    let input = Arc::clone(&window.input);
    let input_fields = input.schema().fields().len();
    // The window without its ntiles: each becomes a row_number with the same ORDER BY, over
    // the partition number of its PARTITION BY (named by the rewrite, so two ntiles of one
    // window never clash).
    let mut exprs = Vec::with_capacity(window.window_expr.len());
    // Per ntile: index in the window, row-number column, bucket count, partition-spec index.
    let mut ntiles = Vec::new();
    // Distinct PARTITION BY lists, in order of first use.
    let mut partitions: Vec<Vec<Expr>> = Vec::new();
    // Row-number columns by the ntile parameters they number (the bucket count aside), with
    // their partition-spec index.
    let mut numbers: Vec<(WindowFunctionParams, String, usize)> = Vec::new();
    for (i, expr) in window.window_expr.iter().enumerate() {
        let Some(ntile) = as_ntile(expr) else {
            exprs.push(expr.clone());
            continue;
        };
        // The row numbering does not depend on the bucket count.
        let params = WindowFunctionParams {
            args: vec![],
            ..ntile.params.clone()
        };
        let spec = match partitions.iter().position(|p| *p == params.partition_by) {
            Some(spec) => spec,
            None => {
                partitions.push(params.partition_by.clone());
                partitions.len() - 1
            }
        };
        // One row number per (PARTITION BY, ORDER BY): two equal window expressions in one
        // window would be taken apart by common-subexpression elimination.
        let number = match numbers.iter().find(|(p, ..)| *p == params) {
            Some((_, name, _)) => name.clone(),
            None => {
                let name = format!("{PREFIX}{id}_row_{i}");
                numbers.push((params, name.clone(), spec));
                name
            }
        };
        ntiles.push((i, number, ntile.buckets, spec));
    }
    // Per PARTITION BY list, before the window: the partitions' row counts and a dense
    // partition number, joined on the keys (NULL = NULL). The row numbers are then taken
    // over that one integer instead of the keys: sorting and splitting on it is cheaper than
    // on the keys (often strings, compared byte by byte at every step of the sort).
    let mut plan = LogicalPlanBuilder::from(Arc::clone(&input));
    let mut numbered = Vec::with_capacity(partitions.len());
    for (spec, keys) in partitions.iter().enumerate() {
        let rows = format!("{PREFIX}{id}_rows_{spec}");
        let right: Vec<Expr> = keys
            .iter()
            .enumerate()
            .map(|(k, e)| e.clone().alias(format!("{PREFIX}{id}_part_{spec}_{k}")))
            .collect();
        let counts = LogicalPlanBuilder::from(Arc::clone(&input))
            .aggregate(right, vec![count_all().alias(&rows)])?;
        if keys.is_empty() {
            plan = plan.cross_join(counts.build()?)?;
            numbered.push(Vec::new());
            continue;
        }
        let pid = format!("{PREFIX}{id}_pid_{spec}");
        let counts = counts.window(vec![row_number().alias(&pid)])?.build()?;
        let left: Vec<Expr> = keys
            .iter()
            .enumerate()
            .map(|(k, e)| e.clone().alias(format!("{PREFIX}{id}_key_{spec}_{k}")))
            .collect();
        let carried = plan
            .schema()
            .columns()
            .into_iter()
            .map(Expr::Column)
            .chain(left);
        let names = |side: &str| -> Vec<Column> {
            (0..keys.len())
                .map(|k| Column::new_unqualified(format!("{PREFIX}{id}_{side}_{spec}_{k}")))
                .collect()
        };
        // The counts (one row per partition) on the left: the hash join builds its table
        // from the left side and streams the right.
        let before: Vec<Expr> = plan
            .schema()
            .columns()
            .into_iter()
            .map(Expr::Column)
            .collect();
        plan = LogicalPlanBuilder::from(counts)
            .join_detailed(
                plan.project(carried)?.build()?,
                JoinType::Inner,
                (names("part"), names("key")),
                None,
                NullEquality::NullEqualsNull,
            )?
            // Only the count and the number go on: the keys, again, would be carried through
            // the sort twice more.
            .project(before.into_iter().chain([
                col(Column::new_unqualified(&rows)),
                col(Column::new_unqualified(&pid)),
            ]))?;
        numbered.push(vec![col(Column::new_unqualified(pid))]);
    }
    // The row numbers, each over its partition number.
    for (params, name, spec) in numbers {
        let params = WindowFunctionParams {
            partition_by: numbered[spec].clone(),
            ..params
        };
        exprs.push(
            Expr::from(WindowFunction {
                fun: WindowFunctionDefinition::WindowUDF(row_number_udwf()),
                params,
            })
            .alias(name),
        );
    }
    let plan = plan.window(exprs)?;
    // The window's own output: its input's columns, then each window column by its name, an
    // ntile as the bucket of its row number.
    let mut out: Vec<Expr> = Vec::with_capacity(window.schema.fields().len());
    for (i, (qualifier, field)) in window.schema.iter().enumerate() {
        let ntile = i
            .checked_sub(input_fields)
            .and_then(|w| ntiles.iter().find(|(at, ..)| *at == w));
        out.push(match ntile {
            None => Expr::Column(Column::new(qualifier.cloned(), field.name())),
            Some((_, number, buckets, spec)) => {
                bucket(number, &format!("{PREFIX}{id}_rows_{spec}"), *buckets)?.alias(field.name())
            }
        });
    }
    Ok(Transformed::yes(plan.project(out)?.build()?))
}

/// SQL's `ntile` bucket (1-based) of the row numbered `number` (1-based) in a partition of
/// `rows` rows split into `buckets`: the first `rows % buckets` buckets hold one row more.
fn bucket(number: &str, rows: &str, buckets: i64) -> datafusion::common::Result<Expr> {
    let i = cast(col(Column::new_unqualified(number)), DataType::Int64) - lit(1i64);
    let rows = || col(Column::new_unqualified(rows));
    let base = || rows() / lit(buckets);
    let rem = || rows() % lit(buckets);
    let large = || base() + lit(1i64);
    let large_rows = || rem() * large();
    // `base` is 0 only when every row is in a large bucket; the guard keeps the division
    // that is not taken from dividing by zero.
    let divisor = when(base().eq(lit(0i64)), lit(1i64)).otherwise(base())?;
    let value = when(i.clone().lt(large_rows()), i.clone() / large() + lit(1i64))
        .otherwise(rem() + (i - large_rows()) / divisor + lit(1i64))?;
    Ok(cast(value, DataType::UInt64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray, UInt64Array};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    /// Partitions of 0..=40 rows (and a NULL partition), with ties in the ORDER BY key.
    fn context() -> SessionContext {
        let (mut part, mut key, mut id) = (Vec::new(), Vec::new(), Vec::new());
        for size in 0..=40i64 {
            for r in 0..size {
                part.push((size != 7).then(|| format!("p{size}")));
                key.push(r % 5);
                id.push(size * 100 + r);
            }
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("part", DataType::Utf8, true),
            Field::new("key", DataType::Int64, false),
            Field::new("id", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from(part)),
                Arc::new(Int64Array::from(key)),
                Arc::new(Int64Array::from(id)),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new();
        let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx
    }

    /// (id, bucket) pairs of `sql` as DataFusion plans it, or through the rewrite.
    async fn buckets(ctx: &SessionContext, sql: &str, rewrite: bool) -> Vec<(i64, Vec<u64>)> {
        let plan = ctx.state().create_logical_plan(sql).await.unwrap();
        let plan = if rewrite {
            let rewritten = rewrite_ntile(plan.clone()).unwrap();
            assert_ne!(rewritten, plan, "nothing rewritten");
            rewritten
        } else {
            plan
        };
        let batches = ctx
            .execute_logical_plan(plan)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut rows = Vec::new();
        for b in &batches {
            let ids = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            for r in 0..b.num_rows() {
                let values = (1..b.num_columns())
                    .map(|c| {
                        let a = b.column(c).as_any().downcast_ref::<UInt64Array>().unwrap();
                        a.value(r)
                    })
                    .collect();
                rows.push((ids.value(r), values));
            }
        }
        rows.sort();
        rows
    }

    #[tokio::test]
    async fn rewritten_ntile_equals_datafusions_ntile() {
        let ctx = context();
        for sql in [
            // One PARTITION BY (with a NULL partition), several bucket counts, a second
            // ordering, a total over the whole table and an ntile inside a subquery.
            "SELECT id, ntile(4) OVER (PARTITION BY part ORDER BY key, id) AS a, \
             ntile(15) OVER (PARTITION BY part ORDER BY key, id) AS b, \
             ntile(50) OVER (PARTITION BY part ORDER BY id DESC) AS c, \
             ntile(1) OVER (PARTITION BY part ORDER BY id) AS d, \
             row_number() OVER (PARTITION BY part ORDER BY key, id) AS e, \
             ntile(3) OVER (PARTITION BY part, key ORDER BY id) AS f FROM t",
            "SELECT id, ntile(7) OVER (ORDER BY id) AS a, \
             ntile(3) OVER (PARTITION BY key ORDER BY id) AS b FROM t",
            "SELECT id, n FROM (SELECT id, ntile(15) OVER (PARTITION BY part, key ORDER BY id) \
             AS n FROM t WHERE key < 4) s WHERE n > 2",
        ] {
            let want = buckets(&ctx, sql, false).await;
            assert!(want.len() > 100, "{sql}");
            assert_eq!(buckets(&ctx, sql, true).await, want, "{sql}");
        }
    }

    #[tokio::test]
    async fn the_rewritten_plan_streams_the_window() {
        let ctx = context();
        let sql = "SELECT id, ntile(15) OVER (PARTITION BY part ORDER BY key) AS n FROM t";
        let explain = |plan: LogicalPlan| {
            let ctx = ctx.clone();
            async move {
                let df = ctx.execute_logical_plan(plan).await.unwrap();
                let physical = df.create_physical_plan().await.unwrap();
                let text = datafusion::physical_plan::displayable(physical.as_ref())
                    .indent(false)
                    .to_string();
                text
            }
        };
        let plan = ctx.state().create_logical_plan(sql).await.unwrap();
        let before = explain(plan.clone()).await;
        assert!(before.contains("WindowAggExec") && !before.contains("BoundedWindowAggExec"));
        let after = explain(rewrite_ntile(plan).unwrap()).await;
        assert!(after.contains("BoundedWindowAggExec"), "{after}");
        // The rows are sorted on the partition number, not on the (string) keys.
        assert!(
            after.contains("SortExec: expr=[__firstkd_ntile_0_pid_0@"),
            "{after}"
        );
        assert!(!after.contains(" WindowAggExec"), "{after}");
    }

    #[tokio::test]
    async fn calls_it_cannot_rewrite_are_left_alone() {
        let ctx = context();
        for sql in [
            "SELECT id, row_number() OVER (ORDER BY id) FROM t",
            "SELECT id, ntile(key + 1) OVER (ORDER BY id) FROM t",
        ] {
            let plan = ctx.state().create_logical_plan(sql).await.unwrap();
            assert_eq!(rewrite_ntile(plan.clone()).unwrap(), plan, "{sql}");
        }
    }
}
