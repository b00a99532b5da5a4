#!/usr/bin/env bash
# Trainer step time, firstkd vs PyTorch, on the benchmark student of examples/train_bench.rs
# (2-layer SmolLM2 shape, batch 4 x 256, loss + backward + clip + AdamW, f32, CPU).
# The two run alternately ROUNDS times so both see the same machine load; each run prints
# its median step; this prints every run and the median over the rounds.
#
#   scripts/bench-train-vs-torch.sh [ROUNDS] [STEPS] [LOSS,...]   # defaults: 3 8 kd
#   FIRSTKD_BENCH_SHAPE=qwen0.5b FIRSTKD_BENCH_TOKENS=512 scripts/bench-train-vs-torch.sh 1 2 kd,ce
#     # the Qwen2.5-0.5B-shaped student instead (both sides read the same variables)
#
#   FIRSTKD_BENCH_BASELINE="FIRSTKD_ATTENTION=materialised" scripts/bench-train-vs-torch.sh 3 6 kd
#     # also runs firstkd under those environment settings in every round (a third column:
#     # the same binary with one code path switched back, measured in the same run)
#
# Needs torch in the Python on PATH or in $PYTHON (e.g. a venv with `pip install torch`).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"; steps="${2:-8}"; losses="${3:-kd}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
python="${PYTHON:-python3}"
threads="$(nproc)"
cargo build --release --quiet --example train_bench
bench="$CARGO_TARGET_DIR/release/examples/train_bench"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# One process per loss and side, so each peak RSS is that loss's own high-water mark.
for r in $(seq "$rounds"); do
  for loss in ${losses//,/ }; do
    "$bench" "$steps" "$loss" | grep '^| [a-z]' | grep -v '^| loss' >> "$out/firstkd"
    "$python" scripts/train_bench_torch.py "$steps" "$threads" "$loss" | grep '^| [a-z]' | grep -v '^| loss' >> "$out/torch"
    if [ -n "${FIRSTKD_BENCH_BASELINE:-}" ]; then
      # shellcheck disable=SC2086  # the setting is split into its assignments on purpose
      env $FIRSTKD_BENCH_BASELINE "$bench" "$steps" "$loss" | grep '^| [a-z]' | grep -v '^| loss' >> "$out/baseline"
    fi
  done
done
echo "threads: $threads; rounds: $rounds; steps per run: $steps; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
base="${FIRSTKD_BENCH_BASELINE:-}"
[ -n "$base" ] && echo "baseline: firstkd with $base"
extra=""; rule=""
[ -n "$base" ] && { extra=" baseline median step s (runs) | baseline / firstkd |"; rule="---|---:|"; }
echo "| loss | firstkd median step s (runs) | torch median step s (runs) | torch / firstkd | firstkd peak RSS MiB | torch peak RSS MiB |$extra"
echo "|---|---|---|---:|---:|---:|$rule"
python3 - "$out" "${losses}" "$base" <<'PY'
import os, statistics, sys
out, losses, base = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
def runs(name, rss_cell):
    rows, peaks = {}, {}
    for line in open(f"{out}/{name}"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.setdefault(cells[0], []).append(float(cells[2]))
        peaks[cells[0]] = max(peaks.get(cells[0], 0.0), float(cells[rss_cell]))
    return rows, peaks
(f, fp), (t, tp) = runs("firstkd", 7), runs("torch", 4)
g = runs("baseline", 7)[0] if base and os.path.exists(f"{out}/baseline") else {}
fmt = lambda v: " ".join(f"{x:.3f}" for x in v)
for loss in losses:
    a, b = f.get(loss, []), t.get(loss, [])
    if not a or not b:
        print(f"| {loss} | {a} | {b} | - | - | - |"); continue
    ma, mb = statistics.median(a), statistics.median(b)
    row = f"| {loss} | {ma:.3f} ({fmt(a)}) | {mb:.3f} ({fmt(b)}) | {mb / ma:.2f} | {fp[loss]:.0f} | {tp[loss]:.0f} |"
    if base:
        c = g.get(loss, [])
        mc = statistics.median(c) if c else float("nan")
        row += f" {mc:.3f} ({fmt(c)}) | {mc / ma:.2f} |"
    print(row)
PY
