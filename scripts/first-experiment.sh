#!/usr/bin/env bash
# FIRST at CPU scale: the paper's comparison with the SmolLM2-135M-Instruct teacher.
#
#   1. the teacher labels CommonsenseQA training questions (multiple choice, the response is the
#      answer text, so cloze scoring applies: the 135M teacher is at chance with letter scoring);
#   2. the temperature is fitted on held-out positions (10% of samples by hash);
#   3. three students with the same initialisation (teacher layers $LAYERS), data, steps and
#      learning rate: ce (fine-tuning on hard labels), kd (top-5 KL at T = 1), first (top-5 KL
#      at the fitted T);
#   4. teacher and students are evaluated with cloze scoring on CommonsenseQA dev (in domain),
#      ARC-Easy and OpenBookQA test, and BoolQ (out of domain): accuracy and ECE.
#
# Usage: scripts/first-experiment.sh [--quick|--full]   (default --quick: a few minutes, a
# smoke test of the whole pipeline whose numbers mean nothing; --full: the real comparison,
# a few hours on 2 cores). Output: ${FIRSTKD_OUT:-out/experiment-MODE}/ (results.md there).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
mode="${1:---quick}"
shared="${FIRSTKD_SHARED:-../shared}/data"
case "$mode" in
  --quick) train_limit=150; steps=8; batch=1024; eval_limit=30; layers="0,1,2,27,28,29" ;;
  --full)  train_limit=9741; steps=600; batch=2048; eval_limit=500; layers="0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,29" ;;
  *) echo "usage: $0 [--quick|--full]" >&2; exit 2 ;;
esac
for f in commonsenseqa/train_rand_split.jsonl commonsenseqa/dev_rand_split.jsonl arc_easy/test.json openbookqa/test.json boolq/test.json; do
  [ -f "$shared/$f" ] || { echo "missing $shared/$f (../shared/data)" >&2; exit 1; }
done
out="${FIRSTKD_OUT:-out/experiment-${mode#--}}"
step() { printf '\n== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/firstkd"
teacher=$(scripts/fetch-teacher.sh)
rm -rf "$out"
mkdir -p "$out"
start=$(date +%s)

step "labelling $train_limit CommonsenseQA training questions"
"$bin" label --model "$teacher" --input "$shared/commonsenseqa/train_rand_split.jsonl" --format mc \
  --mc-response text --limit "$train_limit" --out "$out/store" | tee "$out/label.txt"
"$bin" verify "$out/store"
"$bin" inspect "$out/store" | tee "$out/inspect.txt"
"$bin" stats "$out/store" | tee "$out/stats.txt"

step "fitting the temperature (ECE, renormalised top-5, 10% of samples held out by hash)"
"$bin" calibrate "$out/store" | tee "$out/calibrate.txt"

for loss in ce kd first; do
  step "student $loss: teacher layers $layers, $steps steps"
  "$bin" distill --store "$out/store" --init "teacher-layers:$teacher:$layers" --loss "$loss" \
    --steps "$steps" --batch-tokens "$batch" --lr 1e-4 --warmup $(( steps / 10 + 1 )) --seed 0 \
    --quiet --out "$out/student-$loss" | tee "$out/distill-$loss.txt"
done

step "evaluating teacher and students (cloze scoring, first $eval_limit items per task)"
"$bin" compare --model "teacher=$teacher" --model "ce=$out/student-ce/final" \
  --model "kd=$out/student-kd/final" --model "first=$out/student-first/final" \
  --task "csqa=$shared/commonsenseqa/dev_rand_split.jsonl" --task "arc_easy=$shared/arc_easy/test.json" \
  --task "obqa=$shared/openbookqa/test.json" --task "boolq=$shared/boolq/test.json" \
  --mode cloze --limit "$eval_limit" --markdown | tee "$out/compare.md"

{
  echo "# FIRST experiment ($mode), $(date -u +%Y-%m-%d)"
  echo
  echo "Command: \`scripts/first-experiment.sh $mode\`; wall time $(( $(date +%s) - start )) s."
  echo "Student init: teacher layers $layers; $steps steps of $batch tokens, lr 1e-4, seed 0."
  echo
  cat "$out/compare.md"
  echo
  echo '```'
  cat "$out/calibrate.txt"
  echo '```'
} > "$out/results.md"
step "done: $out/results.md"
cat "$out/results.md"
