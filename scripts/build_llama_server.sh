#!/usr/bin/env bash
# Build llama.cpp's llama-server (the peer of benchmarks/peer_llamacpp.py) from the llama-cpp-python
# sdist and cache it under ${BLOCKZOO_CACHE_DIR:-~/.cache/blockzoo}/llama.cpp/<version>/; prints its path.
# A second run finds the cached binary and returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" -m benchmarks.llamacpp_build "$@"
