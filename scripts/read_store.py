#!/usr/bin/env python3
"""Read a firstkd store (format 1.0 or 2.0) as the logical `labels` table, without firstkd.

    python3 scripts/read_store.py STORE [--engine pyarrow|duckdb|polars|spark] [--summary]

`labels_pyarrow(store)` is the pyarrow decode documented in docs/format.md; the DuckDB and
Spark engines run schemas/decode/{duckdb,spark}.sql; polars uses its own expressions. Only
the files the manifest lists are read (a store being written may hold others). `--summary`
prints one JSON line of aggregates that tests compare with `firstkd sql`.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DECODE = os.path.join(HERE, "..", "schemas", "decode")


def manifest(store):
    with open(os.path.join(store, "manifest.json")) as f:
        return json.load(f)


def part_files(store, table):
    return [os.path.join(store, p[table]["file"]) for p in manifest(store)["parts"]]


def labels_pyarrow(store):
    """The logical labels table (sample_id, position, target_id, in_loss, topk_ids,
    topk_logprobs, target_logprob, entropy) as a pyarrow Table."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = manifest(store)
    labels = pa.concat_tables([pq.read_table(f) for f in part_files(store, "labels")])
    if not m["schema_version"].startswith("2."):
        return labels  # 1.0 files hold the logical table as it is
    q = m["quantization"]
    k = m["k"]
    samples = pa.concat_tables(
        [pq.read_table(f, columns=["sample_id", "input_ids"]) for f in part_files(store, "samples")]
    )
    # target_id = input_ids[position + 1] of the row's sample.
    flat = samples["input_ids"].combine_chunks()
    starts = dict(zip(samples["sample_id"].to_pylist(), flat.offsets.to_numpy()[:-1].tolist()))
    values = flat.flatten().to_numpy()
    sid = labels["sample_id"].to_numpy()
    pos = labels["position"].to_numpy().astype(np.int64)
    target = values[np.array([starts[s] for s in sid], dtype=np.int64) + pos + 1]

    def lp(units):
        return np.log(np.maximum(units, q["zero_prob_units"]) / q["prob_scale"]).astype(np.float32)

    ids = labels["topk_ids"].combine_chunks().flatten().to_numpy().reshape(-1, k)
    probs_q = labels["topk_probs_q"].combine_chunks().flatten().to_numpy().reshape(-1, k)
    logprobs = lp(probs_q.astype(np.float64))
    hit = ids == target[:, None]
    in_list = np.take_along_axis(logprobs, hit.argmax(axis=1)[:, None], axis=1)[:, 0]
    tq = labels["target_logprob_q"].to_numpy(zero_copy_only=False)  # NaN where null
    target_lp = np.where(np.isnan(tq), in_list, -tq / q["logprob_scale"]).astype(np.float32)
    entropy = (labels["entropy_q"].to_numpy() / q["entropy_scale"]).astype(np.float32)
    lists = lambda flat_values: pa.FixedSizeListArray.from_arrays(pa.array(flat_values.ravel()), k)
    return pa.table({
        "sample_id": labels["sample_id"],
        "position": labels["position"],
        "target_id": pa.array(target, pa.uint32()),
        "in_loss": labels["in_loss"],
        "topk_ids": lists(ids.astype(np.uint32)),
        "topk_logprobs": lists(logprobs),
        "target_logprob": pa.array(target_lp),
        "entropy": pa.array(entropy),
    })


def sql_text(engine, store):
    with open(os.path.join(DECODE, f"{engine}.sql")) as f:
        return f.read().replace("STORE", store)


def summary_sql(table):
    return (
        "SELECT count(*) AS rows, sum(CAST(target_id AS BIGINT)) AS target_sum, "
        "sum(CAST(in_loss AS INT)) AS in_loss, "
        f"avg(exp(topk_logprobs[{{first}}])) AS top1_prob, "
        "avg(target_logprob) AS target_logprob, avg(entropy) AS entropy "
        f"FROM {table}"
    )


def summary(store, engine):
    if engine == "pyarrow":
        import numpy as np

        t = labels_pyarrow(store)
        lps = t["topk_logprobs"].combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
        return {
            "rows": t.num_rows,
            "target_sum": int(t["target_id"].to_numpy().astype(np.int64).sum()),
            "in_loss": int(np.asarray(t["in_loss"]).sum()),
            "top1_prob": float(np.exp(lps[:, 0].astype(np.float64)).mean()),
            "target_logprob": float(t["target_logprob"].to_numpy().astype(np.float64).mean()),
            "entropy": float(t["entropy"].to_numpy().astype(np.float64).mean()),
        }
    if engine == "duckdb":
        import duckdb

        con = duckdb.connect()
        if manifest(store)["schema_version"].startswith("2."):
            con.execute(sql_text("duckdb", store))
        else:
            con.execute(f"CREATE VIEW labels AS SELECT * FROM read_parquet('{store}/labels/*.parquet')")
        row = con.execute(summary_sql("labels").format(first=1)).fetchone()
    elif engine == "spark":
        from pyspark.sql import SparkSession

        spark = (
            SparkSession.builder.master("local[1]")
            .appName("firstkd")
            .config("spark.ui.showConsoleProgress", "false")
            .getOrCreate()
        )
        spark.read.parquet(*part_files(store, "labels")).createOrReplaceTempView("stored_labels")
        spark.read.parquet(*part_files(store, "samples")).createOrReplaceTempView("samples")
        if manifest(store)["schema_version"].startswith("2."):
            spark.sql(sql_text("spark", store))
        else:
            spark.sql("CREATE OR REPLACE TEMPORARY VIEW labels AS SELECT * FROM stored_labels")
        row = spark.sql(summary_sql("labels").format(first=0)).collect()[0]
        spark.stop()
    elif engine == "polars":
        import polars as pl

        m = manifest(store)
        labels = pl.concat([pl.read_parquet(f) for f in part_files(store, "labels")])
        samples = pl.concat([pl.read_parquet(f, columns=["sample_id", "input_ids"]) for f in part_files(store, "samples")])
        if m["schema_version"].startswith("2."):
            q = m["quantization"]
            to_lp = (pl.element().cast(pl.Float64).clip(lower_bound=q["zero_prob_units"]) / q["prob_scale"]).log()
            df = labels.join(samples, on="sample_id").with_columns(
                pl.col("input_ids").list.get(pl.col("position").cast(pl.Int64) + 1).alias("target_id"),
                pl.col("topk_probs_q").list.eval(to_lp).alias("topk_logprobs"),
                (pl.col("entropy_q") / q["entropy_scale"]).alias("entropy"),
            )
            # The target's log-prob: its list entry when the stored value is null.
            df = df.with_columns(
                pl.struct(["topk_ids", "topk_logprobs", "target_id"]).map_elements(
                    lambda r: r["topk_logprobs"][r["topk_ids"].index(r["target_id"])] if r["target_id"] in r["topk_ids"] else None,
                    return_dtype=pl.Float64,
                ).alias("in_list_lp")
            ).with_columns(
                pl.when(pl.col("target_logprob_q").is_null())
                .then(pl.col("in_list_lp"))
                .otherwise(pl.col("target_logprob_q").cast(pl.Float64) / -q["logprob_scale"])
                .alias("target_logprob")
            )
        else:
            df = labels.with_columns(pl.col("topk_logprobs").cast(pl.List(pl.Float32)))
        row = (
            df.height,
            int(df["target_id"].cast(pl.Int64).sum()),
            int(df["in_loss"].sum()),
            float(df["topk_logprobs"].list.first().cast(pl.Float64).exp().mean()),
            float(df["target_logprob"].cast(pl.Float64).mean()),
            float(df["entropy"].cast(pl.Float64).mean()),
        )
    else:
        raise SystemExit(f"unknown engine {engine}")
    keys = ["rows", "target_sum", "in_loss", "top1_prob", "target_logprob", "entropy"]
    return {key: (float(v) if isinstance(v, float) else int(v)) for key, v in zip(keys, row)}


def main():
    args = sys.argv[1:]
    if not args:
        raise SystemExit(__doc__)
    store = os.path.abspath(args[0])
    engine = "pyarrow"
    if "--engine" in args:
        engine = args[args.index("--engine") + 1]
    if "--summary" in args:
        print(json.dumps(summary(store, engine)))
    else:
        print(labels_pyarrow(store).slice(0, 5).to_pandas() if engine == "pyarrow" else summary(store, engine))


if __name__ == "__main__":
    main()
