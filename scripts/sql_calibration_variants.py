#!/usr/bin/env python3
"""The pure-SQL calibration query of sql_bench.py in DuckDB and in `firstkd sql` under several
settings, interleaved (DuckDB, then each firstkd variant, per round), with medians and the
DuckDB/firstkd ratio of each.

    python3 scripts/sql_calibration_variants.py --store /tmp/sqltest/b10m16 --rounds 3

The store must exist (`firstkd synth DIR --rows N --dtype float16`, or sql_bench.py makes
it). Variants: the session default, DataFusion's 8,192-row batches, 4 target partitions,
and the default under `--memory-limit 2G`. Needs the python `duckdb` package.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import duckdb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sql_bench as sb  # noqa: E402

VARIANTS = {
    "default": ("", []),
    "batch 8192": ("SET datafusion.execution.batch_size = 8192;", []),
    "4 target partitions": ("SET datafusion.execution.target_partitions = 4;", []),
    "--memory-limit 2G": ("", ["--memory-limit", "2G"]),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--firstkd", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(sb.ROOT, "target")), "release", "firstkd"))
    args = ap.parse_args()
    con = duckdb.connect()
    con.execute(f"SET threads = {args.threads}")
    dd_sql = sb.calibration_sql(
        f"read_parquet('{args.store}/labels/*.parquet')", f"read_parquet('{args.store}/samples/*.parquet')",
        "exp(l.topk_logprobs[1])", "CASE WHEN l.topk_ids[1] = l.target_id THEN 1.0 ELSE 0.0 END",
        "l.target_logprob")
    fk_sql = sb.firstkd_calibration_sql()
    times = {name: [] for name in ["DuckDB", *VARIANTS]}
    for r in range(args.rounds):
        start = time.perf_counter()
        dd_rows = con.execute(dd_sql).fetchall()
        times["DuckDB"].append(time.perf_counter() - start)
        for name, (prefix, flags) in VARIANTS.items():
            start = time.perf_counter()
            out = subprocess.run([args.firstkd, "sql", args.store, "--format", "csv", *flags, prefix + fk_sql],
                                 check=True, capture_output=True, text=True).stdout
            times[name].append(time.perf_counter() - start)
            sb.check_same_sql_result(out, dd_rows)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()), file=sys.stderr, flush=True)
    dd = statistics.median(times["DuckDB"])
    print(f"threads: {args.threads}; median of {args.rounds} interleaved rounds\n")
    print("| run | median s | runs s | DuckDB / run |")
    print("|---|---:|---|---:|")
    for name, v in times.items():
        m = statistics.median(v)
        print(f"| {name} | {m:.2f} | {' '.join(f'{x:.2f}' for x in v)} | {dd / m:.2f} |")


if __name__ == "__main__":
    main()
