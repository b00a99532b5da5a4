"""Agreement of two sets of teacher labels over the same windows: a firstkd store (its labels/*.parquet)
or a Parquet file written by scripts/bench_label_reference.py, on either side.

Usage: python compare_labels.py A B [--json]
A, B: a store directory or a .parquet file. Rows are matched on (sample_id, position); sample ids
of a store are renumbered by order of first appearance so that they match the reference's window
index (both label the same windows in the same order).

Prints, over the positions both sides label: the fraction whose top-1 id agrees, whose top-k id
sets agree and whose top-k lists agree in order, and the mean / max absolute difference of the
top-1 log-prob, of the target log-prob and of the entropy.
"""
import glob, json, os, sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq


def load(path):
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "labels", "*.parquet")))
        if not files:
            sys.exit(f"{path}: no labels/*.parquet")
        tables = [pq.read_table(f) for f in files]
    else:
        tables = [pq.read_table(path)]
    cols = {"sample_id": [], "position": [], "ids": [], "lp": [], "target": [], "entropy": []}
    for t in tables:
        cols["sample_id"].append(t["sample_id"].to_numpy().astype(np.int64))
        cols["position"].append(t["position"].to_numpy().astype(np.int64))
        ids = t["topk_ids"].combine_chunks()
        lp = pc.cast(t["topk_logprobs"].combine_chunks().flatten(), "float64").to_numpy()
        k = len(lp) // max(len(t), 1)
        cols["ids"].append(ids.flatten().to_numpy().astype(np.int64).reshape(-1, k))
        cols["lp"].append(lp.reshape(-1, k))
        cols["target"].append(pc.cast(t["target_logprob"], "float64").to_numpy())
        cols["entropy"].append(pc.cast(t["entropy"], "float64").to_numpy())
    d = {c: np.concatenate(v) for c, v in cols.items()}
    # Renumber samples by first appearance (store ids are hashes, reference ids are indices).
    _, first = np.unique(d["sample_id"], return_index=True)
    order = {sid: i for i, sid in enumerate(d["sample_id"][np.sort(first)])}
    d["sample_id"] = np.array([order[s] for s in d["sample_id"]], dtype=np.int64)
    return d


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        sys.exit(__doc__)
    a, b = load(args[0]), load(args[1])
    key = lambda d: d["sample_id"] * (1 << 32) + d["position"]
    ka, kb = key(a), key(b)
    common, ia, ib = np.intersect1d(ka, kb, return_indices=True)
    if len(common) == 0:
        sys.exit("no common (sample, position) rows")
    ida, idb = a["ids"][ia], b["ids"][ib]
    k = min(ida.shape[1], idb.shape[1])
    ida, idb = ida[:, :k], idb[:, :k]
    sets = np.mean([set(x) == set(y) for x, y in zip(ida, idb)])
    out = {
        "positions": int(len(common)),
        "only_a": int(len(ka) - len(common)),
        "only_b": int(len(kb) - len(common)),
        "k": int(k),
        "top1_agree": float(np.mean(ida[:, 0] == idb[:, 0])),
        "topk_set_agree": float(sets),
        "topk_order_agree": float(np.mean(np.all(ida == idb, axis=1))),
        "top1_logprob_mean_abs_diff": float(np.mean(np.abs(a["lp"][ia, 0] - b["lp"][ib, 0]))),
        "top1_logprob_max_abs_diff": float(np.max(np.abs(a["lp"][ia, 0] - b["lp"][ib, 0]))),
        "target_logprob_mean_abs_diff": float(np.mean(np.abs(a["target"][ia] - b["target"][ib]))),
        "target_logprob_max_abs_diff": float(np.max(np.abs(a["target"][ia] - b["target"][ib]))),
        "entropy_mean_abs_diff": float(np.mean(np.abs(a["entropy"][ia] - b["entropy"][ib]))),
    }
    if "--json" in sys.argv:
        print(json.dumps(out))
    else:
        for name, v in out.items():
            print(f"{name}: {v:.6g}" if isinstance(v, float) else f"{name}: {v}")


if __name__ == "__main__":
    main()
