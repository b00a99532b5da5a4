#!/usr/bin/env bash
# Training step time against the sequence length on the CPU, firstkd beside PyTorch: the
# benchmark student of examples/train_bench.rs (2-layer SmolLM2 shape, f32, loss + backward +
# clip + AdamW) at 1024 tokens per step as 8 x 128, 4 x 256, 2 x 512 and 1 x 1024, each point
# run by scripts/bench-train-vs-torch.sh (firstkd and torch alternating, medians). Writes a
# Markdown table to stdout and an SVG plot (step seconds against sequence length, one line per
# engine and loss) to OUT.svg.
#
#   scripts/bench-train-scaling.sh OUT.svg [ROUNDS] [STEPS] [LOSS,...]   # defaults: 2 4 kd
#   FIRSTKD_BENCH_BASELINE="FIRSTKD_ATTENTION=materialised" scripts/bench-train-scaling.sh ...
#     # a third curve: firstkd under those settings, run in the same rounds
#
# torch comes from $PYTHON, else the cached venv of scripts/torch-venv.sh (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
svg="${1:?usage: scripts/bench-train-scaling.sh OUT.svg [ROUNDS] [STEPS] [LOSS,...]}"
rounds="${2:-2}"; steps="${3:-4}"; losses="${4:-kd}"
if [ -z "${PYTHON:-}" ]; then PYTHON=$(scripts/torch-venv.sh); export PYTHON; fi
"$PYTHON" -c "import torch" 2>/dev/null \
  || { echo "bench-train-scaling: no torch in $PYTHON (set PYTHON)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) threads; $(grep -o -m1 'avx512f' /proc/cpuinfo || echo no-avx512)" >&2
for seq in 128 256 512 1024; do
  FIRSTKD_BENCH_SEQ=$seq scripts/bench-train-vs-torch.sh "$rounds" "$steps" "$losses" \
    | grep '^| [a-z]' | grep -v '^| loss' | sed "s/^/$seq /" >> "$work/points"
  echo "seq $seq done" >&2
done
python3 - "$work/points" "$svg" <<'PY'
import os, sys
from collections import defaultdict
points, svg = sys.argv[1], sys.argv[2]
curves = defaultdict(list)  # (engine, loss) -> [(seq, seconds)]
base = os.environ.get("FIRSTKD_BENCH_BASELINE", "")
print("| seq len | rows x seq | loss | firstkd step s | torch step s | torch / firstkd |"
      + (f" firstkd with {base} step s | that / firstkd |" if base else ""))
print("|---:|---|---|---:|---:|---:|" + ("---:|---:|" if base else ""))
for line in open(points):
    seq, rest = line.split(" ", 1)
    cells = [c.strip() for c in rest.strip().strip("|").split("|")]
    loss, f, t, ratio = cells[0], float(cells[1].split()[0]), float(cells[2].split()[0]), cells[3]
    seq = int(seq)
    curves[("firstkd", loss)].append((seq, f)); curves[("torch", loss)].append((seq, t))
    extra = ""
    if len(cells) > 7 and cells[6]:
        # FIRSTKD_BENCH_BASELINE set: firstkd under those settings, in the same rounds.
        c = float(cells[6].split()[0])
        curves[(f"firstkd with {base}", loss)].append((seq, c))
        extra = f" {c:.3f} | {c / f:.2f} |"
    print(f"| {seq} | {1024 // seq} x {seq} | {loss} | {f:.3f} | {t:.3f} | {ratio} |{extra}")
sys.path.insert(0, "scripts")
from line_plot import write_svg
write_svg(svg, curves, "training step seconds (1024 tokens) vs sequence length",
          "sequence length (rows = 1024 / length)", "seconds per step",
          legend=lambda key: f"{key[0]} {key[1]}", dashed=lambda key: key[0] == "torch", yfmt="{:.2f}")
PY
