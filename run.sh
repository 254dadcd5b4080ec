#!/usr/bin/env bash
# The project's two commands (see README):
#   ./run.sh demo   create .venv if missing, install, run the whole recipe on real photos
#   ./run.sh test   create/update .venv and run the test suite
# NPU targets (docs/npu_targets.md; needs the package registry once, for the toolchain venvs):
#   ./run.sh npu-setup [ethosu] [rknn]   create the toolchain venvs .venv-<toolchain>/ (never touches .venv)
#   ./run.sh npu        the toolchain venvs, then the demo's models compiled for every target, with the table
#   ./run.sh npu-test   the toolchain tests (tests_npu/), after ./run.sh test
set -euo pipefail
cd "$(dirname "$0")"

python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
  done
fi
[ -n "$python_bin" ] || { echo "error: no python3 found (Python 3.11 is needed)" >&2; exit 2; }

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $("$python_bin" --version)"
  "$python_bin" -m venv .venv
fi
echo "installing requirements into .venv (first time: a few minutes)"
.venv/bin/python -m pip install --disable-pip-version-check -q -r requirements-test.txt

case "${1:-}" in
  demo) shift; exec .venv/bin/python -m scripts.demo "$@" ;;
  # The codec tests load OpenVINO (a second runtime with its own thread pool and AMX kernels). In one process with
  # the rest of the suite the pytest process was killed by a SIGSEGV that the kernel sent (si_code SI_KERNEL, the
  # main thread inside waitpid()): whichever came second, the codec tests or the tests that fork DataLoader workers
  # and subprocesses, died when a child exited after OpenVINO had run there (the kernel's sign that it could not
  # build a signal frame; seen on an AMX CPU, not reproduced in small scripts). So they run in a process of their own.
  test) shift
        .venv/bin/python -m pytest -q tests --ignore=tests/test_codec.py --ignore=tests/test_codec_faults.py "$@"
        exec .venv/bin/python -m pytest -q tests/test_codec.py tests/test_codec_faults.py "$@" ;;
  npu-setup) shift; exec .venv/bin/python -m scripts.npu_setup "$@" ;;
  npu) shift
       .venv/bin/python -m scripts.npu_setup
       exec .venv/bin/python -m scripts.npu_demo "$@" ;;
  npu-test) shift
            .venv/bin/python -m scripts.npu_setup
            exec .venv/bin/python -m pytest -q tests_npu "$@" ;;
  *) echo "usage: ./run.sh demo|test|npu|npu-setup|npu-test" >&2; exit 2 ;;
esac
