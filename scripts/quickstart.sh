#!/usr/bin/env bash
# The main job on bundled defaults. Today: build firstkd, fetch and cache the teacher,
# write a seeded synthetic soft-label store, verify it and show what it holds.
# Output goes to ${FIRSTKD_OUT:-out/quickstart}.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
out="${FIRSTKD_OUT:-out/quickstart}"
echo "== building firstkd (release; the first build compiles dependencies, ~20 min on 2 cores)"
cargo build --release
bin="$CARGO_TARGET_DIR/release/firstkd"
echo "== fetching the teacher (cached)"
teacher=$(scripts/fetch-teacher.sh)
echo "teacher: $teacher"
rm -rf "$out/synthetic"
mkdir -p "$out"
echo "== writing a synthetic store"
"$bin" synth "$out/synthetic" --rows 200000 --seed 0
echo "== verifying it"
"$bin" verify "$out/synthetic"
echo "== inspecting it"
"$bin" inspect "$out/synthetic"
echo "== done: store in $out/synthetic"
