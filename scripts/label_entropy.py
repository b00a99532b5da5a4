#!/usr/bin/env python3
"""Order-0 entropy of a 2.0 store's label columns: the bytes per token that any coder which
sees each column's values independently (as Parquet encodings + zstd do) cannot beat.

    python3 scripts/label_entropy.py STORE

Prints, per column, the empirical entropy of its values (ids and probabilities per rank of
the list) next to the bytes the store spends on it (Parquet column chunk sizes).
"""
import collections
import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq


def entropy_bits(values):
    counts = np.array(list(collections.Counter(values.tolist()).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def main():
    store = sys.argv[1]
    m = json.load(open(os.path.join(store, "manifest.json")))
    if not m["schema_version"].startswith("2."):
        raise SystemExit("a 2.0 store is needed (firstkd convert STORE --out NEW)")
    k = m["k"]
    files = [os.path.join(store, p["labels"]["file"]) for p in m["parts"]]
    t = pq.ParquetFile(files[0]).read() if len(files) == 1 else __import__("pyarrow").concat_tables([pq.read_table(f) for f in files])
    n = t.num_rows
    stored = collections.Counter()
    for f in files:
        md = pq.ParquetFile(f).metadata
        for rg in range(md.num_row_groups):
            for c in range(md.row_group(rg).num_columns):
                col = md.row_group(rg).column(c)
                stored[col.path_in_schema.split(".")[0]] += col.total_compressed_size
    ids = t["topk_ids"].combine_chunks().flatten().to_numpy().reshape(n, k)
    qs = t["topk_probs_q"].combine_chunks().flatten().to_numpy().reshape(n, k)
    tq = t["target_logprob_q"].to_numpy(zero_copy_only=False)
    eq = t["entropy_q"].to_numpy()
    rows = [
        ("topk_ids", sum(entropy_bits(ids[:, j]) for j in range(k)) / 8),
        ("topk_probs_q", sum(entropy_bits(qs[:, j]) for j in range(k)) / 8),
        # null or a value: the null flag plus the values where set
        ("target_logprob_q", (entropy_bits(np.isnan(tq)) + np.mean(~np.isnan(tq)) * entropy_bits(tq[~np.isnan(tq)])) / 8),
        ("entropy_q", entropy_bits(eq) / 8),
    ]
    print(f"{store}: {n} label rows, k = {k}")
    print("| column | order-0 entropy, bytes/token | stored, bytes/token |")
    print("|---|---:|---:|")
    for name, h in rows:
        print(f"| {name} | {h:.2f} | {stored[name] / n:.2f} |")
    rest = sum(v for key, v in stored.items() if key not in dict(rows)) / n
    print(f"| sample_id, position, in_loss | - | {rest:.2f} |")
    print(f"| total | {sum(h for _, h in rows):.2f} | {sum(stored.values()) / n:.2f} |")


if __name__ == "__main__":
    main()
