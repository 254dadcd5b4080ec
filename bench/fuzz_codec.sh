#!/usr/bin/env bash
# Fuzz the codec's decoder for SECONDS in all, on one core, restarting libFuzzer after each finding
# (it stops at the first); the corpus in OUT/corpus carries over, findings collect in OUT/artifacts.
#   bench/fuzz_codec.sh OUT SECONDS
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench_out/fuzz}"; total="${2:-1800}"
python_bin="${PYTHON:-.venv/bin/python}"
[ -d "$out/bundle" ] || "$python_bin" -m bench.fuzz_codec prepare --out "$out"
end=$(( $(date +%s) + total )); run=0
while [ "$(date +%s)" -lt "$end" ]; do
  run=$((run + 1)); left=$(( end - $(date +%s) ))
  echo "=== run $run, $left s left, $(date -u +%FT%TZ)"
  NUMBA_DISABLE_JIT=1 taskset -c 1 "$python_bin" -m bench.fuzz_codec fuzz --out "$out" -- \
    -max_total_time="$left" -timeout=5 -rss_limit_mb=2048 -print_final_stats=1
  echo "=== run $run exited with $?"
done
