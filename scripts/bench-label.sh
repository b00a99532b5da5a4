#!/usr/bin/env bash
# Labelling speed benchmark: firstkd label vs the HF transformers + torch fp32 reference
# (scripts/bench_label_reference.py) on the same GGUF teacher, the same WikiText-2 text and the
# same windows, at sequence lengths 256 and 512, 2 threads each. Prints a Markdown table.
# Installs torch/transformers into a cached virtual environment ($FIRSTKD_CACHE/bench-venv).
# Usage: scripts/bench-label.sh [MAX_TOKENS]   (default 4096 tokens per sequence length)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
cache="${FIRSTKD_CACHE:-$HOME/.cache/firstkd}"
max_tokens="${1:-4096}"
text="${FIRSTKD_SHARED:-../shared}/data/wikitext-2/valid.txt"
[ -f "$text" ] || { echo "missing $text (../shared/data)" >&2; exit 1; }
venv="${FIRSTKD_BENCH_VENV:-$cache/bench-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, transformers, gguf, accelerate, pyarrow" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch transformers gguf accelerate numpy pyarrow
fi
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/firstkd"
teacher=$(scripts/fetch-teacher.sh)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# One text record holding the first ~4*MAX_TOKENS characters, so both sides cut the same windows.
python3 - "$text" "$work/input.jsonl" "$work/input.txt" "$max_tokens" <<'PY'
import json, sys
text = open(sys.argv[1]).read()[: int(sys.argv[4]) * 4]
open(sys.argv[3], "w").write(text)
open(sys.argv[2], "w").write(json.dumps({"text": text}) + "\n")
PY
echo "| seq len | tokens | firstkd tokens/s | reference tokens/s | ratio |"
echo "|---:|---:|---:|---:|---:|"
for seq in 256 512; do
  OMP_NUM_THREADS=2 "$venv/bin/python" scripts/bench_label_reference.py "$teacher" "$work/input.txt" "$seq" 0 "$work/ref-$seq.parquet" 2 >"$work/ref.out" 2>"$work/ref.log" || { cat "$work/ref.log" >&2; exit 1; }
  ref=$(tail -n 1 "$work/ref.out")
  ours=$(RAYON_NUM_THREADS=2 "$bin" label --model "$teacher" --input "$work/input.jsonl" --format text --seq-len "$seq" --out "$work/store-$seq" --json)
  python3 - "$seq" "$ref" "$ours" <<'PY'
import json, sys
seq, ref, ours = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
ours_tps = ours["tokens_labelled"] / ours["seconds"]
print(f"| {seq} | {ours['tokens_labelled']} (ref {ref['tokens']}) | {ours_tps:.0f} | {ref['tokens_per_s']:.0f} | {ours_tps / ref['tokens_per_s']:.2f} |")
PY
done
