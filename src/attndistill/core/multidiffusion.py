"""Texture expansion with MultiDiffusion, and tiled VAE decoding (ALGORITHM.md §4).

The latent canvas is larger than the UNet's comfortable size, so every DDIM
step runs on overlapping square *views* (64x64 latents, stride 8, the last
window of each row/column clamped to the edge), in batches; each view is
denoised, AD-guided against the reference (:mod:`attndistill.core.guidance`), and
the canvas becomes the per-pixel average of the views covering it. All views
of a timestep see the same noised reference (fresh noise every timestep, as in
Algorithm 2), so its features are computed once per timestep, not per batch.

With seamless tiling on an axis the views wrap around the canvas edge instead
of being clamped (a view that crosses the right edge continues on the left),
so the result is periodic; along an axis where the canvas is exactly one view
wide the UNet's convolutions are made circular instead (:mod:`attndistill.model.tiling`).

Large canvases are decoded tile by tile with feathered overlaps, so a
4096x4096 result never needs the decoder memory of the whole image.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..model.models import Conditioning, DiffusionModel
from ..model.tiling import seamless
from ..presets import DECODE_OVERLAP, DECODE_TILE, PRESETS, VIEW, VIEW_BATCH
from .engine import Distiller
from .guidance import cfg_noise, guide_latents, noised, previous_timestep, reference_lookahead
from .progress import Callback, StepLoop

Wrap = tuple[bool, bool]  # periodic along (y, x)


def window_starts(length: int, view: int, stride: int, *, wrap: bool = False) -> list[int]:
    """Start offsets of windows of ``view`` along an axis of ``length`` latents.

    Clamped (default): 0, stride, 2*stride, ... and a last window ending exactly at the edge.
    Wrapped (periodic axis wider than one view): every ``stride`` around the circle.
    """
    if view > length:
        raise ValueError(f"a view of {view} latents does not fit an axis of {length}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1 (got {stride})")
    if wrap and length > view:
        return list(range(0, length, stride))
    starts = list(range(0, length - view + 1, stride))
    if starts[-1] != length - view:
        starts.append(length - view)  # the last window is clamped to the edge
    return starts


def window_index(start: int, size: int, length: int, device=None) -> torch.Tensor:
    """Indices ``start .. start+size-1`` modulo ``length`` (wrapped windows cross the edge)."""
    return (torch.arange(start, start + size, device=device) % length)


def views(hw: tuple[int, int], view: int, stride: int, *, wrap: Wrap = (False, False)) -> list[tuple[int, int]]:
    """(top, left) of every view on a canvas of ``hw`` latents, row by row."""
    ys = window_starts(hw[0], view, stride, wrap=wrap[0])
    xs = window_starts(hw[1], view, stride, wrap=wrap[1])
    return [(y, x) for y in ys for x in xs]


def coverage(hw: tuple[int, int], view: int, stride: int, *, wrap: Wrap = (False, False)) -> torch.Tensor:
    """How many views cover each latent position: (h, w) integer counts."""
    count = torch.zeros(hw, dtype=torch.long)
    for y, x in views(hw, view, stride, wrap=wrap):
        rows, cols = window_index(y, view, hw[0]), window_index(x, view, hw[1])
        count[rows[:, None], cols[None, :]] += 1
    return count


def _crop(z: torch.Tensor, y: int, x: int, size: int) -> torch.Tensor:
    rows = window_index(y, size, z.shape[-2], z.device)
    cols = window_index(x, size, z.shape[-1], z.device)
    return z[..., rows[:, None], cols[None, :]]  # (B, C, size, size)


def _batches(items: list, size: int) -> Iterator[list]:
    """As few batches of at most ``size`` as there must be, of equal sizes give or take one.

    17 views in batches of 8 run as 6, 6 and 5, not 8, 8 and 1: a batch of one runs at batch-1
    speed, about half the rate of a batch of 8 on an H200 (benchmarks/RESULTS.md).
    """
    count = -(-len(items) // size)
    small, extra = divmod(len(items), count) if count else (0, 0)
    start = 0
    for k in range(count):
        stop = start + small + (k < extra)
        yield items[start:stop]
        start = stop


def multidiffusion(distiller: Distiller, init: torch.Tensor, ref_latents: torch.Tensor, *, scheduler,
                   cond: Conditioning, uncond: Conditioning | None = None, guidance: float = 1.0, iters: int,
                   lr: float, adain: bool = False, view: int = VIEW, stride: int = PRESETS["expand"].stride,
                   view_batch: int = VIEW_BATCH, wrap: Wrap = (False, False),
                   generator: torch.Generator | None = None, callback: Callback | None = None,
                   progress: bool = True, pad: bool | None = None) -> torch.Tensor:
    """AD-guided MultiDiffusion over a latent canvas; returns the final canvas (B, 4, H, W), fp32.

    init: start canvas (noise) (B, 4, H, W); ref_latents: clean reference latents (R, 4, hr, wr);
    scheduler: a DDIM scheduler with its timesteps set; cond/uncond: conditioning of the denoising
    call (batch 1); wrap: periodic (y, x) axes (views wrap around the edge). The distiller is entered
    here. A canvas of exactly one view gives the plain AD-guided sampler's result. pad: a smaller
    last batch is filled up with copies of its last view, whose results are dropped (default: with
    CUDA graphs, where each batch shape is a graph of its own that holds its working memory: case e's
    batches of 6, 6 and 5 held graphs for 6 views and for 5, whose pools for 5 are 3.9 GiB by a CPU count,
    benchmarks/graph_memory.py; and with ``compiled_loss`` or ``compiled_calls``, where each shape is a
    program of its own, minutes to compile).
    """
    model = distiller.model
    z = init.detach().to(model.device, torch.float32)
    b, _, h, w = z.shape
    starts = views((h, w), view, stride, wrap=wrap)
    distiller.condition_on((view, view))  # SDXL's null conditioning of the size the UNet sees: one view
    batches = list(_batches(starts, max(1, view_batch)))
    real = [len(batch) for batch in batches]  # views of each batch before any copies fill it up
    if pad is None:
        pad = distiller.cuda_graphs or model.perf.compiled_loss or model.perf.compiled_calls
    if pad:
        batches = [batch + batch[-1:] * (len(batches[0]) - len(batch)) for batch in batches]
    timesteps = scheduler.timesteps
    # not automatic here: one reference row beside ~35 view rows a step; on an H200 (run 5) computing it
    # ahead saved nothing and cost 1.4 GB
    lookahead = reference_lookahead(distiller, timesteps, ref_latents, scheduler=scheduler,
                                    generator=generator, auto=False) if iters > 0 else None
    # the bar counts view batches; --preview-every counts steps
    with StepLoop(model.device, len(timesteps), desc=f"expanding ({len(batches)} view batches a step)",
                  progress=progress, callback=callback, bar_total=len(timesteps) * len(batches), advance=0,
                  dtype=model.dtype, raised=["attention-scale"] + ["guidance"] * (uncond is not None)) as loop, \
            distiller:
        for i, t in enumerate(timesteps):
            t_int = int(t)
            t_prime = previous_timestep(t_int, scheduler)
            value = torch.zeros_like(z)
            count = torch.zeros(1, 1, h, w, device=z.device)
            per_batch: list[tuple[int, list[torch.Tensor]]] = []  # (views, each iteration's loss)
            # one noised reference per timestep, shared by all view batches: its features are computed once
            ahead = lookahead.at(i) if lookahead else None
            ref_t = ahead.ref if ahead else noised(scheduler, ref_latents.to(model.device), t_prime, generator)
            reference_key = object()
            for batch, kept in zip(batches, real, strict=True):
                # 1. the views of this batch, stacked: (n*B, 4, view, view), view-major
                zv = torch.cat([_crop(z, y, x, view) for y, x in batch])
                # 2. one denoising step (capture paused: this call records no features)
                with distiller.store.paused():
                    eps = cfg_noise(model, zv, model.timestep(t), cond, uncond, guidance)
                zv = scheduler.step(eps, t, zv).prev_sample
                # 3. AD guidance of every view at t' (fresh Adam; this timestep's reference)
                zv, batch_losses = guide_latents(distiller, zv, t_prime, ref_t, scheduler=scheduler,
                                                 iters=iters, lr=lr, adain_on=adain, generator=generator,
                                                 ref_is_noised=True, reference_key=reference_key,
                                                 ahead=ahead)
                per_batch.append((kept, batch_losses))
                # 4. accumulate for the per-pixel average (not the copies that fill a batch up)
                for (top, left), piece in zip(batch[:kept], zv.split(b)[:kept]):
                    rows = window_index(top, view, h, z.device)[:, None]
                    cols = window_index(left, view, w, z.device)[None, :]
                    value[..., rows, cols] += piece
                    count[..., rows, cols] += 1
                loop.tick()
            z = value / count
            loop.done(i, t_int, z, canvas_losses(per_batch), ad_timestep=t_prime)
    return z


def canvas_losses(per_batch: list[tuple[int, list[torch.Tensor]]]) -> list[torch.Tensor]:
    """Each Adam iteration's loss over the canvas: the view batches' losses (each a mean over its rows) averaged,
    weighted by their views. A step's loss then does not depend on how the views were batched; it was the last
    batch's, and its iterations one per batch and iteration. (A batch filled up with copies of its last view
    counts them in its own mean: a difference in the fourth decimal.)"""
    views = sum(n for n, _ in per_batch)
    iters = min((len(losses) for _, losses in per_batch), default=0)
    return [sum(n * losses[k] for n, losses in per_batch) / views for k in range(iters)]


def _ramp(length: int, overlap: int) -> torch.Tensor:
    """Blending weights along one tile side: linear over ``overlap`` pixels at both ends, positive everywhere."""
    x = torch.arange(length, dtype=torch.float32)
    ramp = torch.minimum((x + 0.5) / max(overlap, 1), (length - x - 0.5) / max(overlap, 1))
    return ramp.clamp(max=1.0)


def decode_tiled(model: DiffusionModel, latents: torch.Tensor, *, tile: int = DECODE_TILE,
                 overlap: int = DECODE_OVERLAP, wrap: Wrap = (False, False)) -> torch.Tensor:
    """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [0, 1] on the CPU, one tile per decoder call.

    Canvases no larger than ``tile`` latents are decoded whole (circular convolutions on the ``wrap``
    axes); larger ones in ``tile``-square windows overlapping by ``overlap`` latents, blended with
    linear ramps. On ``wrap`` axes the windows continue across the edge, so the image stays periodic.
    """
    b, _, h, w = latents.shape
    axes = ("y" if wrap[0] else "") + ("x" if wrap[1] else "")
    if h <= tile and w <= tile:
        with seamless(model.vae, axes or None):
            return model.decode(latents).cpu()
    f = model.vae_scale_factor
    th, tw = min(tile, h), min(tile, w)
    stride = max(1, tile - overlap)
    ys = window_starts(h, th, stride, wrap=wrap[0] and h > th)
    xs = window_starts(w, tw, stride, wrap=wrap[1] and w > tw)
    out = torch.zeros(b, 3, h * f, w * f)
    weight = torch.zeros(1, 1, h * f, w * f)
    ramp = _ramp(th * f, overlap * f)[:, None] * _ramp(tw * f, overlap * f)[None, :]  # (th*f, tw*f)
    # an axis that fits in one tile is decoded whole: circular convolutions keep it periodic
    whole = ("y" if wrap[0] and h <= th else "") + ("x" if wrap[1] and w <= tw else "")
    with seamless(model.vae, whole or None):
        for y, x in ((y, x) for y in ys for x in xs):
            rows, cols = window_index(y, th, h, latents.device), window_index(x, tw, w, latents.device)
            piece = model.decode(latents[..., rows[:, None], cols[None, :]]).cpu()  # (B, 3, th*f, tw*f)
            prow, pcol = window_index(y * f, th * f, h * f)[:, None], window_index(x * f, tw * f, w * f)[None, :]
            out[..., prow, pcol] += piece * ramp
            weight[..., prow, pcol] += ramp
    return out / weight
