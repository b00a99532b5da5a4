#!/usr/bin/env bash
# Peak resident memory of `firstkd distill` over one epoch of a synthetic store and of the same
# kind of store 10x larger: streaming means it must not grow with the store.
# Usage: scripts/bench-train-memory.sh [ROWS]   (default 200000; the second store has 10x ROWS)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
rows="${1:-200000}"
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/firstkd"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/student.json" <<'JSON'
{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
 "max_position_embeddings": 512, "tie_word_embeddings": true}
JSON
echo "| store label rows | store size | steps | wall s | peak RSS MiB | RSS MiB at 10% / 50% / 90% of the run |"
echo "|---:|---:|---:|---:|---:|---|"
for n in "$rows" $(( rows * 10 )); do
  "$bin" synth "$work/s$n" --rows "$n" --vocab 512 --seed 1 >/dev/null
  size=$(du -sh "$work/s$n" | cut -f1)
  /usr/bin/time -f "%e %M" -o "$work/time" "$bin" distill --store "$work/s$n" \
    --init "random:$work/student.json" --loss kd --temperature 1 --steps 100000000 --epochs 1 \
    --batch-tokens 4096 --quiet --out "$work/run$n" > "$work/out" &
  # Resident memory over the run (one sample a second): it must level off, not creep up.
  : > "$work/rss"
  while kill -0 $! 2>/dev/null; do
    pid=$(pgrep -n -f "distill --store $work/s$n" || true)
    [ -n "$pid" ] && awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$pid/status" 2>/dev/null >> "$work/rss"
    sleep 1
  done
  wait $!
  read -r wall rss < "$work/time"
  steps=$(grep -o 'trained [0-9]* step' "$work/out" | grep -o '[0-9]*')
  trend=$(awk '{v[NR] = $1} END {if (NR == 0) {print "-"; exit}
    printf "%d / %d / %d", v[int(NR * 0.1) + 1], v[int(NR * 0.5) + 1], v[int(NR * 0.9) + 1]}' "$work/rss")
  echo "| $n | $size | $steps | $wall | $(( rss / 1024 )) | $trend |"
done
