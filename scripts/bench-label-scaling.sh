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
# A plain SVG line plot: x = log2(batch tokens), y = tokens/s.
W, H, L, R, T, B = 640, 400, 70, 150, 30, 50
xs = sorted({bt for c in curves.values() for bt, _ in c})
ymax = max(t for c in curves.values() for _, t in c) * 1.1
import math
def px(bt):
    lo, hi = math.log2(xs[0]), math.log2(xs[-1])
    return L + (math.log2(bt) - lo) / max(hi - lo, 1e-9) * (W - L - R)
def py(t):
    return H - B - t / ymax * (H - T - B)
colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W/2}" y="18" text-anchor="middle">firstkd label tokens/s ({compute}) vs batch tokens</text>',
       f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/>',
       f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>',
       f'<text x="{(L + W - R)/2}" y="{H-12}" text-anchor="middle">padded tokens per forward pass (--batch-tokens)</text>',
       f'<text x="16" y="{(T + H - B)/2}" transform="rotate(-90 16 {(T + H - B)/2})" text-anchor="middle">tokens/s</text>']
for bt in xs:
    out.append(f'<text x="{px(bt):.1f}" y="{H-B+16}" text-anchor="middle">{bt}</text>')
for i in range(6):
    t = ymax * i / 5
    out.append(f'<text x="{L-6}" y="{py(t)+4:.1f}" text-anchor="end">{t:.0f}</text>')
    out.append(f'<line x1="{L}" y1="{py(t):.1f}" x2="{W-R}" y2="{py(t):.1f}" stroke="#ddd"/>')
for i, seq in enumerate(sorted(curves)):
    c = colors[i % len(colors)]
    pts = " ".join(f"{px(bt):.1f},{py(t):.1f}" for bt, t in sorted(curves[seq]))
    out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
    for bt, t in sorted(curves[seq]):
        out.append(f'<circle cx="{px(bt):.1f}" cy="{py(t):.1f}" r="3" fill="{c}"/>')
    out.append(f'<text x="{W-R+10}" y="{T+20+18*i}" fill="{c}">seq {seq}</text>')
out.append("</svg>")
open(svg, "w").write("\n".join(out) + "\n")
PY
