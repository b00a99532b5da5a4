#!/usr/bin/env python3
"""Load a `firstkd export --format axolotl` directory the way axolotl's KD trainer does, and
write the distribution a student would be trained on at every position.

    python3 scripts/axolotl_collate.py EXPORT_DIR OUT.json [--batch 4] [--pad-to-multiple-of 8]

Replicates, in numpy, axolotl's `DataCollatorForKD` (src/axolotl/integrations/kd/collator.py):
per position the target rows are padded to the batch's largest k with log-prob -1e9, id 0,
mask 0; sequences are right-padded to the batch length (rounded up to a multiple) with whole
padding rows; labels are padded with -100. Then the alignment of its KD loss
(kernels/liger.py): hidden state i of the student is paired with target row i (no shift),
only entries with target_mask 1 count, and the teacher distribution is exp(target_logprobs)
as stored (axolotl does not renormalise the teacher). Checks on the way that the CE labels
(shifted inside the loss) agree: row i is trained exactly where labels[i + 1] != -100, and
then labels[i + 1] == input_ids[i + 1].

OUT.json: {"rows": [[row, position, [ids...], [probs...]], ...], "batches": n,
"tensor_shapes": [[B, S, K], ...]}; row numbers count sequences over the files in name order.
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

PAD_LOGPROB = -1e9


def load_rows(export_dir):
    files = sorted(glob.glob(os.path.join(export_dir, "data", "*.parquet"))) + sorted(
        glob.glob(os.path.join(export_dir, "data", "*.jsonl"))
    )
    if not files:
        sys.exit(f"{export_dir}: no data/*.parquet or data/*.jsonl files")
    rows = []
    for f in files:
        if f.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(f).to_pylist())
        else:
            with open(f) as fh:
                rows.extend(json.loads(line) for line in fh if line.strip())
    return rows


def collate(features, pad_to_multiple_of):
    """DataCollatorForKD on a list of rows: the padded [B, S, K] arrays."""
    max_len = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        max_len = (max_len + pad_to_multiple_of - 1) // pad_to_multiple_of * pad_to_multiple_of
    max_k = max(len(pos) for f in features for pos in f["target_token_ids"])
    b = len(features)
    input_ids = np.zeros((b, max_len), dtype=np.int64)
    attention = np.zeros((b, max_len), dtype=np.int64)
    labels = np.full((b, max_len), -100, dtype=np.int64)
    t_lp = np.full((b, max_len, max_k), PAD_LOGPROB, dtype=np.float32)
    t_ids = np.zeros((b, max_len, max_k), dtype=np.int64)
    t_mask = np.zeros((b, max_len, max_k), dtype=np.int32)
    for r, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[r, :n] = f["input_ids"]
        attention[r, :n] = f["attention_mask"]
        labels[r, :n] = f["labels"]
        for i, (ids, lps, mask) in enumerate(
            zip(f["target_token_ids"], f["target_logprobs"], f["target_mask"])
        ):
            pad = max_k - len(ids)
            t_ids[r, i] = (list(ids) + [0] * pad)[:max_k]
            t_lp[r, i] = (list(lps) + [PAD_LOGPROB] * pad)[:max_k]
            t_mask[r, i] = (list(mask) + [0] * pad)[:max_k]
    return input_ids, attention, labels, t_ids, t_lp, t_mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir")
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--pad-to-multiple-of", type=int, default=8)
    args = ap.parse_args()
    rows = load_rows(args.export_dir)
    out, shapes, errors = [], [], []
    for start in range(0, len(rows), args.batch):
        feats = rows[start : start + args.batch]
        input_ids, attention, labels, t_ids, t_lp, t_mask = collate(feats, args.pad_to_multiple_of)
        shapes.append(list(t_lp.shape))
        b, s, _ = t_lp.shape
        # liger: hidden state i <-> target row i; CE labels shifted: labels[:, 1:].
        shifted = np.concatenate([labels[:, 1:], np.full((b, 1), -100)], axis=1)
        for r in range(b):
            for i in range(s):
                valid = t_mask[r, i].astype(bool)
                trained = shifted[r, i] != -100
                if valid.any() != trained:
                    errors.append(f"row {start + r} position {i}: mask {valid.any()} but label {shifted[r, i]}")
                    continue
                if not valid.any():
                    continue
                if shifted[r, i] != input_ids[r, i + 1]:
                    errors.append(f"row {start + r} position {i}: label {shifted[r, i]} != next input id")
                probs = np.exp(t_lp[r, i][valid].astype(np.float64))
                out.append([start + r, i, t_ids[r, i][valid].tolist(), probs.tolist()])
    if errors:
        sys.exit("alignment errors:\n" + "\n".join(errors[:20]))
    with open(args.out, "w") as f:
        json.dump({"rows": out, "batches": len(shapes), "tensor_shapes": shapes}, f)
    print(json.dumps({"sequences": len(rows), "trained_positions": len(out), "batches": len(shapes)}))


if __name__ == "__main__":
    main()
