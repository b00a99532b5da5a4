#!/usr/bin/env bash
# Knowledge selection compared on held-out text: which soft labels, at about the same bytes per
# token, give the best student (issue 13's comparison; results in docs/RESULTS.md).
#
# Teacher: SmolLM2-135M-Instruct (scripts/fetch-teacher.sh). Student: the teacher's blocks
# 0,1,2,27,28,29 (6 of 30; embeddings, final norm and head kept), the same initialisation for
# every variant. Training text: the first TRAIN_CHARS characters of WikiText-2 validation;
# held-out text: the first HELDOUT_CHARS characters of WikiText-2 test (../shared/data).
#
# Stores (seq 256): top-k:5 (temperature fitted by `calibrate`, ECE on 10% held-out samples),
# top-p:0.95,max=20, and sample:DRAWS,t=1 (DRAWS=6 has about the bytes of top-5), the sample
# store labelled once per seed (seed=S) so the seeds cover the draws as well as the data order.
# Variants, every one at the same steps, batch and learning rate, at seeds SEEDS (`--seed`):
#   ce (hard labels: plain fine-tuning), top5 (`kd`, renormalised top-5), top5-tail (`kd-tail`),
#   first (`first`: top-5 at the fitted T), top-p (`kd` on the top-p lists), sampled
#   (`sampled` on the sample store), online (`online --teacher`: full-distribution KL, no store);
#   also available: first-ce (`mix --mix-kd first --alpha 0.5`: FIRST plus hard labels) and
#   sampled-N (`sampled` on a sample:N store, N draws, labelled per seed).
# Evaluation: every student (and the teacher, and the student before training: one step at
# lr 1e-30) labels the held-out text with `--dtype float32`; `firstkd stats --json` of that
# store gives the next-token NLL (mean -log q(target) over the full vocabulary), the top-1
# accuracy and the ECE of the top-1 confidence (15 equal-width bins).
#
# Usage: scripts/select-compare.sh [--quick|--full]
#   --quick: a smoke test whose numbers mean nothing (a few minutes);
#   --full (default): about an hour on 2 CPU cores.
# Overrides (environment): TRAIN_CHARS, HELDOUT_CHARS, STEPS, BATCH, LR, SEEDS ("0 1 2"),
# DRAWS, VARIANTS ("ce top5 top5-tail first top-p sampled online"), FIRSTKD_OUT.
# Output: ${FIRSTKD_OUT:-out/select-compare-MODE}/results.md (the table) and one folder per run.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
mode=full
case "${1:---full}" in
  --quick) mode=quick ;;
  --full) mode=full ;;
  *) echo "usage: $0 [--quick|--full]" >&2; exit 2 ;;
esac
if [ "$mode" = quick ]; then
  d_train=12000; d_heldout=4000; d_steps=3; d_seeds="0"
else
  d_train=120000; d_heldout=24000; d_steps=30; d_seeds="0 1 2"
fi
train_chars="${TRAIN_CHARS:-$d_train}"; heldout_chars="${HELDOUT_CHARS:-$d_heldout}"
steps="${STEPS:-$d_steps}"; batch="${BATCH:-1024}"; lr="${LR:-3e-4}"; seeds="${SEEDS:-$d_seeds}"
draws="${DRAWS:-6}"; variants="${VARIANTS:-ce top5 top5-tail first top-p sampled online}"
out="${FIRSTKD_OUT:-out/select-compare-$mode}"
data="${FIRSTKD_SHARED:-../shared}/data/wikitext-2"
for f in valid.txt test.txt; do
  [ -f "$data/$f" ] || { echo "select-compare: $data/$f not found (the shared data folder)" >&2; exit 1; }
done
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/firstkd"
teacher="$(scripts/fetch-teacher.sh)"
init="teacher-layers:$teacher:0,1,2,27,28,29"
rm -rf "$out"
mkdir -p "$out/stores" "$out/students" "$out/eval"
head -c "$train_chars" "$data/valid.txt" > "$out/train.txt"
head -c "$heldout_chars" "$data/test.txt" > "$out/heldout.txt"
echo "select-compare ($mode): $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) threads; " \
  "train $train_chars chars, held-out $heldout_chars chars, $steps steps of $batch tokens, lr $lr, seeds $seeds" \
  | tee "$out/run.txt"

label() { # STORE SELECT...
  local store="$1"; shift
  "$bin" label --model "$teacher" --input "$out/train.txt" --out "$out/stores/$store" --seq-len 256 "$@" \
    | tee -a "$out/run.txt"
  "$bin" verify "$out/stores/$store" > /dev/null
}
label topk --select top-k:5
"$bin" calibrate "$out/stores/topk" | tee "$out/calibrate.txt"
[[ " $variants " == *" top-p "* ]] && label topp --select top-p:0.95,max=20
for v in $variants; do
  case "$v" in
    sampled) n="$draws"; prefix=sample ;;
    sampled-*) n="${v#sampled-}"; prefix="sample$n" ;;
    *) continue ;;
  esac
  for s in $seeds; do label "$prefix-s$s" --select "sample:$n,t=1,seed=$s"; done
done

evaluate() { # NAME MODEL
  "$bin" label --model "$2" --input "$out/heldout.txt" --out "$out/eval/$1" --seq-len 256 --dtype float32 > /dev/null
  "$bin" stats "$out/eval/$1" --json > "$out/eval/$1.json"
}
evaluate teacher "$teacher"
"$bin" distill --store "$out/stores/topk" --init "$init" --loss ce --steps 1 --lr 1e-30 \
  --batch-tokens "$batch" --max-seq-len 256 --out "$out/students/untrained" --quiet > /dev/null
evaluate untrained "$out/students/untrained/final"

for s in $seeds; do
  for v in $variants; do
    store=topk; extra=()
    case "$v" in
      ce) extra=(--loss ce) ;;
      top5) extra=(--loss kd) ;;
      top5-tail) extra=(--loss kd-tail) ;;
      first) extra=(--loss first) ;;
      top-p) store=topp; extra=(--loss kd) ;;
      first-ce) extra=(--loss mix --mix-kd first --alpha 0.5) ;;
      sampled) store="sample-s$s"; extra=(--loss sampled) ;;
      sampled-*) store="sample${v#sampled-}-s$s"; extra=(--loss sampled) ;;
      online) extra=(--loss online --teacher "$teacher") ;;
      *) echo "select-compare: unknown variant $v" >&2; exit 2 ;;
    esac
    name="$v-s$s"
    echo "== $name (store $store)" | tee -a "$out/run.txt"
    "$bin" distill --store "$out/stores/$store" --init "$init" "${extra[@]}" --steps "$steps" \
      --batch-tokens "$batch" --max-seq-len 256 --lr "$lr" --seed "$s" --out "$out/students/$name" --quiet \
      | tee -a "$out/run.txt"
    evaluate "$name" "$out/students/$name/final"
    rm -rf "$out/eval/$name"  # the json is what the table reads
  done
done
python3 scripts/select_table.py "$out" --expect "teacher,untrained,${variants// /,}" > "$out/results.md"
cat "$out/results.md"
