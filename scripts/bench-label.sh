#!/usr/bin/env bash
# Labelling speed benchmark: firstkd label against the HF transformers + torch fp32 reference
# (scripts/bench_label_reference.py, batch 1 and batch 8) on the same GGUF teacher, the same
# WikiText-2 validation text and the same windows, 2 threads each, in interleaved rounds.
# Prints a Markdown table of median tokens/s per engine, the ratio to the better torch, and
# the agreement of each firstkd mode's labels with the reference (scripts/compare_labels.py).
#
# Usage: scripts/bench-label.sh [--teacher smollm2|qwen1.5b] [--chars N] [--seq S] [--rounds R]
#   defaults: smollm2, 24000 characters, seq 256, 3 rounds.
# firstkd writes float32 (1.0) stores here, as the reference writes float32 log-probs.
# firstkd modes: `--compute f32` with the AVX-512 kernel (the default on AVX-512 CPUs), the same
# with candle's matmul (FIRSTKD_F32_KERNEL=candle), `--compute int16` and `--compute int8`.
# Installs torch/transformers into a cached virtual environment (scripts/torch-venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
cache="${FIRSTKD_CACHE:-$HOME/.cache/firstkd}"
teacher_name=smollm2 chars=24000 seq=256 rounds=3
while [ $# -gt 0 ]; do
  case "$1" in
    --teacher) teacher_name="$2"; shift 2 ;;
    --chars) chars="$2"; shift 2 ;;
    --seq) seq="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
text="${FIRSTKD_SHARED:-../shared}/data/wikitext-2/valid.txt"
[ -f "$text" ] || { echo "missing $text (../shared/data)" >&2; exit 1; }
py=$(scripts/torch-venv.sh)
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/firstkd"
case "$teacher_name" in
  smollm2) teacher=$(scripts/fetch-teacher.sh) ;;
  qwen1.5b) teacher=$(scripts/fetch-model.sh qwen2.5-coder-1.5b) ;;
  *) echo "--teacher smollm2 or qwen1.5b" >&2; exit 2 ;;
esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$text" "$work/input.jsonl" "$work/input.txt" "$chars" <<'PY'
import json, sys
text = open(sys.argv[1]).read()[: int(sys.argv[4])]
open(sys.argv[3], "w").write(text)
open(sys.argv[2], "w").write(json.dumps({"text": text}) + "\n")
PY
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($(nproc) threads; $(grep -o -w -m1 -E 'avx512_vnni|avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '))" >&2
for r in $(seq 1 "$rounds"); do
  for b in 1 8; do
    OMP_NUM_THREADS=2 "$py" scripts/bench_label_reference.py "$teacher" "$work/input.txt" "$seq" 0 "$work/ref-$b.parquet" 2 "$b" 2>"$work/ref.log" | tail -n 1 >>"$work/torch-b$b.jsonl" || { cat "$work/ref.log" >&2; exit 1; }
  done
  for mode in f32 f32-candle int16 int8; do
    rm -rf "$work/store-$mode"
    compute=${mode%-candle}
    kernel=$([ "$mode" = f32-candle ] && echo candle || echo auto)
    FIRSTKD_F32_KERNEL=$kernel RAYON_NUM_THREADS=2 "$bin" label --model "$teacher" --input "$work/input.jsonl" \
      --format text --seq-len "$seq" --out "$work/store-$mode" --compute "$compute" --dtype float32 --json 2>"$work/label.log" \
      | tr -d '\n' >>"$work/firstkd-$mode.jsonl" || { cat "$work/label.log" >&2; exit 1; }
    echo >>"$work/firstkd-$mode.jsonl"
  done
  echo "round $r done" >&2
done
for mode in f32 f32-candle int16 int8; do
  "$py" scripts/compare_labels.py "$work/store-$mode" "$work/ref-1.parquet" --json >"$work/agree-$mode.json"
done
python3 - "$work" "$teacher_name" "$seq" <<'PY'
import json, statistics, sys, os
work, name, seq = sys.argv[1:4]
def med(path, f):
    return statistics.median(f(json.loads(l)) for l in open(path) if l.strip())
t1 = med(f"{work}/torch-b1.jsonl", lambda d: d["tokens_per_s"])
t8 = med(f"{work}/torch-b8.jsonl", lambda d: d["tokens_per_s"])
best = max(t1, t8)
print(f"| teacher | seq | engine | tokens/s (median) | vs better torch | top-1 agree | top-5 set agree | mean abs top-1 log-prob diff |")
print("|---|---:|---|---:|---:|---:|---:|---:|")
print(f"| {name} | {seq} | torch fp32 batch 1 | {t1:.0f} | {t1 / best:.2f} | - | - | - |")
print(f"| {name} | {seq} | torch fp32 batch 8 | {t8:.0f} | {t8 / best:.2f} | - | - | - |")
labels = {"f32": "firstkd f32 (avx512 kernel)", "f32-candle": "firstkd f32 (candle matmul)",
          "int16": "firstkd int16 (w12a13)", "int8": "firstkd int8 (w8a8)"}
for mode, label in labels.items():
    tps = med(f"{work}/firstkd-{mode}.jsonl", lambda d: d["tokens_labelled"] / d["seconds"])
    a = json.load(open(f"{work}/agree-{mode}.json"))
    print(f"| {name} | {seq} | {label} | {tps:.0f} | {tps / best:.2f} | {a['top1_agree']:.4f} | {a['topk_set_agree']:.4f} | {a['top1_logprob_mean_abs_diff']:.4f} |")
PY
