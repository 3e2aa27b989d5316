"""Arithmetic each benchmark case needs: FLOPs of the library's own UNet programs, counted, not timed.

A count needs no GPU: the full-size architectures run on the ``meta`` device (shapes only) under
``torch.utils.flop_counter.FlopCounterMode``. Each program is the one a task runs per step: the
reference (and content) features under no-grad, one AD iteration (target forward to the last
captured layer, the ideal attention, backward to the latent), and the denoising call. A case's
arithmetic is those programs times how often it runs them; VAE and text-encoder calls, paid once per
run, are left out. Dividing by a measured time gives the TFLOP/s a run reached; dividing by a target
time gives the TFLOP/s the target asks for. Example::

    python benchmarks/flops.py                 # full-size SD 1.5 and SDXL (about 2 minutes on a CPU)
    python benchmarks/flops.py --tiny          # the tiny test models (seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from attndistill.core.engine import Distiller  # noqa: E402

#: Views of case e: 1536x512 pixels with 64-latent views at stride 8 give 17 views, in batches of 8.
E_VIEW_BATCHES = (8, 8, 1)


def gflop(fn: Callable[[], object]) -> float:
    """GFLOP of ``fn()`` as counted by PyTorch's FLOP counter (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def programs(model, *, side: int) -> dict[str, float]:
    """GFLOP of each per-step program at a square latent of ``side``, for the batch sizes the cases use."""
    device = model.device

    def latents(b: int = 1, grad: bool = False) -> torch.Tensor:
        return torch.zeros(b, 4, side, side, device=device, requires_grad=grad)

    t = torch.tensor(500, device=device)
    size = (side * model.vae_scale_factor,) * 2
    out = {}
    for content, name in ((None, "b1"), (1, "content_b1"), (8, "content_b8")):
        distiller = Distiller(model, content_weight=0.25 if content else 0.0, fused=False, cuda_graphs=False,
                              condition_size=size if model.kind == "sdxl" else None)
        distiller.batch_references = True  # reference and content in one no-grad call, as on a GPU
        with distiller:
            distiller.begin_timestep(t, latents(), latents(content) if content else None)
            out[f"reference_{name}"] = gflop(distiller.compute_reference)
            batches = (1, 8) if content is None else (content,)
            for b in batches:
                z = latents(b, grad=True)
                key = f"iteration_b{b}" + ("_content" if content else "")
                out[key] = gflop(lambda z=z, d=distiller: (d.loss(z) * z.shape[0]).backward())
    cond = model.null_condition(size if model.kind == "sdxl" else None)
    with torch.no_grad():
        for b in (1, 2, 8):
            out[f"denoise_b{b}"] = gflop(lambda b=b: model.predict(latents(b), t, cond))
    return out


def cases(sd15: dict[str, float], sdxl: dict[str, float] | None) -> dict[str, dict]:
    """GFLOP per step and in all of each case of ``bench.py`` (its settings), from the programs' counts."""
    p = sd15
    per_step = {
        "a": (200, p["reference_content_b1"] + p["iteration_b1_content"]),
        "b": (50, p["denoise_b2"] + p["reference_b1"] + 3 * p["iteration_b1"]),
        "c": (300, p["reference_b1"] + p["iteration_b1"]),
        "e": (50, sum(p[f"denoise_b{b}"] for b in E_VIEW_BATCHES) + p["reference_b1"]
              + 2 * sum(p[f"iteration_b{b}"] for b in E_VIEW_BATCHES)),
        "g": (50, p["reference_content_b8"] + p["iteration_b8_content"]),
        "g one by one": (8 * 50, p["reference_content_b1"] + p["iteration_b1_content"]),
    }
    if sdxl is not None:
        per_step["d"] = (50, sdxl["denoise_b2"] + sdxl["reference_b1"] + 2 * sdxl["iteration_b1"])
    return {case: {"steps": steps, "gflop_per_step": round(g, 1), "tflop": round(steps * g / 1000, 1)}
            for case, (steps, g) in sorted(per_step.items())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny test models (seconds; for checking the script)")
    args = p.parse_args(argv)
    import attndistill as ad
    from attndistill.testing import build_tiny_sd15, build_tiny_sdxl, full_size_model

    counts = {}
    for kind in ("sd15", "sdxl"):
        if args.tiny:
            folder = Path(tempfile.mkdtemp())
            (build_tiny_sdxl if kind == "sdxl" else build_tiny_sd15)(folder)
            model = ad.load_model(str(folder), device="cpu", dtype=torch.float32)
            side = model.native_size // model.vae_scale_factor
        else:
            model = full_size_model(kind, ROOT / "configs", device="meta", dtype=torch.float32)
            side = 128 if kind == "sdxl" else 64
        counts[kind] = programs(model, side=side)
        rounded = {k: round(v, 1) for k, v in counts[kind].items()}
        print(json.dumps({"model": kind, "latent": side, "gflop": rounded}), flush=True)
        del model
    print(json.dumps({"cases": cases(counts["sd15"], counts["sdxl"])}), flush=True)


if __name__ == "__main__":
    main()
