#!/usr/bin/env bash
# GPU throughput of labelling and training, as one table (docs/benchmarks.md, issue 16's GPU
# targets). Runs on the GPU machine from the repo root with .dev/firstkd-cuda.tar.xz made by
# scripts/build-cuda.sh (no Rust, no network, no weight files: the models are of the real
# teacher's and student's shapes with seeded random weights, which do not change the speed).
#
#   scripts/gpu-throughput.sh                   # everything below, ~5 min on an H200
#   QUICK=1 scripts/gpu-throughput.sh           # one labelling and one training row
#
# Stages, each one table row (and PASS/FAIL in the log):
#  1. labelling, Qwen2.5-Coder-1.5B shape (examples/label_bench.rs): bf16 products, packed rows
#     of ROW_LEN tokens, selection on the device, Parquet written on a second thread; at batch
#     sizes of $BATCHES tokens and rows of $ROWS tokens (the scaling curve), then f32 and the
#     host-selection path for comparison. The first bf16 run also labels 4 sequences again on
#     the CPU in f32 and prints the agreement (top-1, top-5 set, target log-prob).
#  2. training, Qwen2.5-0.5B shape (examples/train_bench.rs, FIRSTKD_BENCH_SHAPE=qwen0.5b):
#     bf16 products, kd and ce, $TRAIN_TOKENS tokens per step in rows of 1024.
# MFU is model FLOPs over the H200's dense bf16 peak (PEAK_TFLOPS, default 989). Peak device
# memory comes from nvidia-smi polled every 100 ms during each stage.
# Output: $OUT/gpu-throughput.md (or /tmp/fk-out/) and the log next to it.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=${OUT:-/tmp/fk-out}
FK=/tmp/fk
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
BATCHES=${BATCHES:-16384 65536 131072}
ROWS=${ROWS:-1024 2048 4096}
TOKENS=${TOKENS:-262144}
TRAIN_TOKENS=${TRAIN_TOKENS:-16384}
mkdir -p "$OUTDIR"
TABLE=$OUTDIR/gpu-throughput.md
LOG=$OUTDIR/gpu-throughput.log
: >"$TABLE"
AGREE=$OUTDIR/.agreement.md
: >"$AGREE"
t0=$(date +%s)
fails=0

# Unpack the build and set LD_LIBRARY_PATH (cuda-check.sh's setup stage).
SETUP_ONLY=1 OUT=$OUTDIR bash "$ROOT/scripts/cuda-check.sh" >"$LOG" 2>&1 || { echo "setup failed; see $LOG"; exit 1; }
# shellcheck disable=SC1091
source "$FK/env.sh"

peak_mem() { # COMMAND... : runs it with nvidia-smi polling; sets PEAK_MIB
  local poll=$OUTDIR/.smi.$$
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$poll" 2>/dev/null &
  local smi=$!
  "$@"
  local rc=$?
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  PEAK_MIB=$(sort -n "$poll" | tail -1)
  rm -f "$poll"
  return $rc
}

label() { # LABEL_BENCH_ARGS...
  local out
  if out=$(peak_mem timeout 300 "$FK/label_bench" --device cuda --shape qwen1.5b --peak-tflops "$PEAK_TFLOPS" "$@" 2>>"$LOG"); then
    echo "$out" >>"$LOG"
    echo "$out" | grep -E '^\| qwen' | sed "s/\$/ ${PEAK_MIB:-?} MiB |/" >>"$TABLE"
    echo "$out" | grep -E '^\| agreement' >>"$AGREE"
    echo "### PASS: label_bench $* [t+$(($(date +%s) - t0))s]"
  else
    echo "$out" >>"$LOG"
    fails=$((fails + 1))
    echo "### FAIL: label_bench $* [t+$(($(date +%s) - t0))s]"
  fi
}

{
echo "## labelling, Qwen2.5-Coder-1.5B shape, $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null), $(date -u +%F)"
echo
echo "| model | device | compute | rows | batch tokens | selection | sequences | tokens | fill | s | tokens/s | model TFLOP/s | MFU | peak device memory |"
echo "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|"
} >>"$TABLE"
label --compute bf16 --tokens "$TOKENS" --row-len 2048 --batch-tokens 65536 --check 4 --min-len 200 --max-len 1000
if [[ -z ${QUICK:-} ]]; then
  for b in $BATCHES; do
    [[ $b == 65536 ]] && continue
    label --compute bf16 --tokens "$TOKENS" --row-len 2048 --batch-tokens "$b" --check 0
  done
  for r in $ROWS; do
    [[ $r == 2048 ]] && continue
    label --compute bf16 --tokens "$TOKENS" --row-len "$r" --batch-tokens 65536 --check 0 --max-len "$((r < 1000 ? r : 1000))"
  done
  label --compute bf16 --tokens "$TOKENS" --row-len 0 --batch-tokens 65536 --check 0
  label --compute bf16 --tokens "$TOKENS" --row-len 2048 --batch-tokens 65536 --check 0 --host-select
  label --compute f32 --tokens "$((TOKENS / 4))" --row-len 2048 --batch-tokens 65536 --check 0
fi

{
echo
echo "Labels against the CPU f32 engine on the same weights and sequences:"
echo
echo "| check | model | labels | positions | top-1 agrees | top-5 set agrees | mean abs target lp diff | max |"
echo "|---|---|---|---:|---:|---:|---:|---:|"
cat "$AGREE"
echo
echo "## training, Qwen2.5-0.5B shape, bf16 products, $TRAIN_TOKENS tokens per step (rows of 1024)"
echo
} >>"$TABLE"
for loss in kd ce; do
  if out=$(peak_mem env FIRSTKD_DEVICE=cuda FIRSTKD_PRECISION=bf16 FIRSTKD_BENCH_SHAPE=qwen0.5b \
      FIRSTKD_BENCH_TOKENS="$TRAIN_TOKENS" FIRSTKD_BENCH_SEQ=1024 FIRSTKD_PEAK_TFLOPS="$PEAK_TFLOPS" \
      timeout 300 "$FK/train_bench" 8 "$loss" 2>>"$LOG"); then
    echo "$out" >>"$LOG"
    grep -q '^| loss' "$TABLE" || echo "$out" | grep -E '^\| loss|^\|---' | sed -e '1s/$/ peak device memory |/' -e '2s/$/---|/' >>"$TABLE"
    echo "$out" | grep -E "^\| $loss " | sed "s/\$/ ${PEAK_MIB:-?} MiB |/" >>"$TABLE"
    echo "### PASS: train_bench qwen0.5b $loss [t+$(($(date +%s) - t0))s]"
  else
    echo "$out" >>"$LOG"
    fails=$((fails + 1))
    echo "### FAIL: train_bench qwen0.5b $loss [t+$(($(date +%s) - t0))s]"
  fi
  [[ -n ${QUICK:-} ]] && break
done
cat "$TABLE"
echo "### done in $(($(date +%s) - t0)) s, $fails failed; table: $TABLE, log: $LOG"
exit "$fails"
