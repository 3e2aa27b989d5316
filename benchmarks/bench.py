"""Speed and memory of attndistill's tasks, measured through the public API.

Builds full-size SD 1.5 / SDXL architectures with random weights from
``configs/`` (speed does not depend on weight values) or the tiny test models
(``--tiny``, for CPU), runs the issue's cases and prints one JSON line per run.
``--compare`` also runs the plain path (every optimisation off) in the same
process. Example (GPU)::

    python benchmarks/bench.py --cases a,b,c --compare
    python benchmarks/bench.py --tiny --device cpu --cases a,c --steps 4 --compare
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import fields
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import attndistill as ad  # noqa: E402
from attndistill.model.perf import PerfOptions  # noqa: E402

DATA = ROOT / "tests" / "data"
CONTENT, STYLE, TEXTURE = DATA / "horse.jpg", DATA / "watercolor-cat.jpg", DATA / "wood-rings.jpg"
PROMPT = "a deer in a misty forest"

# case -> (model kind, default steps, description)
CASES = {
    "a": ("sd15", 200, "style transfer, optimisation, 512², 200 x 1 iter, lambda 0.25"),
    "b": ("sd15", 50, "style-specific T2I, 512², 50 DDIM steps, guidance 7.5, 3 AD iters, AdaIN"),
    "c": ("sd15", 300, "texture synthesis, optimisation, 512², 300 x 1 iter"),
    "d": ("sdxl", 50, "SDXL style-specific T2I, 1024², 50 steps, guidance 7, 2 AD iters, AdaIN"),
    "e": ("sd15", 50, "texture expansion 1536x512, 50 steps, 2 iters, stride 8, view batch 8"),
    "f": ("sd15", 1, "texture expansion 4096x4096, peak memory over 1 step"),
    "g": ("sd15", 50, "8 style transfers sharing one style: batched vs one by one"),
    "h": ("sdxl", 50, "SDXL texture expansion 1024x512, 512-px views beside a 1024² reference, 2 iters, stride 8"),
}


def run_case(case: str, model, steps: int, size_scale: float) -> list:
    """Run one case through the public API; returns the images (for equality checks)."""
    side = int(model.native_size * size_scale)
    if case == "a":
        return [ad.style_transfer(CONTENT, STYLE, model=model, steps=steps, size=side, progress=False)]
    if case == "c":
        return ad.texture_synthesis(TEXTURE, model=model, steps=steps, size=side, progress=False)
    if case in ("b", "d"):
        from attndistill.tasks.generate import text_to_image

        preset = "t2i-sdxl" if model.kind == "sdxl" else "t2i"
        iters = 2 if model.kind == "sdxl" else 3
        return text_to_image(PROMPT, STYLE, model=model, steps=steps, iters=iters,
                             guidance=ad.PRESETS[preset].guidance, adain=True, size=side, progress=False)
    if case in ("e", "f"):
        from attndistill.tasks.textures import expand_texture

        w, h = (3 * side, side) if case == "e" else (8 * side, 8 * side)
        # views of the model's native size (64 latents on SD 1.5), so tiny models and --size-scale work too
        return [expand_texture(TEXTURE, model=model, size=(w, h), steps=steps, iters=2, stride=8, view_batch=8,
                               view=side // model.vae_scale_factor, progress=False)]
    if case == "h":  # views of half the native size (SDXL: the default 64 latents) beside a native reference
        from attndistill.tasks.textures import expand_texture

        return [expand_texture(TEXTURE, model=model, size=(side, side // 2), steps=steps, iters=2, stride=8,
                               view_batch=8, view=side // (2 * model.vae_scale_factor), progress=False)]
    if case == "g":
        from attndistill.tasks.transfer import style_transfer_batch

        return style_transfer_batch([CONTENT] * 8, STYLE, model=model, steps=steps, size=side, progress=False)
    raise ValueError(case)


def one_by_one(model, steps: int, size_scale: float, runs: int = 8) -> list:
    side = int(model.native_size * size_scale)
    return [ad.style_transfer(CONTENT, STYLE, model=model, steps=steps, size=side, seed=i, progress=False)
            for i in range(runs)]


def measure(fn, device: torch.device) -> tuple[float, dict[str, float], list]:
    """(seconds, peaks, result) of ``fn()``.

    Two peaks (GB): ``peak_gb``, memory held by tensors (``max_memory_allocated``), and ``reserved_gb``,
    memory the caching allocator holds (``max_memory_reserved``). Only the second counts the private
    pools of CUDA graphs captured before ``fn()``: a replay's activations are invisible to the first,
    which is why runs 1-6, which reported only ``peak_gb``, understate the fast path's footprint.
    ``device_used_gb``: the card's memory in use right after ``fn()`` (``mem_get_info``), with what the
    allocator does not see (CUDA context, library handles, kernels): closest to "does it fit a card".
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if device.type != "cuda":
        return seconds, {"peak_gb": float("nan")}, result
    free, total = torch.cuda.mem_get_info(device)
    return seconds, {"peak_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
                     "reserved_gb": round(torch.cuda.max_memory_reserved(device) / 1e9, 2),
                     "device_used_gb": round((total - free) / 1e9, 2)}, result


def max_diff(a: list, b: list) -> float:
    return max(float(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).max()) / 255 for x, y in zip(a, b))


def profile(fn, device: torch.device, top: int = 16) -> list[dict]:
    """The ``top`` operators by self time (device time on a GPU) while ``fn()`` runs."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)[:top]
    return [{"op": e.key[:400], "ms": round(getattr(e, attr) / 1000, 2), "calls": e.count} for e in events]


@contextlib.contextmanager
def timed_static_calls(device: torch.device):
    """Time every static program call (a CUDA graph replay on a GPU) by kind while the block runs.

    Yields a dict filled at exit: kind -> {"calls", "ms", "ms_per_call"}. The kinds are the reference
    program (reference and content features), the AD iteration (target forward, backward, Adam) and the
    denoising call. On a GPU, CUDA events time the device work without a sync per call.
    """
    from attndistill.core.stepper import StaticCall, StaticReference

    original = StaticCall.__call__
    marks: list[tuple[str, object, object]] = []
    cuda = device.type == "cuda"

    def kind(call) -> str:
        if call.grad:
            return "iteration"
        return "reference" if isinstance(getattr(call.fn, "__self__", None), StaticReference) else "denoising"

    def timed(call):
        start = torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
        if cuda:
            start.record()
        out = original(call)
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        marks.append((kind(call), start, end))
        return out

    totals: dict[str, dict] = {}
    StaticCall.__call__ = timed
    try:
        yield totals
    finally:
        StaticCall.__call__ = original
        if cuda:
            torch.cuda.synchronize(device)
        for name, start, end in marks:
            ms = start.elapsed_time(end) if cuda else 1000 * (end - start)
            entry = totals.setdefault(name, {"calls": 0, "ms": 0.0})
            entry["calls"] += 1
            entry["ms"] += ms
        for entry in totals.values():
            entry["ms_per_call"] = round(entry["ms"] / entry["calls"], 2)
            entry["ms"] = round(entry["ms"], 1)


def sync_sites(fn, device: torch.device, top: int = 12) -> tuple[int, list[dict]]:
    """Run ``fn()`` with CUDA's sync debug mode on: (syncs, their call sites, most frequent first).

    Each operation that makes the host wait for the GPU (reading a device value, a copy from pageable CPU
    memory) warns; a site is the innermost frame in attndistill beside the innermost frame of any code.
    A step that syncs leaves the GPU idle while Python prepares the next; the progress bar's loss read every
    10 steps and the run's start and end are meant to.
    """
    import traceback
    import warnings
    from collections import Counter

    sites: Counter = Counter()

    def where(frames: list) -> str:
        return f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}" if frames else "-"

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        stack = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        sites[where([f for f in stack if "attndistill" in f.filename]) + " | " + where(stack)] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize(device)
    return sum(sites.values()), [{"where": k, "count": n} for k, n in sites.most_common(top)]


def programs_compiled() -> int:
    """Programs ``torch.compile`` has made in this process so far (``compile``, ``compiled_norms``)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_seconds() -> float:
    """Seconds ``torch.compile`` has spent in this process so far: tracing and compiling each program, and its
    backward, which is compiled at its first call (PyTorch's own timers; 0 where this PyTorch lacks them)."""
    from torch._dynamo.utils import compilation_time_metrics as metrics

    return sum(sum(metrics.get(name, ())) for name in ("_compile.compile_inner", "backward._backward_impl"))


def code_digest() -> str:
    """Short hash of the package source: ties a measurement to the code it measured (no .git needed)."""
    import hashlib

    digest = hashlib.sha1()
    for path in sorted((ROOT / "src" / "attndistill").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:10]


def _switches(text: str) -> dict[str, bool | int]:
    """``"compile=1,lookahead_batch=16"`` -> PerfOptions keyword arguments (booleans as 0/1)."""
    types = {f.name: str(f.type) for f in fields(PerfOptions)}
    pairs = (kv.split("=") for kv in text.split(",") if kv)
    return {k: int(v) if "int" in types[k] else bool(int(v)) for k, v in pairs}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="a,b,c,d,e,g")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bf16 on GPU, fp32 on CPU by default")
    p.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke runs)")
    p.add_argument("--steps", type=int, default=None, help="override every case's step count")
    p.add_argument("--plain-steps", type=int, default=None, help="steps for the plain path (ms/step is reported)")
    p.add_argument("--size-scale", type=float, default=1.0, help="fraction of the native size (e.g. 0.5)")
    p.add_argument("--compare", action="store_true", help="also run the plain path and check equality")
    p.add_argument("--variant", action="append", default=[],
                   help="extra fast-path variants, e.g. gradient_checkpointing=1,cpu_offload=1")
    p.add_argument("--variant-steps", type=int, default=None,
                   help="steps for each variant (ms/step and the full run's estimate are reported)")
    p.add_argument("--fast", default="", help="switches of the fast path itself, e.g. compile=1")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile STEPS steps of the fast path and print where the time goes")
    p.add_argument("--breakdown", type=int, default=0, metavar="STEPS",
                   help="also time STEPS steps of the fast path by program: reference, iteration, denoising")
    p.add_argument("--sync-check", type=int, default=0, metavar="STEPS",
                   help="also run STEPS steps of the fast path in CUDA's sync debug mode and list where the host "
                        "waited for the GPU (CUDA only)")
    p.add_argument("--memory-cap", type=float, default=None, metavar="GB",
                   help="cap the caching allocator (graph pools included) at GB once the model is built: does the case "
                        "fit a smaller card?")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}.get(
        args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    code = code_digest()
    models: dict[str, object] = {}

    def get_model(kind: str):
        if kind not in models:
            for other in list(models):  # one full-size model at a time
                del models[other]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if args.tiny:
                import tempfile

                from attndistill.testing import build_tiny_sd15, build_tiny_sdxl

                folder = Path(tempfile.mkdtemp())
                (build_tiny_sdxl if kind == "sdxl" else build_tiny_sd15)(folder)
                models[kind] = ad.load_model(str(folder), device=device, dtype=dtype)
            else:
                from attndistill.testing import full_size_model

                models[kind] = full_size_model(kind, ROOT / "configs", device=str(device), dtype=dtype)
        return models[kind]

    def emit(**row) -> None:
        row.update(card=card, dtype=str(dtype).removeprefix("torch."), code=code,
                   alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
        if args.memory_cap:
            row.update(memory_cap_gb=args.memory_cap)
        print(json.dumps(row), flush=True)

    for case in args.cases.split(","):
        kind, default_steps, description = CASES[case]
        steps = args.steps or default_steps
        try:
            if args.memory_cap and device.type == "cuda":  # the case's memory, not the build's
                torch.cuda.set_per_process_memory_fraction(1.0)
            model = get_model(kind)
            if args.memory_cap and device.type == "cuda":
                total = torch.cuda.mem_get_info(device)[1]
                torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap * 1e9 / total))
            model.release_graphs()  # this run's memory its own: no graphs or cached blocks before it
            fast = PerfOptions(**_switches(args.fast))
            model.set_perf(fast)
            # warm-up: captures CUDA graphs (cached on the model for the real run); reported separately
            warm_steps = min(steps, 2)
            model.stats.clear()
            warm_s, programs, compiling = 0.0, programs_compiled(), compile_seconds()
            if case != "f":  # f measures peak memory only: one 4096² step takes minutes
                warm_s, _, _ = measure(partial(run_case, case, model, warm_steps, args.size_scale), device)
            capture_s = model.stats.get("graph_capture_s", 0.0)
            fast_s, peak, fast_images = measure(partial(run_case, case, model, steps, args.size_scale), device)
            emit(case=case, description=description, path="fast", steps=steps, seconds=round(fast_s, 3),
                 ms_per_step=round(1000 * fast_s / steps, 1), **peak,
                 graph_capture_s=round(capture_s, 2), warmup_s=round(warm_s, 2),
                 compiled_programs=programs_compiled() - programs, compile_s=round(compile_seconds() - compiling, 1),
                 graphs=model.stats.get("graphs_captured", 0), switches=args.fast,
                 checkpointing=bool(model.perf.gradient_checkpointing))  # on by itself where a capture ran short
            if args.profile:
                top = profile(partial(run_case, case, model, args.profile, args.size_scale), device)
                emit(case=case, path="profile", steps=args.profile, top=top)
            if args.sync_check and device.type == "cuda":
                syncs, sites = sync_sites(partial(run_case, case, model, args.sync_check, args.size_scale), device)
                emit(case=case, path="sync-check", steps=args.sync_check, syncs=syncs, sites=sites)
            if args.breakdown:
                with timed_static_calls(device) as parts:
                    seconds, _, _ = measure(partial(run_case, case, model, args.breakdown, args.size_scale), device)
                emit(case=case, path="breakdown", steps=args.breakdown, seconds=round(seconds, 3), parts=parts,
                     other_ms=round(1000 * seconds - sum(p["ms"] for p in parts.values()), 1))
            if args.variant and args.variant_steps and args.variant_steps < steps:
                # the variants' yardstick: the fast path over as many steps (fixed costs weigh the same)
                seconds, peak, _ = measure(partial(run_case, case, model, args.variant_steps, args.size_scale), device)
                emit(case=case, path="fast", steps=args.variant_steps, seconds=round(seconds, 3),
                     ms_per_step=round(1000 * seconds / args.variant_steps, 1), **peak)
            for variant in args.variant:
                try:  # a variant that fails (an experimental switch) leaves the case's other runs
                    model.set_perf(PerfOptions(**(_switches(args.fast) | _switches(variant))))
                    model.release_graphs()
                    model.stats.clear()
                    variant_steps = min(args.variant_steps or steps, steps)
                    # a short run is warmed up over its own steps: look-ahead chunks of that run's sizes, first
                    # uses of kernels, are paid here and not in the timed run (run 3 warmed up over 2 steps)
                    warm = warm_steps if variant_steps == steps else variant_steps
                    programs, compiling = programs_compiled(), compile_seconds()
                    warm_s, _, _ = measure(partial(run_case, case, model, warm, args.size_scale), device)
                    seconds, peak, _ = measure(partial(run_case, case, model, variant_steps, args.size_scale), device)
                    emit(case=case, path="fast+" + variant, steps=variant_steps, seconds=round(seconds, 3),
                         ms_per_step=round(1000 * seconds / variant_steps, 1), **peak,
                         est_full_seconds=round(seconds / variant_steps * steps, 2), warmup_s=round(warm_s, 2),
                         compiled_programs=programs_compiled() - programs,
                         compile_s=round(compile_seconds() - compiling, 1),
                         graph_capture_s=round(model.stats.get("graph_capture_s", 0.0), 2),
                         checkpointing=bool(model.perf.gradient_checkpointing))
                except Exception as exc:
                    emit(case=case, path="fast+" + variant, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                    model.release_graphs()
                model.set_perf(fast)
            if case == "g":
                model.release_graphs()
                one_by_one(model, 2, args.size_scale, runs=1)  # its graphs (batch 1) are captured here, untimed
                seconds1, peak1, _ = measure(partial(one_by_one, model, steps, args.size_scale), device)
                emit(case=case, path="one-by-one (fast path)", steps=steps, seconds=round(seconds1, 3),
                     images_per_min_batched=round(8 * 60 / fast_s, 1),
                     images_per_min_one_by_one=round(8 * 60 / seconds1, 1),
                     speedup=round(seconds1 / fast_s, 2), **peak1)
            if args.compare and case != "g":
                plain_steps = min(args.plain_steps or steps, steps)
                model.set_perf(PerfOptions.plain())
                model.release_graphs()
                seconds, peak, plain_images = measure(
                    partial(run_case, case, model, plain_steps, args.size_scale), device)
                emit(case=case, path="plain", steps=plain_steps, seconds=round(seconds, 3),
                     ms_per_step=round(1000 * seconds / plain_steps, 1), **peak,
                     est_full_seconds=round(seconds / plain_steps * steps, 2))
                if plain_steps == steps:
                    emit(case=case, path="fast-vs-plain", max_abs_pixel_diff=round(max_diff(fast_images,
                                                                                             plain_images), 5))
                model.set_perf(fast)
        except Exception as exc:  # keep measuring the other cases
            emit(case=case, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
