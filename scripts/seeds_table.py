#!/usr/bin/env python3
"""Mean and standard deviation over seeds of a `firstkd compare --plot-dir DIR` run
(DIR/reports.json) whose models are named LOSS-sSEED (e.g. `kd-s0`, `kd-s1`, `kd-s2`, as
scripts/first-experiment.sh --pair qwen names them); models without a seed suffix are one row
each (std "-"). Per task: accuracy and ECE as mean ± sample standard deviation (n - 1), the
number of seeds, and the items per seed. Standard library only.

    python3 scripts/seeds_table.py out/experiment-qwen-full/plots/reports.json
"""
import json
import re
import statistics
import sys


def group_name(model):
    m = re.fullmatch(r"(.+)-s(\d+)", model)
    return m.group(1) if m else model


def cell(values):
    if len(values) == 1:
        return f"{values[0]:.3f}", "-"
    return f"{statistics.mean(values):.3f}", f"{statistics.stdev(values):.3f}"


def main(path):
    with open(path) as f:
        rows = json.load(f)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    groups = list(dict.fromkeys(group_name(r["model"]) for r in rows))
    print("| task | model | seeds | n | acc mean | acc std | ECE mean | ECE std |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for task in tasks:
        for g in groups:
            reps = [r["reports"][0] for r in rows if r["task"] == task and group_name(r["model"]) == g]
            if not reps:
                continue
            acc = cell([r["accuracy"] for r in reps])
            ece = cell([r["calibration"]["ece"] for r in reps])
            print(f"| {task} | {g} | {len(reps)} | {reps[0]['n']} | {acc[0]} | {acc[1]} | {ece[0]} | {ece[1]} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
