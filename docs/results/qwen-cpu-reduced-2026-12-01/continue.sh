#!/usr/bin/env bash
# Continuation of `FIRSTKD_TRAIN_LIMIT=40 FIRSTKD_STEPS=12 FIRSTKD_EVAL_LIMIT=40 scripts/first-experiment.sh --full --pair qwen`
# after the disk filled during student first-s1 (checkpoint folders were not removed): the same commands as the script.
set -euo pipefail
cd /work/main
bin=/tmp/firstkd-target/release/firstkd; out=/tmp/qrun/out; shared=../shared/data
teacher=$(scripts/fetch-model.sh qwen2.5-coder-1.5b); student=$(scripts/fetch-model.sh qwen2.5-coder-0.5b)
step() { local now; now=$(date +%s); [ -z "${last:-}" ] || printf '%s\t%s s\n' "$last_name" "$(( now - last ))" >> "$out/timings.txt"; last=$now; last_name="$*"; printf '\n== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
for seed in 1 2; do
  name=first-s$seed
  step "student $name: the pre-trained Qwen2.5-Coder-0.5B-Instruct (gguf:$student), 12 steps of 512 tokens, seed $seed"
  "$bin" distill --store "$out/store" --init "gguf:$student" --loss first --steps 12 --batch-tokens 512 --lr 2e-5 \
    --device cpu --warmup 2 --seed "$seed" --quiet --out "$out/student-$name" | tee "$out/distill-$name.txt"
  rm -rf "$out/student-$name/checkpoints"
done
step "evaluating teacher and students (cloze scoring, first 40 items per task)"
model_args=(--model "teacher=$teacher" --model "student-base=$student")
for loss in ce kd first; do for seed in 0 1 2; do model_args+=(--model "$loss-s$seed=$out/student-$loss-s$seed/final"); done; done
"$bin" compare "${model_args[@]}" \
  --task "csqa=$shared/commonsenseqa/dev_rand_split.jsonl" --task "arc_easy=$shared/arc_easy/test.json" \
  --task "obqa=$shared/openbookqa/test.json" --task "boolq=$shared/boolq/boolq.jsonl" \
  --mode cloze --limit 40 --device cpu --plot-dir "$out/plots" --markdown | tee "$out/compare.md"
step "done"
