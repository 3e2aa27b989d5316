#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see benchmarks/RESULTS.md). Wheels for packages the
# machine lacks travel in .whl/ (diffusers); the package runs from src/.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:src || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
run() { timeout "$1" python3 benchmarks/bench.py "${@:2}" 2>>"$OUT/stderr.txt" | tee -a "$OUT/bench.jsonl"; }
run 200 --cases a,b,c,g --compare --plain-steps 20
run 60 --cases a,b --steps 20 --compare
run 150 --cases e --compare --plain-steps 5
run 200 --cases d --compare --plain-steps 5 --variant gradient_checkpointing=1
tail -5 "$OUT/stderr.txt"
