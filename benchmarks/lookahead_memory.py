"""Memory of the no-grad feature calls, measured on the CPU: a call's peak and what it keeps.

Look-ahead (``PerfOptions.lookahead_batch``) computes the reference and content features of several
steps in one no-grad UNet call. On an H200 it cost 1.3-1.5 GB of peak in cases a, b and c
(``RESULTS.md``, run 5). Where that memory goes needs no GPU to find: the activations of a forward
and the features the library keeps have the same sizes on any device (kernel workspaces, such as
cuDNN's and attention's, differ). PyTorch's profiler reports every CPU allocation with the running
total, so a call's peak and the bytes alive after it are read from its trace. The model is the
full-size SD 1.5 architecture with random weights. Example::Example::

    python benchmarks/lookahead_memory.py                     # 16 rows at 512², cases a, c and g, bf16
    python benchmarks/lookahead_memory.py --cases d           # SDXL: 4 rows at 1024²
    python benchmarks/lookahead_memory.py --rows 8 --size 256
    python benchmarks/lookahead_memory.py --cases g --contents 1    # case a's per-step reference call
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from attndistill.core import features  # noqa: E402
from attndistill.core.engine import Distiller  # noqa: E402
from attndistill.core.lookahead import ReferenceLookahead  # noqa: E402
from attndistill.model.perf import LOOKAHEAD_LATENT_PIXELS  # noqa: E402
from attndistill.testing import full_size_model  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import code_digest  # noqa: E402

MB = 2**20  # the "_mb" fields are MiB


def trace_events(prof) -> tuple[list[dict], list[dict]]:
    """(the CPU's memory events in the order they happened, every event) of a finished profile's trace."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                    key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    return memory, events


def allocations(fn) -> tuple[int, int]:
    """(peak, end) bytes of CPU memory allocated by ``fn()`` and not yet freed, from the profiler's trace."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    memory, _ = trace_events(prof)
    if not memory:
        return 0, 0
    # the profiler's running total also counts what earlier profiled code allocated and freed unprofiled
    base = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    totals = [e["args"]["Total Allocated"] - base for e in memory]
    return max(totals), totals[-1]


def lookahead_call(model, *, rows: int, side: int, content: bool, case: str) -> dict:
    """Peak and kept bytes of the first look-ahead call of a run shaped like case a (content), c or d."""
    g = torch.Generator().manual_seed(0)
    z_ref = torch.randn(1, 4, side, side, generator=g).to(model.dtype)
    z_content = torch.randn(1, 4, side, side, generator=g).to(model.dtype) if content else None
    per_step = 1 + (1 if content else 0)
    steps = rows // per_step

    def inputs(i: int):
        return 999 - 5 * i, z_ref, z_content

    size = (side * model.vae_scale_factor,) * 2 if model.kind == "sdxl" else None
    distiller = Distiller(model, content_weight=0.25 if content else 0.0, condition_size=size)
    with distiller:
        ahead = ReferenceLookahead(distiller, list(range(steps)), inputs, rows, pad=False, overlap=False)
        peak, kept = allocations(lambda: ahead.at(0))
    return {"case": case, "rows": rows, "steps_per_call": steps, "latent": side,
            "dtype": str(model.dtype).removeprefix("torch."), "peak_mb": round(peak / MB, 1),
            "kept_mb": round(kept / MB, 1)}


def reference_call(model, *, side: int, contents: int = 8) -> dict:
    """Peak and kept bytes of case g's per-step reference call: the style and its contents in one no-grad
    call (with one content: the per-step reference program of case a without look-ahead)."""
    g = torch.Generator().manual_seed(0)
    z_ref = torch.randn(1, 4, side, side, generator=g).to(model.dtype)
    z_content = torch.randn(contents, 4, side, side, generator=g).to(model.dtype)
    distiller = Distiller(model, content_weight=0.25)
    distiller.batch_references = True  # reference and content rows in one call, as on a GPU
    with distiller:
        distiller.begin_timestep(torch.tensor(500), z_ref, z_content)
        peak, kept = allocations(distiller.compute_reference)
    return {"case": "g", "rows": 1 + contents, "steps_per_call": 1, "latent": side,
            "dtype": str(model.dtype).removeprefix("torch."), "peak_mb": round(peak / MB, 1),
            "kept_mb": round(kept / MB, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=None,
                   help="rows of the look-ahead call (default: the library's automatic 16 for SD 1.5, 4 for SDXL)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: 512, SDXL 1024)")
    p.add_argument("--cases", default="a,c,g", help="a: look-ahead of reference + content rows; c: of reference "
                   "rows only; g: one step's reference call with 8 contents (no look-ahead); d: SDXL look-ahead "
                   "of reference rows (T2I)")
    p.add_argument("--contents", type=int, default=8, help="content rows of case g's reference call")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--chunk-pixels", type=int, default=None,
                   help="latent pixels per feed-forward chunk (default: the library's; 0: no chunks, "
                        "--no-feed-forward-chunks)")
    p.add_argument("--configs", default=str(ROOT / "configs"))
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.chunk_pixels:
        features.FEED_FORWARD_CHUNK_PIXELS = args.chunk_pixels
    models = {}
    for case in args.cases.split(","):
        kind = "sdxl" if case == "d" else "sd15"
        if kind not in models:
            models.clear()  # one full-size model in memory at a time
            models[kind] = full_size_model(kind, args.configs, device="cpu", dtype=dtype)
            if args.chunk_pixels == 0:
                models[kind].set_perf(feed_forward_chunks=False)
        model = models[kind]
        side = (args.size or model.native_size) // model.vae_scale_factor
        rows = args.rows or LOOKAHEAD_LATENT_PIXELS // (side * side)  # the library's automatic size
        line = (reference_call(model, side=side, contents=args.contents) if case == "g"
                else lookahead_call(model, rows=rows, side=side, content=case == "a", case=case))
        chunk_pixels = getattr(features, "FEED_FORWARD_CHUNK_PIXELS", None)  # None: code before chunking
        if not getattr(model.perf, "feed_forward_chunks", True):
            chunk_pixels = 0
        print(json.dumps({**line, "model": kind, "chunk_pixels": chunk_pixels, "device": "cpu",
                          "code": code_digest()}), flush=True)


if __name__ == "__main__":
    main()
