#!/usr/bin/env bash
# Bytes per token and probability error of the store layouts on real teacher labels.
#
#   scripts/store-size.sh [--chars N] [--store EXISTING_FLOAT32_STORE] [OUT_DIR]
#
# Labels the first N characters (default 120000) of WikiText-2 test (../shared/data) with the
# SmolLM2-135M teacher at --dtype float32 (or takes an existing float32 store), converts it
# with `firstkd convert` to quantized (2.0) and float16 (1.0), and prints one table: labels and
# whole-store bytes per token, and the largest errors against the float32 labels (decoded
# by scripts/read_store.py, independently of firstkd).
set -euo pipefail
cd "$(dirname "$0")/.."
chars=120000
src=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --chars) chars="$2"; shift 2 ;;
    --store) src="$2"; shift 2 ;;
    *) break ;;
  esac
done
out="${1:-${TMPDIR:-/tmp}/firstkd-store-size}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/firstkd"
rm -rf "$out" && mkdir -p "$out"
if [[ -z "$src" ]]; then
  data="../shared/data/wikitext-2/test.txt"
  [[ -f "$data" ]] || { echo "store-size: $data not found" >&2; exit 1; }
  head -c "$chars" "$data" > "$out/wikitext2-test.txt"
  teacher="$(scripts/fetch-teacher.sh)"
  "$bin" label --model "$teacher" --input "$out/wikitext2-test.txt" --out "$out/float32" \
    --dtype float32 --seq-len 256 >/dev/null
  src="$out/float32"
fi
for dtype in quantized float16 float32; do
  [[ "$dtype" == float32 && "$src" == "$out/float32" ]] && continue
  "$bin" convert "$src" --out "$out/$dtype" --dtype "$dtype" >/dev/null
  "$bin" verify "$out/$dtype" >/dev/null
done
[[ -d "$out/float32" ]] || cp -r "$src" "$out/float32"
python3 - "$out" <<'PY'
import json, os, sys
import numpy as np
sys.path.insert(0, "scripts")
from read_store import labels_pyarrow, manifest
out = sys.argv[1]
ref = labels_pyarrow(os.path.join(out, "float32"))
def arrays(t):
    k = t["topk_ids"].type.list_size
    ids = t["topk_ids"].combine_chunks().flatten().to_numpy().reshape(-1, k)
    lp = t["topk_logprobs"].combine_chunks().flatten().to_numpy().reshape(-1, k).astype(np.float64)
    return ids, lp, t["target_logprob"].to_numpy().astype(np.float64), t["entropy"].to_numpy().astype(np.float64)
rid, rlp, rt, rh = arrays(ref)
order = np.argsort(rid, axis=1)
print(f"store: {manifest(os.path.join(out, 'float32'))['labeling'].get('inputs', [{}])[0].get('file', '?')}, {ref.num_rows} label rows")
print("| layout | version | labels B/token | whole store B/token | max prob error | max tail error | max target prob error | max entropy error |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for dtype in ["float32", "float16", "quantized"]:
    d = os.path.join(out, dtype); m = manifest(d)
    rows = sum(p["labels"]["rows"] for p in m["parts"])
    lb = sum(p["labels"]["bytes"] for p in m["parts"]); sb = sum(p["samples"]["bytes"] for p in m["parts"])
    ids, lp, t, h = arrays(labels_pyarrow(d))
    o = np.argsort(ids, axis=1)
    assert (np.take_along_axis(ids, o, 1) == np.take_along_axis(rid, order, 1)).all(), "ids must be lossless"
    p, rp = np.exp(np.take_along_axis(lp, o, 1)), np.exp(np.take_along_axis(rlp, order, 1))
    print(f"| {dtype} | {m['schema_version']} | {lb/rows:.2f} | {(lb+sb)/rows:.2f} | {np.abs(p-rp).max():.2e} | "
          f"{np.abs(p.sum(1)-rp.sum(1)).max():.2e} | {np.abs(np.exp(t)-np.exp(rt)).max():.2e} | {np.abs(h-rh).max():.2e} |")
PY
