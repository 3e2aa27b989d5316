"""What every task shares: option checks, sizes, reference latents, seeded noise, and the
parameters a result records (so any image can be rerun exactly)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import ParamSpec, TypeVar

import numpy as np
import torch
from PIL import Image

from ..checks import MAX_SEED, flag, non_negative, number, positive, whole
from ..core.engine import Distiller
from ..errors import CLI_WORDS, UserError, in_api_words
from ..fingerprints import KEY, fingerprints, inputs_as_read
from ..images import (
    ImageInput,
    check_size,
    drawn_over,
    fit_references,
    fit_size,
    load_image,
    params_json,
    round_to_multiple,
    to_pil,
)
from ..model.controlnet import park_kept_controlnet
from ..model.hub import hub_commits
from ..model.loading import local_or_hub
from ..model.models import DiffusionModel
from ..model.perf import pixel_switches
from ..model.tiling import check_axes
from ..presets import DEFAULT_REFERENCE_FIT, REFERENCE_FITS, Preset
from ..version import __version__

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger(__name__)

Size = int | tuple[int, int] | None


def describe_input(source: ImageInput) -> str:
    """How a result records an input: a file by its absolute path (a rerun works from any folder)."""
    return os.path.abspath(source) if isinstance(source, str | os.PathLike) else "<image>"


def as_list(x: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """One image or several: a list, a tuple or any other iterable of them, a generator too (not a mapping, an
    array or a path, which are one input each, so that the input's own check names them)."""
    single = isinstance(x, str | bytes | os.PathLike | Image.Image | np.ndarray | torch.Tensor | Mapping)
    return [x] if single or not isinstance(x, Iterable) else list(x)


#: The most images one run makes (they are held, and texture variations optimised, together).
MAX_IMAGES = 256


def check_run(*, seed: object, callback: object = None, num: object = 1, what: str = "num", fused: object = None,
              progress: object = False, tile: object = None, tune_vae: object = False) -> tuple[int, int, str | None]:
    """The options of a run that need no model, checked before one loads: returns (seed, num) as plain ints (a
    NumPy integer would reach torch's generators and the PNG's JSON, which refuse it) and the tiling axes."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise UserError(f"seed must be a whole number from 0 to {MAX_SEED} (got {seed!r})")
    if not 0 <= seed <= MAX_SEED:  # beyond it (or below 0) two seeds would give one image
        raise UserError(f"seed {seed} is out of range; a seed must be a whole number from 0 to {MAX_SEED}")
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
    flag("tune_vae", tune_vae)
    return int(seed), int(num), check_axes(tile)


def check_callback(callback: object) -> None:
    """A ``callback`` argument: None or something to call with a StepInfo."""
    if callback is not None and not callable(callback):
        raise UserError(f"callback must be a function taking a StepInfo (got a {type(callback).__name__})")


#: Most Adam iterations per step (as many as the most steps).
MAX_ITERS = 1000


def check_settings(preset: Preset) -> Preset:
    """Out-of-range numbers get a one-line error before any work starts; returns the preset with plain
    Python numbers (NumPy ones are welcome, but the PNG's JSON refuses them)."""
    numbers_ = {name: number(name.replace("_", " "), getattr(preset, name))
                for name in ("lr", "content_weight", "attention_scale", "guidance", "guidance_rescale")}
    wholes = {name: whole(name, getattr(preset, name)) for name in ("steps", "iters", "stride")}
    preset = replace(preset, **numbers_, **wholes, adain=flag("adain", preset.adain))
    check_reference_fit(preset.reference_fit)
    if preset.steps < 1:
        raise UserError(f"steps must be at least 1 (got {preset.steps})")
    if preset.iters < 0 or (preset.mode == "optimize" and preset.iters < 1):
        raise UserError(f"iters must be at least {1 if preset.mode == 'optimize' else 0} (got {preset.iters})")
    if preset.iters > MAX_ITERS:  # 1-3 in the paper; a run of more is a slip that would not end
        raise UserError(f"iters must be at most {MAX_ITERS} (got {preset.iters})")
    positive("lr", preset.lr)
    non_negative("content weight", preset.content_weight)
    positive("attention scale", preset.attention_scale)
    if preset.mode != "optimize" and preset.guidance < 1:
        raise UserError(f"guidance must be >= 1 (got {preset.guidance}); 1 turns classifier-free guidance off")
    if not 0 <= preset.guidance_rescale <= 1:
        raise UserError(f"guidance rescale must be between 0 (off) and 1 (got {preset.guidance_rescale}); 0.7 is "
                        "the usual value for zero-terminal-SNR models")
    return preset


#: How far rounding a long-side size to the UNet's multiples may change an image's aspect unsaid (768x401 at
#: 512 px becomes 512x256: 1.04 times).
ASPECT_KEPT = 1.5


def target_size(model: DiffusionModel, size: Size, like: Image.Image | None = None,
                like_name: str | None = None, *, warn: bool = True) -> tuple[int, int]:
    """(width, height) in pixels: explicit, or the long side of ``like`` (aspect kept), rounded for the UNet.

    With ``warn`` (the run's own call, not a check's), a size that rounding changes is said. With ``like_name``
    too, a (width, height) of another aspect than ``like`` is said in a warning naming it: the image is
    stretched to it. So is an aspect too extreme to keep once each side is a whole number of the UNet's multiples.
    """
    multiple = model.latent_multiple
    size = check_size(size)
    if size is None:
        size = model.native_size
    if isinstance(size, int):
        w = h = round_to_multiple(size, multiple)
        if like is not None:
            w, h = fit_size(like.size, size, multiple)
    else:
        w, h = (round_to_multiple(s, multiple) for s in size)
    if warn:
        warn_rounded(size, (w, h), multiple)
        native = model.native_size
        if 2 * w * h < native * native:  # SDXL at SD 1.5's 512² is the usual slip
            log.warning("size %dx%d is under half the area this model was trained at (%dx%d): Stable Diffusion's "
                        "images degrade well below it; a larger --size does better", w, h, native, native)
    if like is None or not like_name or not warn:
        return _checked_area(w, h)
    # a (width, height) that giving only the long side makes is no choice of the user's: a rerun of a recorded
    # size says what the run itself said, no more
    if isinstance(size, int) or (w, h) == fit_size(like.size, max(size), multiple):
        change = (like.size[0] / like.size[1]) / (w / h)
        if max(change, 1 / change) > ASPECT_KEPT:
            log.warning("%s is %dx%d, an aspect that %dx%d (sides in multiples of %d px) cannot keep: it is "
                        "stretched %.1f times; crop it, or give a larger --size", like_name, *like.size, w, h,
                        multiple, max(change, 1 / change))
    elif not drawn_over(size, like.size):
        log.warning("%s is %dx%d but the size asked for is %dx%d, another aspect: it is stretched to it (give "
                    "only the long side to keep its aspect)", like_name, *like.size, *size)
    return _checked_area(w, h)


#: Longest canvas side any task takes: a 4096² canvas took 74 s per step on an H200 (expand,
#: benchmarks/RESULTS.md), so 16384² would take about 20 minutes per step.
MAX_CANVAS_SIDE = 16384


def warn_rounded(asked: int | tuple[int, int], made: tuple[int, int], multiple: int) -> None:
    """Say a size that the model's multiples change (``asked``: a long side or a (width, height)): the result's
    size is not the one asked for, which only the last line of a run showed."""
    if isinstance(asked, int):
        changed, shown = max(made) != asked, str(asked)
    else:
        changed, shown = tuple(made) != tuple(asked), "{}x{}".format(*asked)
    if changed:
        log.warning("size %s is rounded to %dx%d: sides are whole multiples of %d px for this model", shown, *made,
                    multiple)


def _checked_area(w: int, h: int) -> tuple[int, int]:
    if w * h > 4096 * 4096:
        raise UserError(f"size {w}x{h} is too large for one canvas; use 'attndistill expand' for huge textures")
    if max(w, h) > MAX_CANVAS_SIDE:  # within the area, a strip of hours: 1x99999 ran 4 minutes on a tiny model
        raise UserError(f"size {w}x{h} is over {MAX_CANVAS_SIDE} px on a side; give at most {MAX_CANVAS_SIDE} px "
                        "a side")
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


#: A task's decorator: it runs outside ``torch.inference_mode``. AD differentiates the latents, which inference
#: mode forbids even where a run turns grad mode back on (a server may wrap every call in it); ``no_grad`` is fine.
#: torch's own decorator, as ``load_model`` takes it: it keeps the task's signature (batch and web UI read it).
with_gradients = torch.inference_mode(False)

#: The running task's exit stack (:func:`public_task`), where :func:`held` leaves the model's lock until it returns.
_RUN: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar("attndistill_run", default=None)


def public_task(fn: Callable[P, R]) -> Callable[P, R]:
    """A public task's decorator: it runs outside ``torch.inference_mode`` (:data:`with_gradients`), the model it
    takes through :func:`held` is its own until it returns, and its errors name its keyword arguments where they
    name a command-line option (``--lr`` -> ``lr=``) unless a front end speaking in options runs it."""

    parameters = inspect.signature(fn).parameters
    flags = frozenset(name for name, p in parameters.items() if isinstance(p.default, bool))

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with contextlib.ExitStack() as stack:
            stack.enter_context(inputs_as_read())  # its result's fingerprints: its inputs as it read them
            token = _RUN.set(stack)
            try:
                return fn(*args, **kwargs)
            except UserError as exc:  # said in the words of its reader: a Python caller passes keyword arguments
                if not CLI_WORDS.get() and exc.args and isinstance(exc.args[0], str):
                    exc.args = (in_api_words(exc.args[0], parameters, flags), *exc.args[1:])
                raise
            finally:
                _RUN.reset(token)

    return with_gradients(run)


def held(model: DiffusionModel) -> DiffusionModel:
    """``model``, the running task's alone until it returns. A run puts its own attention processors, convolution
    padding (``tile``) and VAE (``tune_vae``) on the model, which another thread's run at the same time would take
    for the model's own: two such runs both failed, and the model kept their processors. That run waits."""
    stack = _RUN.get()
    if stack is not None:
        if model.lock.acquire(blocking=False):  # only to know whether to say it waits
            model.lock.release()
        else:
            log.info("waiting for another thread's run on the same model to finish")
        stack.enter_context(model.lock)  # released where it was taken, in this thread, when the task returns
        stack.callback(park_kept_controlnet, model)  # a ControlNet kept for later runs leaves the GPU's memory
    return model


def run_distiller(model: DiffusionModel, preset: Preset, layers: Sequence[int], *,
                  condition_size: tuple[int, int], fused: bool | None, **masks: torch.Tensor | None) -> Distiller:
    """The run's Distiller, weighted as the preset says. ``condition_size`` (h, w) px: the null conditioning's
    size (SDXL's add_time_ids, ALGORITHM.md §1); ``masks``: ``update_mask`` or the label maps. Nothing in a run
    draws from torch's global random state (its noise comes from generators of the seed), which it leaves as
    the caller had it."""
    return Distiller(model, layers=layers, attention_scale=preset.attention_scale,
                     content_weight=preset.content_weight, fused=fused, condition_size=condition_size, **masks)


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
_UNUSED = {"optimize": ("guidance", "guidance_rescale", "adain", "stride"), "sample": ("stride",),
           "multidiffusion": ("guidance_rescale",)}


def run_parameters(task: str, model: DiffusionModel, preset: Preset, layers: Sequence[int], size: tuple[int, int],
                   seed: int, *, fused: bool | None = None, **inputs: object) -> dict:
    """What a result records: enough to rerun it exactly, pixel-changing speed switches included."""
    settings = {k: v for k, v in asdict(preset).items() if k not in ("task", *_UNUSED[preset.mode])}
    switches = pixel_switches(model.perf) if hasattr(model, "perf") else {}
    extra = ({"fused": fused} if fused is not None else {}) | ({"perf": switches} if switches else {})
    params = {"task": task, "version": __version__, **model_parameters(model), "layers": list(layers),
              "size": list(size), "seed": seed, **settings, **extra, **inputs}
    return with_provenance(params, model)


def with_provenance(params: dict, model: DiffusionModel) -> dict:
    """A record (a result's, a tuned VAE's) with its input files' digests, so that info can tell when one changed
    under its name, and where it was made."""
    digests = fingerprints(params)
    if "vae" in digests and params.get("vae") == model.vae_source and getattr(model, "vae_digest", None):
        digests["vae"] = model.vae_digest  # the folder as loaded, not as it is now (tuned again since)
    made = made_with(model)
    commits = {**model.hub_commits, **hub_commits({"controlnet": params.get("controlnet")})}
    if commits:  # the Hub snapshots loaded: a repository may change under its name
        made["hub_commits"] = commits
    return params | ({KEY: digests} if digests else {}) | {"made_with": made}


def model_parameters(model: DiffusionModel) -> dict[str, str]:
    """The model a result (or a tuned VAE) was made with, as a rerun loads it: its source, a swapped-in VAE,
    a single-file checkpoint's configs, the dtype, and whether pickle files were allowed."""
    swapped = {k: local_or_hub(v) for k, v in (("vae", model.vae_source), ("config", model.config_source))
               if v is not None}
    pickle = {"allow_pickle": True} if getattr(model, "allow_pickle", False) else {}
    return {"model": local_or_hub(model.source), **swapped, "dtype": str(model.dtype).removeprefix("torch."),
            **pickle}


def made_with(model: DiffusionModel) -> dict[str, str]:
    """Where a result was made: bf16 GPU kernels differ between cards and library versions, and CPU sums between
    thread counts (1/255 seen between 1 and 2 threads); none of them is an option."""
    import diffusers

    device = torch.device(getattr(model, "device", "cpu"))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    threads = {"threads": torch.get_num_threads()} if device.type == "cpu" else {}
    return {"device": card, **threads, "torch": torch.__version__, "diffusers": diffusers.__version__}
