#!/usr/bin/env bash
# Labelling speed and store size of each knowledge selection, side by side in one run.
#
#   scripts/bench-select.sh [--chars N] [--rounds R] [--teacher PATH]
#
# Labels the first N characters (default 24000) of WikiText-2 validation (../shared/data)
# with the SmolLM2-135M teacher (or --teacher) once per selection per round, the selections
# interleaved within each round, and prints per selection the median tokens/s over the
# rounds (whole process, as `firstkd label` reports it), the ratio to top-k:5, mean list
# length, mean stored mass and labels bytes per token.
set -euo pipefail
cd "$(dirname "$0")/.."
chars=24000
rounds=3
teacher=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --chars) chars="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --teacher) teacher="$2"; shift 2 ;;
    *) echo "bench-select: unknown argument $1" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/firstkd"
[[ -n "$teacher" ]] || teacher="$(scripts/fetch-teacher.sh)"
data="../shared/data/wikitext-2/valid.txt"
[[ -f "$data" ]] || { echo "bench-select: $data not found" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
head -c "$chars" "$data" > "$work/valid.txt"
# The last entry is the 1.0 writer (float16) with the same top-5: the cost of the 2.0 layout.
selections=("top-k:5" "top-p:0.95,max=20" "sample:12,t=1,seed=0" "top-k:5 --dtype float16")
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) threads; $(grep -o -m1 'avx512f' /proc/cpuinfo || echo no-avx512)"
for r in $(seq 1 "$rounds"); do
  for i in "${!selections[@]}"; do
    out="$work/s$i-r$r"
    line="$("$bin" label --model "$teacher" --input "$work/valid.txt" --out "$out" --seq-len 256 \
      --select ${selections[$i]} | grep -o '([0-9.]* tokens/s)' | tr -dc '0-9.')"
    echo "$i $line" >> "$work/speeds"
    [[ "$r" == 1 ]] || rm -rf "$out"
  done
done
python3 - "$work" "${selections[@]}" <<'PY'
import json, os, statistics, sys
import numpy as np
import pyarrow.parquet as pq
work, sels = sys.argv[1], sys.argv[2:]
speeds = {}
for line in open(os.path.join(work, "speeds")):
    i, v = line.split()
    speeds.setdefault(int(i), []).append(float(v))
base = statistics.median(speeds[0])
print("| selection | tokens/s (median of %d) | vs top-k:5 | mean list length | mean stored mass | labels B/token |" % len(speeds[0]))
print("|---|---:|---:|---:|---:|---:|")
for i, sel in enumerate(sels):
    d = os.path.join(work, f"s{i}-r1")
    m = json.load(open(os.path.join(d, "manifest.json")))
    q = m.get("quantization")
    rows = sum(p["labels"]["rows"] for p in m["parts"])
    size = sum(p["labels"]["bytes"] for p in m["parts"])
    lens, mass = [], []
    for p in m["parts"]:
        f = os.path.join(d, p["labels"]["file"])
        if q is None:  # 1.0: float log-probs
            for row in pq.read_table(f, columns=["topk_logprobs"])["topk_logprobs"].to_pylist():
                lens.append(len(row))
                mass.append(float(np.exp(np.array(row, dtype=np.float64)).sum()))
            continue
        for row in pq.read_table(f, columns=["topk_probs_q"])["topk_probs_q"].to_pylist():
            lens.append(len(row))
            mass.append(sum(max(v, q["zero_prob_units"]) for v in row) / q["prob_scale"])
    med = statistics.median(speeds[i])
    print(f"| {sel} | {med:.0f} | {med / base:.2f} | {np.mean(lens):.2f} | {np.mean(mass):.3f} | {size / rows:.2f} |")
PY
