#!/usr/bin/env bash
# Second prepared GPU run: fast paths after the split-call/sync changes (see benchmarks/RESULTS.md).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:src || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
run() { timeout "$1" python3 benchmarks/bench.py "${@:2}" 2>>"$OUT/stderr.txt" | tee -a "$OUT/bench.jsonl"; }
run 100 --cases a,c,g,b
run 50 --cases e
run 80 --cases d --variant offload_text_encoders=1
grep -i "graph capture failed\|Traceback\|Error" "$OUT/stderr.txt" | head -5
