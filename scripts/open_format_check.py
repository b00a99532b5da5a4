#!/usr/bin/env python3
"""What other tools see in a firstkd store: column names and types, key-value metadata, row
counts, and the top-k coverage computed by DuckDB from the files alone.

    python3 scripts/open_format_check.py STORE [--engines pyarrow,duckdb,polars,datasets,spark]

Prints one JSON object: per engine {"labels": {"columns": [[name, type]], "rows": n},
"samples": {...}}, where `type` is the engine's own type mapped to the portable names of
schemas/*.json (uint64, uint32, uint16, bool, utf8, list<...>); Spark has no unsigned
integers, so its raw names (decimal(20,0), bigint, int, ...) are reported as they are.
"kv" holds each part's key-value metadata keys as pyarrow and DuckDB read them, and
"duckdb_coverage" the mean cumulative top-1..k probability mass over in-loss positions
(the number `firstkd stats --report coverage` prints), from SQL over the Parquet files.
Only files the manifest lists are read.
"""
import argparse
import json
import os
import re


def manifest(store):
    with open(os.path.join(store, "manifest.json")) as f:
        return json.load(f)


def files(store, table):
    return [os.path.join(store, p[table]["file"]) for p in manifest(store)["parts"]]


def norm_arrow(t):
    import pyarrow as pa

    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{norm_arrow(t.value_type)}>"
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{norm_arrow(t.value_type)}>[{t.list_size}]"
    s = str(t)
    return {"string": "utf8", "large_string": "utf8", "halffloat": "float16", "float": "float32", "double": "float64"}.get(s, s)


def norm_duckdb(s):
    base = {
        "UBIGINT": "uint64", "UINTEGER": "uint32", "USMALLINT": "uint16", "UTINYINT": "uint8",
        "BIGINT": "int64", "INTEGER": "int32", "SMALLINT": "int16", "BOOLEAN": "bool",
        "VARCHAR": "utf8", "FLOAT": "float32", "DOUBLE": "float64",
    }
    m = re.fullmatch(r"(.*)\[(\d*)\]", s)
    if m:
        inner = norm_duckdb(m.group(1))
        return f"fixed_size_list<{inner}>[{m.group(2)}]" if m.group(2) else f"list<{inner}>"
    return base.get(s, s)


def norm_polars(d):
    import polars as pl

    if isinstance(d, pl.List):
        return f"list<{norm_polars(d.inner)}>"
    if isinstance(d, pl.Array):
        return f"fixed_size_list<{norm_polars(d.inner)}>[{d.shape[0]}]"
    return {
        "UInt64": "uint64", "UInt32": "uint32", "UInt16": "uint16", "UInt8": "uint8",
        "Int64": "int64", "Int32": "int32", "Boolean": "bool", "String": "utf8",
        "Float32": "float32", "Float64": "float64",
    }.get(str(d), str(d))


def norm_datasets(f):
    import datasets

    if isinstance(f, datasets.Value):
        return {"string": "utf8", "float": "float32", "double": "float64"}.get(f.dtype, f.dtype)
    for name in ("List", "LargeList", "Sequence"):
        cls = getattr(datasets, name, None)
        if cls is not None and isinstance(f, cls):
            inner = norm_datasets(f.feature)
            length = getattr(f, "length", -1)
            return f"fixed_size_list<{inner}>[{length}]" if length not in (-1, None) else f"list<{inner}>"
    return str(f)


def engine_pyarrow(store, table):
    import pyarrow.parquet as pq

    t = None
    rows = 0
    for f in files(store, table):
        pf = pq.ParquetFile(f)
        t = pf.schema_arrow
        rows += pf.metadata.num_rows
    return {"columns": [[fld.name, norm_arrow(fld.type)] for fld in t], "rows": rows}


def engine_duckdb(store, table):
    import duckdb

    fl = files(store, table)
    con = duckdb.connect()
    cols = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [fl]).fetchall()
    rows = con.execute("SELECT count(*) FROM read_parquet(?)", [fl]).fetchone()[0]
    return {"columns": [[c[0], norm_duckdb(c[1])] for c in cols], "rows": rows}


def engine_polars(store, table):
    import polars as pl

    lf = pl.scan_parquet(files(store, table))
    schema = lf.collect_schema()
    rows = lf.select(pl.len()).collect().item()
    return {"columns": [[n, norm_polars(d)] for n, d in schema.items()], "rows": rows}


def engine_datasets(store, table):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=files(store, table), split="train")
    return {"columns": [[n, norm_datasets(f)] for n, f in ds.features.items()], "rows": ds.num_rows}


_spark = None


def engine_spark(store, table):
    global _spark
    if _spark is None:
        from pyspark.sql import SparkSession

        _spark = (
            SparkSession.builder.master("local[1]").appName("firstkd-open-format")
            .config("spark.ui.enabled", "false").getOrCreate()
        )
        _spark.sparkContext.setLogLevel("ERROR")
    df = _spark.read.parquet(*files(store, table))
    return {"columns": [[f.name, f.dataType.simpleString()] for f in df.schema.fields], "rows": df.count()}


def kv(store):
    import duckdb
    import pyarrow.parquet as pq

    out = {"pyarrow": {}, "duckdb": {}}
    con = duckdb.connect()
    for table in ("labels", "samples"):
        for f in files(store, table):
            meta = pq.read_metadata(f).metadata or {}
            out["pyarrow"][os.path.relpath(f, store)] = sorted(k.decode() for k in meta)
            keys = con.execute("SELECT DISTINCT decode(key) FROM parquet_kv_metadata(?)", [f]).fetchall()
            out["duckdb"][os.path.relpath(f, store)] = sorted(k[0] for k in keys)
    return out


def duckdb_coverage(store):
    import duckdb

    m = manifest(store)
    k = m["k"]
    fl = files(store, "labels")
    con = duckdb.connect()
    if m["schema_version"].startswith("2."):
        q = m["quantization"]
        probs = f"list_transform(topk_probs_q, lambda x: greatest(x, {q['zero_prob_units']}) / {q['prob_scale']}.0)"
    else:
        probs = "list_transform(topk_logprobs, lambda x: exp(x))"
    sums = ", ".join(f"avg(list_sum(list_slice(p, 1, {j})))" for j in range(1, k + 1))
    sql = f"SELECT {sums} FROM (SELECT {probs} AS p FROM read_parquet(?) WHERE in_loss)"
    return list(con.execute(sql, [fl]).fetchone())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--engines", default="pyarrow,duckdb,polars,datasets,spark")
    args = ap.parse_args()
    result = {}
    for engine in args.engines.split(","):
        fn = globals()[f"engine_{engine}"]
        result[engine] = {table: fn(args.store, table) for table in ("labels", "samples")}
    result["kv"] = kv(args.store)
    result["duckdb_coverage"] = duckdb_coverage(args.store)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
