#!/usr/bin/env bash
# The README's test command: install (CPU torch first, so no CUDA build is pulled) and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
ruff check src tests benchmarks
python -m pytest "$@"
