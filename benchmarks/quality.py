"""KV-cache quality on a real model: FP16 vs mlx-lm's quantized cache vs KIVI vs PatternKV.

Runs `mlx_patternkv.evaluate` with the full preset (perplexity / KL / top-1 agreement at 2K, 4K and 8K
tokens of context, needle in a haystack over 1K-8K tokens and depths 0-100%, GSM8K, bytes and peak
memory): progress bar, tables on the terminal, results/quality.json with every raw figure,
results/quality.md and PNG plots (needs matplotlib for the plots).

  python benchmarks/quality.py                          # full preset, SmolLM2-135M-Instruct
  python benchmarks/quality.py --quick                  # the quick preset (`pkv-mlx eval`'s default)
  python benchmarks/quality.py --methods fp16,pkv2,kivi2 --contexts 2048,4096 --out results/q
  python benchmarks/quality.py --report results/quality.json   # tables and plots of a (partial) run
  python benchmarks/quality.py --report a/quality.json b/quality.json --out results/merged   # merge pieces

In pieces, with a time limit per call (a remote GPU machine: scripts/device_setup.sh, scripts/device_quality.sh):
  python benchmarks/quality.py --dtype float16 --needle-contexts '' --gsm8k 0 --out OUT \
      --resume OUT/quality.json --deadline-s 500      # the ppl part; repeat the same command to go on
A method that raises on some unit of work (e.g. mlx-lm's quantized cache on MLX's CUDA backend) is recorded
in quality.json's "errors" and the report, and the run goes on.
"""

import sys

from mlx_patternkv.evaluate import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not {"--quick", "--full", "--report", "-h", "--help"} & set(argv):
        argv = ["--full", *argv]
    sys.exit(main(argv, prog="python benchmarks/quality.py"))
