"""Case g as a user meets it: N ``attndistill style`` commands one after another, against one ``attndistill batch``.

``bench.py`` measures case g's "one by one" as N warmed-up runs in one process: the hardest baseline, with
the model loaded and every CUDA graph captured before the clock starts. A user who runs N commands pays,
in each, the start of Python, the model's load from disk, the graphs' capture and the decode; one
``attndistill batch --group N`` pays them once and optimises the N targets in one batch. This script times
both as processes, on a full-size SD 1.5 architecture with random weights saved to disk (``--tiny``: the
tiny test model, for the CPU). Its ratio is reported beside bench.py's, never instead of it.

Before the timed runs an untimed command of one step reads the model files once, so that no timed process
reads them from disk while the others read the page cache. One JSON line per measurement. Example (GPU)::

    python benchmarks/batch_vs_commands.py --jobs 8 --steps 50
    python benchmarks/batch_vs_commands.py --tiny --device cpu --jobs 2 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
CONTENT, STYLE = DATA / "horse.jpg", DATA / "watercolor-cat.jpg"


def save_model(folder: Path, *, tiny: bool, device: str) -> float:
    """Write the model the commands load; returns its size on disk in GB."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from attndistill.testing import build_tiny_sd15, full_size_model

    if tiny:
        build_tiny_sd15(folder)
    else:  # bf16 weights, as a user's fp16/bf16 download; built on the device (faster), saved from there
        model = full_size_model("sd15", ROOT / "configs", device=device, dtype=torch.bfloat16)
        # the tiny local tokenizer's vocabulary: load_model refuses a text encoder of CLIP's 49,408 tokens
        # beside it (a download without its vocabulary); one embedding row per token costs no time
        model.pipe.text_encoder.resize_token_embeddings(len(model.pipe.tokenizer))
        model.pipe.save_pretrained(folder, safe_serialization=True)
        del model
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def timed(command: list[str], env: dict[str, str]) -> float:
    """Wall time of one process; its output is shown only when it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=8, help="style transfers sharing one style image")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tiny", action="store_true", help="the tiny test model (CPU smoke runs)")
    p.add_argument("--device", default="auto", help="passed to every command (auto: CUDA where there is one)")
    p.add_argument("--work", type=Path, default=None, help="folder for the model and the results (default: temporary)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="batch-vs-commands-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "model"
    build_device = "cuda" if args.device in ("auto", "cuda") and _has_cuda() else "cpu"
    start = time.perf_counter()
    size_gb = save_model(folder, tiny=args.tiny, device=build_device)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    cli = [sys.executable, "-m", "attndistill"]
    model_options = ["-m", str(folder), "--device", args.device, "-q"]

    def emit(**row) -> None:
        row.update(jobs=args.jobs, steps=args.steps, model="tiny" if args.tiny else "sd15 full size, bf16 on disk")
        print(json.dumps(row), flush=True)

    emit(what="model saved", gb=round(size_gb, 2), seconds=round(time.perf_counter() - start, 1))
    # untimed: reads the model files into the page cache for every timed process alike
    timed([*cli, "style", str(CONTENT), str(STYLE), "-o", str(work / "warm.png"), "--steps", "1", *model_options], env)
    commands = 0.0
    for i in range(args.jobs):  # a line each: a run stopped at its time limit still says what it measured
        seconds = timed([*cli, "style", str(CONTENT), str(STYLE), "-o", str(work / f"command-{i}.png"),
                         "--seed", str(i), "--steps", str(args.steps), *model_options], env)
        emit(what="command", index=i, seconds=round(seconds, 2))
        commands += seconds
    emit(what="commands", seconds=round(commands, 2), seconds_per_image=round(commands / args.jobs, 2))
    jobs = work / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"task": "style", "content": str(CONTENT), "style": str(STYLE), "seed": i,
                                        "steps": args.steps, "output": f"job-{i}.png"}) + "\n"
                            for i in range(args.jobs)))
    batch = timed([*cli, "batch", str(jobs), "--out", str(work / "batch"), "--group", str(args.jobs),
                   *model_options], env)
    emit(what="batch", seconds=round(batch, 2), seconds_per_image=round(batch / args.jobs, 2))
    emit(what="ratio", images_per_min_commands=round(60 * args.jobs / commands, 1),
         images_per_min_batch=round(60 * args.jobs / batch, 1), speedup=round(commands / batch, 2))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
