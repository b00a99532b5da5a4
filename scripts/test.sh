#!/usr/bin/env bash
# Runs the whole test suite the way CI does. Installs what the tests need first (Python
# readers used to check the store is open to other tools, the cached teacher model).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/firstkd-target}"
python3 -m pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
scripts/fetch-teacher.sh >/dev/null
cargo test --release "$@"
