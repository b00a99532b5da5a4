#!/usr/bin/env bash
# The main job on bundled defaults, end to end on 2 CPU cores:
#   fetch + cache the SmolLM2-135M-Instruct teacher -> label the samples in data/ ->
#   verify -> coverage and calibration stats -> fit the temperature -> distill a small
#   student for a few steps with the FIRST loss -> evaluate teacher and student.
# Everything is written under ${FIRSTKD_OUT:-out/quickstart} (wiped at the start).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
out="${FIRSTKD_OUT:-out/quickstart}"
step() { printf '\n== %s\n' "$*"; }

step "building firstkd (release; the first build compiles dependencies, ~20 min on 2 cores)"
cargo build --release
bin="$CARGO_TARGET_DIR/release/firstkd"

step "fetching the teacher (cached in ${FIRSTKD_CACHE:-$HOME/.cache/firstkd})"
teacher=$(scripts/fetch-teacher.sh)
echo "teacher: $teacher"
rm -rf "$out"
mkdir -p "$out"

step "labelling data/chat.jsonl and data/mc.jsonl (top-5 ids + log-probs at every position)"
"$bin" label --model "$teacher" --input data/chat.jsonl --input data/mc.jsonl --mc-response text \
  --out "$out/store" --part-sequences 4

step "verifying the store"
"$bin" verify "$out/store"
"$bin" inspect "$out/store"

step "coverage and teacher calibration"
"$bin" stats "$out/store"

step "fitting the temperature on held-out positions (half of the samples, by hash)"
"$bin" calibrate "$out/store" --held-out-fraction 0.5

step "distilling a 4-layer student (teacher layers 0,8,16,29) with the FIRST loss, 20 steps"
"$bin" distill --store "$out/store" --init "teacher-layers:$teacher:0,8,16,29" --loss first \
  --steps 20 --batch-tokens 512 --lr 3e-4 --warmup 2 --out "$out/student"

step "evaluating teacher and student on data/mc.jsonl (cloze scoring)"
"$bin" compare --model "teacher=$teacher" --model "student=$out/student/final" \
  --task "mc=data/mc.jsonl" --mode cloze --markdown | tee "$out/compare.md"

step "done"
echo "store:      $out/store"
echo "student:    $out/student/final (Hugging Face layout), metrics in $out/student/metrics.jsonl"
echo "comparison: $out/compare.md"
