#!/usr/bin/env bash
# The README's test command: install (CPU torch first, so no CUDA build is pulled) and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,ui]"
# the web UI test drives Debian's Chromium (never a browser downloaded by playwright)
if [ ! -x /usr/bin/chromium ]; then
    apt-get update -qq && apt-get install -y -qq chromium
fi
ruff check src tests benchmarks
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: threads only fight over 2 cores
python -m pytest -q "$@"
