#!/usr/bin/env bash
# Training step time against the sequence length on the CPU, firstkd beside PyTorch: the
# benchmark student of examples/train_bench.rs (2-layer SmolLM2 shape, f32, loss + backward +
# clip + AdamW) at 1024 tokens per step as 8 x 128, 4 x 256, 2 x 512 and 1 x 1024, each point
# run by scripts/bench-train-vs-torch.sh (firstkd and torch alternating, medians). Writes a
# Markdown table to stdout and an SVG plot (step seconds against sequence length, one line per
# engine and loss) to OUT.svg.
#
#   scripts/bench-train-scaling.sh OUT.svg [ROUNDS] [STEPS] [LOSS,...]   # defaults: 2 4 kd
#
# torch comes from $PYTHON, else the venv scripts/bench-label.sh installs
# ($FIRSTKD_CACHE/bench-venv), else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
svg="${1:?usage: scripts/bench-train-scaling.sh OUT.svg [ROUNDS] [STEPS] [LOSS,...]}"
rounds="${2:-2}"; steps="${3:-4}"; losses="${4:-kd}"
venv="${FIRSTKD_CACHE:-$HOME/.cache/firstkd}/bench-venv"
if [ -z "${PYTHON:-}" ] && [ -x "$venv/bin/python" ]; then export PYTHON="$venv/bin/python"; fi
"${PYTHON:-python3}" -c "import torch" 2>/dev/null \
  || { echo "bench-train-scaling: no torch in ${PYTHON:-python3} (run scripts/bench-label.sh once, or set PYTHON)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) threads; $(grep -o -m1 'avx512f' /proc/cpuinfo || echo no-avx512)" >&2
for seq in 128 256 512 1024; do
  FIRSTKD_BENCH_SEQ=$seq scripts/bench-train-vs-torch.sh "$rounds" "$steps" "$losses" \
    | grep '^| [a-z]' | grep -v '^| loss' | sed "s/^/$seq /" >> "$work/points"
  echo "seq $seq done" >&2
done
python3 - "$work/points" "$svg" <<'PY'
import math, sys
from collections import defaultdict
points, svg = sys.argv[1], sys.argv[2]
curves = defaultdict(list)  # (engine, loss) -> [(seq, seconds)]
print("| seq len | rows x seq | loss | firstkd step s | torch step s | torch / firstkd |")
print("|---:|---|---|---:|---:|---:|")
for line in open(points):
    seq, rest = line.split(" ", 1)
    cells = [c.strip() for c in rest.strip().strip("|").split("|")]
    loss, f, t, ratio = cells[0], float(cells[1].split()[0]), float(cells[2].split()[0]), cells[3]
    seq = int(seq)
    curves[("firstkd", loss)].append((seq, f)); curves[("torch", loss)].append((seq, t))
    print(f"| {seq} | {1024 // seq} x {seq} | {loss} | {f:.3f} | {t:.3f} | {ratio} |")
W, H, L, R, T, B = 640, 400, 70, 170, 30, 50
xs = sorted({s for c in curves.values() for s, _ in c})
ymax = max(v for c in curves.values() for _, v in c) * 1.1
def px(s):
    lo, hi = math.log2(xs[0]), math.log2(xs[-1])
    return L + (math.log2(s) - lo) / max(hi - lo, 1e-9) * (W - L - R)
def py(v):
    return H - B - v / ymax * (H - T - B)
colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W/2}" y="18" text-anchor="middle">training step seconds (1024 tokens) vs sequence length</text>',
       f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/>',
       f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>',
       f'<text x="{(L + W - R)/2}" y="{H-12}" text-anchor="middle">sequence length (rows = 1024 / length)</text>',
       f'<text x="16" y="{(T + H - B)/2}" transform="rotate(-90 16 {(T + H - B)/2})" text-anchor="middle">seconds per step</text>']
for s in xs:
    out.append(f'<text x="{px(s):.1f}" y="{H-B+16}" text-anchor="middle">{s}</text>')
for i in range(6):
    v = ymax * i / 5
    out.append(f'<text x="{L-6}" y="{py(v)+4:.1f}" text-anchor="end">{v:.2f}</text>')
    out.append(f'<line x1="{L}" y1="{py(v):.1f}" x2="{W-R}" y2="{py(v):.1f}" stroke="#ddd"/>')
for i, key in enumerate(sorted(curves)):
    c = colors[i % len(colors)]
    dash = ' stroke-dasharray="6 4"' if key[0] == "torch" else ""
    pts = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in sorted(curves[key]))
    out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
    for s, v in sorted(curves[key]):
        out.append(f'<circle cx="{px(s):.1f}" cy="{py(v):.1f}" r="3" fill="{c}"/>')
    out.append(f'<text x="{W-R+10}" y="{T+20+18*i}" fill="{c}">{key[0]} {key[1]}</text>')
out.append("</svg>")
open(svg, "w").write("\n".join(out) + "\n")
PY
