"""Working memory of each program the fast path captures as a CUDA graph, counted on the CPU.

A captured graph keeps in a memory pool of its own every block its program allocated while it was
captured: the program's intermediate tensors, which no other work can use afterwards. While a graph
replays, ``max_memory_allocated`` does not count them, so the GPU peaks of runs 1-6 left them out
(RESULTS.md, "What the memory figures of runs 1-6 count"). Their sizes do not depend on the device
(cuDNN and attention workspaces aside), so this script reads each program's peak from PyTorch's
profiler on the CPU, on the full-size architectures with random weights, in bf16, shaped as the
benchmark's cases run them on a GPU:

- ``iteration``: one AD iteration (the target's forward to the last captured layer, the loss, the
  backward to the latent), at the case's batch;
- ``denoise``: the denoising call (classifier-free guidance doubles the batch);
- ``reference``: the per-timestep reference (and content) call, where look-ahead does not feed it.

    python benchmarks/graph_memory.py                   # cases a, b, e, g (SD 1.5)
    python benchmarks/graph_memory.py --cases e-uneven  # expansion's batches before the last was filled up
    python benchmarks/graph_memory.py --cases d         # SDXL at 1024²
    python benchmarks/graph_memory.py --cases a,e-iteration --compiled-loss  # the compiled iteration's pool
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import code_digest  # noqa: E402
from lookahead_memory import MB, allocations  # noqa: E402

from attndistill.core.engine import Distiller  # noqa: E402
from attndistill.testing import full_size_model  # noqa: E402

#: Per case: (model, programs as (name, batch, content rows)). a: style transfer; b: SD 1.5 T2I; d: SDXL
#: T2I; e: expansion (17 views in batches of 6, the last filled up to 6; no guidance, no look-ahead);
#: e-uneven: the same before that filling (batches of 6, 6 and 5: two shapes, two graphs each); g: 8 transfers.
CASES = {
    "a": ("sd15", [("iteration", 1, 1)]),
    "b": ("sd15", [("iteration", 1, 0), ("denoise", 2, 0)]),
    "d": ("sdxl", [("iteration", 1, 0), ("denoise", 2, 0)]),
    "e": ("sd15", [("iteration", 6, 0), ("denoise", 6, 0), ("reference", 1, 0)]),
    "e-uneven": ("sd15", [("iteration", 6, 0), ("iteration", 5, 0), ("denoise", 6, 0), ("denoise", 5, 0),
                          ("reference", 1, 0)]),
    "g": ("sd15", [("iteration", 8, 8), ("reference", 1, 8)]),
    "e-iteration": ("sd15", [("iteration", 6, 0)]),
}


def program_peak(model, name: str, batch: int, contents: int) -> float:
    """Peak bytes above the start that one run of the program allocates (what its graph's pool holds)."""
    side = model.native_size // model.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    z_ref = torch.randn(1, 4, side, side, generator=g).to(model.dtype)
    z_content = torch.randn(contents, 4, side, side, generator=g).to(model.dtype) if contents else None
    size = (model.native_size,) * 2 if model.kind == "sdxl" else None
    if name == "denoise":
        x = torch.randn(batch, 4, side, side, generator=g).to(model.dtype)
        with torch.no_grad():
            return allocations(lambda: model.predict(x, 500, model.null_condition(size)))[0]
    distiller = Distiller(model, content_weight=0.25 if contents else 0.0, condition_size=size)
    distiller.batch_references = True  # reference and content rows in one call, as on a GPU
    with distiller:
        distiller.begin_timestep(torch.tensor(500), z_ref, z_content)
        if name == "reference":
            with torch.no_grad():
                return allocations(distiller.compute_reference)[0]
        with torch.no_grad():
            distiller.compute_reference()
        z = torch.randn(batch, 4, side, side, generator=g).requires_grad_()

        def iteration():
            with torch.enable_grad():
                (distiller.loss(z) * batch).backward()
            z.grad = None

        if model.perf.compiled_loss:
            iteration()  # compiles the program (its tracing allocates nothing real); the count is of a run
        return allocations(iteration)[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="a,b,e,g", help=f"of {', '.join(CASES)}")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="the UNet's gradient checkpointing on (--gradient-checkpointing)")
    p.add_argument("--compiled-norms", action="store_true",
                   help="the UNet's GroupNorms (+ SiLU) as compiled programs (--compiled-norms)")
    p.add_argument("--compiled-loss", action="store_true",
                   help="each AD iteration's loss as one compiled program (--compiled-loss): which activations its "
                        "backward keeps is the compiler's choice, the same on any device")
    p.add_argument("--configs", default=str(ROOT / "configs"))
    args = p.parse_args(argv)
    models = {}
    for case in args.cases.split(","):
        kind, programs = CASES[case]
        if kind not in models:
            models.clear()  # one full-size model in memory at a time
            models[kind] = full_size_model(kind, args.configs, device="cpu", dtype=torch.bfloat16)
            models[kind].set_perf(gradient_checkpointing=args.gradient_checkpointing,
                                  compiled_norms=args.compiled_norms, compiled_loss=args.compiled_loss)
        model = models[kind]
        weights = sum(p.numel() * p.element_size() for p in model.unet.parameters())
        rows = []
        for name, batch, contents in programs:
            peak = program_peak(model, name, batch, contents)
            rows.append({"program": name, "batch": batch, "content_rows": contents, "peak_mb": round(peak / MB, 1)})
        print(json.dumps({"case": case, "model": kind, "gradient_checkpointing": args.gradient_checkpointing,
                          "compiled_norms": args.compiled_norms, "compiled_loss": args.compiled_loss,
                          "programs": rows,
                          "pools_mb": round(sum(r["peak_mb"] for r in rows), 1),
                          "unet_weights_mb": round(weights / MB, 1), "dtype": "bfloat16", "device": "cpu",
                          "code": code_digest()}), flush=True)


if __name__ == "__main__":
    main()
