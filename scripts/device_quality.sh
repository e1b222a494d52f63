#!/usr/bin/env bash
# Runs ON THE GPU MACHINE after `source scripts/device_setup.sh`: the full preset of the evaluation harness
# (benchmarks/quality.py) in pieces, each resumable, within a wall-clock budget:
#
#   bash scripts/device_quality.sh SECONDS PIECE...      PIECE: ppl | needle | gsm8k | all
#
# Pieces run in the order given, each in float16 ($PKV_DTYPE) with its state in /tmp/pkv-state/PIECE (kept
# on a warm machine) and its report in $OUT/PIECE (quality.json, quality.md; all output in $OUT/log). A piece
# that finished earlier is skipped; one cut short by the budget goes on from its state in the next call, so
# the same command can be repeated until it prints "all pieces complete". No unit of work starts that would
# end after SECONDS from now (minus a margin for the report); a unit that raises (e.g. mlx-lm's quantized
# cache on shapes MLX's CUDA backend lacks) is recorded and the run goes on. On a fresh machine, seed the
# state from returned files by carrying them as .device/state/PIECE/quality.json.
# Extra arguments for benchmarks/quality.py: $PKV_ARGS (e.g. PKV_ARGS="--gsm8k 10"; a piece's own choice of
# parts wins, so this limits the gsm8k piece only). A piece's state must have the same settings: to change
# them, rm -rf /tmp/pkv-state/PIECE first.
set -uo pipefail
end=$(( $(date +%s) + ${1:?usage: device_quality.sh SECONDS PIECE...} )); shift
out=${OUT:-/tmp/pkv-out}
status=0
complete() {  # a quality.json that neither stopped early nor ended inside a unit of work (a crash)
  [[ -f $1 ]] && python3 -c 'import json, sys; sys.exit(bool({"incomplete", "running"} & set(json.load(open(sys.argv[1])))))' "$1"
}
for piece in "$@"; do
  case $piece in
    ppl) args=(--needle-contexts '' --gsm8k 0) ;;
    needle) args=(--contexts '' --gsm8k 0) ;;
    gsm8k) args=(--contexts '' --needle-contexts '') ;;
    all) args=() ;;
    *) echo "unknown piece $piece (ppl, needle, gsm8k, all)" >&2; exit 2 ;;
  esac
  state=/tmp/pkv-state/$piece
  mkdir -p "$state" "$out/$piece"
  if [[ ! -f $state/quality.json && -f .device/state/$piece/quality.json ]]; then
    cp .device/state/$piece/quality.json "$state/"
  fi
  if complete "$state/quality.json"; then
    echo "== $piece: complete"
    cp "$state"/quality.json "$state"/quality.md "$out/$piece/" 2>/dev/null
    continue
  fi
  left=$(( end - $(date +%s) - 20 ))
  if (( left < 30 )); then
    echo "== $piece: not started, ${left}s left"; status=3
    cp "$state"/quality.json "$state"/quality.md "$out/$piece/" 2>/dev/null  # the latest state comes back
    continue
  fi
  echo "== $piece: running for at most ${left}s"
  # $OUT/$piece/quality.json is rewritten after every unit, so even a killed call returns it
  [[ -f $state/quality.json ]] && cp "$state/quality.json" "$out/$piece/"
  trap 'cp "$out/$piece/quality.json" "$state/" 2>/dev/null' EXIT
  trap 'exit 143' TERM INT
  python3 benchmarks/quality.py --full --dtype "${PKV_DTYPE:-float16}" --no-plots \
    --out "$out/$piece" --resume "$out/$piece/quality.json" --deadline-s "$left" ${PKV_ARGS:-} "${args[@]}" \
    2>&1 | tee -a "$out/log"
  rc=$?
  cp "$out/$piece/quality.json" "$out/$piece/quality.md" "$state/" 2>/dev/null
  trap - EXIT TERM INT
  if (( rc != 0 )); then
    echo "== $piece: exit status $rc"; status=$rc
  elif complete "$state/quality.json"; then
    echo "== $piece: complete"
  else
    echo "== $piece: INCOMPLETE (the same command goes on with it)"; status=3
  fi
done
(( status == 0 )) && echo "== all pieces complete: $*"
exit $status
