#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (docs/reliability.md, "Fuzzing") for SECONDS each
# (default 600), starting from the built-in seeds and the committed corpus, then minimises the
# corpus into fuzz/corpus/TARGET (committed; tests/it/fuzz_corpus.rs replays it on stable) and
# copies any crashing input to fuzz/regressions/TARGET. Needs the nightly toolchain (rustup)
# and cargo-fuzz (installed here when missing) and the cached SmolLM2 GGUF
# (scripts/fetch-model.sh smollm2-135m). Prints one line per target: runs, corpus size, crashes.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]        JOBS=2 runs two targets at a time
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH="${1:-600}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(input_records chat_template gguf_header store_files)
JOBS="${JOBS:-1}"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-/tmp/firstkd-fuzz-target}"
rustup toolchain list | grep -q '^nightly' || {
  echo "fuzz: the nightly toolchain is needed (rustup toolchain install nightly)" >&2
  exit 1
}
command -v cargo-fuzz > /dev/null || cargo install --locked cargo-fuzz
# Seeds: the repository's records, a small GGUF made from SmolLM2's header, a synthetic
# store's files (written by an ignored test, so they come from the same code as the replay).
(unset CARGO_TARGET_DIR; export CARGO_TARGET_DIR="${MAIN_TARGET_DIR:-/tmp/firstkd-target}";
  cargo test --release --quiet --test it -- --ignored --exact fuzz_corpus::write_fuzz_seeds > /dev/null)
cd fuzz
cargo +nightly fuzz build -O -a -s none
mkdir -p work
run_one() {
  local t="$1"
  mkdir -p "corpus/$t" "work/$t" "artifacts/$t" "regressions/$t"
  cp -n "corpus/$t"/* "work/$t"/ 2> /dev/null || true
  local log="work/$t.log"
  set +e
  cargo +nightly fuzz run -O -a -s none "$t" "work/$t" "seeds/$t" -- \
    -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 -timeout=30 -max_len=1048576 \
    -print_final_stats=1 > "$log" 2>&1
  local code=$?
  set -e
  # Minimise what was found into the committed corpus.
  rm -rf "work/$t.min" && mkdir -p "work/$t.min"
  cargo +nightly fuzz run -O -a -s none "$t" "work/$t.min" "work/$t" "seeds/$t" -- -merge=1 \
    > "work/$t.merge.log" 2>&1 || true
  rm -rf "corpus/$t" && mv "work/$t.min" "corpus/$t"
  local crashes=0
  for f in "artifacts/$t"/crash-* "artifacts/$t"/oom-* "artifacts/$t"/timeout-*; do
    [ -e "$f" ] || continue
    cp "$f" "regressions/$t/"
    crashes=$((crashes + 1))
  done
  local runs
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  echo "$t: exit $code, ${runs:-?} runs in ${SECONDS_EACH} s, corpus $(ls "corpus/$t" | wc -l) files, $crashes crashing input(s) (log: fuzz/$log)"
}
export -f run_one
export SECONDS_EACH
printf '%s\n' "${TARGETS[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one {}'
