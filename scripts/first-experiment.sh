#!/usr/bin/env bash
# The paper's comparison: teacher labels -> fitted temperature -> students -> evaluation.
#
# Two teacher/student pairs:
#   --pair smollm2 (default): the SmolLM2-135M-Instruct teacher; students are the teacher with
#           layers removed (no smaller pre-trained model shares its tokenizer);
#   --pair qwen: the Qwen2.5-Coder-1.5B-Instruct teacher and the pre-trained
#           Qwen2.5-Coder-0.5B-Instruct student (same tokenizer), every student at several seeds
#           (reported as mean and standard deviation by scripts/seeds_table.py).
#
# Stages:
#   1. the teacher labels multiple-choice training questions (the response is the answer text,
#      so cloze scoring applies); with --pair qwen on a GPU (or FIRSTKD_FINETUNE_TEACHER=1) the
#      teacher is first fine-tuned on them with `distill --loss ce` (the paper distils a
#      fine-tuned teacher) and the fine-tuned teacher labels;
#   2. the temperature is fitted on held-out positions (ECE, 10% of samples by hash);
#   3. students with the same initialisation, data, steps and learning rate: ce (fine-tuning
#      on hard labels), kd (top-5 KL at T = 1), kd-ls (kd with the teacher's top-5 mixed with
#      uniform over the same 5 ids, factor 0.1: the paper's "Distill w/ LS"), first (top-5 KL
#      at the fitted T), kd-tail (top-5 + tail bucket);
#   4. teacher, untouched student (qwen) and students are evaluated with cloze scoring on
#      CommonsenseQA dev (in domain), ARC-Easy and OpenBookQA test, and BoolQ (qwen: with its
#      passage; smollm2: question only, as in the earlier runs).
#
# Usage: scripts/first-experiment.sh [--quick|--full] [--pair smollm2|qwen] [--device cpu|cuda[:N]]
#   smollm2 --quick (default): a few minutes, a smoke test of the whole pipeline whose numbers
#           mean nothing (150 CommonsenseQA questions, 6-layer student, 8 steps, 30 eval items);
#   smollm2 --full: about an hour on 2 CPU cores (docs/RESULTS.md says why).
#   qwen --quick: ce and first, one seed, 24 questions, 2 steps, 10 eval items (minutes; smoke);
#   qwen --full on the CPU: sized for under 2 hours on 2 cores: 100 training questions from each
#           of CommonsenseQA, OpenBookQA and ARC-Easy, students ce, kd, first at seeds 0, 1, 2,
#           20 steps of 512 tokens (about 2 epochs) at lr 2e-5, 80 eval items per task (estimated
#           from the reduced run in docs/RESULTS.md: ~7 min labelling, ~60 min students, ~35 min eval);
#   qwen --full --device cuda: the teacher fine-tuned first, every student, 1500 questions per
#           training file, 3 seeds, 150 steps of 8192 tokens, 500 eval items per task.
# Overrides (environment): FIRSTKD_TRAIN_LIMIT (questions per training file), FIRSTKD_STEPS,
# FIRSTKD_BATCH, FIRSTKD_LR, FIRSTKD_EVAL_LIMIT, FIRSTKD_STUDENTS (e.g. "ce kd kd-ls first kd-tail"),
# FIRSTKD_SEEDS (e.g. "0 1 2"), FIRSTKD_FINETUNE_TEACHER (1/0), FIRSTKD_FT_STEPS.
# Output: ${FIRSTKD_OUT:-out/experiment-MODE (smollm2) or out/experiment-qwen-MODE}/ (results.md there).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
args="$*"
mode="--quick"
device="cpu"
pair="smollm2"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick|--full) mode="$1" ;;
    --device) device="${2:?--device needs a value}"; shift ;;
    --pair) pair="${2:?--pair needs a value}"; shift ;;
    *) echo "usage: $0 [--quick|--full] [--pair smollm2|qwen] [--device cpu|cuda[:N]]" >&2; exit 2 ;;
  esac
  shift
done
shared="${FIRSTKD_SHARED:-../shared}/data"
gpu=0; [ "$device" = cpu ] || gpu=1
finetune=0; ft_steps=0; seeds="0"; base=""
boolq=boolq/test.json
case "$pair:$mode" in
  smollm2:--quick) train_limit=150; steps=8; batch=1024; eval_limit=30; lr=1e-4
           inputs=(commonsenseqa/train_rand_split.jsonl); students="ce kd first" ;;
  smollm2:--full) train_limit=1500; steps=80; batch=2048; eval_limit=300; lr=5e-5
           inputs=(commonsenseqa/train_rand_split.jsonl openbookqa/train.json arc_easy/train.json)
           students="ce kd first" ;;
  qwen:--quick) train_limit=8; steps=2; batch=256; eval_limit=10; lr=2e-5
           inputs=(commonsenseqa/train_rand_split.jsonl openbookqa/train.json arc_easy/train.json)
           students="ce first"; boolq=boolq/boolq.jsonl ;;
  qwen:--full)
           inputs=(commonsenseqa/train_rand_split.jsonl openbookqa/train.json arc_easy/train.json)
           seeds="0 1 2"; boolq=boolq/boolq.jsonl; lr=2e-5
           if [ "$gpu" = 1 ]; then
             train_limit=1500; steps=150; batch=8192; eval_limit=500; finetune=1; ft_steps=100
             students="ce kd kd-ls first kd-tail"
           else
             train_limit=100; steps=20; batch=512; eval_limit=80; students="ce kd first"
           fi ;;
  *) echo "unknown pair $pair (smollm2, qwen)" >&2; exit 2 ;;
esac
train_limit="${FIRSTKD_TRAIN_LIMIT:-$train_limit}"; steps="${FIRSTKD_STEPS:-$steps}"
batch="${FIRSTKD_BATCH:-$batch}"; lr="${FIRSTKD_LR:-$lr}"; eval_limit="${FIRSTKD_EVAL_LIMIT:-$eval_limit}"
seeds="${FIRSTKD_SEEDS:-$seeds}"; finetune="${FIRSTKD_FINETUNE_TEACHER:-$finetune}"
ft_steps="${FIRSTKD_FT_STEPS:-$ft_steps}"; [ "$ft_steps" -gt 0 ] || ft_steps=50
read -r -a students <<< "${FIRSTKD_STUDENTS:-$students}"
read -r -a seeds <<< "$seeds"
[ "${#students[@]}" -gt 0 ] || { echo "FIRSTKD_STUDENTS names no student" >&2; exit 2; }
[ "${#seeds[@]}" -gt 0 ] || { echo "FIRSTKD_SEEDS names no seed" >&2; exit 2; }
for list in "${students[*]}" "${seeds[*]}"; do
  dup=$(tr ' ' '\n' <<< "$list" | sort | uniq -d | head -n 1)
  [ -z "$dup" ] || { echo "'$dup' is listed twice in: $list" >&2; exit 2; }
done
for loss in "${students[@]}"; do
  case "$loss" in ce|kd|kd-ls|first|kd-tail|mix) ;; *) echo "unknown student loss '$loss'" >&2; exit 2 ;; esac
done
for f in "${inputs[@]}" commonsenseqa/dev_rand_split.jsonl arc_easy/test.json openbookqa/test.json "$boolq"; do
  [ -f "$shared/$f" ] || { echo "missing $shared/$f (../shared/data)" >&2; exit 1; }
done
if [ "$pair" = smollm2 ]; then out="${FIRSTKD_OUT:-out/experiment-${mode#--}}"; else out="${FIRSTKD_OUT:-out/experiment-qwen-${mode#--}}"; fi
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
  if [ "$gpu" = 0 ]; then cargo build --release --quiet; else cargo build --release --quiet --features cuda; fi
  bin="$CARGO_TARGET_DIR/release/firstkd"
fi
if [ "$pair" = qwen ]; then
  teacher=$(scripts/fetch-model.sh qwen2.5-coder-1.5b)
  student_gguf=$(scripts/fetch-model.sh qwen2.5-coder-0.5b)
  init="gguf:$student_gguf"; base="$student_gguf"
  init_text="the pre-trained Qwen2.5-Coder-0.5B-Instruct ($init)"
else
  teacher=$(scripts/fetch-teacher.sh)
  case "$mode" in
    --quick) layers="0,1,2,27,28,29" ;;
    --full)  layers="0,1,2,3,4,5,6,7,8,9,10,11,12,13,15,17,19,21,23,25,26,27,28,29" ;;
  esac
  init="teacher-layers:$teacher:$layers"; init_text="teacher layers $layers"
fi
rm -rf "$out"
mkdir -p "$out"
start=$(date +%s)

input_args=()
for f in "${inputs[@]}"; do input_args+=(--input "$shared/$f"); done
label_with="$teacher"
if [ "$finetune" = 1 ]; then
  step "fine-tuning the teacher on up to $train_limit training questions of each file ($ft_steps ce steps)"
  "$bin" label --model "$teacher" "${input_args[@]}" --format mc --mc-response text \
    --limit "$train_limit" --device "$device" --out "$out/store-instruct" | tee "$out/label-instruct.txt"
  "$bin" distill --store "$out/store-instruct" --init "gguf:$teacher" --loss ce --steps "$ft_steps" \
    --batch-tokens "$batch" --lr "$lr" --device "$device" --warmup $(( ft_steps / 10 + 1 )) --seed 0 \
    --quiet --out "$out/teacher-ft" | tee "$out/distill-teacher-ft.txt"
  rm -rf "$out/teacher-ft/checkpoints"   # keep the final model only (1.5B: ~18 GB with AdamW state)
  label_with="$out/teacher-ft/final"
fi
step "labelling up to $train_limit training questions from each of: ${inputs[*]}"
"$bin" label --model "$label_with" "${input_args[@]}" --format mc \
  --mc-response text --limit "$train_limit" --device "$device" --out "$out/store" | tee "$out/label.txt"
"$bin" verify "$out/store"
"$bin" inspect "$out/store" | tee "$out/inspect.txt"
"$bin" stats "$out/store" --plot "$out/plots/teacher-labels" | tee "$out/stats.txt"

step "fitting the temperature (ECE, renormalised top-5, 10% of samples held out by hash)"
"$bin" calibrate "$out/store" | tee "$out/calibrate.txt"

names=()
for loss in "${students[@]}"; do
  extra=(--loss "$loss")
  [ "$loss" = kd-ls ] && extra=(--loss kd --teacher-smoothing 0.1)
  for seed in "${seeds[@]}"; do
    name="$loss"; [ "${#seeds[@]}" = 1 ] || name="$loss-s$seed"
    names+=("$name")
    step "student $name: $init_text, $steps steps of $batch tokens, seed $seed"
    "$bin" distill --store "$out/store" --init "$init" "${extra[@]}" \
      --steps "$steps" --batch-tokens "$batch" --lr "$lr" --device "$device" --warmup $(( steps / 10 + 1 )) \
      --seed "$seed" --quiet --out "$out/student-$name" | tee "$out/distill-$name.txt"
    rm -rf "$out/student-$name/checkpoints"   # keep the final model only (0.5B: ~6 GB with AdamW state)
  done
done

step "evaluating teacher and students (cloze scoring, first $eval_limit items per task)"
model_args=(--model "teacher=$label_with")
[ "$finetune" = 1 ] && model_args+=(--model "teacher-instruct=$teacher")
[ -z "$base" ] || model_args+=(--model "student-base=$base")
for name in "${names[@]}"; do model_args+=(--model "$name=$out/student-$name/final"); done
"$bin" compare "${model_args[@]}" \
  --task "csqa=$shared/commonsenseqa/dev_rand_split.jsonl" --task "arc_easy=$shared/arc_easy/test.json" \
  --task "obqa=$shared/openbookqa/test.json" --task "boolq=$shared/$boolq" \
  --mode cloze --limit "$eval_limit" --device "$device" --plot-dir "$out/plots" --markdown | tee "$out/compare.md"

step "writing $out/results.md"
{
  echo "# FIRST experiment ($pair $mode), $(date -u +%Y-%m-%d)"
  echo
  overrides=""
  for v in FIRSTKD_TRAIN_LIMIT FIRSTKD_STEPS FIRSTKD_BATCH FIRSTKD_LR FIRSTKD_EVAL_LIMIT FIRSTKD_STUDENTS FIRSTKD_SEEDS FIRSTKD_FINETUNE_TEACHER FIRSTKD_FT_STEPS; do
    [ -z "${!v:-}" ] || overrides+="$v=\"${!v}\" "
  done
  echo "Command: \`${overrides}scripts/first-experiment.sh $args\`; wall time $(( $(date +%s) - start )) s."
  echo '```'
  cat "$out/timings.txt"
  echo '```'
  echo
  echo "Device: $device ($(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores)."
  echo "Training inputs: ${inputs[*]} (at most $train_limit questions each)."
  [ "$finetune" = 1 ] && echo "Teacher: fine-tuned from $(basename "$teacher") with $ft_steps ce steps on the same questions."
  echo "Student init: $init_text; $steps steps of $batch tokens, lr $lr, seeds ${seeds[*]}."
  echo
  cat "$out/compare.md"
  echo
  if [ "${#seeds[@]}" -gt 1 ]; then
    echo "Mean ± standard deviation over seeds ${seeds[*]} (\`scripts/seeds_table.py $out/plots/reports.json\`):"
    echo
    python3 scripts/seeds_table.py "$out/plots/reports.json"
    echo
  fi
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
  echo
  echo "Peak resident memory per stage:"
  echo '```'
  grep -H "peak resident memory" "$out"/label*.txt "$out"/distill-*.txt 2>/dev/null | sed "s#$out/##" || true
  echo '```'
} > "$out/results.md"
echo "done: $out/results.md"
cat "$out/results.md"
