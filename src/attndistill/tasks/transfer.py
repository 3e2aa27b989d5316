"""Optimisation tasks (paper Algorithm 1): style and appearance transfer, texture synthesis.

Every task has the same shape: inputs first, then keyword-only options whose
``None`` means "the preset's value" (:mod:`attndistill.presets`). Results are
PIL images whose ``info["parameters"]`` holds everything needed to reproduce
them; :func:`attndistill.images.save_png` embeds it in the PNG.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..core.engine import parse_layers
from ..core.optimize import optimize_latents
from ..core.progress import Callback
from ..errors import UserError
from ..images import (
    ImageInput,
    add_parameters,
    drawn_over,
    load_image,
    to_tensor,
)
from ..model.loading import as_model
from ..model.models import DiffusionModel
from ..model.tiling import seamless
from ..presets import Preset, get_preset
from .regions import load_mask, paste_region, update_mask
from .setup import (
    Size,
    as_list,
    check_run,
    check_settings,
    describe_input,
    encode_references,
    finish,
    held,
    public_task,
    run_distiller,
    run_parameters,
    seeded_noise,
    target_size,
)
from .vae_tuning import tuned_vae

log = logging.getLogger(__name__)


def _mask_input(mask: ImageInput | None) -> dict:
    """A result records its mask only when it had one."""
    return {} if mask is None else {"mask": describe_input(mask)}


def _optimise_task(task: str, *, target: Image.Image | list[Image.Image] | None, references: list[ImageInput],
                   ref_what: str, model: DiffusionModel | str | None, size: Size, num: int, seed: int,
                   layers: str | Sequence[int] | None, preset: Preset, inputs: dict, fused: bool | None,
                   progress: bool, callback: Callback | None, vae: str | None, device: str | None, dtype: str | None,
                   tile: str | None = None, tune_vae: bool = False,
                   mask: ImageInput | None | list[ImageInput | None] = None,
                   target_names: list[str] | None = None) -> list[Image.Image]:
    """The optimisation tasks' common run. ``target``: the content (or a list of contents, one target each,
    optimised in one batch, named by ``target_names``); ``mask``: one over the content, or with a list of
    contents a list with one mask (or None) for each."""
    seed, num, tile = check_run(seed=seed, callback=callback, num=num, fused=fused, progress=progress, tile=tile,
                                tune_vae=tune_vae)
    preset = check_settings(preset)
    targets = target if isinstance(target, list) else None  # several contents: one target each, one batch
    # restyle a region only (regions.py): one mask, or one (or None) per content
    masks = mask if targets is not None and isinstance(mask, list) else [mask] * len(targets or [target])
    what = "structure image" if task == "appearance" else "content image"
    mask_images = [load_mask(m, t, tile=tile, what=what) for m, t in zip(masks, targets or [target], strict=True)]
    model = held(as_model(model, vae=vae, device=device, dtype=dtype))
    layer_ids = parse_layers(layers, model)
    name = inputs.get("content") or inputs.get("structure")  # a batch's first content has no name here
    w, h = target_size(model, size, like=targets[0] if targets else target,
                       like_name=f"{what} '{name}'" if name else f"the first {what}")
    def stretch(image: Image.Image) -> float:  # how far (w, h) stretches an image's aspect, either way
        change = (image.size[0] / image.size[1]) / (w / h)
        return max(change, 1 / change)

    for i, other in enumerate(targets[1:] if targets else [], start=1):  # a batch takes its first content's size
        if stretch(other) > 1.02 * stretch(targets[0]) and not drawn_over(targets[0].size, other.size):
            named = f"'{target_names[i]}'" if target_names and target_names[i] != "<image>" else f"number {i + 1}"
            log.warning("%s %s is %dx%d, another aspect than the batch's first (%dx%d): it is stretched %.1f times "
                        "to %dx%d; optimise it in a batch of its own aspect to keep it", what, named, *other.size,
                        *targets[0].size, stretch(other), w, h)
    # the latent cells a mask lets change, known before any encoding work (batch dry-runs check it too)
    region = _update_region(mask_images, masks, (w, h), model.vae_scale_factor)
    z_ref = encode_references(model, references, ref_what, preset.reference_fit)
    z_content = None
    if target is not None:
        z_content = model.encode(to_tensor(targets or target, (w, h)))
        init = z_content if targets else z_content.expand(num, -1, -1, -1)
    else:
        init = seeded_noise((num, 4, h // model.vae_scale_factor, w // model.vae_scale_factor), seed)
    distiller = run_distiller(model, preset, layer_ids, condition_size=(h, w), fused=fused, update_mask=region)
    # seamless: circular convolutions for the run; tune_vae: a decoder fitted to the references
    with (tuned_vae(model, references if tune_vae else None, reference_fit=preset.reference_fit, progress=progress,
                    callback=callback),
          seamless(model, tile)):
        z = optimize_latents(distiller, init, z_ref, content_latents=z_content, steps=preset.steps,
                             iters=preset.iters, lr=preset.lr, callback=callback, progress=progress, desc=task)
        params = run_parameters(task, model, preset, layer_ids, (w, h), seed, fused=fused, tile=tile,
                                tune_vae=tune_vae, **inputs)
        images = finish(model, z, params)
    if targets is None:
        mask_images, targets = mask_images * len(images), [target] * len(images)
    return [img if m is None else paste_region(img, t, m)
            for img, t, m in zip(images, targets, mask_images, strict=True)]


def _update_region(mask_images: list[Image.Image | None], masks: list, size: tuple[int, int],
                   factor: int) -> torch.Tensor | None:
    """The latent cells each target may change: (1 or B, 1, h, w), all of a target's cells where it has no
    mask; None where no target has one (the plain run)."""
    if all(m is None for m in mask_images):
        return None
    rows = [update_mask(m, size, factor, describe_input(source)) if m is not None else None
            for m, source in zip(mask_images, masks, strict=True)]
    shape = next(r for r in rows if r is not None).shape
    rows = [torch.ones(shape) if r is None else r for r in rows]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


@public_task
def style_transfer(content: ImageInput, style: ImageInput | Sequence[ImageInput], *,
                   model: DiffusionModel | str | None = None, steps: int | None = None, iters: int | None = None,
                   lr: float | None = None, content_weight: float | None = None,
                   attention_scale: float | None = None, layers: str | Sequence[int] | None = None,
                   size: Size = None, seed: int = 0, vae: str | None = None, device: str | None = None,
                   dtype: str | None = None, fused: bool | None = None, progress: bool = True,
                   callback: Callback | None = None, tile: str | None = None, tune_vae: bool = False,
                   reference_fit: str | None = None, mask: ImageInput | None = None) -> Image.Image:
    """Repaint ``content`` in the style of ``style`` (one image or several) by optimisation.

    Defaults come from the ``style`` preset (200 steps, lr 0.05, content weight 0.25, the last six
    self-attention layers); ``size`` is the long side of the result (default the model's native size),
    aspect kept. ``mask``: an image over the content, white where to restyle; the rest stays the content
    (:mod:`attndistill.tasks.regions`). Example::

        out = style_transfer("horse.jpg", "watercolor-cat.jpg", model="stable-diffusion-v1-5/stable-diffusion-v1-5")
        save_png(out, "horse-watercolor.png")  # the PNG carries the run's parameters (attndistill info)
    """
    preset = get_preset("style").override(steps=steps, iters=iters, lr=lr, content_weight=content_weight,
                                          attention_scale=attention_scale, reference_fit=reference_fit)
    styles = as_list(style)
    return _optimise_task(
        "style", target=load_image(content, what="content image"), references=styles, ref_what="style image",
        model=model, size=size, num=1, seed=seed, layers=layers, preset=preset,
        inputs={"content": describe_input(content), "style": [describe_input(s) for s in styles],
                **_mask_input(mask)},
        fused=fused, progress=progress, callback=callback, vae=vae, device=device, dtype=dtype, tile=tile,
        tune_vae=tune_vae, mask=mask)[0]


@public_task
def appearance_transfer(structure: ImageInput, appearance: ImageInput | Sequence[ImageInput], *,
                        model: DiffusionModel | str | None = None, steps: int | None = None,
                        iters: int | None = None, lr: float | None = None, content_weight: float | None = None,
                        attention_scale: float | None = None, layers: str | Sequence[int] | None = None,
                        size: Size = None, seed: int = 0, vae: str | None = None, device: str | None = None,
                        dtype: str | None = None, fused: bool | None = None, progress: bool = True,
                        callback: Callback | None = None, tile: str | None = None,
                        tune_vae: bool = False, reference_fit: str | None = None,
                        mask: ImageInput | None = None) -> Image.Image:
    """Give ``structure`` the appearance (colours, materials) of ``appearance``; content weight 0.2.

    ``mask``: white where to change the appearance, as in :func:`style_transfer`."""
    preset = get_preset("appearance").override(steps=steps, iters=iters, lr=lr, content_weight=content_weight,
                                               attention_scale=attention_scale, reference_fit=reference_fit)
    refs = as_list(appearance)
    return _optimise_task(
        "appearance", target=load_image(structure, what="structure image"), references=refs,
        ref_what="appearance image", model=model, size=size, num=1, seed=seed, layers=layers, preset=preset,
        inputs={"structure": describe_input(structure), "appearance": [describe_input(r) for r in refs],
                **_mask_input(mask)},
        fused=fused, progress=progress, callback=callback, vae=vae, device=device, dtype=dtype, tile=tile,
        tune_vae=tune_vae, mask=mask)[0]


@public_task
def texture_synthesis(reference: ImageInput | Sequence[ImageInput], *, num: int = 1,
                      model: DiffusionModel | str | None = None, steps: int | None = None,
                      iters: int | None = None, lr: float | None = None, attention_scale: float | None = None,
                      layers: str | Sequence[int] | None = None, size: Size = None, seed: int = 0,
                      vae: str | None = None, device: str | None = None, dtype: str | None = None,
                      fused: bool | None = None, progress: bool = True, callback: Callback | None = None,
                      tile: str | None = None, tune_vae: bool = False,
                      reference_fit: str | None = None) -> list[Image.Image]:
    """Synthesise ``num`` new textures like ``reference`` from random latents, optimised in one batch.

    ``size`` is an int (square side) or (width, height); default the model's native size. Returns a list.
    """
    seed, num, _ = check_run(seed=seed, callback=callback, num=num, fused=fused, progress=progress)
    preset = get_preset("texture").override(steps=steps, iters=iters, lr=lr, attention_scale=attention_scale,
                                            reference_fit=reference_fit)
    refs = as_list(reference)
    return _optimise_task(
        "texture", target=None, references=refs, ref_what="texture image", model=model, size=size, num=num,
        seed=seed, layers=layers, preset=preset, inputs={"reference": [describe_input(r) for r in refs], "num": num},
        fused=fused, progress=progress, callback=callback, vae=vae, device=device, dtype=dtype, tile=tile,
        tune_vae=tune_vae)


@public_task
def style_transfer_batch(contents: Sequence[ImageInput], style: ImageInput | Sequence[ImageInput], *,
                         model: DiffusionModel | str | None = None, steps: int | None = None,
                         iters: int | None = None, lr: float | None = None, content_weight: float | None = None,
                         attention_scale: float | None = None, layers: str | Sequence[int] | None = None,
                         size: Size = None, seed: int = 0, vae: str | None = None, device: str | None = None,
                         dtype: str | None = None, progress: bool = True, callback: Callback | None = None,
                         tile: str | None = None, tune_vae: bool = False, reference_fit: str | None = None,
                         masks: Sequence[ImageInput | None] | None = None) -> list[Image.Image]:
    """Style transfer of several contents with one style, optimised together in one batch.

    Each target gets the gradient it would get alone, so results match one-by-one runs up to
    rounding: a batched call sums in another order, and Adam's first step turns the sign of a
    near-zero gradient into a full step (on the CPU a pixel differs by at most 2/255 in the tests).
    The reference features are computed once per step for all of them. All contents are resized
    to the size of the first (or ``size``). ``masks``: one per content (None: restyle it whole), as
    ``mask`` of :func:`style_transfer`; the other options as there (``tune_vae`` tunes one decoder for
    the whole batch). Returns one image per content.
    """
    if isinstance(contents, str | os.PathLike | Image.Image):
        raise UserError("style_transfer_batch takes a list of content images; for one, use style_transfer")
    if not isinstance(contents, Iterable) or isinstance(contents, bytes | np.ndarray | torch.Tensor):
        raise UserError(f"style_transfer_batch takes a list of content images (paths or PIL images), not a "
                        f"{type(contents).__name__}")
    contents = list(contents)  # a generator would be spent by loading, and the results' parameters need them
    if not contents:
        raise UserError("style_transfer_batch needs at least one content image")
    preset = get_preset("style").override(steps=steps, iters=iters, lr=lr, content_weight=content_weight,
                                          attention_scale=attention_scale, reference_fit=reference_fit)
    styles = as_list(style)
    images = [load_image(c, what="content image") for c in contents]
    if masks is not None:
        if (isinstance(masks, str | os.PathLike | Image.Image | Mapping | set | frozenset)
                or not isinstance(masks, Iterable)):  # a dict's keys or a set's order would pair masks at random
            raise UserError("masks takes a list with one mask (or None) per content image, in the contents' order")
        masks = list(masks)
        if len(masks) != len(contents):
            raise UserError(f"masks has {len(masks)} {'entry' if len(masks) == 1 else 'entries'} for "
                            f"{len(contents)} content images; give one mask (or None) per content image")
    results = _optimise_task(
        "style", target=images, references=styles, ref_what="style image", model=model, size=size,
        num=len(images), seed=seed, layers=layers, preset=preset,
        inputs={"style": [describe_input(s) for s in styles]}, fused=None, progress=progress, callback=callback,
        vae=vae, device=device, dtype=dtype, tile=tile, tune_vae=tune_vae, mask=masks,
        target_names=[describe_input(c) for c in contents])
    batched = {"batched": len(contents)} if len(contents) > 1 else {}  # rerun alone: the same to rounding only
    for img, content, mask in zip(results, contents, masks or [None] * len(contents), strict=True):
        add_parameters(img, content=describe_input(content), **_mask_input(mask), **batched)
    return results
