#!/usr/bin/env bash
# The README's test command: install torch first, then the package, and run the suite.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build where pip's index holds the CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
python -m pip install -q -e ".[test,ui]"
# the web UI test drives Debian's Chromium (never a browser downloaded by playwright)
if [ ! -x /usr/bin/chromium ]; then
    { apt-get update -qq && apt-get install -y -qq chromium; } || \
        echo "test.sh: could not install chromium (it needs root): the browser test will fail, the others run" >&2
fi
ruff check src tests benchmarks
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: threads only fight over 2 cores
# two workers that take tests from each other when one runs out (a few compiled-program tests take 10-25 s
# each): each test is small and single-threaded, so both cores work (about 3 to 4 minutes on a
# 2-core machine: the README has the latest CI figures) (the tests use their own temporary folders and free ports)
python -m pytest -q -n 2 --dist worksteal "$@"
