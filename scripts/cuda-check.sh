#!/usr/bin/env bash
# Runs on the GPU machine, from the repo root, with .dev/firstkd-cuda.tar.xz made by
# scripts/build-cuda.sh (firstkd, it-tests, train_bench, firstkd-lib-tests). No Rust needed.
# Stages: unpack into /tmp/fk, ldd, (a) lib + integration tests whose names contain $FILTER,
# (b) FIRSTKD_DEVICE=cuda train_bench, f32 and bf16, (c) synth + distill --device cuda (kd, ce).
# Output: $OUT/cuda-check.log (or /tmp/fk-out/). Each stage prints PASS / FAIL / SKIP and the
# script goes on; the exit status is the number of failed stages.
#
#   scripts/cuda-check.sh                    # all stages
#   FILTER=cuda STEPS=20 scripts/cuda-check.sh
#   TRAIN_BENCH_ARGS="20 kd ce" BENCH_PRECISIONS=bf16 scripts/cuda-check.sh
#   SETUP_ONLY=1 scripts/cuda-check.sh       # unpack and set up /tmp/fk only
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEV=$ROOT/.dev
FK=/tmp/fk
OUTDIR=${OUT:-/tmp/fk-out}
FILTER=${FILTER:-cuda}
STEPS=${STEPS:-20}
mkdir -p "$FK" "$OUTDIR"
LOG=$OUTDIR/cuda-check.log
fails=0
# Per-stage timeouts are capped so the whole run ends within DEADLINE seconds (a device command
# is limited to 600 s).
DEADLINE=${DEADLINE:-540}
limit() { # WANTED_SECONDS -> min(wanted, time left before DEADLINE), at least 1
  local left=$((t0 + DEADLINE - $(date +%s)))
  ((left < 1)) && left=1
  echo $(($1 < left ? $1 : left))
}
result() { # STAGE STATUS [DETAIL]
  echo "### $2: $1${3:+ ($3)} [t+$(($(date +%s) - t0))s]"
  [[ $2 == FAIL ]] && fails=$((fails + 1))
  return 0
}

main() {
t0=$(date +%s)

echo "### cuda-check $(date -u +%FT%TZ) on $(hostname), repo $ROOT"
nvidia-smi -L 2>&1 || true
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader 2>&1 || true

# ---------------------------------------------------------------- unpack
rm -rf "$FK" && mkdir -p "$FK"
if [[ ! -f $DEV/firstkd-cuda.tar.xz ]]; then
  result unpack FAIL "missing $DEV/firstkd-cuda.tar.xz"
elif if command -v xz >/dev/null; then xz -dc "$DEV/firstkd-cuda.tar.xz" | tar -C "$FK" -xf -
     else python3 -c 'import sys,tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$DEV/firstkd-cuda.tar.xz" "$FK"; fi \
  && (cd "$FK" && sha256sum --quiet -c SHA256SUMS); then
  result unpack PASS "$(cd "$FK" && ls | grep -v -e SHA256SUMS -e manifest | paste -sd' ')"
else
  result unpack FAIL "extract or checksum failed"
fi
[[ -f $FK/cuda-manifest.txt ]] && cat "$FK/cuda-manifest.txt"

# The test binaries have build-machine paths compiled in: CARGO_BIN_EXE_firstkd and
# CARGO_MANIFEST_DIR (test data under tests/data). Recreate them if possible.
if [[ -f $FK/cuda-manifest.txt ]]; then
  bin_path=$(awk '/^# CARGO_BIN_EXE_firstkd=/{sub(/^# CARGO_BIN_EXE_firstkd=/,""); print}' "$FK/cuda-manifest.txt")
  src_dir=$(awk '/^# CARGO_MANIFEST_DIR=/{sub(/^# CARGO_MANIFEST_DIR=/,""); print}' "$FK/cuda-manifest.txt")
fi
bin_path=${bin_path:-/tmp/firstkd-cuda-target/release/firstkd}
src_dir=${src_dir:-/work/main}
if [[ ! -e $bin_path || -L $bin_path ]]; then
  mkdir -p "$(dirname "$bin_path")" && ln -sfn "$FK/firstkd" "$bin_path" || echo "note: could not link $bin_path"
fi
if [[ ! -e $src_dir && $src_dir != "$ROOT" ]]; then
  mkdir -p "$(dirname "$src_dir")" && ln -sfn "$ROOT" "$src_dir" || echo "note: could not link $src_dir -> $ROOT"
fi

# ---------------------------------------------------------------- library path
dirs=()
add_lib_dir() { # LIBNAME: first directory holding it
  local d
  for base in "${SITE:+$SITE/nvidia}" /opt/torch/.venv /usr/local/cuda; do
    [[ -n $base && -d $base ]] || continue
    d=$(find -L "$base" -name "$1" -print -quit 2>/dev/null)
    [[ -n $d ]] && { dirs+=("$(dirname "$d")"); return 0; }
  done
  echo "warning: $1 not found under ${SITE:+$SITE/nvidia }/opt/torch/.venv /usr/local/cuda"
}
PY=python3
[[ -x /opt/torch/.venv/bin/python3 ]] && PY=/opt/torch/.venv/bin/python3
SITE=$($PY -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null || true)
for l in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do add_lib_dir "$l"; done
[[ -d /usr/local/nvidia/lib64 ]] && dirs+=(/usr/local/nvidia/lib64)
joined=$( ((${#dirs[@]})) && printf '%s\n' "${dirs[@]}" | awk '!seen[$0]++' | paste -sd:)
export LD_LIBRARY_PATH=$joined${joined:+${LD_LIBRARY_PATH:+:}}${LD_LIBRARY_PATH:-}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
echo "export LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >"$FK/env.sh"  # for scripts/cuda-experiment.sh
if [[ -n ${SETUP_ONLY:-} ]]; then echo "### setup only: $FK ready"; return 0; fi

# ---------------------------------------------------------------- ldd
missing=0
for n in firstkd firstkd-lib-tests it-tests train_bench label_bench; do
  [[ -x $FK/$n ]] || continue
  if [[ $n == firstkd ]]; then ldd "$FK/$n" | grep -E 'cuda|cublas|curand|nvrtc|not found|stdc\+\+|libc\.so'; fi
  nf=$(ldd "$FK/$n" 2>&1 | grep -c 'not found')
  ((nf)) && { echo "$n:"; ldd "$FK/$n" | grep 'not found'; missing=$((missing + nf)); }
done
((missing == 0)) && result ldd PASS "all libraries resolve" || result ldd FAIL "$missing unresolved"

# ---------------------------------------------------------------- (a) tests named *$FILTER*
run_tests() { # STAGE BIN
  local stage=$1 bin=$FK/$2 n rc
  [[ -x $bin ]] || { result "$stage" FAIL "no binary"; return; }
  local list
  list=$("$bin" "$FILTER" --list 2>&1)
  rc=$?
  if ((rc != 0)); then echo "$list" | tail -5; result "$stage" FAIL "--list exit $rc"; return; fi
  n=$(grep -c ': test$' <<<"$list")
  if ((n == 0)); then result "$stage" SKIP "no tests matching '$FILTER'"; return; fi
  echo "--- $stage: $n test(s) matching '$FILTER'"
  (cd "$ROOT" && RUST_BACKTRACE=1 timeout "$(limit "${TEST_TIMEOUT:-240}")" "$bin" "$FILTER" --test-threads=1)
  rc=$?
  ((rc == 0)) && result "$stage" PASS "$n tests" || result "$stage" FAIL "exit $rc"
}
run_tests "lib unit tests" firstkd-lib-tests
run_tests "integration tests (it)" it-tests

# ---------------------------------------------------------------- (b) train_bench
# examples/train_bench.rs: args [STEPS] [LOSS...] (default 6; kd kd-tail ce); device and matmul
# precision come from FIRSTKD_DEVICE=cuda and FIRSTKD_PRECISION=bf16 (else CPU, f32).
for prec in ${BENCH_PRECISIONS:-f32 bf16}; do
  # shellcheck disable=SC2086
  if FIRSTKD_DEVICE=cuda FIRSTKD_PRECISION=$prec timeout "$(limit "${BENCH_TIMEOUT:-120}")" "$FK/train_bench" ${TRAIN_BENCH_ARGS:-10}; then
    result "train_bench cuda $prec" PASS
  else
    result "train_bench cuda $prec" FAIL "exit $?"
  fi
done

# ---------------------------------------------------------------- (c) end-to-end distill on cuda
work=$(mktemp -d /tmp/fk-smoke.XXXX)
cat >"$work/student.json" <<'EOF'
{"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 2,
 "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
 "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
 "tie_word_embeddings": true}
EOF
if timeout "$(limit 60)" "$FK/firstkd" synth "$work/store" --rows $(((STEPS + 4) * 4096 * 2)) >/dev/null; then
  for loss in kd ce; do
    s=$(date +%s.%N)
    if timeout "$(limit 120)" "$FK/firstkd" distill --store "$work/store" --init "random:$work/student.json" \
      --loss "$loss" --steps "$STEPS" --batch-tokens 4096 --device cuda --quiet --out "$work/run-$loss" 2>&1 | tail -3; then
      result "distill --device cuda --loss $loss" PASS "$STEPS steps, $(awk -v s="$s" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}') s"
    else
      result "distill --device cuda --loss $loss" FAIL "exit ${PIPESTATUS[0]}"
    fi
  done
else
  result "distill smoke" FAIL "synth failed"
fi
rm -rf "$work"

echo "### done in $(($(date +%s) - t0)) s, $fails failed stage(s); log: $LOG"
return "$fails"
}

main "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
