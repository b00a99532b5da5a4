#!/usr/bin/env python3
"""Prints the detailed Markdown table of a `firstkd compare --plot-dir DIR` run (DIR/reports.json):
per task and model, accuracy (with a 95% normal-approximation interval half-width), length-
normalised accuracy, ECE, Brier, NLL and mean confidence. Standard library only.

    python3 scripts/results_table.py out/experiment-full/plots/reports.json
"""
import json
import math
import sys


def main(path):
    with open(path) as f:
        rows = json.load(f)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    print("| task | model | n | acc | ±95% | acc_norm | ECE | Brier | NLL | mean conf |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for task in tasks:
        for r in (r for r in rows if r["task"] == task):
            rep = r["reports"][0]
            cal = rep["calibration"]
            n, acc = rep["n"], rep["accuracy"]
            half = 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / n)
            cells = [rep.get("acc_norm"), cal["ece"], rep.get("brier_multiclass"), cal.get("nll"),
                     cal["mean_confidence"]]
            # acc_norm exists only for cloze scoring; a missing value prints as "-".
            text = " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
            print(f"| {task} | {r['model']} | {n} | {acc:.3f} | {half:.3f} | {text} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
