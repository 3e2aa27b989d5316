"""Every CLI command once on a GPU, with the tiny random-weight models: do the GPU-only code paths run?

The test suite runs on the CPU, where CUDA graphs, look-ahead, pinned-memory copies and the other GPU
branches are called without capture or not at all. This drives each command through the same CLI a user
runs, on ``--device cuda``, a few steps each, and prints one JSON line per command: whether it exited 0
with its output written, its time, and the end of its output when it did not. Nothing here checks pixels.

    python benchmarks/gpu_smoke.py            # on a GPU machine (about a minute)
    python benchmarks/gpu_smoke.py cpu        # the same commands here
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from typer.testing import CliRunner  # noqa: E402

from attndistill.cli import app  # noqa: E402
from attndistill.testing import build_tiny_controlnet, build_tiny_sd15, build_tiny_sdxl  # noqa: E402

DATA = ROOT / "tests" / "data"
HORSE, CAT, WOOD, BRIDGE = (DATA / n for n in ("horse.jpg", "watercolor-cat.jpg", "wood-rings.jpg", "golden-gate.jpg"))


def inputs(folder: Path) -> dict[str, Path]:
    """Label maps, a restyle mask and a colour layout, made beside the results."""
    ref = Image.open(WOOD)
    labels = np.zeros((ref.height, ref.width, 3), np.uint8)
    labels[:, ref.width // 2:] = (0, 0, 255)
    target = np.zeros((64, 128, 3), np.uint8)
    target[32:] = (0, 0, 255)
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 32:96] = 255
    layout = np.zeros((128, 128, 3), np.uint8)
    layout[:64] = (200, 120, 40)
    layout[64:] = (40, 90, 160)
    made = {"ref_labels": labels, "target_labels": target, "mask": mask, "layout": layout}
    for name, array in made.items():
        Image.fromarray(array).save(folder / f"{name}.png")
    paths = {name: folder / f"{name}.png" for name in made}
    # three style jobs sharing a style (the runner batches them with --group) and a texture job
    jobs = [{"task": "style", "content": str(c), "style": str(CAT), "steps": 3, "size": 128, "seed": i}
            for i, c in enumerate((HORSE, BRIDGE, HORSE))]
    jobs.append({"task": "texture", "reference": str(WOOD), "steps": 3, "size": 128})
    paths["jobs"] = folder / "jobs.jsonl"
    paths["jobs"].write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return paths


def commands(sd15: Path, sdxl: Path, controlnet: Path, made: dict[str, Path]) -> dict[str, list]:
    """name -> CLI arguments (output, model and device are added)."""
    small = ["--size", 128, "--steps", 4]
    return {
        "style": ["style", HORSE, CAT, *small],
        "style, two styles, tiled, tuned VAE": ["style", BRIDGE, CAT, WOOD, *small, "--tile", "y", "--tune-vae"],
        "style, restyle mask": ["style", HORSE, CAT, *small, "--mask", made["mask"]],
        "appearance": ["appearance", HORSE, CAT, *small],
        "texture": ["texture", WOOD, *small],
        "texture, seamless, 2 results": ["texture", WOOD, *small, "--tile", "xy", "--num", 2],
        "texture, masked": ["texture", WOOD, "--ref-labels", made["ref_labels"], "--target-labels",
                            made["target_labels"], "--size", "128x64", "--steps", 4],
        "texture, sampled": ["texture", WOOD, "--mode", "sample", *small],
        "texture, layout": ["texture", WOOD, "--layout", made["layout"], *small],
        "t2i": ["t2i", "-p", "a deer", "-s", CAT, *small],
        "t2i, ControlNet": ["t2i", "-p", "a deer", "-s", CAT, *small, "--controlnet", controlnet,
                            "--control-image", HORSE, "--control", "canny"],
        "t2i, ControlNet as one file": ["t2i", "-p", "a deer", "-s", CAT, *small, "--controlnet",
                                        controlnet / "diffusion_pytorch_model.safetensors", "--control-image", HORSE,
                                        "--control", "canny"],
        "t2i, pattern (tiled), ControlNet": ["t2i", "-p", "a pattern", "-s", CAT, *small, "--tile", "xy",
                                            "--controlnet", controlnet, "--control-image", HORSE, "--control",
                                            "canny"],
        "t2i, content": ["t2i", "-p", "a deer", "-s", CAT, *small, "--content", HORSE, "--content-weight", 0.2],
        "t2i, SDXL": ["t2i", "-p", "a deer", "-s", CAT, *small, "--model", sdxl],
        "style, SDXL": ["style", HORSE, CAT, *small, "--model", sdxl],
        # whole compiled UNet calls inside CUDA graphs (minutes of compiling on CPUs, about a minute on a GPU machine)
        "style, compiled loss and calls": ["style", HORSE, CAT, *small, "--compiled-loss", "--compiled-calls"],
        "t2i, SDXL, compiled, checkpointing": ["t2i", "-p", "a deer", "-s", CAT, *small, "--model", sdxl,
                                               "--compiled-loss", "--compiled-calls", "--gradient-checkpointing"],
        "expand": ["expand", WOOD, "--size", "384x128", "--view", 16, "--steps", 3],
        "expand, seamless": ["expand", WOOD, "--size", "384x128", "--view", 16, "--steps", 3, "--tile", "x"],
        "finetune-vae": ["finetune-vae", CAT, "--steps", 5],
        "batch, grouped": ["batch", made["jobs"], "--group", 3],
    }


def main(argv: list[str]) -> int:
    device = argv[0] if argv else "cuda"
    folder = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    sd15, sdxl = build_tiny_sd15(folder / "sd15"), build_tiny_sdxl(folder / "sdxl")
    controlnet = build_tiny_controlnet(folder / "controlnet")
    made = inputs(folder)
    failed = 0
    for i, (name, args) in enumerate(commands(sd15, sdxl, controlnet, made).items()):
        out = folder / (f"{args[0]}-{i}" if args[0] in ("finetune-vae", "batch") else f"out-{i}.png")
        if "--model" not in args:
            args = [*args, "--model", sd15]
        start = time.perf_counter()
        result = CliRunner().invoke(app, [str(a) for a in [*args, "-o", out, "--device", device]])
        if args[0] == "batch":  # a folder of results: every job recorded as done
            records = (out / "results.jsonl").read_text().splitlines() if (out / "results.jsonl").exists() else []
            jobs = len(Path(args[1]).read_text().splitlines())
            written = len(records) == jobs and all(json.loads(r).get("status") == "done" for r in records)
        else:
            written = out.exists() or any(folder.glob(f"out-{i}*.png"))
        ok = result.exit_code == 0 and written
        failed += not ok
        row = {"command": name, "ok": ok, "exit": result.exit_code, "seconds": round(time.perf_counter() - start, 2)}
        if not ok:
            row["output"] = result.output[-600:]
            if result.exception is not None and result.exit_code not in (0, 2):
                import traceback

                row["traceback"] = "".join(traceback.format_exception(result.exception))[-1500:]
        print(json.dumps(row), flush=True)
    print(json.dumps({"device": device, "commands": i + 1, "failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
