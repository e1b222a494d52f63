#!/usr/bin/env bash
# Runs the test suite. On Linux, MLX's CPU wheel ships a slow reference BLAS; preloading OpenBLAS
# (apt-get install libopenblas0-pthread) makes float32 matmuls about 30x faster.
set -euo pipefail
cd "$(dirname "$0")/.."
blas=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
if [[ $(uname) == Linux && -e $blas ]]; then export LD_PRELOAD=$blas; fi
exec python3 -m pytest -q "$@"
