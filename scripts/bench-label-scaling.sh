#!/usr/bin/env bash
# Labelling scaling curves on the CPU: `firstkd label` tokens/s against the sequence length
# (--seq-len) and the padded tokens per forward pass (--batch-tokens), on the same WikiText-2
# validation text, one run per point. Writes a Markdown table to stdout and an SVG plot
# (one line per sequence length, tokens/s against batch tokens) to OUT.svg.
#
# Usage: scripts/bench-label-scaling.sh OUT.svg [--chars N] [--compute f32|int16|int8]
#   defaults: 12000 characters, f32; teacher: SmolLM2-135M (scripts/fetch-teacher.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
svg="${1:?usage: scripts/bench-label-scaling.sh OUT.svg [--chars N] [--compute MODE]}"
shift
chars=12000 compute=f32
while [ $# -gt 0 ]; do
  case "$1" in
    --chars) chars="$2"; shift 2 ;;
    --compute) compute="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
text="${FIRSTKD_SHARED:-../shared}/data/wikitext-2/valid.txt"
[ -f "$text" ] || { echo "missing $text (../shared/data)" >&2; exit 1; }
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/firstkd"
teacher=$(scripts/fetch-teacher.sh)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$text" "$work/input.jsonl" "$chars" <<'PY'
import json, sys
open(sys.argv[2], "w").write(json.dumps({"text": open(sys.argv[1]).read()[: int(sys.argv[3])]}) + "\n")
PY
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) threads" >&2
for seq in 128 256 512 1024; do
  for bt in 512 1024 2048 4096 8192; do
    [ "$bt" -lt "$seq" ] && continue
    rm -rf "$work/store"
    RAYON_NUM_THREADS=$(nproc) "$bin" label --model "$teacher" --input "$work/input.jsonl" --format text \
      --seq-len "$seq" --batch-tokens "$bt" --compute "$compute" --out "$work/store" --json 2>/dev/null \
      | python3 -c "import json,sys; d=json.load(sys.stdin); print($seq, $bt, d['tokens_labelled'] / d['seconds'])" >>"$work/points"
    echo "seq $seq, batch tokens $bt done" >&2
  done
done
python3 - "$work/points" "$svg" "$compute" <<'PY'
import sys
from collections import defaultdict
points, svg, compute = sys.argv[1], sys.argv[2], sys.argv[3]
curves = defaultdict(list)
for line in open(points):
    seq, bt, tps = line.split()
    curves[int(seq)].append((int(bt), float(tps)))
print(f"| seq len | batch tokens | tokens/s ({compute}) |")
print("|---:|---:|---:|")
for seq in sorted(curves):
    for bt, tps in sorted(curves[seq]):
        print(f"| {seq} | {bt} | {tps:.0f} |")
sys.path.insert(0, "scripts")
from line_plot import write_svg
write_svg(svg, curves, f"firstkd label tokens/s ({compute}) vs batch tokens",
          "padded tokens per forward pass (--batch-tokens)", "tokens/s", legend=lambda seq: f"seq {seq}")
PY
