"""Seamless tiling: circular padding in every ``Conv2d``, per axis (ALGORITHM.md §4).

A result tiles without a seam when every convolution of the UNet and the VAE
sees its input as periodic: left edge next to right edge (x), top next to
bottom (y). Attention and GroupNorm carry no position, so with circular
padding the whole network commutes with circular shifts of its input::

    with seamless(model, axes="xy"):
        z = optimise(...)            # UNet sees a torus
        image = model.decode(z)      # so does the decoder

Each convolution gets a forward pre-hook that pads the periodic axes itself
(``F.pad(mode="circular")``) while the layer's own zero padding is switched
off on those axes only. Everything is restored in ``finally``: after the
``with`` block the modules are exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

AXES = ("x", "y", "xy")


def check_axes(axes: str | None) -> str | None:
    """``None``/"" (no tiling), "x", "y" or "xy" ("yx" accepted); anything else is a :class:`UserError`."""
    if axes is None or axes == "" or axes == "none":
        return None
    norm = "".join(sorted(set(str(axes).lower())))
    if norm not in AXES:
        raise UserError(f"tile '{axes}' is not understood; use x, y or xy")
    return norm


def _modules(target, parts: tuple[str, ...]) -> list[nn.Module]:
    """A DiffusionModel (the ``parts`` among "unet", "vae", "decoder"), one module, or several."""
    if isinstance(target, nn.Module):
        return [target]
    if hasattr(target, "unet") and hasattr(target, "vae"):
        table = {"unet": target.unet, "vae": target.vae, "decoder": target.vae.decoder}
        return [table[p] for p in parts]
    return list(target)


def _vaes(target, parts: tuple[str, ...]) -> list[nn.Module]:
    """The VAEs among (or holding) ``target``'s ``parts``: what may decode in tiles."""
    if hasattr(target, "unet") and hasattr(target, "vae"):
        return [target.vae] if {"vae", "decoder"} & set(parts) else []
    return [m for m in _modules(target, parts) if hasattr(m, "use_tiling")]


def _pre_hook(pad_x: int, pad_y: int):
    def hook(_module: nn.Module, args: tuple) -> tuple:
        x = F.pad(args[0], (pad_x, pad_x, pad_y, pad_y), mode="circular")  # (B, C, H + 2py, W + 2px)
        return (x, *args[1:])
    return hook


@contextmanager
def seamless(target, axes: str | None = "xy", *, parts: tuple[str, ...] = ("unet", "vae")) -> Iterator[None]:
    """Make every padded ``Conv2d`` of ``target`` circular along ``axes`` for the ``with`` block.

    target: a :class:`~attndistill.model.models.DiffusionModel` (its ``parts``: "unet", "vae" or only the
    "decoder"), an ``nn.Module`` or an iterable of modules; axes: "x", "y", "xy", or None/"" for a no-op.
    A model's cached CUDA graphs are dropped on entry and exit: they replay the padding they were
    captured with. The VAE encoder's downsamplers pad by hand (one zero row and column, then an
    unpadded convolution) and stay as they are: encoding is not periodic, so tasks encode their
    images before they enter this block.
    """
    axes = check_axes(axes)
    if axes is None:
        yield
        return
    graphs = getattr(target, "graphs", None)
    if graphs is not None:
        graphs.clear()
    convs: list[nn.Conv2d] = []
    seen: set[int] = set()
    for module in _modules(target, parts):
        for m in module.modules():
            if (isinstance(m, nn.Conv2d) and id(m) not in seen and m.padding_mode == "zeros"
                    and not isinstance(m.padding, str) and any(m.padding)):
                seen.add(id(m))
                convs.append(m)
    # diffusers' VAE tiles (--vae-tiling) are decoded one by one, each wrapping around on its own: whole images
    vaes = [m for m in _vaes(target, parts) if getattr(m, "use_tiling", False)]
    saved: list[tuple[nn.Conv2d, tuple[int, ...], torch.utils.hooks.RemovableHandle]] = []
    try:
        for vae in vaes:
            vae.use_tiling = False
        for conv in convs:
            py, px = conv.padding
            circ_x, circ_y = px if "x" in axes else 0, py if "y" in axes else 0
            handle = conv.register_forward_pre_hook(_pre_hook(circ_x, circ_y))
            saved.append((conv, conv.padding, handle))
            conv.padding = (py - circ_y, px - circ_x)  # the conv's own zero padding stays on the other axis
        yield
    finally:
        for conv, padding, handle in reversed(saved):
            handle.remove()
            conv.padding = padding
        for vae in vaes:
            vae.use_tiling = True
        if graphs is not None:
            graphs.clear()

