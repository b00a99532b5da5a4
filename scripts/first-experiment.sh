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
# Usage: scripts/first-experiment.sh [--quick|--full] [--device cpu|cuda[:N]]
#   --quick (default): a few minutes, a smoke test of the whole pipeline whose numbers mean
#           nothing (150 CommonsenseQA questions, 6-layer student, 8 steps, 30 eval items);
#   --full: the comparison, sized for about an hour on 2 CPU cores (docs/RESULTS.md says why):
#           1500 training questions from each of CommonsenseQA, OpenBookQA and ARC-Easy, a
#           24-layer student (the teacher without layers 14,16,18,20,22,24), 80 steps of 2048
#           padded tokens at lr 5e-5, 300 eval items per task.
#   --device cuda: teacher labelling, training and evaluation on the GPU (`cuda` feature).
# Overrides (environment): FIRSTKD_TRAIN_LIMIT (questions per training file), FIRSTKD_STEPS, FIRSTKD_EVAL_LIMIT,
# FIRSTKD_STUDENTS (losses, default "ce kd first"; e.g. "ce kd first kd-tail").
# Output: ${FIRSTKD_OUT:-out/experiment-MODE}/ (results.md there).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
args="$*"
mode="--quick"
device="cpu"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick|--full) mode="$1" ;;
    --device) device="${2:?--device needs a value}"; shift ;;
    *) echo "usage: $0 [--quick|--full] [--device cpu|cuda[:N]]" >&2; exit 2 ;;
  esac
  shift
done
shared="${FIRSTKD_SHARED:-../shared}/data"
case "$mode" in
  --quick) train_limit=150; steps=8; batch=1024; eval_limit=30; lr=1e-4; layers="0,1,2,27,28,29"
           inputs=(commonsenseqa/train_rand_split.jsonl) ;;
  --full)  train_limit=1500; steps=80; batch=2048; eval_limit=300; lr=5e-5
           layers="0,1,2,3,4,5,6,7,8,9,10,11,12,13,15,17,19,21,23,25,26,27,28,29"
           inputs=(commonsenseqa/train_rand_split.jsonl openbookqa/train.json arc_easy/train.json) ;;
esac
train_limit="${FIRSTKD_TRAIN_LIMIT:-$train_limit}"; steps="${FIRSTKD_STEPS:-$steps}"; eval_limit="${FIRSTKD_EVAL_LIMIT:-$eval_limit}"
read -r -a students <<< "${FIRSTKD_STUDENTS:-ce kd first}"
for f in "${inputs[@]}" commonsenseqa/dev_rand_split.jsonl arc_easy/test.json openbookqa/test.json boolq/test.json; do
  [ -f "$shared/$f" ] || { echo "missing $shared/$f (../shared/data)" >&2; exit 1; }
done
out="${FIRSTKD_OUT:-out/experiment-${mode#--}}"
last=""
step() {  # prints a stage header and records the previous stage's wall time in timings.txt
  local now; now=$(date +%s)
  [ -z "$last" ] || printf '%s\t%s s\n' "$last_name" "$(( now - last ))" >> "$out/timings.txt"
  last=$now; last_name="$*"
  printf '\n== [%s] %s\n' "$(date +%H:%M:%S)" "$*"
}

if [ -n "${FIRSTKD_BIN:-}" ]; then
  bin="$FIRSTKD_BIN"   # a prebuilt binary (e.g. a `cuda` build carried to a GPU machine)
else
  if [ "$device" = cpu ]; then cargo build --release --quiet; else cargo build --release --quiet --features cuda; fi
  bin="$CARGO_TARGET_DIR/release/firstkd"
fi
teacher=$(scripts/fetch-teacher.sh)
rm -rf "$out"
mkdir -p "$out"
start=$(date +%s)

input_args=()
for f in "${inputs[@]}"; do input_args+=(--input "$shared/$f"); done
step "labelling up to $train_limit training questions from each of: ${inputs[*]}"
"$bin" label --model "$teacher" "${input_args[@]}" --format mc \
  --mc-response text --limit "$train_limit" --device "$device" --out "$out/store" | tee "$out/label.txt"
"$bin" verify "$out/store"
"$bin" inspect "$out/store" | tee "$out/inspect.txt"
"$bin" stats "$out/store" --plot "$out/plots/teacher-labels" | tee "$out/stats.txt"

step "fitting the temperature (ECE, renormalised top-5, 10% of samples held out by hash)"
"$bin" calibrate "$out/store" | tee "$out/calibrate.txt"

for loss in "${students[@]}"; do
  step "student $loss: teacher layers $layers, $steps steps"
  "$bin" distill --store "$out/store" --init "teacher-layers:$teacher:$layers" --loss "$loss" \
    --steps "$steps" --batch-tokens "$batch" --lr "$lr" --device "$device" --warmup $(( steps / 10 + 1 )) --seed 0 \
    --quiet --out "$out/student-$loss" | tee "$out/distill-$loss.txt"
done

step "evaluating teacher and students (cloze scoring, first $eval_limit items per task)"
model_args=(--model "teacher=$teacher")
for loss in "${students[@]}"; do model_args+=(--model "$loss=$out/student-$loss/final"); done
"$bin" compare "${model_args[@]}" \
  --task "csqa=$shared/commonsenseqa/dev_rand_split.jsonl" --task "arc_easy=$shared/arc_easy/test.json" \
  --task "obqa=$shared/openbookqa/test.json" --task "boolq=$shared/boolq/test.json" \
  --mode cloze --limit "$eval_limit" --device "$device" --plot-dir "$out/plots" --markdown | tee "$out/compare.md"

step "writing $out/results.md"
{
  echo "# FIRST experiment ($mode), $(date -u +%Y-%m-%d)"
  echo
  overrides=""
  for v in FIRSTKD_TRAIN_LIMIT FIRSTKD_STEPS FIRSTKD_EVAL_LIMIT FIRSTKD_STUDENTS; do [ -z "${!v:-}" ] || overrides+="$v=\"${!v}\" "; done
  echo "Command: \`${overrides}scripts/first-experiment.sh $args\`; wall time $(( $(date +%s) - start )) s."
  echo '```'
  cat "$out/timings.txt"
  echo '```'
  echo
  echo "Device: $device. Training inputs: ${inputs[*]} (at most $train_limit questions each)."
  echo "Student init: teacher layers $layers; $steps steps of $batch tokens, lr $lr, seed 0."
  echo
  cat "$out/compare.md"
  echo
  echo "Details (\`scripts/results_table.py $out/plots/reports.json\`; ±95% = normal-approximation"
  echo "interval half-width of the accuracy; reliability diagrams: $out/plots/MODEL-TASK.svg):"
  echo
  python3 scripts/results_table.py "$out/plots/reports.json"
  echo
  echo '```'
  cat "$out/calibrate.txt"
  echo '```'
  echo
  echo "Teacher labels (\`firstkd inspect\`, \`firstkd stats\`):"
  echo '```'
  cat "$out/inspect.txt" "$out/stats.txt"
  echo '```'
} > "$out/results.md"
echo "done: $out/results.md"
cat "$out/results.md"
