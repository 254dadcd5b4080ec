#!/usr/bin/env bash
# The GPU check (see bench/gpu_check.py): bash bench/gpu_check.sh [--cpu_smoke] [--work_dir DIR]
# Run from anywhere; it uses the repository's .venv when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=python3
[ -x .venv/bin/python ] && python_bin=.venv/bin/python
exec "$python_bin" -m bench.gpu_check "$@"
