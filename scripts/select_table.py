#!/usr/bin/env python3
"""The table of scripts/select-compare.sh: per variant, the store it trained on (selection,
labels and whole-store bytes per token, read from the manifests), and the held-out next-token
NLL, top-1 accuracy and ECE as mean +- sample standard deviation over the seeds (from the
`firstkd stats --json` reports in OUT/eval/NAME-sSEED.json). Several OUT folders (runs with
the same settings and other VARIANTS) make one table; a variant in more than one is taken from
the first. Also per store: the mean list length and the mean stored probability mass (read
with pyarrow); per variant the mean top-1 confidence. `--expect V1,V2,...` exits 1 naming any
variant without a report (scripts/select-compare.sh passes its variants).

    python3 scripts/select_table.py out/select-compare-full [OUT ...] [--expect ce,top5,...]
"""
import glob
import json
import math
import os
import re
import statistics
import sys

STORE = {"ce": "topk", "top5": "topk", "top5-tail": "topk", "first": "topk", "top-p": "topp",
         "sampled": "sample-s{seed}", "online": None, "first-ce": "topk"}
LOSS = {"ce": "ce", "top5": "kd", "top5-tail": "kd-tail", "first": "first", "top-p": "kd",
        "sampled": "sampled", "online": "online", "first-ce": "mix (0.5 first + 0.5 ce)"}


def store_size(path):
    with open(os.path.join(path, "manifest.json")) as f:
        m = json.load(f)
    rows = sum(p["labels"]["rows"] for p in m["parts"])
    labels = sum(p["labels"]["bytes"] for p in m["parts"])
    whole = labels + sum(p["samples"]["bytes"] for p in m["parts"])
    sel = m.get("selection") or {"mode": "top-k", "k": m["k"]}
    # The seed of a sample store is the run's seed; the table names it once for all seeds.
    desc = ",".join(f"{k}={v}" for k, v in sel.items() if k not in ("mode", "seed"))
    if "seed" in sel:
        desc += ",seed=the run's"
    lens, mass = list_stats(path, m)
    return f"{sel['mode']}:{desc}", labels / rows, whole / rows, m.get("temperature"), lens, mass


def list_stats(path, manifest):
    """Mean list length and mean stored probability mass over the store's positions."""
    import pyarrow.parquet as pq

    q = manifest.get("quantization")
    n = total_len = total_mass = 0
    for f in sorted(glob.glob(os.path.join(path, "labels", "*.parquet"))):
        col = "topk_probs_q" if q else "topk_logprobs"
        for row in pq.read_table(f, columns=[col])[col].to_pylist():
            n += 1
            total_len += len(row)
            if q:
                total_mass += sum(row) / q["prob_scale"]
            else:
                total_mass += sum(math.exp(v) for v in row)
    return total_len / max(n, 1), total_mass / max(n, 1)


def report(path):
    with open(path) as f:
        d = json.load(f)
    groups = d["calibration"]["groups"]
    r = next(g for g in groups if g.get("source") is None)["report"]
    return r


def cell(values, digits=3):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main(outs, expect):
    runs, home = {}, {}
    for out in outs:
        ev = os.path.join(out, "eval")
        if not os.path.isdir(ev):
            sys.exit(f"select_table: {ev}: no such folder (not a scripts/select-compare.sh output)")
        for name in sorted(os.listdir(ev)):
            if not name.endswith(".json"):
                continue
            base = name[:-5]
            m = re.fullmatch(r"(.+)-s(\d+)", base)
            variant, seed = (m.group(1), int(m.group(2))) if m else (base, None)
            if home.setdefault(variant, out) != out:
                continue
            runs.setdefault(variant, []).append((seed, report(os.path.join(ev, name))))
    order = ["teacher", "untrained", "ce", "top5", "top5-tail", "first", "first-ce", "top-p", "sampled",
             "sampled-12", "online"]
    n_eval = None
    missing = [v for v in expect if v not in runs]
    if missing:
        sys.exit(f"select_table: no evaluation report for {', '.join(missing)} in {', '.join(outs)}")
    print("| variant | loss | store selection | mean list length | mean stored mass | labels B/token | "
          "whole store B/token | seeds | held-out NLL (nats) | top-1 acc | mean confidence | ECE |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in order + sorted(set(runs) - set(order)):
        if v not in runs:
            continue
        reps = runs[v]
        n_eval = reps[0][1]["n"]
        sel, lb, wb, ll, lm = "-", "-", "-", "-", "-"
        store = STORE.get(v)
        m = re.fullmatch(r"sampled-(\d+)", v)
        if m:
            store = "sample" + m.group(1) + "-s{seed}"
        if store is not None:
            sizes = [store_size(os.path.join(home[v], "stores", store.format(seed=s))) for s, _ in reps]
            sel = sizes[0][0]
            if v in ("first", "first-ce") and sizes[0][3]:
                sel += f" (T = {sizes[0][3]['value']:.3f})" if isinstance(sizes[0][3], dict) else ""
            lb = f"{statistics.mean(x[1] for x in sizes):.2f}"
            wb = f"{statistics.mean(x[2] for x in sizes):.2f}"
            ll = f"{statistics.mean(x[4] for x in sizes):.2f}"
            lm = f"{statistics.mean(x[5] for x in sizes):.3f}"
        elif v == "online":
            sel, lb, wb = "none (teacher in the loop)", "0", "0"
        seeds = len([s for s, _ in reps if s is not None]) or "-"
        nll = cell([r["nll"] for _, r in reps])
        acc = cell([r["accuracy"] for _, r in reps])
        ece = cell([r["ece"] for _, r in reps], 4)
        conf = cell([r["mean_confidence"] for _, r in reps])
        loss = "sampled" if m else LOSS.get(v, "-")
        print(f"| {v} | {loss} | {sel} | {ll} | {lm} | {lb} | {wb} | {seeds} | {nll} | {acc} | {conf} | {ece} |")
    print(f"\nHeld-out positions per evaluation: {n_eval}.")


if __name__ == "__main__":
    args = sys.argv[1:]
    expect = []
    if "--expect" in args:
        i = args.index("--expect")
        if i + 1 >= len(args):
            sys.exit("select_table: --expect needs a comma-separated list of variants")
        expect = [v for v in args[i + 1].split(",") if v]
        del args[i:i + 2]
    if not args:
        sys.exit(__doc__)
    main(args, expect)
