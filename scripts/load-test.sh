#!/usr/bin/env bash
# Load test of `firstkd sql` and `firstkd stats` (issue 15, docs/reliability.md "Load"):
# writes a synthetic store of ROWS label rows (default 10^8), then runs a scan, a group-by, a
# top-k, a distinct count of every (sample, position) under a small memory limit, a full
# sort under that limit (spilling) and the `stats` report,
# each with its wall time, exit code and peak resident memory (VmHWM, reported by firstkd
# itself with FIRSTKD_REPORT_PEAK_RSS=1). Prints a Markdown table and writes it to
# $OUT/load.md.
#
#   scripts/load-test.sh [ROWS]    OUT=/tmp/firstkd-load by default; KEEP=1 keeps the store;
#                                  BIN=path/to/firstkd skips the build; LIMIT=1G the small limit
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-100000000}"
OUT="${OUT:-/tmp/firstkd-load}"
LIMIT="${LIMIT:-1G}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN="$CARGO_TARGET_DIR/release/firstkd"
fi
STORE="$OUT/store-$ROWS"
mkdir -p "$OUT"
export FIRSTKD_REPORT_PEAK_RSS=1

# run NAME CMD...: one row of the table.
TABLE="$OUT/load.md"
{
  echo "| step | exit | wall s | peak RSS MiB | result (first line) |"
  echo "|---|---:|---:|---:|---|"
} > "$TABLE"
run() {
  local name="$1"; shift
  local start end code
  start=$(date +%s.%N)
  set +e
  "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  code=$?
  set -e
  end=$(date +%s.%N)
  local kib result
  kib=$(sed -n 's/^firstkd: peak RSS \([0-9]*\) KiB$/\1/p' "$OUT/$name.err" | tail -1)
  # The first row of a result table (stats: the all-positions coverage row), or the error.
  if [ "$code" = 0 ]; then
    result=$(awk '/^all +\(all\) +\(all\)/ {print; exit} /^\| / && !/^\| *[a-z_(]/ {print; exit}' \
      "$OUT/$name.out" | tr -s ' ' | cut -c1-100)
    [ -n "$result" ] || result=$(awk 'NF {print; exit}' "$OUT/$name.out" | cut -c1-100)
  else
    result=$(awk '!/^firstkd: peak RSS/ && NF {print; exit}' "$OUT/$name.err" | cut -c1-140)
  fi
  printf '| %s | %s | %.1f | %s | %s |\n' "$name" "$code" "$(awk "BEGIN {print $end - $start}")" \
    "$(( ${kib:-0} / 1024 ))" "${result//|/\\|}" >> "$TABLE"
}

if [ ! -f "$STORE/manifest.json" ]; then
  rm -rf "$STORE"
  # zstd level 3: the store is larger than `label`'s (level 19), so the queries read more
  # bytes, and it is written several times faster.
  run "synth ($ROWS rows)" "$BIN" synth "$STORE" --rows "$ROWS" --seed 15 --zstd-level 3
fi
du -sb "$STORE" | awk '{printf "store: %s bytes on disk\n", $1}' > "$OUT/size.txt"
run "count, mean entropy" "$BIN" sql "$STORE" \
  "SELECT count(*) AS n, avg(entropy) AS mean_entropy, sum(CAST(in_loss AS BIGINT)) AS in_loss FROM labels"
run "group by target_id" "$BIN" sql "$STORE" \
  "SELECT target_id, count(*) AS n FROM labels GROUP BY target_id ORDER BY n DESC LIMIT 5"
run "top 5 by entropy" "$BIN" sql "$STORE" \
  "SELECT sample_id, position, entropy FROM labels ORDER BY entropy DESC LIMIT 5"
run "distinct (sample, position), limit $LIMIT" "$BIN" sql "$STORE" --memory-limit "$LIMIT" \
  "SELECT count(DISTINCT sample_id * 65536 + position) AS n FROM labels"
run "full sort to CSV, limit $LIMIT" "$BIN" sql "$STORE" --memory-limit "$LIMIT" --format csv \
  --output "$OUT/sorted.csv" "SELECT sample_id, position, entropy FROM labels ORDER BY entropy DESC, sample_id, position"
rm -f "$OUT/sorted.csv"
run "stats" "$BIN" stats "$STORE"
run "stats, limit $LIMIT" "$BIN" stats "$STORE" --memory-limit "$LIMIT"

{
  echo
  echo "$ROWS label rows; $(cat "$OUT/size.txt"); $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(date -u +%F)"
} >> "$TABLE"
cat "$TABLE"
[ "${KEEP:-0}" = 1 ] || rm -rf "$STORE"
