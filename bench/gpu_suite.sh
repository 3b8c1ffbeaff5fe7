#!/usr/bin/env bash
# The GPU path in one prepared run (issue 18): bench/gpu_suite.py's steps, each time-boxed, ONE JSON file
# of every figure (printed last). At most --budget_s (480 s) on one GPU:
#     bash bench/gpu_suite.sh --out runs/gpu_suite.json
# The same steps on the CPU in seconds each (proof that it runs; figures of no target setting):
#     bash bench/gpu_suite.sh --device cpu --tiny
# Python: $PYTHON, else the repository's .venv, else python3 (a GPU machine's own, offline).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" bench/gpu_suite.py "$@"
