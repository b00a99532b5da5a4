#!/usr/bin/env python3
"""Write soft labels in DistillKit's compressed logit layout, for testing `firstkd import
--format distillkit` without DistillKit (it is not on PyPI and needs torch).

    python3 scripts/distillkit_encode.py AXOLOTL_RAW_EXPORT OUT_DIR [--d 49152]
        [--exact-k 1] [--terms 0,1] [--bits 6] [--scale-dtype float16] [--no-delta]

Input: a `firstkd export --temperature raw` directory (full-vocabulary log-probs at T = 1).
Output: OUT_DIR/data_0.parquet with input_ids list<uint64>, bytepacked_indices and
compressed_logprobs list<list<uint8>>, OUT_DIR/compression_config.yaml, and
OUT_DIR/expected.json (the ids and log-probs DistillKit's decoder gives back, computed here
independently of firstkd) so a test can check firstkd's decoder.

An independent numpy re-implementation of arcee-ai/DistillKit distillkit/compression
(bitpack.py, monotonic_logprobs.py): ids sorted by descending log-prob, packed MSB first in
ceil(log2(d)) bits per id; log-probs delta-encoded, the first exact_k kept as float32, the
rest fitted by least squares on t^p over t = 0..T-1, the residual quantised in one bin
(scale = max|r| / 2^(bits-1) in scale_dtype, q = clamp(round(r / scale)) - qmin). Like
DistillKit's capture, a position is stored for every input id: the last one (which predicts
a token after the row) repeats the row's last real distribution.
"""
import argparse
import glob
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PAD = -1e8


def pack_bits(values, bits):
    out = []
    acc, n = 0, 0
    for v in values:
        for b in range(bits - 1, -1, -1):
            acc = (acc << 1) | ((int(v) >> b) & 1)
            n += 1
            if n == 8:
                out.append(acc)
                acc, n = 0, 0
    if n:
        out.append(acc << (8 - n))
    return out


def unpack_bits(data, bits, count):
    vals, pos = [], 0
    for _ in range(count):
        v = 0
        for _ in range(bits):
            v = (v << 1) | ((data[pos // 8] >> (7 - pos % 8)) & 1)
            pos += 1
        vals.append(v)
    return vals


def np_dtype(name):
    return {"float16": np.float16, "float32": np.float32, "float64": np.float64}[name]


def encode(lp, cfg):
    """Bytes of one position's log-probs (sorted descending), and their decoded values."""
    k, ek = cfg["k"], cfg["exact_k"]
    v = np.asarray(lp, dtype=np.float32)
    if cfg["delta_encoding"]:
        v = np.concatenate([v[:1], np.diff(v)]).astype(np.float32)
    exact = v[:ek].astype(np.float32)
    tail = v[ek:].astype(np.float32)
    t = np.arange(k - ek, dtype=np.float32)
    X = np.stack([t ** p for p in cfg["polynomial_terms"]], axis=1).astype(np.float32)
    coeffs = (np.linalg.pinv(X.astype(np.float64), rcond=1e-5) @ tail.astype(np.float64)).astype(np.float32)
    fit = (X @ coeffs).astype(np.float32)
    resid = tail - fit
    (b,) = [cfg["residual_bins"][0]["element_bits"]]
    sd = np_dtype(cfg["residual_bins"][0]["scale_dtype"])
    m = float(np.abs(resid).max())
    scale = sd(m / 2 ** (b - 1) if m > 0 else 1.0)
    qmin, qmax = -(2 ** (b - 1)), 2 ** (b - 1) - 1
    q = np.clip(np.round(resid / np.float32(scale)), qmin, qmax).astype(np.int64) - qmin
    data = exact.tobytes() + coeffs.tobytes() + np.array([scale], dtype=sd).tobytes() + bytes(pack_bits(q, b))
    # DistillKit's decoder, independently: exact, fit + dequantised residual, cumsum.
    back_q = np.array(unpack_bits(list(data[-math.ceil(len(q) * b / 8):]), b, len(q)))
    deq = (back_q + qmin) * float(scale)
    vals = np.concatenate([exact.astype(np.float64), fit.astype(np.float64) + deq])
    if cfg["delta_encoding"]:
        vals = np.cumsum(vals)
    return list(data), vals.tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--d", type=int, default=49152)
    ap.add_argument("--exact-k", type=int, default=1)
    ap.add_argument("--terms", default="0,1")
    ap.add_argument("--bits", type=int, default=6)
    ap.add_argument("--scale-dtype", default="float16")
    ap.add_argument("--no-delta", action="store_true")
    args = ap.parse_args()
    rows = []
    for f in sorted(glob.glob(os.path.join(args.export_dir, "data", "*"))):
        if f.endswith(".parquet"):
            rows.extend(pq.read_table(f).to_pylist())
        elif f.endswith(".jsonl"):
            with open(f) as fh:
                rows.extend(json.loads(line) for line in fh if line.strip())
    k = len(rows[0]["target_token_ids"][0])
    cfg = {
        "d": args.d,
        "k": k,
        "exact_k": args.exact_k,
        "exact_dtype": "float32",
        "polynomial_terms": [int(p) for p in args.terms.split(",")],
        "term_dtype": "float32",
        "residual_bins": [
            {"scale_dtype": args.scale_dtype, "element_bits": args.bits, "num_elements": k - args.exact_k}
        ],
        "delta_encoding": not args.no_delta,
        "error_diffusion": False,
        "normalize_t": False,
    }
    bits = math.ceil(math.log2(args.d))
    table = {"input_ids": [], "bytepacked_indices": [], "compressed_logprobs": []}
    expected = []
    for row in rows:
        n = len(row["input_ids"])
        packed, comp, exp_rows = [], [], []
        for i in range(n):
            src = min(i, n - 2)  # the last position repeats the last real one
            pairs = [
                (lp, t)
                for t, lp in zip(row["target_token_ids"][src], row["target_logprobs"][src])
                if lp > PAD
            ]
            pairs.sort(key=lambda p: (-p[0], p[1]))
            ids = [t for _, t in pairs]
            data, vals = encode([lp for lp, _ in pairs], cfg)
            packed.append(pack_bits(ids, bits))
            comp.append(data)
            if i < n - 1:
                exp_rows.append([ids, vals])
        table["input_ids"].append(row["input_ids"])
        table["bytepacked_indices"].append(packed)
        table["compressed_logprobs"].append(comp)
        expected.append(exp_rows)
    schema = pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.uint64())),
            pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
            pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
        ]
    )
    os.makedirs(args.out_dir, exist_ok=True)
    pq.write_table(pa.table(table, schema=schema), os.path.join(args.out_dir, "data_0.parquet"))
    with open(os.path.join(args.out_dir, "compression_config.yaml"), "w") as f:
        # yaml.safe_dump of DistillKit's config model is plain YAML; JSON is a subset of it.
        json.dump(cfg, f, indent=2)
    with open(os.path.join(args.out_dir, "expected.json"), "w") as f:
        json.dump(expected, f)
    print(json.dumps({"sequences": len(rows), "k": k, "index_bits": bits}))


if __name__ == "__main__":
    main()
