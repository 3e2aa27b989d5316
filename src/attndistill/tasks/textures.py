"""Texture tasks beyond plain synthesis: expansion to any size, masked synthesis, options for any texture task.

Same conventions as :mod:`attndistill.tasks.transfer`: inputs first, keyword-only
options whose ``None`` means "the preset's value", PIL results carrying their
parameters in ``info["parameters"]``::

    big = expand_texture("wood.jpg", size=(1536, 512), model=model)
    out = masked_texture_synthesis("tiles.jpg", "tiles-labels.png", "layout-labels.png", model=model)
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..checks import flag, whole
from ..core.engine import parse_layers
from ..core.losses import resize_labels
from ..core.multidiffusion import decode_tiled, multidiffusion
from ..core.optimize import optimize_latents
from ..core.progress import Callback
from ..errors import UnmatchedLabels, UserError
from ..images import (
    ImageInput,
    add_parameters,
    check_size,
    drawn_over,
    load_image,
    params_json,
    reference_boxes,
    round_to_multiple,
    to_pil,
    to_tensor,
)
from ..model.loading import as_model
from ..model.models import DiffusionModel
from ..model.tiling import check_axes, seamless
from ..presets import DECODE_OVERLAP, DECODE_TILE, VIEW, VIEW_BATCH, Preset, get_preset
from .setup import (
    MAX_CANVAS_SIDE,
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
    warn_rounded,
)
from .vae_tuning import tuned_vae

log = logging.getLogger(__name__)

#: A label map with more colours than this, most of them with no flat area (lines and specks), is a smoothed map
#: (drawn with anti-aliasing, resized with interpolation, saved as JPEG), not a flat-colour one.
SMOOTHED_COLOURS = 32
#: Most labels (flat regions of distinct colours) a label map may have: a segmentation's classes fit, a photo does not.
MAX_LABELS = 256


# -- texture expansion (MultiDiffusion) -------------------------------------------------------------

def check_expansion(preset: Preset, size: int | tuple[int, int], *, view: int = VIEW, view_batch: int = VIEW_BATCH,
                    decode_tile: int = DECODE_TILE) -> Preset:
    """Settings of an expansion that can be refused before the model loads; returns the preset with plain
    numbers (:func:`~attndistill.tasks.setup.check_settings`)."""
    preset = check_settings(preset)
    if whole("view", view) < 1:
        raise UserError(f"view must be at least 1 latent (got {view})")
    if preset.stride < 1:
        raise UserError(f"stride must be at least 1 latent (got {preset.stride})")
    if preset.stride > view:
        raise UserError(f"stride {preset.stride} is larger than the view ({view} latents), which leaves gaps "
                        f"between views; use a stride of at most {view}")
    if whole("view batch", view_batch) < 1:
        raise UserError(f"view batch must be at least 1 (got {view_batch})")
    if whole("decode tile", decode_tile) < 8:
        raise UserError(f"decode tile must be at least 8 latents (got {decode_tile})")
    size = check_size(size)
    if size is None:
        raise UserError("expand needs a size: the canvas's (width, height) in pixels, or one number for a square")
    w, h = (size, size) if isinstance(size, int) else size
    if max(round_to_multiple(w, 8), round_to_multiple(h, 8)) > MAX_CANVAS_SIDE:  # as the canvas rounds it (latents)
        raise UserError(f"size {w}x{h} is over {MAX_CANVAS_SIDE} px on a side; expand to at most "
                        f"{MAX_CANVAS_SIDE}x{MAX_CANVAS_SIDE} and upscale, or tile a smaller texture with --tile xy")
    return preset


def canvas_size(model: DiffusionModel, size: int | tuple[int, int], view: int, *, warn: bool = True
                ) -> tuple[int, int]:
    """(width, height) in pixels, rounded to whole latents, at least one view on each side; ``warn`` (the run's
    own call, not a check's): a size that rounding changes is said."""
    f = model.vae_scale_factor
    size = check_size(size)
    w, h = (size, size) if isinstance(size, int) else size
    w, h = round_to_multiple(w, f), round_to_multiple(h, f)
    if warn:
        warn_rounded(size, (w, h), f)
    unit = model.latent_multiple // f
    if view < unit or view % unit:
        near = sorted({max(unit, view // unit * unit), (view // unit + 1) * unit})
        raise UserError(f"--view {view} must be a multiple of {unit} latents for this UNet; use "
                        f"{' or '.join(map(str, near))}")
    if min(w, h) < view * f:
        fits = min(w, h) // f // unit * unit  # the largest view the short side takes
        smaller = f", a --view of at most {fits} latents ({fits * f} px)" if fits >= unit else ""
        raise UserError(f"size {w}x{h} is smaller than one view ({view * f} px); use a larger --size{smaller}, or "
                        "'attndistill texture' for small textures")
    return w, h


@public_task
def expand_texture(reference: ImageInput | Sequence[ImageInput], *, size: int | tuple[int, int],
                   model: DiffusionModel | str | None = None, steps: int | None = None, iters: int | None = None,
                   lr: float | None = None, attention_scale: float | None = None,
                   layers: str | Sequence[int] | None = None, stride: int | None = None, view: int = VIEW,
                   view_batch: int = VIEW_BATCH, tile: str | None = None, decode_tile: int = DECODE_TILE,
                   tune_vae: bool = False, seed: int = 0, vae: str | None = None, device: str | None = None,
                   dtype: str | None = None, fused: bool | None = None, progress: bool = True,
                   callback: Callback | None = None, reference_fit: str | None = None) -> Image.Image:
    """Grow a texture like ``reference`` to ``size`` (width, height) px with AD-guided MultiDiffusion.

    Defaults from the ``expand`` preset (50 DDIM steps, 2 iterations, lr 0.05, stride 8 latents);
    views of ``view`` latents (64: 512 px on SD 1.5), ``view_batch`` at a time; ``tile`` "x", "y" or
    "xy" makes the result periodic; ``decode_tile`` latents per decoder call. Example::

        big = expand_texture("wood.jpg", size=(4096, 4096), model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    """

    preset = get_preset("expand").override(steps=steps, iters=iters, lr=lr, attention_scale=attention_scale,
                                           stride=stride, reference_fit=reference_fit)
    preset = check_expansion(preset, size, view=view, view_batch=view_batch, decode_tile=decode_tile)
    seed, _, axes = check_run(seed=seed, callback=callback, fused=fused, progress=progress, tile=tile,
                              tune_vae=tune_vae)
    axes = axes or ""
    refs = as_list(reference)
    model = held(as_model(model, vae=vae, device=device, dtype=dtype))
    layer_ids = parse_layers(layers, model)
    w, h = canvas_size(model, size, view)
    f = model.vae_scale_factor
    hw = (h // f, w // f)
    if preset.stride == view and max(hw) > view:
        log.warning("stride %d is the view's width (%d latents): the views do not overlap, so each is denoised alone "
                    "and the canvas shows their edges; use a stride below the view (MultiDiffusion's default is %d "
                    "for a view of %d)", view, view, get_preset("expand").stride, VIEW)
    # periodic axes: wrapped views where the canvas is wider than a view, circular convs where it is one view
    wrap = ("y" in axes and hw[0] > view, "x" in axes and hw[1] > view)
    unet_axes = ("y" if "y" in axes and hw[0] == view else "") + ("x" if "x" in axes and hw[1] == view else "")

    z_ref = encode_references(model, refs, "texture image", preset.reference_fit)
    scheduler = model.ddim_scheduler(preset.steps)
    view_px = view * f
    cond = model.null_condition((view_px, view_px))
    # one CPU generator for the start canvas and then the reference noise, as in sampling: a second generator
    # of the same seed would give the first reference noise the canvas's own first values
    generator = torch.Generator("cpu").manual_seed(seed)
    init = torch.randn((1, 4, *hw), generator=generator) * scheduler.init_noise_sigma
    distiller = run_distiller(model, preset, layer_ids, condition_size=(view_px, view_px), fused=fused)
    with seamless(model, unet_axes or None, parts=("unet",)):
        z = multidiffusion(distiller, init, z_ref, scheduler=scheduler, cond=cond, guidance=preset.guidance,
                           iters=preset.iters, lr=preset.lr, adain=preset.adain, view=view,
                           stride=preset.stride, view_batch=view_batch, wrap=wrap, generator=generator,
                           callback=callback, progress=progress)
    with tuned_vae(model, refs if tune_vae else None, reference_fit=preset.reference_fit, progress=progress,
                   callback=callback):
        pixels = decode_tiled(model, z, tile=decode_tile, overlap=min(DECODE_OVERLAP, decode_tile // 4),
                              wrap=("y" in axes, "x" in axes))
    image = to_pil(pixels)[0]
    params = run_parameters("expand", model, preset, layer_ids, (w, h), seed, fused=fused,
                            reference=[describe_input(r) for r in refs], view=view, view_batch=view_batch,
                            decode_tile=decode_tile, tile=axes or None, tune_vae=tune_vae)
    image.info["parameters"] = params_json(params)
    return image


# -- options for any texture task --------------------------------------------------------------------

@public_task
def with_texture_options(task: Callable[..., list[Image.Image] | Image.Image],
                         reference: ImageInput | Sequence[ImageInput], *, model: DiffusionModel | str,
                         tile: str | None = None, tune_vae: bool = False, progress: bool = True,
                         **kwargs: object) -> list[Image.Image] | Image.Image:
    """Run ``task(reference, model=model, **kwargs)`` seamless along ``tile`` and/or decoding with VAE*.

    For tasks without these options of their own: the UNet and the VAE decoder get circular
    convolutions for the run (the encoder keeps its own, the references are not periodic);
    ``tune_vae`` fits a decoder copy to the references. The options are added to each result's
    parameters. A task that has both options (every texture task) gets them passed: its own way
    is the right one (expansion, for one, wraps its views rather than the UNet's convolutions).
    Returns what ``task`` returns (a list of images, or one).
    """
    if not callable(task):  # with_texture_options("texture", ...): the task is a function
        raise UserError(f"with_texture_options takes a task function such as ad.texture_sampling, not a "
                        f"{type(task).__name__}")
    tile = check_axes(tile)
    flag("tune_vae", tune_vae)
    if {"tile", "tune_vae"} <= _parameter_names(task):
        return task(reference, model=model, tile=tile, tune_vae=tune_vae, progress=progress, **kwargs)
    refs = as_list(reference)
    # a path or Hub id, like every task takes, loaded here with the task's own vae/device/dtype options
    model = held(as_model(model, **{k: kwargs.pop(k) for k in ("vae", "device", "dtype") if k in kwargs}))
    fit = kwargs.get("reference_fit")  # no reference: the task itself says one is needed
    with (tuned_vae(model, refs if tune_vae and refs else None, reference_fit=fit, progress=progress,
                    callback=kwargs.get("callback")),
          seamless(model, tile, parts=("unet", "decoder"))):
        # a generator of references was used up by as_list: the task gets the list
        result = task(refs if isinstance(reference, Iterator) else reference, model=model, progress=progress,
                      **kwargs)
    for img in [result] if isinstance(result, Image.Image) else result:
        add_parameters(img, tile=tile, tune_vae=tune_vae)
    return result


def _parameter_names(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a callable Python cannot look into: it gets the wrapper's own way
        return set()


# -- masked (controllable) texture synthesis --------------------------------------------------------

def label_maps(images: Sequence[Image.Image], names: Sequence[str]) -> tuple[list[np.ndarray], list[str]]:
    """Colour label maps -> integer maps (H, W) over one shared palette; returns (maps, colours as #rrggbb).

    Each distinct colour is one label; the same colour means the same label in every map.
    """
    codes = []
    for img, name in zip(images, names, strict=True):
        rgb = np.asarray(img.convert("RGB"), dtype=np.int32)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # (H, W) one int per colour
        count = len(np.unique(code))
        if count > SMOOTHED_COLOURS:
            edges = len(edge_only_colours(code))
            if 2 * edges > count:
                raise UserError(f"label map '{name}' has {count} colours, {edges} of them with no flat area (lines "
                                "and specks, as smoothing and JPEG leave); a label map needs flat colours, one per "
                                "region (draw it with no anti-aliasing and save it as PNG, not JPEG)")
            if count > MAX_LABELS:
                raise UserError(f"label map '{name}' has {count} colours, more than the {MAX_LABELS} labels a map may "
                                f"have; merge regions until {MAX_LABELS} colours or fewer are left")
        codes.append(code)
    palette = np.unique(np.concatenate([c.ravel() for c in codes]))
    maps = [np.searchsorted(palette, c) for c in codes]
    return maps, [f"#{int(c):06x}" for c in palette]


def edge_only_colours(code: np.ndarray) -> set[int]:
    """The values of an (H, W) map that no pixel of theirs holds with all four neighbours equal (past the
    border counts as equal): lines one or two pixels wide and specks, as the blends that anti-aliasing,
    interpolation and JPEG leave along region edges. Any flat region of 3x3 pixels or more has such an interior
    pixel."""
    pad = np.pad(code, 1, mode="edge")
    inner = ((pad[:-2, 1:-1] == code) & (pad[2:, 1:-1] == code) & (pad[1:-1, :-2] == code)
             & (pad[1:-1, 2:] == code))
    return set(np.unique(code).tolist()) - set(np.unique(code[inner]).tolist())


def _resize_ids(ids: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Integer map (H, W) -> (h, w) for ``size`` (w, h)."""
    return resize_labels(torch.from_numpy(ids.astype(np.int64)), (size[1], size[0]))


def sample_label_init(ref_pixels: torch.Tensor, ref_ids: torch.Tensor, target_ids: torch.Tensor, *, num: int = 1,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial images (num, 3, h, w): each target pixel copies a random reference pixel of the same label.

    ref_pixels: (R, 3, H, W); ref_ids: (R, H, W); target_ids: (h, w). Raises ValueError naming a
    target label that no reference pixel carries.
    """
    pix = ref_pixels.permute(1, 0, 2, 3).reshape(3, -1)  # (3, R*H*W)
    src_ids = ref_ids.reshape(-1)
    dst_ids = target_ids.reshape(-1)
    out = torch.empty(num, 3, dst_ids.numel(), dtype=ref_pixels.dtype)
    for label in dst_ids.unique().tolist():
        src = (src_ids == label).nonzero().squeeze(1)
        if src.numel() == 0:
            raise ValueError(f"label {label} has no pixel in the reference")
        dst = (dst_ids == label).nonzero().squeeze(1)
        for n in range(num):
            pick = src[torch.randint(src.numel(), (dst.numel(),), generator=generator)]
            out[n][:, dst] = pix[:, pick]
    return out.reshape(num, 3, *target_ids.shape)


def _crop_like(ids: np.ndarray, box: tuple[int, int, int, int], image_size: tuple[int, int]) -> np.ndarray:
    """The part of a label map (H, W) that ``box`` cuts from its image of ``image_size`` (the map may be smaller)."""
    sx, sy = ids.shape[1] / image_size[0], ids.shape[0] / image_size[1]
    left, top, right, bottom = box
    return ids[round(top * sy):max(round(bottom * sy), round(top * sy) + 1),
               round(left * sx):max(round(right * sx), round(left * sx) + 1)]


def _check_aspect(image: Image.Image, labels: Image.Image, what: str) -> None:
    if not drawn_over(labels.size, image.size):
        raise UserError(f"{what} is {labels.width}x{labels.height} but its texture image is "
                        f"{image.width}x{image.height}; draw the label map over the texture, at its aspect")


def _is_jpeg(source: ImageInput) -> bool:
    """Stored as JPEG, whatever its name says (``load_image``'s result no longer knows)."""
    if isinstance(source, Image.Image):
        return source.format == "JPEG"
    try:  # its first bytes: Image.open would warn of, or refuse, a huge JPEG that load_image decoded smaller
        with open(source, "rb") as f:
            return f.read(3) == b"\xff\xd8\xff"
    except (OSError, TypeError, ValueError):
        return False


def check_label_maps(reference: ImageInput | Sequence[ImageInput], ref_labels: ImageInput | Sequence[ImageInput],
                     target_labels: ImageInput, size: Size = None
                     ) -> tuple[list[Image.Image], Image.Image, list[np.ndarray], list[str], list[str]]:
    """Masked synthesis's inputs, read and checked before any model loads (the CLI and batch runs call it too):
    one map per texture, at its aspect, a (width, height) ``size`` at the target map's aspect (the layout
    would be stretched), and every target colour in some reference map.

    Returns (texture images, target map image, integer maps, colours, map names).
    """
    refs, ref_label_inputs = as_list(reference), as_list(ref_labels)
    if not refs:
        raise UserError("no texture image given; pass one (or several) with their label maps")
    if len(refs) != len(ref_label_inputs):
        raise UserError(f"{len(refs)} texture image(s) but {len(ref_label_inputs)} reference label map(s); give "
                        "one reference label map per texture image (on the command line: '--ref-labels A.png "
                        "--ref-labels B.png')")
    ref_images = [load_image(r, what="texture image") for r in refs]
    ref_label_images = [load_image(r, what="reference label map", labels=True) for r in ref_label_inputs]
    target_image = load_image(target_labels, what="target label map", labels=True)
    names = [describe_input(r) for r in ref_label_inputs] + [describe_input(target_labels)]
    for img, lab, name in zip(ref_images, ref_label_images, names, strict=False):
        _check_aspect(img, lab, f"reference label map '{name}'")
    size = check_size(size)
    if isinstance(size, tuple) and not drawn_over(size, target_image.size):
        raise UserError(f"target label map '{names[-1]}' is {target_image.width}x{target_image.height} but the size "
                        f"asked for is {size[0]}x{size[1]}, another aspect, which would stretch its layout; give only "
                        "the long side, a size of the map's aspect, or a map drawn at the size's aspect")
    maps, colours = label_maps(ref_label_images + [target_image], names)
    if len(colours) == 1:  # one region everywhere: nothing to keep apart (a map read wrong, or the wrong file)
        raise UserError(f"the label maps ({', '.join(repr(n) for n in names)}) have one colour only, {colours[0]}; "
                        "masked synthesis needs two regions or more (for one region, run texture synthesis "
                        "without label maps)")
    in_target = set(np.unique(maps[-1]).tolist())
    in_references = set(np.unique(np.concatenate([m.ravel() for m in maps[:-1]])).tolist())
    missing = sorted(in_target - in_references)
    if missing:
        jpeg = [n for n, source in zip(names, [*ref_label_inputs, target_labels], strict=True) if _is_jpeg(source)]
        hint = (f"; {', '.join(repr(n) for n in jpeg)} {'is' if len(jpeg) == 1 else 'are'} JPEG, whose compression "
                "adds colours: save label maps as PNG") if jpeg else ""
        share = float(np.isin(maps[-1], missing).mean())
        if not jpeg and set(missing) <= edge_only_colours(maps[-1]):  # the blends smoothing leaves between regions
            hint = (f"; they cover only {share:.1%} of it, in lines and specks with no flat area, as the "
                    "blends of a map drawn or resized with smoothing do: paint without anti-aliasing and resize "
                    "label maps with nearest-neighbour")
        elif not jpeg and all(map(_grey, (colours[i] for i in in_target))) and not all(
                map(_grey, (colours[i] for i in in_references))):  # one map saved in greyscale, say
            hint = ("; the target map is greyscale and the reference label maps are in colour: save the maps in the "
                    "same colours")
        elif not jpeg:  # regions drawn on purpose
            hint = (f"; they are regions ({share:.1%} of the map): paint a region of each in a reference label map "
                    "over the texture it should take, or recolour them in the target map")
        raise UserError(f"target label map '{names[-1]}' uses colour(s) {', '.join(colours[i] for i in missing)} "
                        f"that no reference label map has; every target colour needs a region in the reference{hint}")
    return ref_images, target_image, maps, colours, names


def _grey(colour: str) -> bool:
    """A label colour ("#rrggbb") whose channels are equal."""
    return colour[1:3] == colour[3:5] == colour[5:7]


@public_task
def masked_texture_synthesis(reference: ImageInput | Sequence[ImageInput],
                             ref_labels: ImageInput | Sequence[ImageInput], target_labels: ImageInput, *,
                             num: int = 1, model: DiffusionModel | str | None = None, steps: int | None = None,
                             iters: int | None = None, lr: float | None = None,
                             content_weight: float | None = None, attention_scale: float | None = None,
                             layers: str | Sequence[int] | None = None, size: Size = None, seed: int = 0,
                             tile: str | None = None, tune_vae: bool = False, vae: str | None = None,
                             device: str | None = None, dtype: str | None = None, fused: bool | None = None,
                             progress: bool = True, callback: Callback | None = None,
                             reference_fit: str | None = None) -> list[Image.Image]:
    """Texture whose regions follow ``target_labels``, each region made of the same-coloured region of the reference.

    Label maps are colour images (one label per distinct colour), one per reference image. Masked AD
    (target tokens attend only to reference tokens of their label) from an initialisation of reference
    pixels sampled per label, with a content loss on that initialisation; preset ``texture-masked``
    (200 steps, lambda 0.15). ``size`` defaults to the long side of the target map at the model's
    native size, aspect kept. ``reference_fit`` crops the label maps as it crops their textures.
    Returns ``num`` images.
    """
    seed, num, tile = check_run(seed=seed, callback=callback, num=num, fused=fused, progress=progress, tile=tile,
                                tune_vae=tune_vae)
    preset = get_preset("texture-masked").override(steps=steps, iters=iters, lr=lr, content_weight=content_weight,
                                                   attention_scale=attention_scale, reference_fit=reference_fit)
    preset = check_settings(preset)
    refs = as_list(reference)
    ref_images, target_image, maps, colours, names = check_label_maps(refs, ref_labels, target_labels, size)

    model = held(as_model(model, vae=vae, device=device, dtype=dtype))
    layer_ids = parse_layers(layers, model)
    # named, so that a map whose aspect the size cannot keep is said, as a layout's is
    w, h = target_size(model, size, like=target_image, like_name=f"target label map '{names[-1]}'")
    # the references as encode_references fits them, and their label maps cut and resized alike
    (rw, rh), boxes = reference_boxes([img.size for img in ref_images], preset.reference_fit, model.native_size,
                                      model.latent_multiple, names=[describe_input(r) for r in refs], warn=True)
    ref_pixels = to_tensor([img.crop(box) for img, box in zip(ref_images, boxes, strict=True)], (rw, rh))
    ref_ids = torch.stack([_resize_ids(_crop_like(m, box, img.size), (rw, rh))
                           for m, box, img in zip(maps[:-1], boxes, ref_images, strict=True)])  # (R, rh, rw)
    target_ids = _resize_ids(maps[-1], (w, h))  # (h, w)
    lost = sorted(set(target_ids.unique().tolist()) - set(ref_ids.unique().tolist()))
    if lost:  # too thin to survive resizing, or (keep) outside the crop
        keep = preset.reference_fit == "keep"
        how = "cut to the first texture's aspect (reference fit 'keep' keeps the centre) and " if keep else ""
        raise UserError(f"colour(s) {', '.join(colours[i] for i in lost)} of '{names[-1]}' keep no region in "
                        f"{', '.join(repr(n) for n in names[:-1])} once {how}resized to {rw}x{rh}; make those "
                        f"regions larger{' or use reference fit squash' if keep else ''}")
    init_pixels = sample_label_init(ref_pixels, ref_ids, target_ids, num=num,
                                    generator=torch.Generator("cpu").manual_seed(seed))
    z_ref = model.encode(ref_pixels)
    z_init = model.encode(init_pixels)  # the initialisation is also the content image
    distiller = run_distiller(model, preset, layer_ids, condition_size=(h, w), fused=fused,
                                 ref_labels=ref_ids, target_labels=target_ids[None])
    with (tuned_vae(model, ref_images if tune_vae else None, reference_fit=preset.reference_fit, progress=progress,
                    callback=callback),
          seamless(model, tile)):
        try:  # fails at the first step, if at all
            z = optimize_latents(distiller, z_init, z_ref, content_latents=z_init, steps=preset.steps,
                                 iters=preset.iters, lr=preset.lr, callback=callback, progress=progress,
                                 desc="texture-masked")
        except UnmatchedLabels as exc:
            h_tok, w_tok = exc.grid or (rh, rw)
            raise UserError(f"colour(s) {', '.join(colours[i] for i in exc.labels)} of '{names[-1]}' keep no region "
                            f"in {', '.join(repr(n) for n in names[:-1])} once resized to the model's {h_tok}x{w_tok} "
                            f"token grid; make those regions at least {max(rw // w_tok, rh // h_tok)} px wide in the "
                            f"reference scaled to {rw}x{rh}") from None
        params = run_parameters("texture-masked", model, preset, layer_ids, (w, h), seed, fused=fused,
                                reference=[describe_input(r) for r in refs], ref_labels=names[:-1],
                                target_labels=names[-1], num=num, tile=tile, tune_vae=tune_vae)
        return finish(model, z, params)

