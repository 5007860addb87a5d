#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment in .venv and installs
# geotoken-jax with its pinned requirements. Idempotent; run from anywhere.
#
#   bash launch/setup.sh          the run-time stack (requirements.txt, requirements-nodeps.txt)
#   bash launch/setup.sh --test   also the test suite, its oracles and the benchmarks' peers
#                                 (requirements-test.txt)
set -euo pipefail
usage="usage: bash launch/setup.sh [--test]"
with_test=0
for arg in "$@"; do
  case "$arg" in
    --test) with_test=1 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$with_test" = 1 ]; then
  # One resolution for both files, so the test pins cannot move a run-time pin.
  .venv/bin/python -m pip install -q -r requirements.txt -r requirements-test.txt
else
  .venv/bin/python -m pip install -q -r requirements.txt
fi
.venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
.venv/bin/python -m pip install -q --no-deps -e .
