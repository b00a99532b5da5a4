#!/usr/bin/env bash
# Prints the path of a Python that has torch + transformers (and what the benchmarks need),
# creating it first when missing: a virtual environment cached at $FIRSTKD_CACHE/bench-venv
# (or $FIRSTKD_BENCH_VENV). Used by the benchmarks against PyTorch and by scripts/test.sh,
# which exports it as FIRSTKD_TORCH_PYTHON for the test that loads a student checkpoint in
# transformers (tests/it/qwen.rs). The first install downloads about 6 GB from PyPI.
set -euo pipefail
cache="${FIRSTKD_CACHE:-$HOME/.cache/firstkd}"
venv="${FIRSTKD_BENCH_VENV:-$cache/bench-venv}"
check='import torch, transformers, gguf, accelerate, pyarrow, numpy'
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "$check" 2>/dev/null; then
  echo "torch-venv: installing torch, transformers, gguf, accelerate into $venv (about 6 GB)" >&2
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch transformers gguf accelerate numpy pyarrow >&2 \
    || { echo "torch-venv: pip install failed (is PyPI reachable?)" >&2; exit 1; }
  "$venv/bin/python" -c "$check" || { echo "torch-venv: $venv still lacks torch/transformers" >&2; exit 1; }
fi
echo "$venv/bin/python"
