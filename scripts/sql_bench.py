#!/usr/bin/env python3
"""Side-by-side timing of firstkd's built-in SQL reports (DataFusion) and the equivalent SQL in
DuckDB, on one synthetic store.

    cargo build --release      # the binary: $CARGO_TARGET_DIR/release/firstkd
    python3 scripts/sql_bench.py --rows 10000000 --dtype float16 --store /tmp/bench-store

Makes the store with `firstkd synth` unless it exists, then runs each query --repeat times in
both engines, alternating (firstkd, DuckDB, firstkd, ...; DuckDB is run again for each row),
and prints a Markdown table of median wall times (firstkd: the whole process,
`firstkd stats ...` / `firstkd sql ...`; DuckDB: the query in an open in-process connection)
and the DuckDB/firstkd ratio. Checks that the two engines agree on the headline numbers.
Needs the python `duckdb` package.
"""

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import time

import duckdb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_pair(fk_fn, dd_fn, repeat):
    """Runs firstkd and DuckDB alternately, `repeat` times each (the machine's load then
    falls on both alike); returns (firstkd median, firstkd result, DuckDB median, DuckDB
    result). A firstkd failure is raised at once."""
    fk_times, dd_times, fk_out, dd_out = [], [], None, None
    for _ in range(repeat):
        start = time.perf_counter()
        fk_out = fk_fn()
        fk_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        dd_out = dd_fn()
        dd_times.append(time.perf_counter() - start)
    return statistics.median(fk_times), fk_out, statistics.median(dd_times), dd_out


def add(rows, row):
    """Keeps a result row, with the peak memory of its firstkd runs, and prints it at once (a
    long run that dies still leaves its rows)."""
    row = (*row, PEAK[0])
    PEAK[0] = 0.0
    rows.append(row)
    print(f"row: {row}", file=sys.stderr, flush=True)


# Peak resident memory (MiB) of the firstkd runs since the last `add`: each run is waited for
# with wait4, which returns that one process's own high-water mark.
PEAK = [0.0]


def run_firstkd(binary, args):
    import tempfile
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([binary, *args], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        PEAK[0] = max(PEAK[0], usage.ru_maxrss / 1024)  # KiB on Linux
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, [binary, *args], stdout, stderr)
    return stdout


def coverage_sql(k, labels, samples, mass, quantile):
    """The coverage report as one SQL aggregate (firstkd's `stats --report coverage` until
    2026-12-03): `mass(j)` spells the top-j mass of `l.topk_logprobs`, `quantile(col, q)` an
    approximate quantile."""
    masses = ", ".join(f"{mass(j)} AS m{j}" for j in range(1, k + 1))
    aggs = ["count(*) AS n"]
    aggs += [f"avg(m{j}) AS mean_m{j}" for j in range(1, k + 1)]
    for qi, q in enumerate([0.1, 0.5, 0.9]):
        aggs += [f"{quantile(f'm{j}', q)} AS q{qi}_m{j}" for j in range(1, k + 1)]
    aggs.append(f"avg(CASE WHEN m{k} >= 0.95 THEN 1.0 ELSE 0.0 END) AS frac_ge")
    aggs = ",\n    ".join(aggs)

    def select(positions, where):
        return (
            f"  SELECT '{positions}' AS positions, source, split,\n    {aggs}\n"
            f"  FROM t{where}\n  GROUP BY GROUPING SETS ((source, split), ())"
        )

    return f"""WITH t AS (
  SELECT s.source, s.split, l.in_loss, {masses}
  FROM {samples} s JOIN {labels} l ON l.sample_id = s.sample_id
)
SELECT * FROM (
{select('all', '')}
  UNION ALL
{select('in_loss', ' WHERE in_loss')}
)
ORDER BY positions, source NULLS LAST, split NULLS LAST"""


def duckdb_coverage_sql(store, k):
    return coverage_sql(
        k, f"read_parquet('{store}/labels/*.parquet')", f"read_parquet('{store}/samples/*.parquet')",
        lambda j: f"list_sum(list_transform(l.topk_logprobs[1:{j}], lambda x: exp(x)))",
        lambda col, q: f"approx_quantile({col}, {q})")


def firstkd_coverage_sql(k):
    return coverage_sql(
        k, "labels", "samples", lambda j: f"topk_mass(l.topk_logprobs, {j})",
        lambda col, q: f"approx_percentile_cont({q}) WITHIN GROUP (ORDER BY {col})")


def calibration_sql(labels, samples, conf, correct, target_lp):
    """Pure-SQL calibration report (T = 1, confidence = stored top-1 probability): ECE, MCE,
    Brier and NLL over 15 equal-width bins, adaptive ECE over 15 equal-mass bins (ntile), for
    every (positions, source, split) group and the totals. Runs in DuckDB and DataFusion."""
    return f"""WITH base AS (
  SELECT s.source, s.split, l.in_loss, {conf} AS conf, {correct} AS correct, -({target_lp}) AS nll
  FROM {labels} l JOIN {samples} s ON l.sample_id = s.sample_id
),
expanded AS (
  SELECT 'all' AS positions, source, split, conf, correct, nll FROM base
  UNION ALL SELECT 'in_loss', source, split, conf, correct, nll FROM base WHERE in_loss
  UNION ALL SELECT 'all', NULL, NULL, conf, correct, nll FROM base
  UNION ALL SELECT 'in_loss', NULL, NULL, conf, correct, nll FROM base WHERE in_loss
),
bins AS (
  SELECT positions, source, split, least(floor(conf * 15), 14) AS bin, count(*) AS cnt,
         sum(conf) AS sc, sum(correct) AS sa, sum((conf - correct) * (conf - correct)) AS se,
         sum(nll) AS snll
  FROM expanded GROUP BY positions, source, split, least(floor(conf * 15), 14)
),
runs AS (
  SELECT positions, source, split, run, count(*) AS cnt, sum(conf) AS sc, sum(correct) AS sa
  FROM (SELECT positions, source, split, conf, correct,
               ntile(15) OVER (PARTITION BY positions, source, split ORDER BY conf, correct) AS run
        FROM expanded) r
  GROUP BY positions, source, split, run
),
adaptive AS (
  SELECT positions, source, split, sum(abs(sa - sc)) / sum(cnt) AS adaptive_ece
  FROM runs GROUP BY positions, source, split
)
SELECT b.positions, b.source, b.split, sum(b.cnt) AS n, sum(b.sa) / sum(b.cnt) AS accuracy,
       sum(b.sc) / sum(b.cnt) AS confidence, sum(abs(b.sa - b.sc)) / sum(b.cnt) AS ece,
       max(abs(b.sa - b.sc) / b.cnt) AS mce, sum(b.se) / sum(b.cnt) AS brier,
       sum(b.snll) / sum(b.cnt) AS nll, max(a.adaptive_ece) AS adaptive_ece
FROM bins b JOIN adaptive a
  ON (b.positions = a.positions) AND (b.source IS NOT DISTINCT FROM a.source)
     AND (b.split IS NOT DISTINCT FROM a.split)
GROUP BY b.positions, b.source, b.split
ORDER BY b.positions, b.source NULLS LAST, b.split NULLS LAST"""


def check_same_sql_result(fk_csv, dd_rows):
    """firstkd's CSV of calibration_sql against DuckDB's rows: same groups, n, and metrics
    within 1e-6 (the engines add in different orders)."""
    lines = list(csv.reader(io.StringIO(fk_csv)))
    header, body = lines[0], lines[1:]
    assert len(body) == len(dd_rows), (len(body), len(dd_rows))
    for fk, dd in zip(body, dd_rows):
        for name, a, b in zip(header, fk, dd):
            if b is None or isinstance(b, str):
                assert (a or None) == b, (name, fk, dd)
            else:
                assert abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b))), (name, fk, dd)


def firstkd_calibration_sql():
    return calibration_sql("labels", "samples", "topk_mass(l.topk_logprobs, 1)",
                           "CASE WHEN target_rank(l.topk_ids, l.target_id) = 1 THEN 1.0 ELSE 0.0 END",
                           "CAST(l.target_logprob AS DOUBLE)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--store", default="/tmp/firstkd-bench-store")
    ap.add_argument("--firstkd", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "firstkd"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--zstd-level", type=int, default=19,
                    help="zstd level of the store synth writes (19, label's default; 3 writes 10^8 rows faster)")
    ap.add_argument("--print-sql", action="store_true",
                    help="print the pure-SQL calibration query in firstkd's spelling and exit (to run it "
                         "by hand: EXPLAIN ANALYZE, SET, --memory-limit)")
    ap.add_argument("--reports-only", action="store_true",
                    help="time only firstkd's two reports against DuckDB's SQL (at 10^8 rows the pure-SQL "
                         "calibration query in firstkd held more memory than the machine's 24 GiB)")
    ap.add_argument("--skip-inline", action="store_true",
                    help="do not time the pure-SQL query with --inline-ctes (slow at 10^8 rows)")
    args = ap.parse_args()
    if args.print_sql:
        print(firstkd_calibration_sql())
        return

    if not os.path.exists(os.path.join(args.store, "manifest.json")):
        start = time.perf_counter()
        run_firstkd(args.firstkd, ["synth", args.store, "--rows", str(args.rows), "--dtype", args.dtype,
                                   "--zstd-level", str(args.zstd_level)])
        print(f"synth: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        PEAK[0] = 0.0
    manifest = json.load(open(os.path.join(args.store, "manifest.json")))
    k = manifest["k"]
    label_rows = sum(p["labels"]["rows"] for p in manifest["parts"])

    con = duckdb.connect()
    con.execute(f"SET threads = {args.threads}")
    labels = f"read_parquet('{args.store}/labels/*.parquet')"
    samples = f"read_parquet('{args.store}/samples/*.parquet')"
    rows = []

    # Coverage.
    dd_cov = lambda: con.execute(duckdb_coverage_sql(args.store, k)).fetchall()
    fk_t, fk_out, dd_t, dd_out = timed_pair(
        lambda: run_firstkd(args.firstkd, ["stats", args.store, "--report", "coverage", "--json"]), dd_cov, args.repeat)
    fk_total = [r for r in json.loads(fk_out)["coverage"]["rows"] if r["positions"] == "all" and r["source"] is None][0]
    dd_total = [r for r in dd_out if r[0] == "all" and r[1] is None][0]
    assert fk_total["n"] == dd_total[3] == label_rows, (fk_total["n"], dd_total[3])
    assert abs(fk_total["mean_mass"][-1] - dd_total[3 + k]) < 1e-9, (fk_total["mean_mass"], dd_total)
    add(rows, ("coverage (`stats --report coverage`: SQL selects, Rust accumulates; top-1..k mass mean, 3 quantiles, frac >= 0.95)", fk_t, dd_t))
    # The same report as one SQL aggregate in both engines (firstkd's report until 2026-12-03).
    variants = [([], "coverage, the same one-aggregate SQL (`firstkd sql`)"),
                (["--inline-ctes"], "coverage, the same one-aggregate SQL (`firstkd sql --inline-ctes`)")]
    for extra, name in [] if args.reports_only else variants:
        if extra and args.skip_inline:
            continue
        t, out, dd_t2, _ = timed_pair(lambda: run_firstkd(
            args.firstkd, ["sql", args.store, "--format", "csv", *extra, firstkd_coverage_sql(k)]), dd_cov, args.repeat)
        total = [r for r in csv.reader(io.StringIO(out)) if r[0] == "all" and r[1] == ""][0]
        assert int(total[3]) == label_rows and abs(float(total[3 + k]) - dd_total[3 + k]) < 1e-9, (total, dd_total)
        add(rows, (name, t, dd_t2))

    # Calibration: firstkd's report (SQL selects positions, firstkd::calibration computes).
    dd_sql = calibration_sql(labels, samples, "exp(l.topk_logprobs[1])",
                             "CASE WHEN l.topk_ids[1] = l.target_id THEN 1.0 ELSE 0.0 END", "l.target_logprob")
    dd_cal = lambda: con.execute(dd_sql).fetchall()
    fk_t, fk_out, dd_t, dd_out = timed_pair(
        lambda: run_firstkd(args.firstkd, ["stats", args.store, "--report", "calibration", "--json"]), dd_cal, args.repeat)
    fk_total = [g for g in json.loads(fk_out)["calibration"]["groups"] if g["positions"] == "in_loss" and g["source"] is None][0]["report"]
    dd_total = [r for r in dd_out if r[0] == "in_loss" and r[1] is None][0]
    assert fk_total["n"] == dd_total[3]
    assert abs(fk_total["ece"] - dd_total[6]) < 1e-4, (fk_total["ece"], dd_total[6])
    # Not exact: where float16 rounding makes the stored top-k mass exceed 1 the uniform-tail
    # mode renormalises over the top-k (docs/calibration.md), DuckDB uses the stored value.
    assert abs(fk_total["nll"] - dd_total[9]) < 1e-4, (fk_total["nll"], dd_total[9])
    add(rows, ("calibration (`stats --report calibration` vs pure SQL in DuckDB; ECE, adaptive ECE, MCE, Brier, NLL)", fk_t, dd_t))

    # The same pure-SQL calibration query in both engines.
    fk_sql = firstkd_calibration_sql()
    if args.reports_only:
        return print_table(rows, label_rows, k, args)
    try:
        fk_t, fk_out, dd_t, _ = timed_pair(
            lambda: run_firstkd(args.firstkd, ["sql", args.store, "--format", "csv", fk_sql]), dd_cal, args.repeat)
        check_same_sql_result(fk_out, dd_out)
    except subprocess.CalledProcessError as e:
        # Reported, not hidden: e.g. the window sort past --memory-limit at 10^8 rows.
        last = (e.stderr or "").strip().splitlines() or [f"killed by signal {-e.returncode}"
                                                         if e.returncode < 0 else "no message"]
        fk_t = f"failed, exit {e.returncode}: {last[-1][:120]}"
    add(rows, ("calibration, the same pure-SQL query (`firstkd sql` vs DuckDB)", fk_t, dd_t))
    if not args.skip_inline:
        # DataFusion's own plan, every CTE inlined at each reference (firstkd before 2026-12-03).
        fk_t, fk_out, dd_t, _ = timed_pair(lambda: run_firstkd(
            args.firstkd, ["sql", args.store, "--format", "csv", "--inline-ctes", fk_sql]), dd_cal, args.repeat)
        check_same_sql_result(fk_out, dd_out)
        add(rows, ("calibration, the same pure-SQL query, `firstkd sql --inline-ctes`", fk_t, dd_t))

    print_table(rows, label_rows, k, args)


def print_table(rows, label_rows, k, args):
    print(f"store: {label_rows:,} label rows, k = {k}, {args.dtype}; threads: {args.threads}; "
          f"median of {args.repeat} runs\n")
    import resource
    print("| query | firstkd (DataFusion) s | DuckDB s | DuckDB / firstkd | firstkd peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, fk, dd, peak in rows:
        if isinstance(fk, str):
            print(f"| {name} | {fk} | {dd:.2f} | - | {peak:.0f} |")
        else:
            print(f"| {name} | {fk:.2f} | {dd:.2f} | {dd / fk:.2f} | {peak:.0f} |")
    # DuckDB runs in this process: its high-water mark over every query above.
    duck = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nDuckDB (in this Python process) peak RSS over all queries: {duck:.0f} MiB")


if __name__ == "__main__":
    main()
