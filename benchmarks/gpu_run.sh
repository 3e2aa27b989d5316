#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see benchmarks/RESULTS.md). Wheels for packages the
# machine lacks travel in .whl/ (diffusers); the package runs from src/.
#   bash benchmarks/gpu_run.sh          # run 8 (<= 585 s): the CUDA checks (the compiled norms against PyTorch's, in a
#                                       # graph, and their kernel times at batch 1); the defaults of a, c, b, g and e
#                                       # uncapped, now that the model is built in bf16 (reserved memory against run
#                                       # 7's), with the plain path over 5 steps (e: 3) in the same process as the
#                                       # issue's bar asks; a, c, b and g with compiled_norms in full runs; a with
#                                       # compiled_norms profiled (kernels, and time per program);
#                                       # then under caps on the allocator, set once the model is built: d with a 12 GB
#                                       # card's defaults under 9 GB (its decode drops the graphs if short of memory),
#                                       # e's default under 6 GB (a capture out of memory turns checkpointing on), a
#                                       # lean (no look-ahead, checkpointing) under the official code's 3.2 GB
#   bash benchmarks/gpu_run.sh run13    # run 13 (<= 540 s): the defaults of a, c, b, g and e with the plain path in the
#                                       # same process, now that steps no longer wait for the GPU (timesteps on the CPU,
#                                       # noise copied from pinned memory); each with a sync check (where the host still
#                                       # waits) and a, c, b, g with the time per program; b with compiled_norms in a
#                                       # full run; d under a 9 GB cap with a 12 GB card's defaults; the 4096² expansion
#   bash benchmarks/gpu_run.sh run14    # run 14 (<= 580 s): each AD iteration's loss as one compiled program
#                                       # (compiled_loss: forward, ideal attentions, L1 terms and their backward) against
#                                       # the default in full runs of b (with the plain path), c, a and e (20 steps)
#   bash benchmarks/gpu_run.sh run15    # run 15 (<= 585 s): the programs of c and e compiled first, in two processes side
#                                       # by side (they fill PyTorch's disk cache; their lines are no figures); then, one
#                                       # process at a time from that cache: c with compiled_loss against compiled_loss +
#                                       # compiled_calls with the plain path; case g as a user meets it (gcli); e over 20
#                                       # steps with compiled_loss against both switches, with the plain path, in the
#                                       # seconds left
#   bash benchmarks/gpu_run.sh gcli     # case g as a user meets it (<= 300 s; run 15 needed about 245 s): 8 `attndistill style` processes, one after
#                                       # another, against one `attndistill batch --group 8` (batch_vs_commands.py)
#   bash benchmarks/gpu_run.sh run16    # prepared after run 15 (<= 560 s): e's compiled programs alone on the machine
#                                       # (330 s; they did not compile within 230 s beside c's in run 15), then e's default
#                                       # against compiled_loss + compiled_calls in full runs from the disk cache, with the
#                                       # plain path
#   bash benchmarks/gpu_run.sh run17    # prepared after run 15 (<= 590 s): a with compiled_loss + compiled_calls and the
#                                       # plain path; then g with both switches, batched and one by one (the one-by-one
#                                       # runs reuse a's programs from the disk cache; the batch compiles its own)
#   bash benchmarks/gpu_run.sh startup  # where one `attndistill style` command of 50 steps spends its ~21 s (<= 150 s;
#                                       # command_profile.py: imports, load, capture, steps, decode under the profiler)
#   bash benchmarks/gpu_run.sh smoke    # every CLI command once on the GPU with the tiny models (gpu_smoke.py, <= 300 s)
#   bash benchmarks/gpu_run.sh run9     # after run 8 (<= 150 s): case h (SDXL expansion, 512-px views beside a 1024²
#                                       # reference) with CUDA graphs against eager over 10 steps
#   bash benchmarks/gpu_run.sh run11    # run 11 (<= 510 s, 319 s on the H200): b and g with look-ahead of 32 rows, d uncapped (run 7's
#                                       # setting) with 8 rows of SDXL (the same latent per call), e with compiled_norms
#                                       # over 20 steps, the 4096² expansion's memory again
#   bash benchmarks/gpu_run.sh run12    # after run 11 (<= 200 s): case b with compiled_norms and unchunked feed-forward
#                                       # layers together, and unchunked alone, in full runs beside the default
#   bash benchmarks/gpu_run.sh run10    # after run 9 (<= 120 s): a and c with look-ahead calls of 32 rows, alone and with
#                                       # compiled_norms, in full runs beside the default
#   bash benchmarks/gpu_run.sh run7     # run 7 (<= 580 s, 398 s on the H200): first the CUDA-only checks (gpu_checks.py: the NHWC
#                                       # GroupNorm against PyTorch's and inside a graph, graphs on their own
#                                       # streams); then every line also prints reserved memory (with the CUDA
#                                       # graphs' pools, which runs 1-6 did not count); the default against NHWC
#                                       # GroupNorms (channels_last_norms) in full runs of every case, against
#                                       # unchunked feed-forward layers in a, c, b and g, and against gradient
#                                       # checkpointing in e and d (the memory targets); the 4096² expansion
#   bash benchmarks/gpu_run.sh caps     # after run 7 (<= 460 s): d, e and a under caps on the allocator (9, 6, 3.2 and
#                                       # 4 GB); in run 7 it ran as three calls
#   bash benchmarks/gpu_run.sh run6     # run 6: the default in full runs with the plain path and without
#                                       # look-ahead (the peaks of lean look-ahead calls: on the CPU 1601 -> 801 MiB), look-
#                                       # ahead on a second stream and look-ahead of 8 rows in full runs, expansion
#                                       # without look-ahead, compile with channels-last (its GroupNorm kernels
#                                       # take NHWC; compiling ~150 s), case g last
#   bash benchmarks/gpu_run.sh run5     # run 5: the defaults of run 4's findings (channels-last and look-ahead on
#                                       # GPUs) in full runs, the plain path and each switch turned back off over
#                                       # as many steps, profiles of cases a and b
#   bash benchmarks/gpu_run.sh run4     # run 4: channels-last, cuDNN autotuning and look-ahead against the old
#                                       # default over as many steps, SDXL with channels-last, kernel profiles of
#                                       # case a, time per program (reference, iteration, denoising) in cases a and b
#   bash benchmarks/gpu_run.sh run3     # run 3: the default with the plain path beside it, the switches, the
#                                       # 4096² peak, compile (the last line needs 200 s, not 120)
#   bash benchmarks/gpu_run.sh memory   # the 4096² expansion's peak memory (one step, <= 130 s)
#   bash benchmarks/gpu_run.sh compare  # run 1: fast and plain paths, equality, SDXL with checkpointing
#   bash benchmarks/gpu_run.sh fast     # run 2: fast paths only, SDXL with text-encoder offload
# Every mode fits one device call of 600 s; the JSON lines land in $OUT/bench.jsonl as they come.
# Before: the wheels, once (the GPU machine has torch and transformers but no network):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# and carry ".whl" with the command (it is git-ignored locally: .git/info/exclude).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:src || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
run() { timeout "$1" python3 benchmarks/bench.py "${@:2}" 2>>"$OUT/stderr.txt" | tee -a "$OUT/bench.jsonl"; }
case "${1:-}" in
  compare)
    run 200 --cases a,b,c,g --compare --plain-steps 20
    run 60 --cases a,b --steps 20 --compare
    run 150 --cases e --compare --plain-steps 5
    run 200 --cases d --compare --plain-steps 5 --variant gradient_checkpointing=1 ;;
  memory)
    run 130 --cases f --steps 1 ;;
  fast)
    run 100 --cases a,c,g,b
    run 50 --cases e
    run 80 --cases d --variant offload_text_encoders=1 ;;
  run3)
    v="--variant lookahead_batch=16 --variant channels_last=1 --variant lookahead_batch=16,channels_last=1"
    run 150 --cases a,c,b,g --compare --plain-steps 10 --variant-steps 20 $v
    run 90 --cases e --compare --plain-steps 4 --variant-steps 10 $v
    run 75 --cases d --fast offload_text_encoders=1 --compare --plain-steps 3
    run 110 --cases f --steps 1
    run 120 --cases a,c,b,e --fast compile=1 --variant-steps 20 --variant lookahead_batch=16 ;;
  run4)  # measured the defaults of its time (NCHW, no look-ahead); today's default has both switches on
    v="--variant channels_last=1 --variant cudnn_benchmark=1 --variant channels_last=1,cudnn_benchmark=1"
    run 200 --cases a,c,b,g --variant-steps 30 $v --variant lookahead_batch=16
    run 90 --cases e --variant-steps 10 --variant channels_last=1 --variant channels_last=1,cudnn_benchmark=1
    run 90 --cases d --fast offload_text_encoders=1 --variant-steps 15 --variant channels_last=1 \
      --variant channels_last=1,cudnn_benchmark=1
    run 60 --cases a --steps 10 --profile 10 --fast cuda_graphs=0
    run 75 --cases a,b --steps 20 --profile 10 --breakdown 20 ;;
  run5)
    run 160 --cases a,c,b,g --compare --plain-steps 10 --variant-steps 30 --variant lookahead_batch=1 \
      --variant lookahead_batch=8 --variant channels_last=0
    run 70 --cases e --variant-steps 10 --variant lookahead_batch=1
    run 80 --cases d --fast offload_text_encoders=1 --variant-steps 15 --variant lookahead_batch=1
    run 70 --cases a,b --steps 20 --profile 10 --breakdown 20 ;;
  caps)  # after run 7: does a case fit under a cap on the allocator (pools and cached blocks counted)?
    run 110 --cases d --fast offload_text_encoders=1,gradient_checkpointing=1 --memory-cap 9
    run 115 --cases e --fast gradient_checkpointing=1 --memory-cap 6 --variant gradient_checkpointing=0
    run 65 --cases a --memory-cap 3.2
    run 105 --cases d --fast offload_text_encoders=1,gradient_checkpointing=1,vae_tiling=1 --memory-cap 9
    run 60 --cases a --memory-cap 4 ;;
  run6)  # its compile line printed nothing in 250 s: compiling case a did not finish
    run 140 --cases a,c,b,g --compare --plain-steps 10 --variant lookahead_batch=1 --variant-steps 30
    run 130 --cases a,c,b --fast lookahead_overlap=1 --variant lookahead_overlap=0,lookahead_batch=8 --variant-steps 300
    run 70 --cases e
    run 250 --cases a,c,b,g --fast compile=1 --profile 10 ;;
  run7)
    timeout 45 python3 benchmarks/gpu_checks.py 2>>"$OUT/stderr.txt" | tee -a "$OUT/checks.jsonl"
    run 180 --cases a,c,b,g --variant-steps 300 --variant channels_last_norms=1 --variant feed_forward_chunks=0 \
      --compare --plain-steps 5
    run 115 --cases e --variant-steps 50 --variant channels_last_norms=1 --variant gradient_checkpointing=1 \
      --compare --plain-steps 3
    run 115 --cases d --fast offload_text_encoders=1 --variant-steps 50 --variant channels_last_norms=1 \
      --variant gradient_checkpointing=1
    run 120 --cases f --steps 1 ;;
  startup)  # run 15: a command took 21.5 s for 50 steps that take ~1.3 s warmed up; where does the rest go?
    timeout 150 python3 benchmarks/command_profile.py --steps 50 --work /tmp/gcli 2>>"$OUT/stderr.txt" \
      | tee -a "$OUT/startup.jsonl" ;;
  smoke)  # do the GPU-only code paths of every command run? (exit status and output, no pixels)
    timeout 300 python3 benchmarks/gpu_smoke.py 2>>"$OUT/stderr.txt" | tee -a "$OUT/smoke.jsonl" ;;
  run14)  # the nineteenth session: compiled_loss; c reuses b's program (same shapes, no content term) from the disk cache
    run 290 --cases b --variant compiled_loss=1 --compare --plain-steps 5
    run 190 --cases c,a --variant compiled_loss=1
    run 100 --cases e --steps 20 --variant compiled_loss=1 ;;
  run17)  # after run 15: case a with both compiled switches; case g compiled both ways, so its ratio compares like with like
    run 300 --cases a --fast compiled_loss=1,compiled_calls=1 --compare --plain-steps 5
    run 290 --cases g --fast compiled_loss=1,compiled_calls=1 ;;
  run16)  # after run 15: case e with the compiled switches has never run on a GPU
    start=$SECONDS
    timeout 330 python3 benchmarks/bench.py --cases e --steps 2 --fast compiled_loss=1,compiled_calls=1 \
      2>>"$OUT/warm-stderr.txt" | tee -a "$OUT/warm.jsonl"
    echo "warm e: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"
    run 225 --cases e --variant compiled_loss=1,compiled_calls=1 --compare --plain-steps 3 ;;
  run15)  # after run 14: c is 4.5% from its target; e's batch-6 program did not compile within its line there
    start=$SECONDS
    warm() { timeout 230 python3 benchmarks/bench.py --cases "$1" --steps 2 --fast compiled_loss=1,compiled_calls=1 \
      >>"$OUT/warm.jsonl" 2>>"$OUT/warm-stderr.txt"; echo "warm $1: exit $?, $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"; }
    warm c & warm e & wait
    run 110 --cases c --fast compiled_loss=1 --variant compiled_loss=1,compiled_calls=1 --compare --plain-steps 5 \
      --breakdown 20  # the compiled iteration timed on its own (run 14 had it by subtraction)
    echo "c measured: $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"
    timeout 240 python3 benchmarks/batch_vs_commands.py --jobs 8 --steps 50 --work /tmp/gcli 2>>"$OUT/stderr.txt" \
      | tee -a "$OUT/gcli.jsonl"
    left=$((575 - (SECONDS - start)))
    echo "gcli done: $((SECONDS - start)) s; e gets $left s" | tee -a "$OUT/gpu.txt"
    [ "$left" -gt 45 ] && run "$left" --cases e --steps 20 --fast compiled_loss=1 \
      --variant compiled_loss=1,compiled_calls=1 --compare --plain-steps 3 ;;
  gcli)  # case g as a user meets it (<= 300 s): 8 `attndistill style` processes against one `attndistill batch --group 8`
    timeout 300 python3 benchmarks/batch_vs_commands.py --jobs 8 --steps 50 --work /tmp/gcli 2>>"$OUT/stderr.txt" \
      | tee -a "$OUT/gcli.jsonl" ;;
  run14b)  # right after run14 on its machine (its disk cache holds a's and c's programs): with look-ahead of 32 rows too; e
    run 130 --cases c,a --fast compiled_loss=1 --variant compiled_loss=1,lookahead_batch=32 --compare --plain-steps 5
    run 150 --cases e --steps 20 --fast compiled_loss=1 ;;
  run13)  # the eighteenth session: the defaults at its tree, no per-step syncs, against the targets in one call
    run 150 --cases a,c,b,g --compare --plain-steps 5 --sync-check 12 --breakdown 20
    run 90 --cases e --compare --plain-steps 3 --sync-check 3
    run 100 --cases b --variant compiled_norms=1
    run 80 --cases d --fast offload_text_encoders=1,gradient_checkpointing=1 --memory-cap 9
    run 120 --cases f --steps 1 ;;
  run12)  # case b with the two switches that each took 4% off it (compiled_norms, run 8; unchunked feed-forward, run 7)
    run 200 --cases b --variant compiled_norms=1,feed_forward_chunks=0 --variant feed_forward_chunks=0 ;;
  run11)  # what runs 8-10 left unmeasured
    run 120 --cases b,g --variant lookahead_batch=32
    run 110 --cases d --fast offload_text_encoders=1 --variant lookahead_batch=8
    run 150 --cases e --steps 20 --variant compiled_norms=1
    run 130 --cases f --steps 1 ;;
  run10)  # after run 9: look-ahead calls of 32 rows (the default's 16 hold 8 steps of case a), with compiled_norms too
    run 120 --cases a,c --variant lookahead_batch=32 --variant lookahead_batch=32,compiled_norms=1 ;;
  run9)  # after run 8, in its leftover minutes: SDXL expansion with graphs of two latent sizes against eager
    run 150 --cases h --steps 10 --variant cuda_graphs=0 ;;  # its line of e with compiled_norms took over 90 s: gone
  *)  # run 8
    timeout 75 python3 benchmarks/gpu_checks.py 2>>"$OUT/stderr.txt" | tee -a "$OUT/checks.jsonl"
    run 180 --cases a,c,b,g --variant compiled_norms=1 --variant-steps 300 --compare --plain-steps 5
    run 65 --cases e --compare --plain-steps 3
    run 75 --cases a --steps 20 --fast compiled_norms=1 --profile 6 --breakdown 20
    run 70 --cases d --fast offload_text_encoders=1,gradient_checkpointing=1 --memory-cap 9
    run 70 --cases e --memory-cap 6
    run 50 --cases a --fast lookahead_batch=1,gradient_checkpointing=1,offload_text_encoders=1 --memory-cap 3.2 ;;
esac
grep -i "graph capture failed\|out of memory\|Traceback\|recompile" "$OUT/stderr.txt" | head -8
