"""Public task functions: thin wrappers that prepare latents and call the engine.

Every task has the same shape: inputs first, then keyword-only options whose
``None`` means "the preset's value" (:mod:`attndistill.presets`). Results are
PIL images whose ``info["parameters"]`` holds everything needed to reproduce
them; :func:`attndistill.images.save_png` embeds it in the PNG.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, replace

import numpy as np
import torch
from PIL import Image

from . import __version__
from .checks import flag, number, whole
from .engine import Distiller, parse_layers
from .errors import UserError
from .images import (
    ImageInput,
    add_parameters,
    check_size,
    drawn_over,
    fit_references,
    fit_size,
    load_image,
    params_json,
    round_to_multiple,
    to_pil,
    to_tensor,
)
from .loading import as_model, local_or_hub
from .models import DiffusionModel
from .optimize import Callback, optimize_latents
from .perf import pixel_switches
from .presets import DEFAULT_REFERENCE_FIT, REFERENCE_FITS, Preset, get_preset
from .regions import load_mask, paste_region, update_mask
from .tiling import check_axes, seamless
from .vae_tuning import tuned_vae

log = logging.getLogger(__name__)

Size = int | tuple[int, int] | None


def describe_input(source: ImageInput) -> str:
    """How a result records an input: a file by its absolute path (a rerun works from any folder)."""
    return os.path.abspath(source) if isinstance(source, str | os.PathLike) else "<image>"


def _mask_input(mask: ImageInput | None) -> dict:
    """A result records its mask only when it had one."""
    return {} if mask is None else {"mask": describe_input(mask)}


def as_list(x: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    return list(x) if isinstance(x, list | tuple) else [x]


#: The most images one run makes (they are held, and texture variations optimised, together).
MAX_IMAGES = 256


def check_run(*, seed: object, callback: object = None, num: object = 1, what: str = "num", fused: object = None,
              progress: object = False) -> tuple[int, int]:
    """The seed, callback and image count of a run, checked before any work; returns (seed, num) as plain ints
    (a NumPy integer would reach torch's generators and the PNG's JSON, which refuse it)."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise UserError(f"seed must be a whole number from 0 to {2**64 - 1} (got {seed!r})")
    if not 0 <= seed < 2**64:  # torch takes -2^63 too, but as 2^64 + seed: two seeds, one image
        raise UserError(f"seed {seed} is out of range; a seed must be a whole number from 0 to {2**64 - 1}")
    check_callback(callback)
    if not isinstance(num, numbers.Integral) or isinstance(num, bool) or num < 1:
        raise UserError(f"{what} must be a whole number of at least 1 (got {num!r})")
    if num > MAX_IMAGES:  # a typo's million images would fill the host's memory before any message could
        raise UserError(f"{what} {num} is more than one run makes (at most {MAX_IMAGES}); for more, run several "
                        "jobs, e.g. lines of a batch file with other seeds")
    if fused is not None:
        flag("fused", fused)
    if isinstance(progress, str):  # any truthy value shows the bar, but progress="no" would too
        raise UserError(f"progress must be True or False (got {progress!r})")
    return int(seed), int(num)


def check_callback(callback: object) -> None:
    """A ``callback`` argument: None or something to call with a StepInfo."""
    if callback is not None and not callable(callback):
        raise UserError(f"callback must be a function taking a StepInfo (got a {type(callback).__name__})")


def check_settings(preset: Preset) -> Preset:
    """Out-of-range numbers get a one-line error before any work starts; returns the preset with plain
    Python numbers (NumPy ones are welcome, but the PNG's JSON refuses them)."""
    numbers_ = {name: number(name.replace("_", " "), getattr(preset, name))
                for name in ("lr", "content_weight", "attention_scale", "guidance")}
    wholes = {name: whole(name, getattr(preset, name)) for name in ("steps", "iters", "stride")}
    preset = replace(preset, **numbers_, **wholes, adain=flag("adain", preset.adain))
    check_reference_fit(preset.reference_fit)
    if preset.steps < 1:
        raise UserError(f"steps must be at least 1 (got {preset.steps})")
    if preset.iters < 0 or (preset.mode == "optimize" and preset.iters < 1):
        raise UserError(f"iters must be at least {1 if preset.mode == 'optimize' else 0} (got {preset.iters})")
    if not preset.lr > 0:
        raise UserError(f"lr must be positive (got {preset.lr})")
    if preset.content_weight < 0:
        raise UserError(f"content weight must be >= 0 (got {preset.content_weight})")
    if not preset.attention_scale > 0:
        raise UserError(f"attention scale must be positive (got {preset.attention_scale})")
    if preset.mode != "optimize" and preset.guidance < 1:
        raise UserError(f"guidance must be >= 1 (got {preset.guidance}); 1 turns classifier-free guidance off")
    return preset


def target_size(model: DiffusionModel, size: Size, like: Image.Image | None = None,
                like_name: str | None = None) -> tuple[int, int]:
    """(width, height) in pixels: explicit, or the long side of ``like`` (aspect kept), rounded for the UNet.

    With ``like_name`` (the run's own call, not a check's), a (width, height) of another aspect than
    ``like`` is said in a warning naming it: the image is stretched to it.
    """
    multiple = model.latent_multiple
    size = check_size(size)
    if size is None:
        size = model.native_size
    if isinstance(size, int):
        if like is None:
            w = h = round_to_multiple(size, multiple)
        else:
            w, h = fit_size(like.size, size, multiple)
    else:
        if like is not None and like_name and not drawn_over(size, like.size):
            log.warning("%s is %dx%d but the size asked for is %dx%d, another aspect: it is stretched to it (give "
                        "only the long side to keep its aspect)", like_name, *like.size, *size)
        w, h = (round_to_multiple(s, multiple) for s in size)
    if w * h > 4096 * 4096:
        raise UserError(f"size {w}x{h} is too large for one canvas; use 'attndistill expand' for huge textures")
    return w, h


def encode_references(model: DiffusionModel, references: Sequence[ImageInput], what: str,
                      fit: str = DEFAULT_REFERENCE_FIT) -> torch.Tensor:
    """Reference images at about the model's native area, fitted by ``fit`` (REFERENCE_FITS) -> latents (R, 4, h, w)."""
    if not references:
        raise UserError(f"no {what} given; pass at least one")
    images = [load_image(r, what=what) for r in references]
    return model.encode(fit_references(images, check_reference_fit(fit), model.native_size, model.latent_multiple,
                                       names=[describe_input(r) for r in references], warn=True))


def check_reference_fit(fit: object) -> str:
    """One of REFERENCE_FITS, or a one-line error naming them."""
    if fit not in REFERENCE_FITS:
        raise UserError(f"reference fit must be one of {', '.join(REFERENCE_FITS)} (got {fit!r}): 'squash' "
                        "stretches each reference to the model's square, 'keep' keeps the first one's aspect")
    return fit


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian latents from a CPU generator, so a seed gives the same start on every device."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def finish(model: DiffusionModel, z: torch.Tensor, params: dict) -> list[Image.Image]:
    """Decode latents and attach the run's parameters to each image."""
    images = to_pil(model.decode(z))
    for i, img in enumerate(images):
        p = dict(params, index=i) if len(images) > 1 else params
        img.info["parameters"] = params_json(p)
    return images


#: Preset fields a mode has no use for: a result does not record settings that could not have changed it.
_UNUSED = {"optimize": ("guidance", "adain", "stride"), "sample": ("stride",), "multidiffusion": ()}


def run_parameters(task: str, model: DiffusionModel, preset: Preset, layers, size, seed, *,
                   fused: bool | None = None, **inputs) -> dict:
    """What a result records: enough to rerun it exactly, pixel-changing speed switches included."""
    settings = {k: v for k, v in asdict(preset).items() if k not in ("task", *_UNUSED[preset.mode])}
    switches = pixel_switches(model.perf) if hasattr(model, "perf") else {}
    extra = ({"fused": fused} if fused is not None else {}) | ({"perf": switches} if switches else {})
    return {"task": task, "version": __version__, **model_parameters(model), "layers": list(layers),
            "size": list(size), "seed": seed, **settings, **extra, **inputs, "made_with": made_with(model)}


def model_parameters(model: DiffusionModel) -> dict[str, str]:
    """The model a result (or a tuned VAE) was made with, as a rerun loads it: its source, a swapped-in VAE,
    a single-file checkpoint's configs, the dtype, and whether pickle files were allowed."""
    swapped = {k: local_or_hub(v) for k, v in (("vae", model.vae_source), ("config", model.config_source))
               if v is not None}
    pickle = {"allow_pickle": True} if getattr(model, "allow_pickle", False) else {}
    return {"model": local_or_hub(model.source), **swapped, "dtype": str(model.dtype).removeprefix("torch."),
            **pickle}


def made_with(model: DiffusionModel) -> dict[str, str]:
    """Where a result was made: bf16 GPU kernels differ between cards and library versions (not an option)."""
    import diffusers

    device = torch.device(getattr(model, "device", "cpu"))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"device": card, "torch": torch.__version__, "diffusers": diffusers.__version__}


def _optimise_task(task: str, *, target: Image.Image | list[Image.Image] | None, references: list[ImageInput],
                   ref_what: str,
                   model, size: Size, num: int, seed: int, layers, preset: Preset, inputs: dict,
                   fused: bool | None, progress: bool, callback: Callback | None, vae, device, dtype,
                   tile: str | None = None, tune_vae: bool = False,
                   mask: ImageInput | None | list[ImageInput | None] = None) -> list[Image.Image]:
    """The optimisation tasks' common run. ``target``: the content (or a list of contents, one target each,
    optimised in one batch); ``mask``: one over the content, or with a list of contents a list with one
    mask (or None) for each."""
    seed, num = check_run(seed=seed, callback=callback, num=num, fused=fused, progress=progress)
    preset = check_settings(preset)
    tile = check_axes(tile)
    flag("tune_vae", tune_vae)
    targets = target if isinstance(target, list) else None  # several contents: one target each, one batch
    # restyle a region only (regions.py): one mask, or one (or None) per content
    masks = mask if targets is not None and isinstance(mask, list) else [mask] * len(targets or [target])
    what = "structure image" if task == "appearance" else "content image"
    mask_images = [load_mask(m, t, tile=tile, what=what) for m, t in zip(masks, targets or [target], strict=True)]
    model = as_model(model, vae=vae, device=device, dtype=dtype)
    layer_ids = parse_layers(layers, model)
    name = inputs.get("content") or inputs.get("structure")  # a batch's first content has no name here
    w, h = target_size(model, size, like=targets[0] if targets else target,
                       like_name=f"{what} '{name}'" if name else f"the first {what}")
    # the latent cells a mask lets change, known before any encoding work (batch dry-runs check it too)
    region = _update_region(mask_images, masks, (w, h), model.vae_scale_factor)
    z_ref = encode_references(model, references, ref_what, preset.reference_fit)
    z_content = None
    if target is not None:
        z_content = model.encode(to_tensor(targets or target, (w, h)))
        init = z_content if targets else z_content.expand(num, -1, -1, -1)
    else:
        init = seeded_noise((num, 4, h // model.vae_scale_factor, w // model.vae_scale_factor), seed)
    torch.manual_seed(seed)
    # features with the null conditioning of the output size (SDXL's add_time_ids, ALGORITHM.md §1)
    distiller = Distiller(model, layers=layer_ids, attention_scale=preset.attention_scale,
                          content_weight=preset.content_weight, fused=fused, condition_size=(h, w),
                          update_mask=region)
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
    (:mod:`attndistill.regions`). Example::

        out = style_transfer("horse.jpg", "watercolor-cat.jpg", model="stable-diffusion-v1-5/stable-diffusion-v1-5")
        out.save("horse-watercolor.png")
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
    seed, num = check_run(seed=seed, callback=callback, num=num, fused=fused, progress=progress)
    preset = get_preset("texture").override(steps=steps, iters=iters, lr=lr, attention_scale=attention_scale,
                                            reference_fit=reference_fit)
    refs = as_list(reference)
    return _optimise_task(
        "texture", target=None, references=refs, ref_what="texture image", model=model, size=size, num=num,
        seed=seed, layers=layers, preset=preset, inputs={"reference": [describe_input(r) for r in refs], "num": num},
        fused=fused, progress=progress, callback=callback, vae=vae, device=device, dtype=dtype, tile=tile,
        tune_vae=tune_vae)


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
        vae=vae, device=device, dtype=dtype, tile=tile, tune_vae=tune_vae, mask=masks)
    for img, content, mask in zip(results, contents, masks or [None] * len(contents), strict=True):
        add_parameters(img, content=describe_input(content), **_mask_input(mask))
    return results
