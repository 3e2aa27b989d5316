"""Where a whole run's allocated memory goes, phase by phase, counted on the CPU.

``graph_memory.py`` and ``lookahead_memory.py`` measure one program each; this script profiles a whole
benchmark case (``bench.run_case``) on the full-size architecture with random weights, in bf16, shaped
as a GPU runs it: the static programs of the CUDA-graph path (called, not captured: the CPU cannot
capture), look-ahead calls filled up to their rows (``pad``), gradient checkpointing. PyTorch's
profiler reports every CPU allocation with the running total; the script tags each phase (VAE encode,
text encoding, look-ahead call, denoising call, AD iteration, VAE decode...) and each module call, and
prints one JSON line per finding:

- ``peak``: the run's peak above its start (weights are allocated before it), the phase, module and
  operator running then, and what the memory alive at that moment was allocated by;
- ``peak_without_graphs``: the same count without what the denoising calls and AD iterations allocate,
  which a GPU replays from CUDA graphs: their working memory lies in the graphs' private pools, which
  ``max_memory_allocated`` leaves out (the figure to set beside a GPU run's ``peak_gb``);
- ``phase``: each phase's own peak above its start and what it leaves allocated;
- ``vae``: (``--vae``) the VAE's encode and decode at the case's size, whole and in forced tiles;
- ``build``: (``--build``) the allocated peak of building the model (``testing.full_size_model``).

Sizes do not depend on the device; kernel workspaces (cuDNN, cuBLAS) do, and are not counted. Example::

    python benchmarks/run_memory.py --steps 1           # case d, SDXL 1024², one step (~15 min on 2 cores)
    python benchmarks/run_memory.py --only vae,build
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import json
import pickle
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import CASES, code_digest, run_case  # noqa: E402
from lookahead_memory import MB, trace_events  # noqa: E402

from attndistill.core import sampling  # noqa: E402
from attndistill.core.engine import Distiller  # noqa: E402
from attndistill.core.lookahead import ReferenceLookahead  # noqa: E402
from attndistill.core.stepper import LatentAdam, StaticReference, StaticStepper  # noqa: E402
from attndistill.model.models import DiffusionModel  # noqa: E402
from attndistill.model.perf import PerfOptions  # noqa: E402
from attndistill.tasks import setup  # noqa: E402
from attndistill.testing import full_size_model  # noqa: E402

#: Phases replayed from CUDA graphs on a GPU: their allocations are not in ``max_memory_allocated`` there.
GRAPHED = ("denoise", "ad_iteration")


# -- tagging ----------------------------------------------------------------------------------------

Replace = Callable[[object, str, object], None]


def replacer(stack: contextlib.ExitStack) -> Replace:
    """``replace(owner, attr, value)``: set an attribute of the library until ``stack`` closes (the tests run
    this script in their own process, which later tests share)."""

    def replace(owner, attr: str, value) -> None:
        stack.callback(setattr, owner, attr, getattr(owner, attr))
        setattr(owner, attr, value)

    return replace


def tag_phases(replace: Replace) -> dict[str, list]:
    """Wrap the run's phases in profiler ranges ``phase:NAME``; returns a log of what each UNet call got."""
    calls: dict[str, list] = defaultdict(list)

    def wrap(owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def tagged(*args, **kwargs):
            with record_function(f"phase:{name}"):
                return original(*args, **kwargs)

        replace(owner, attr, tagged)

    wrap(DiffusionModel, "encode", "vae_encode")
    wrap(DiffusionModel, "decode", "vae_decode")
    wrap(DiffusionModel, "encode_prompt", "text_encode")
    wrap(ReferenceLookahead, "_compute", "lookahead_call")
    wrap(StaticReference, "__init__", "reference_buffers")
    wrap(StaticStepper, "__init__", "stepper_setup")
    wrap(StaticReference, "load", "reference_load")
    wrap(sampling, "_denoise", "denoise")
    wrap(LatentAdam, "step", "ad_iteration")  # bound by StaticStepper's program at construction
    features = Distiller.features

    def logged(self, latents, t, **kwargs):
        calls["feature_calls"].append({"rows": latents.shape[0], "latent": list(latents.shape[-2:]),
                                       "grad": torch.is_grad_enabled()})
        return features(self, latents, t, **kwargs)

    replace(Distiller, "features", logged)
    new_stepper = Distiller._new_stepper

    def stepper(self, *args, **kwargs):
        made = new_stepper(self, *args, **kwargs)
        calls["steppers"].append(type(made).__name__)
        return made

    replace(Distiller, "_new_stepper", stepper)
    return calls


def force_gpu_path(replace: Replace) -> None:
    """What a GPU does that the CPU does not by itself: the static programs (``Distiller(static=True)``:
    the CUDA-graph path without capture) and look-ahead calls filled up to their rows (``pad``)."""

    class StaticDistiller(Distiller):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("static", True)
            super().__init__(*args, **kwargs)

    replace(setup, "Distiller", StaticDistiller)  # where every task makes its Distiller (run_distiller)
    init = ReferenceLookahead.__init__

    def padded(self, *args, pad=None, **kwargs):
        init(self, *args, pad=True if pad is None else pad, **kwargs)

    replace(ReferenceLookahead, "__init__", padded)


@contextlib.contextmanager
def tag_modules(model: DiffusionModel):
    """Profiler ranges ``mod:NAME`` around every module call of the UNet, VAE and text encoders (also
    the recomputations of gradient checkpointing, and calls an early exit leaves by an exception)."""
    stack: list = []
    handles = []

    def pre(name):
        def hook(module, args):
            stack.append((module, torch.ops.profiler._record_function_enter_new(name, None)))
        return hook

    def post(module, args, output):
        while stack:
            owner, handle = stack.pop()
            torch.ops.profiler._record_function_exit._RecordFunction(handle)
            if owner is module:
                break

    parts = {"unet": model.unet, "vae": model.vae}
    parts.update({f"text_encoder_{i}": m for i, m in enumerate(model.text_encoders())})
    for part, root in parts.items():
        for name, module in root.named_modules():
            label = f"mod:{part}.{name}" if name else f"mod:{part}"
            handles.append(module.register_forward_pre_hook(pre(label)))
            handles.append(module.register_forward_hook(post, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# -- the trace --------------------------------------------------------------------------------------

class Trace:
    """Memory events and ranges of one profiled call, read from its chrome trace.

    Allocation masks: ``graphed``, made inside a phase a GPU replays from a CUDA graph (:data:`GRAPHED`);
    ``internal``, freed before the top-level ``aten::`` operator that made it returns (an operator's own
    temporaries: on the CPU oneDNN's copies of a convolution's input and output in its blocked layout,
    which a GPU's cuDNN does not make, or makes in a workspace of another size).
    """

    def __init__(self, prof=None, *, state: dict | None = None) -> None:
        if state is not None:
            self.__dict__.update(state)
            return
        memory, events = trace_events(prof)
        self.ts = [e["ts"] for e in memory]
        self.bytes = [e["args"]["Bytes"] for e in memory]
        self.addr = [e["args"].get("Addr") for e in memory]
        ranges = [e for e in events if e.get("ph") == "X" and "dur" in e]
        del events
        self.phases = self._index(e for e in ranges if e["name"].startswith("phase:"))
        self.modules = self._index(e for e in ranges if e["name"].startswith("mod:"))
        self.ops = self._index(e for e in ranges if e.get("cat") == "cpu_op")

    @staticmethod
    def _index(events) -> tuple[list[float], list[tuple[float, float, str]]]:
        spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"].removeprefix("phase:").removeprefix("mod:"))
                       for e in events)
        return [s for s, _, _ in spans], spans

    @staticmethod
    def innermost(index, t: float, limit: int = 200_000) -> str | None:
        """The latest-starting range holding ``t`` (ranges of one thread nest: the innermost)."""
        starts, spans = index
        i = bisect.bisect_right(starts, t) - 1
        for j in range(i, max(-1, i - limit), -1):
            if spans[j][1] >= t:
                return spans[j][2]
        return None

    def at(self, t: float) -> dict:
        return {"phase": self.innermost(self.phases, t), "module": self.innermost(self.modules, t),
                "op": self.innermost(self.ops, t)}

    def masks(self) -> dict[str, set[int]]:
        graphed_spans = sorted((s, e) for s, e, n in self.phases[1] if n in GRAPHED)
        tops: list[tuple[float, float]] = []  # top-level aten:: operators (not inside another)
        for s, e, name in self.ops[1]:
            if name.startswith("aten::") and (not tops or s > tops[-1][1]):
                tops.append((s, e))
        top_starts = [s for s, _ in tops]

        def inside(spans, starts, t):
            i = bisect.bisect_right(starts, t) - 1
            return i if i >= 0 and spans[i][0] <= t <= spans[i][1] else None

        graphed_starts = [s for s, _ in graphed_spans]
        graphed, internal, live = set(), set(), {}
        for i, (b, a) in enumerate(zip(self.bytes, self.addr, strict=True)):
            if b > 0:
                live[a] = i
                if inside(graphed_spans, graphed_starts, self.ts[i]) is not None:
                    graphed.add(i)
            elif a in live:
                j = live.pop(a)
                op = inside(tops, top_starts, self.ts[j])
                if op is not None and op == inside(tops, top_starts, self.ts[i]):
                    internal.add(j)
        return {"graphed": graphed, "internal": internal}

    def series(self, skip: set[int]) -> list[int]:
        """The running total of allocated bytes after each event, without the allocations in ``skip``."""
        totals, total, live = [], 0, {}
        for i, (b, a) in enumerate(zip(self.bytes, self.addr, strict=True)):
            if b > 0:
                if i not in skip:
                    live[a] = b
                    total += b
            elif a in live:
                total -= live.pop(a)
            totals.append(total)
        return totals

    def peak(self, skip: set[int] = frozenset()) -> dict:
        """Peak of the running total (without ``skip``), where it is, and the blocks alive then grouped
        by what allocated them."""
        totals = self.series(skip)
        best_i = max(range(len(totals)), key=totals.__getitem__)
        live: dict = {}
        for i in range(best_i + 1):
            b, a = self.bytes[i], self.addr[i]
            if b > 0:
                if i not in skip:
                    live[a] = (b, i)
            elif a in live:
                live.pop(a)
        groups: dict = defaultdict(lambda: [0, 0])
        for b, i in live.values():
            where = self.at(self.ts[i])
            module = where["module"] or "-"
            key = (where["phase"] or "-", ".".join(module.split(".")[:5]), where["op"] or "-")
            groups[key][0] += b
            groups[key][1] += 1
        top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:12]
        return {"peak_mb": round(totals[best_i] / MB, 1), **self.at(self.ts[best_i]),
                "alive_by_allocation": [{"phase": k[0], "module": k[1], "op": k[2], "mb": round(v[0] / MB, 1),
                                         "blocks": v[1]} for k, v in top]}

    def per_phase(self, skip: set[int] = frozenset()) -> list[dict]:
        """Per phase name: calls, the largest peak above a call's start, what a call leaves allocated."""
        totals = self.series(skip)
        rows: dict[str, dict] = {}
        for start, end, name in self.phases[1]:
            i0 = bisect.bisect_left(self.ts, start)
            i1 = bisect.bisect_right(self.ts, end)
            before = totals[i0 - 1] if i0 > 0 else 0
            inside = totals[i0:i1] or [before]
            peak = max(inside)
            j = i0 + inside.index(peak)
            row = rows.setdefault(name, {"phase": name, "calls": 0, "peak_above_start_mb": 0.0,
                                         "kept_after_mb": [], "start_mb": [], "at_peak": None})
            row["calls"] += 1
            row["start_mb"].append(round(before / MB, 1))
            row["kept_after_mb"].append(round((inside[-1] - before) / MB, 1))
            if (peak - before) / MB >= row["peak_above_start_mb"]:
                row["peak_above_start_mb"] = round((peak - before) / MB, 1)
                row["at_peak"] = self.at(self.ts[j]) if i1 > i0 else None
        return list(rows.values())


def profiled(fn, *, modules_of: DiffusionModel | None = None) -> tuple[Trace, float, object]:
    start = time.perf_counter()
    tags = tag_modules(modules_of) if modules_of is not None else contextlib.nullcontext()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, tags:
        out = fn()
    return Trace(prof), time.perf_counter() - start, out


# -- measurements ---------------------------------------------------------------------------------

def measure_build(args, emit) -> DiffusionModel:
    """The model build's own allocated peak (``full_size_model`` creates each part in fp32, then casts)."""
    trace, seconds, model = profiled(lambda: full_size_model(CASES[args.case][0], ROOT / "configs", device="cpu",
                                                             dtype=torch.bfloat16))
    totals = trace.series(set())
    peak, kept = max(totals), totals[-1]
    cross = None
    if args.cap_gib:  # the first allocation that takes the running total past the figure of a GPU's OOM
        for i, total in enumerate(totals):
            if total > args.cap_gib * 2**30:
                cross = {"total_gib": round(total / 2**30, 3), "bytes": trace.bytes[i]}
                break
        fp32 = 0
        for name, p in model.unet.named_parameters():  # the same order as built
            fp32 += p.numel() * 4
            if fp32 > args.cap_gib * 2**30:
                cross = {**(cross or {}), "unet_param": name, "param_fp32_bytes": p.numel() * 4}
                break
    emit(what="build", seconds=round(seconds, 1), peak_mb=round(peak / MB, 1), kept_mb=round(kept / MB, 1),
         unet_fp32_mb=round(sum(p.numel() * 4 for p in model.unet.parameters()) / MB, 1), crossing=cross)
    return model


def weights_mb(model: DiffusionModel) -> dict[str, float]:
    def size(m):
        return round(sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())) / MB, 1)

    return {"unet": size(model.unet), "vae": size(model.vae),
            "text_encoders": round(sum(size(m) for m in model.text_encoders()), 1)}


def measure_run(model: DiffusionModel, args, emit) -> None:
    with contextlib.ExitStack() as stack:
        calls = tag_phases(replacer(stack))
        force_gpu_path(replacer(stack))
        trace, seconds, _ = profiled(lambda: run_case(args.case, model, args.steps, 1.0), modules_of=model)
    emit(what="run", case=args.case, steps=args.steps, seconds=round(seconds, 1), weights_mb=weights_mb(model),
         steppers=calls["steppers"],
         feature_calls=[dict(c, n=n) for c, n in _count(calls["feature_calls"])],
         end_mb=round(trace.series(set())[-1] / MB, 1))
    if args.save_trace:
        with open(args.save_trace, "wb") as f:
            pickle.dump(trace.__dict__, f)
    analyse(trace, emit)


def analyse(trace: Trace, emit) -> None:
    """The peaks of a run's trace: all of it, without what graphs replay, without operators' temporaries."""
    masks = trace.masks()
    variants = {"all": set(), "without_graphed": masks["graphed"], "without_op_temporaries": masks["internal"],
                "without_graphed_and_op_temporaries": masks["graphed"] | masks["internal"]}
    for name, skip in variants.items():
        emit(what="peak", count=name, **trace.peak(skip))
    for name in ("all", "without_op_temporaries"):
        for row in trace.per_phase(variants[name]):
            emit(what="phase", count=name, **row)


def _count(items: list[dict]) -> list[tuple[dict, int]]:
    counts: dict[str, int] = {}
    for item in items:
        key = json.dumps(item, sort_keys=True)
        counts[key] = counts.get(key, 0) + 1
    return [(json.loads(k), n) for k, n in counts.items()]


def measure_vae(model: DiffusionModel, args, emit) -> None:
    """VAE encode and decode at the case's size: whole (what ``vae_tiling`` does at the VAE's own sample
    size, since diffusers tiles only larger inputs) and in forced tiles of ``--tile`` pixels."""
    side = model.native_size
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, side, side, generator=g)
    latents = torch.randn(1, 4, side // model.vae_scale_factor, side // model.vae_scale_factor, generator=g)
    vae = model.vae
    saved = (vae.tile_sample_min_size, vae.tile_latent_min_size)
    for tile in [None] + args.tile:
        if tile is None:
            vae.disable_tiling()
        else:
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // model.vae_scale_factor
        for name, fn in (("encode", lambda: model.encode(images)), ("decode", lambda: model.decode(latents))):
            trace, seconds, _ = profiled(fn, modules_of=model)
            for count, skip in (("all", set()), ("without_op_temporaries", trace.masks()["internal"])):
                at = trace.peak(skip)
                emit(what="vae", call=name, side=side, tile=tile, count=count, seconds=round(seconds, 1),
                     peak_mb=at["peak_mb"], module=at["module"], op=at["op"],
                     alive_by_allocation=at["alive_by_allocation"][:4])
    vae.tile_sample_min_size, vae.tile_latent_min_size = saved
    vae.disable_tiling()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="d", help="a bench.py case (default d: SDXL T2I at 1024²)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--only", default="run", help="what to measure, of build, run, vae (comma-separated)")
    p.add_argument("--lookahead-batch", type=int, default=4, help="rows of a look-ahead call (GPU SDXL: 4)")
    p.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    p.add_argument("--tile", type=int, action="append", default=None,
                   help="VAE tile sides in pixels for --only vae (default 512)")
    p.add_argument("--save-trace", default=None, help="--only run: keep the run's trace (pickle) here")
    p.add_argument("--load-trace", default=None, help="analyse a trace kept by --save-trace (no run)")
    p.add_argument("--tiny", action="store_true", help="the tiny test model (a smoke test of this script)")
    p.add_argument("--cap-gib", type=float, default=8.19,
                   help="--only build: report the allocation that takes the total past this many GiB")
    args = p.parse_args(argv)
    args.tile = args.tile or [512]
    torch.manual_seed(0)
    code = code_digest()

    def emit(**row) -> None:
        print(json.dumps({**row, "dtype": "bfloat16", "device": "cpu", "code": code}), flush=True)

    if args.load_trace:
        with open(args.load_trace, "rb") as f:
            analyse(Trace(state=pickle.load(f)), emit)
        return
    only = args.only.split(",")
    if args.tiny:
        from attndistill import load_model
        from attndistill.testing import build_tiny_sd15, build_tiny_sdxl

        folder = Path(tempfile.mkdtemp())
        (build_tiny_sdxl if CASES[args.case][0] == "sdxl" else build_tiny_sd15)(folder)
        model = load_model(str(folder), device="cpu", dtype="bf16")
    elif "build" in only:
        model = measure_build(args, emit)
    else:
        model = full_size_model(CASES[args.case][0], ROOT / "configs", device="cpu", dtype=torch.bfloat16)
    # the GPU path's switches; cuda_graphs off (no capture on a CPU), the static programs forced above
    model.set_perf(PerfOptions(fused=True, cuda_graphs=False, channels_last=False,
                               lookahead_batch=args.lookahead_batch,
                               gradient_checkpointing=not args.no_checkpointing, offload_text_encoders=True))
    if "vae" in only:
        measure_vae(model, args, emit)
    if "run" in only:
        measure_run(model, args, emit)


if __name__ == "__main__":
    main()
