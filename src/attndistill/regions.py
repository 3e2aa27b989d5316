"""Restyle a region only: a mask painted over the content image (white: change, black: keep).

The optimisation changes the latent only in the mask's cells (the loss still sees the whole image, so
the region is styled in its context), and the result is the content image outside the mask, joined
with a feathered edge. This goes beyond the paper (ALGORITHM.md §3 optimises every latent cell); with
no mask nothing here runs.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from .errors import UserError
from .images import ImageInput, load_image

#: Mask cells at the latent's size are changed when more than this share of their pixels is white.
CELL_COVERAGE = 0.5


def load_mask(mask: ImageInput | None, content: Image.Image, *, tile: str | None = None) -> Image.Image | None:
    """The mask as an image (None: no mask), checked against the content and the options before any model loads."""
    if mask is None:
        return None
    if tile:
        raise UserError("a mask keeps the content outside it, which does not tile; drop the mask or the tiling")
    image = load_image(mask, what="mask image")
    _check_aspect(image, content, str(mask) if isinstance(mask, str | os.PathLike) else "<image>")
    return image


def _check_aspect(mask: Image.Image, content: Image.Image, name: str) -> None:
    """A mask drawn over another picture than the content would restyle the wrong place."""
    if abs(mask.width / mask.height - content.width / content.height) > 0.02 * content.width / content.height:
        raise UserError(f"mask '{name}' is {mask.width}x{mask.height} but the content image is "
                        f"{content.width}x{content.height}; paint the mask over the content image, at its aspect")


def update_mask(mask: Image.Image, size: tuple[int, int], factor: int, name: str) -> torch.Tensor:
    """(1, 1, h/f, w/f) of 0 and 1: the latent cells the optimisation may change.

    Adam moves any cell with a gradient by about its learning rate, however small the gradient, so a soft
    mask would act as a hard one anyway: a cell is in when most of its pixels are white.
    """
    w, h = size
    pixels = torch.from_numpy(np.asarray(mask.convert("L").resize((w, h), Image.Resampling.BILINEAR),
                                         dtype=np.float32) / 255.0)[None, None]
    cells = F.interpolate(pixels, size=(h // factor, w // factor), mode="area") > CELL_COVERAGE
    if not cells.any():
        raise UserError(f"mask '{name}' marks no region of at least {factor}x{factor} px at {w}x{h}; paint the "
                        "part to restyle white (black keeps the content)")
    return cells.float()


def paste_region(result: Image.Image, content: Image.Image, mask: Image.Image) -> Image.Image:
    """``result`` inside the mask, ``content`` (resized to the result) outside; the edge feathered by 4 px."""
    size = result.size
    weight = mask.convert("L").resize(size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(4))
    pasted = Image.composite(result, content.convert("RGB").resize(size, Image.Resampling.LANCZOS), weight)
    pasted.info = dict(result.info)
    return pasted
