"""Restyle a region only: a mask painted over the content image (white: change, black: keep).

The optimisation changes the latent only in the mask's cells (the loss still sees the whole image, so
the region is styled in its context), and the result is the content image outside the mask, joined
with a feathered edge. This goes beyond the paper (ALGORITHM.md §3 optimises every latent cell); with
no mask nothing here runs.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageFilter, ImageOps

from ..errors import UserError
from ..images import ImageInput, drawn_over, load_image

#: Mask cells at the latent's size are changed when more than this share of their pixels is white.
CELL_COVERAGE = 0.5


def load_mask(mask: ImageInput | None, content: Image.Image, *, tile: str | None = None,
              what: str = "content image") -> Image.Image | None:
    """The mask as a greyscale image (None: no mask), checked before any model loads.

    White changes; black and transparent keep (a mask exported as white strokes on a transparent layer
    means what it shows); grey counts as white from half up. ``content``: the image it is painted over,
    named ``what`` in errors.
    """
    if mask is None:
        return None
    if tile:
        raise UserError("a mask keeps the content outside it, which does not tile; drop the mask or the tiling")
    name = str(mask) if isinstance(mask, str | os.PathLike) else "<image>"
    image = load_image(mask, what="mask image", flat=True).convert("L")  # transparency on white, as any input
    alpha = _alpha(mask)
    if alpha is not None and alpha.size == image.size:
        image = ImageChops.multiply(image, alpha)
    if not drawn_over(image.size, content.size):
        raise UserError(f"mask '{name}' is {image.width}x{image.height} but the {what} is "
                        f"{content.width}x{content.height}; paint the mask over the {what}, at its aspect")
    # black or white, as the latent cells are: grey from half up changes, below keeps (no ghosting in the paste)
    image = image.point(lambda v: 255 if v > 127 else 0)
    if image.getextrema()[1] == 0:
        raise UserError(f"mask '{name}' has no white; paint the part to restyle white (black and transparent "
                        f"keep the {what})")
    return image


def _alpha(source: ImageInput) -> Image.Image | None:
    """The mask's transparency, upright as :func:`~attndistill.images.load_image` turns it; None if opaque."""
    if isinstance(source, Image.Image):  # as load_image takes an image: as it is, not turned by its EXIF tag
        return source.convert("RGBA").getchannel("A") if source.has_transparency_data else None
    try:
        with warnings.catch_warnings():  # a huge JPEG (no alpha) that load_image decoded at a reduced size
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as raw:
                if not raw.has_transparency_data:
                    return None
                return ImageOps.exif_transpose(raw).convert("RGBA").getchannel("A")
    except (OSError, ValueError, Image.DecompressionBombError):  # load_image has said what is wrong with it
        return None


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
        raise UserError(f"mask '{name}' marks no region of at least {factor}x{factor} px of the {w}x{h} result; "
                        "paint a larger region white, or give a larger --size")
    return cells.float()


#: Standard deviation in pixels of the blur that feathers the mask's edge: the blend reaches about 5 px each way.
FEATHER = 2


def paste_region(result: Image.Image, content: Image.Image, mask: Image.Image) -> Image.Image:
    """``result`` inside the mask, ``content`` (resized to the result) outside, across a feathered edge."""
    size = result.size
    weight = mask.convert("L").resize(size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(FEATHER))
    pasted = Image.composite(result, content.convert("RGB").resize(size, Image.Resampling.LANCZOS), weight)
    pasted.info = dict(result.info)
    return pasted
