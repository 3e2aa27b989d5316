"""Public sampling tasks: style-specific text-to-image, texture sampling, SDEdit layouts.

Thin wrappers over :func:`attndistill.core.sampling.sample`, shaped like
:mod:`attndistill.tasks.transfer`: inputs first, keyword-only options whose ``None``
means "the preset's value" ("t2i" for SD 1.5, "t2i-sdxl" for SDXL,
"texture-sample" for textures), results as PIL images carrying their
parameters in ``info["parameters"]``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..checks import number
from ..core.engine import parse_layers
from ..core.progress import Callback
from ..core.sampling import prompt_conditioning, sample, sdedit_start
from ..errors import UserError
from ..images import BLACK, ImageInput, load_image, to_tensor
from ..model.controlnet import Control, check_control, prepare_control
from ..model.hub import cached_commit
from ..model.loading import as_model, local_or_hub
from ..model.models import DiffusionModel
from ..model.tiling import seamless
from ..presets import LAYOUT_STRENGTH, Preset, get_preset
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
    target_size,
)
from .vae_tuning import tuned_vae

if TYPE_CHECKING:
    from diffusers import ControlNetModel

log = logging.getLogger(__name__)


@dataclass
class _Job:
    """Everything one sampling run needs besides the model and the preset."""

    task: str
    references: list[ImageInput]
    ref_what: str
    prompt: str = ""
    negative_prompt: str | None = None
    num: int = 1
    like: Image.Image | None = None  # the image whose aspect sets the output size (control, content, layout)
    like_name: str | None = None  # how messages name it
    content: Image.Image | None = None
    content_name: str | None = None  # how messages name the content image
    layout: Image.Image | None = None
    strength: float = 1.0
    start_t: int | None = None
    control: tuple | None = None  # (controlnet, image, preprocess, scale)
    tile: str | None = None  # seamless axes of the UNet, a ControlNet and the decoder
    tune_vae: bool = False  # decode with a decoder fitted to the references (VAE*)


def warn_other_aspect(image: Image.Image, name: str, like: Image.Image, like_name: str | None,
                      size: tuple[int, int]) -> None:
    """Say that ``image`` (a content image beside a control image, which sets the size) is stretched to ``size``,
    where its aspect is not ``like``'s: the result's layout then does not follow it where one expects."""
    change = (image.width / image.height) / (like.width / like.height)
    if max(change, 1 / change) > 1.02:  # more than rounding to whole pixels
        log.warning("%s is %dx%d, another aspect than the %s (%dx%d) that sets the size: it is stretched to "
                    "%dx%d; crop it to that aspect", name, *image.size, like_name or "image", *like.size, *size)


def check_sampling(preset: Preset, start_t: int | None, model: DiffusionModel) -> Preset:
    """A sampling run's settings and start timestep, checked; returns the preset with plain numbers."""
    preset = check_settings(preset)
    total = model.scheduler_config.num_train_timesteps
    if start_t is not None and not 0 < number("start-t", start_t) <= total:  # a threshold: 600.5 is fine
        raise UserError(f"start-t must be in 1..{total} (got {start_t}); AD runs at steps with a timestep below it")
    if start_t is not None and (preset.iters > 0 or preset.adain) and hasattr(model, "ddim_scheduler"):
        last = int(model.ddim_scheduler(preset.steps).timesteps[-1])  # the smallest; batch checks lack a scheduler
        if start_t <= last:
            raise UserError(f"start-t {start_t} leaves no step for AD, which runs at steps with a timestep below it: "
                            f"the last of {preset.steps} steps has timestep {last}; raise --start-t above {last}")
    return preset


def _run(job: _Job, *, model: DiffusionModel, preset: Preset, layers: str | Sequence[int] | None, size: Size,
         seed: int, inputs: dict, allow_pickle: bool, fused: bool | None, progress: bool,
         callback: Callback | None) -> list[Image.Image]:
    """A sampling task's run, its model-free options checked by :func:`check_run`."""
    preset = check_sampling(preset, job.start_t, model)
    tile = job.tile  # its axes as check_run returned them
    layer_ids = parse_layers(layers, model)
    w, h = target_size(model, size, like=job.like, like_name=job.like_name)
    if job.content is not None and job.like is not None and job.like is not job.content:
        warn_other_aspect(job.content, job.content_name or "content image", job.like, job.like_name, (w, h))
    control: Control | None = None
    if job.control is not None:
        net, image, preprocess, scale = job.control
        control = prepare_control(net, image, model=model, size=(w, h), preprocess=preprocess, scale=scale,
                                  allow_pickle=allow_pickle)
    z_ref = encode_references(model, job.references, job.ref_what, preset.reference_fit)
    cond, uncond = prompt_conditioning(model, job.prompt, job.negative_prompt, guidance=preset.guidance,
                                       size=(h, w))
    scheduler = model.ddim_scheduler(preset.steps)
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (job.num, model.unet.config.in_channels, h // model.vae_scale_factor, w // model.vae_scale_factor)
    noise = torch.randn(shape, generator=generator)  # CPU generator: a seed gives the same start on every device
    z_content, start_step = None, 0
    if job.layout is not None:
        z_content = model.encode(to_tensor(job.layout, (w, h)))
        latents, start_step = sdedit_start(model, z_content.expand(job.num, -1, -1, -1), noise, steps=preset.steps,
                                           strength=job.strength)
    else:
        latents = noise * scheduler.init_noise_sigma
        if job.content is not None:
            z_content = model.encode(to_tensor(job.content, (w, h)))
    distiller = run_distiller(model, preset, layer_ids, condition_size=(h, w), fused=fused)
    # tiling: a circular UNet, and ControlNet, whose residuals join it (the encoder's inputs are not periodic)
    with seamless(model, tile, parts=("unet",)), seamless([control.net] if control else [], tile):
        z = sample(distiller, latents, z_ref, cond=cond, uncond=uncond, guidance=preset.guidance,
                   guidance_rescale=preset.guidance_rescale,
                   steps=preset.steps, iters=preset.iters, lr=preset.lr, adain=preset.adain, start_t=job.start_t,
                   content_latents=z_content, control=control, start_step=start_step, generator=generator,
                   callback=callback, progress=progress, desc=job.task)
    params = run_parameters(job.task, model, preset, layer_ids, (w, h), seed, start_t=job.start_t, fused=fused,
                            **inputs)
    # tune_vae: decoded by a decoder fitted to the references (ALGORITHM.md §5), circular when tiling
    with (tuned_vae(model, job.references if job.tune_vae else None, reference_fit=preset.reference_fit,
                    progress=progress, callback=callback),
          seamless(model, tile, parts=("decoder",))):
        return finish(model, z, params)


def check_prompt(prompt: object) -> None:
    """A prompt is one string with words in it (checked before any model work, also by batch runs and the page)."""
    if not isinstance(prompt, str):
        raise UserError("prompt must be one string")
    if not prompt.strip():  # as the web UI and jobs files have it: a result that batch runs can rerun
        raise UserError("prompt is empty; describe the image to generate ('attndistill texture --mode sample' "
                        "generates from the style image alone)")


def check_t2i_options(*, controlnet: str | os.PathLike | ControlNetModel | None, control_image: ImageInput | None,
                      control: str, control_scale: float, content: ImageInput | None,
                      content_weight: float | None) -> None:
    """:func:`text_to_image`'s options that go together, checked before any model work (also by batch runs)."""
    if controlnet is not None and not isinstance(controlnet, str | os.PathLike) \
            and not type(controlnet).__name__.startswith("ControlNet"):
        raise UserError(f"controlnet must be a folder, a Hub id or a loaded ControlNetModel, not a "
                        f"{type(controlnet).__name__}")
    if (controlnet is None) != (control_image is None):
        raise UserError("ControlNet needs both --controlnet and --control-image" if controlnet is None
                        else "--controlnet needs a --control-image (a photo with --control canny, or a ready map)")
    scale = check_control(control, control_scale)
    if control != "none" and controlnet is None:  # else the preprocessing would be dropped without a word
        raise UserError(f"preprocessing '{control}' prepares a control image for a ControlNet; add --controlnet "
                        "and --control-image, or set --control none")
    if scale != 1.0 and controlnet is None:  # as the preprocessing: never dropped without a word
        raise UserError(f"control scale {scale:g} scales a ControlNet's residuals; add --controlnet and "
                        "--control-image, or drop --control-scale")
    if content_weight is not None:
        number("content weight", content_weight)
    if content is None and content_weight:
        raise UserError("--content-weight needs a --content image to compare with; add one or drop the weight")
    weight = content_weight if content_weight is not None else get_preset("t2i").content_weight  # 0 for SDXL too
    if content is not None and not weight > 0:
        raise UserError("a content image needs a positive --content-weight (the text-to-image preset has 0), "
                        f"e.g. --content-weight {get_preset('style').content_weight}")


@public_task
def text_to_image(prompt: str, style: ImageInput | Sequence[ImageInput], *, negative_prompt: str | None = None,
                  num_images: int = 1, model: DiffusionModel | str | None = None, steps: int | None = None,
                  iters: int | None = None, lr: float | None = None, guidance: float | None = None,
                  guidance_rescale: float | None = None,
                  adain: bool | None = None, start_t: int | None = None, content: ImageInput | None = None,
                  content_weight: float | None = None, controlnet: str | os.PathLike | ControlNetModel | None = None,
                  control_image: ImageInput | None = None, control: str = "none", control_scale: float = 1.0,
                  attention_scale: float | None = None, layers: str | Sequence[int] | None = None, size: Size = None,
                  seed: int = 0,
                  vae: str | None = None, device: str | None = None, dtype: str | None = None,
                  allow_pickle: bool = False, fused: bool | None = None, progress: bool = True,
                  callback: Callback | None = None, reference_fit: str | None = None,
                  tune_vae: bool = False, tile: str | None = None) -> list[Image.Image]:
    """Generate ``num_images`` images of ``prompt`` in the style of ``style`` (one image or several).

    AD-guided DDIM sampling (Algorithm 2). Defaults come from the "t2i" preset for SD 1.5 (50 steps,
    3 iterations, lr 0.015, guidance 7.5, AdaIN) or "t2i-sdxl" for SDXL (2 iterations, guidance 7).
    ``controlnet`` (Hub id, folder or a loaded ``ControlNetModel``, which is moved to the model's device
    and dtype in place) with ``control_image`` conditions the layout; ``control="canny"`` turns a photo
    into its edge map first. ``content`` with a positive ``content_weight`` adds the content loss.
    ``iters=0`` guides by AdaIN alone; with ``adain=False`` too it is a plain DDIM generation.
    ``guidance_rescale`` (0 to 1, default 0: off) is diffusers' CFG rescale, for zero-terminal-SNR models
    (0.7 is usual there). ``tune_vae`` decodes with a decoder fine-tuned on the style images (VAE*,
    ALGORITHM.md §5). ``tile`` ("x", "y" or "xy") makes the result tile without a seam: a pattern (circular
    convolutions in the UNet, the decoder and a ControlNet, whose condition then wraps around too). Example::

        images = text_to_image("a deer", "watercolor-cat.jpg", model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    """
    check_prompt(prompt)
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise UserError("negative prompt must be one string")
    check_t2i_options(controlnet=controlnet, control_image=control_image, control=control,
                      control_scale=control_scale, content=content, content_weight=content_weight)
    seed, num_images, tile = check_run(seed=seed, callback=callback, num=num_images, what="number of images",
                                       fused=fused, progress=progress, tile=tile, tune_vae=tune_vae)
    model = held(as_model(model, vae=vae, device=device, dtype=dtype))
    preset = get_preset("t2i-sdxl" if model.kind == "sdxl" else "t2i").override(
        steps=steps, iters=iters, lr=lr, guidance=guidance, guidance_rescale=guidance_rescale, adain=adain,
        content_weight=content_weight, attention_scale=attention_scale, reference_fit=reference_fit)
    content_img = load_image(content, what="content image") if content is not None else None
    control_img = None if control_image is None else load_image(control_image, what="control image",
                                                                 background=BLACK)
    styles = as_list(style)
    content_name = f"content image '{describe_input(content)}'" if content_img is not None else None
    job = _Job("t2i", styles, "style image", prompt=prompt, negative_prompt=negative_prompt, num=num_images,
               like=control_img if control_img is not None else content_img, content=content_img, start_t=start_t,
               content_name=content_name,
               like_name=(f"control image '{describe_input(control_image)}'" if control_img is not None else
                          content_name),
               control=(controlnet, control_img, control, control_scale) if controlnet is not None else None,
               tile=tile, tune_vae=tune_vae)
    inputs = {"prompt": prompt, "negative_prompt": negative_prompt, "style": [describe_input(s) for s in styles],
              "num_images": num_images, "tile": tile, "tune_vae": tune_vae}
    if content is not None:
        inputs["content"] = describe_input(content)
    if controlnet is not None:
        inputs.update(controlnet=_controlnet_name(controlnet), control_image=describe_input(control_image),
                      control=control, control_scale=control_scale)
        if allow_pickle:  # the ControlNet's pickle files: a rerun needs the same permission
            inputs["allow_pickle"] = True
    return _run(job, model=model, preset=preset, layers=layers, size=size, seed=seed, inputs=inputs,
                allow_pickle=allow_pickle, fused=fused, progress=progress, callback=callback)


def _controlnet_name(controlnet) -> str:
    """How a result records its ControlNet: a path or Hub id that a rerun loads. A net passed as an object
    records where it was loaded from; one made in memory, or loaded by a relative path that the current folder
    no longer has, cannot be loaded again, and the caller hears so now rather than at the rerun."""
    if isinstance(controlnet, str | os.PathLike):
        return local_or_hub(controlnet)
    name = str(getattr(controlnet.config, "_name_or_path", "") or "")
    if os.path.exists(name) or cached_commit(name, "controlnet") is not None:  # a Hub net leaves its config cached
        return local_or_hub(name)
    log.warning("the ControlNet passed as an object was not loaded from a folder or Hub id that can be found "
                "from here (%s): the result records it, but info --job cannot rerun it; pass the ControlNet as a "
                "path or Hub id instead", repr(name) if name else "made in memory")
    return name or f"<{type(controlnet).__name__} made in memory>"


@public_task
def texture_sampling(reference: ImageInput | Sequence[ImageInput], *, num: int = 1,
                     model: DiffusionModel | str | None = None, steps: int | None = None, iters: int | None = None,
                     lr: float | None = None, guidance: float | None = None, guidance_rescale: float | None = None,
                     adain: bool | None = None, start_t: int | None = None, attention_scale: float | None = None,
                     layers: str | Sequence[int] | None = None, size: Size = None, seed: int = 0,
                     vae: str | None = None, device: str | None = None, dtype: str | None = None,
                     fused: bool | None = None, progress: bool = True, callback: Callback | None = None,
                     tile: str | None = None, tune_vae: bool = False,
                     reference_fit: str | None = None) -> list[Image.Image]:
    """Synthesise ``num`` textures like ``reference`` by AD-guided sampling from noise (empty prompt).

    Defaults from the "texture-sample" preset: 50 steps, 3 iterations, lr 0.05, guidance 1. ``tile``
    "x", "y" or "xy" makes the textures periodic; ``tune_vae`` decodes with VAE* (ALGORITHM.md §5).
    """
    preset = get_preset("texture-sample").override(steps=steps, iters=iters, lr=lr, guidance=guidance,
                                                   guidance_rescale=guidance_rescale, adain=adain,
                                                   attention_scale=attention_scale, reference_fit=reference_fit)
    seed, num, tile = check_run(seed=seed, callback=callback, num=num, what="number of images", fused=fused,
                                progress=progress, tile=tile, tune_vae=tune_vae)
    refs = as_list(reference)
    job = _Job("texture-sample", refs, "texture image", num=num, start_t=start_t, tile=tile, tune_vae=tune_vae)
    inputs = {"reference": [describe_input(r) for r in refs], "num": num, "tile": tile, "tune_vae": tune_vae}
    return _run(job, model=held(as_model(model, vae=vae, device=device, dtype=dtype)), preset=preset, layers=layers,
                size=size, seed=seed, inputs=inputs, allow_pickle=False, fused=fused, progress=progress,
                callback=callback)


@public_task
def layout_texture(reference: ImageInput | Sequence[ImageInput], layout: ImageInput, *,
                   strength: float = LAYOUT_STRENGTH, num: int = 1, model: DiffusionModel | str | None = None,
                   steps: int | None = None,
                   iters: int | None = None, lr: float | None = None, content_weight: float | None = None,
                   guidance: float | None = None, guidance_rescale: float | None = None, adain: bool | None = None,
                   start_t: int | None = None, attention_scale: float | None = None,
                   layers: str | Sequence[int] | None = None, size: Size = None, seed: int = 0,
                   vae: str | None = None, device: str | None = None, dtype: str | None = None,
                   fused: bool | None = None, progress: bool = True, callback: Callback | None = None,
                   tile: str | None = None, tune_vae: bool = False,
                   reference_fit: str | None = None) -> list[Image.Image]:
    """Texture of ``reference`` laid out like the colour ``layout`` image (SDEdit, ALGORITHM.md §4).

    The layout is encoded, noised to the step that ``strength`` in (0, 1] starts from (1: pure noise),
    sampled from there with AD, and is the content image of the content loss (``content_weight``,
    default the "texture-sample" preset's). The output keeps the layout's aspect. ``tile`` and
    ``tune_vae`` as in :func:`texture_sampling`.
    """
    preset = get_preset("texture-sample").override(steps=steps, iters=iters, lr=lr, guidance=guidance,
                                                   guidance_rescale=guidance_rescale, adain=adain,
                                                   content_weight=content_weight,
                                                   attention_scale=attention_scale, reference_fit=reference_fit,
                                                   init="layout")  # the noised layout (SDEdit), not noise
    seed, num, tile = check_run(seed=seed, callback=callback, num=num, what="number of images", fused=fused,
                                progress=progress, tile=tile, tune_vae=tune_vae)
    refs = as_list(reference)
    layout_img = load_image(layout, what="layout image")
    job = _Job("texture-layout", refs, "texture image", num=num, like=layout_img, layout=layout_img,
               like_name=f"layout image '{describe_input(layout)}'", strength=strength, start_t=start_t, tile=tile,
               tune_vae=tune_vae)
    inputs = {"reference": [describe_input(r) for r in refs], "layout": describe_input(layout), "strength": strength,
              "num": num, "tile": tile, "tune_vae": tune_vae}
    return _run(job, model=held(as_model(model, vae=vae, device=device, dtype=dtype)), preset=preset, layers=layers,
                size=size, seed=seed, inputs=inputs, allow_pickle=False, fused=fused, progress=progress,
                callback=callback)

