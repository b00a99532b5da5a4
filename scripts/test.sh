#!/usr/bin/env bash
# Runs the whole test suite the way CI does. Installs what the tests need first (Python
# readers used to check the store is open to other tools, torch + transformers, and the cached models: the
# SmolLM2-135M teacher and the Qwen2.5-Coder 1.5B teacher / 0.5B student pair).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
python3 -m pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
# Spark (a reader of the store in tests/it/format_v2.rs) runs on Java 17 or 21.
if ! command -v java >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless; } \
    >/dev/null || echo "test.sh: could not install Java; the Spark reader test will fail under CI" >&2
fi
# strace records the fsync/rename sequence of a commit (tests/it/crash.rs, docs/reliability.md).
if ! command -v strace >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace; } \
    >/dev/null || echo "test.sh: could not install strace; the commit-durability test will fail under CI" >&2
fi
# torch + transformers (a cached venv) for the test that loads a student checkpoint in
# transformers itself (tests/it/qwen.rs).
FIRSTKD_TORCH_PYTHON="${FIRSTKD_TORCH_PYTHON:-$(scripts/torch-venv.sh)}"
export FIRSTKD_TORCH_PYTHON
for model in smollm2-135m qwen2.5-coder-1.5b qwen2.5-coder-0.5b; do
  scripts/fetch-model.sh "$model" >/dev/null
done
# A real S3-compatible server (SeaweedFS) on 127.0.0.1 for the object-storage tests
# (tests/it/scale.rs), stopped when this script exits.
s3dir="$(mktemp -d "${TMPDIR:-/tmp}/firstkd-s3.XXXXXX")"
trap 'scripts/s3-server.sh stop "$s3dir"' EXIT
# shellcheck disable=SC1090
source "$(scripts/s3-server.sh start "$s3dir")"
cargo test --release "$@"
