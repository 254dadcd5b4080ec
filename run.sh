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
  # Tests marked own_process load OpenVINO (a second runtime with its own thread pool and AMX kernels). In one
  # process with the rest of the suite the pytest process was killed by a SIGSEGV that the kernel sent (si_code
  # SI_KERNEL, the main thread inside waitpid()): whichever came second, the OpenVINO tests or the tests that fork
  # DataLoader workers and subprocesses, died when a child exited after OpenVINO had run there (the kernel's sign
  # that it could not build a signal frame; seen on an AMX CPU, not reproduced in small scripts). So the marker,
  # not a file name, decides: a second pytest call runs them. A `-m EXPR` given here narrows both calls
  # (`./run.sh test -m quick`: the edit loop's tier); other arguments reach both unchanged.
  test) shift
        select=""; args=()
        while [ $# -gt 0 ]; do
          case "$1" in
            -m) select="$2"; shift 2 ;;
            *) args+=("$1"); shift ;;
          esac
        done
        # pytest-xdist: one worker per core, at most 4; worksteal, so that a worker left with long tests (torchrun,
        # the compile test) hands its queue to an idle one. The session's finished runs are shared (tests/conftest.py).
        workers="${TEST_WORKERS:-$(nproc 2>/dev/null || echo 2)}"; [ "$workers" -le 4 ] || workers=4
        status=0
        for group in "not own_process" "own_process"; do
          rc=0
          .venv/bin/python -m pytest -q -n "$workers" --dist worksteal -m "${select:+($select) and }$group" ${args[@]+"${args[@]}"} || rc=$?
          [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || status=$rc  # 5: nothing selected in this group
        done
        exit "$status" ;;
  npu-setup) shift; exec .venv/bin/python -m scripts.npu_setup "$@" ;;
  npu) shift
       .venv/bin/python -m scripts.npu_setup
       exec .venv/bin/python -m scripts.npu_demo "$@" ;;
  npu-test) shift
            .venv/bin/python -m scripts.npu_setup
            exec .venv/bin/python -m pytest -q tests_npu "$@" ;;
  *) echo "usage: ./run.sh demo|test|npu|npu-setup|npu-test" >&2; exit 2 ;;
esac
