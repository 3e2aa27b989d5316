"""Images in and out: load and validate, resize, tensors, atomic PNG writes.

Every image a user hands us passes :func:`load_image`, which turns whatever is
on disk (palette, CMYK, 16-bit, alpha, EXIF-rotated) into plain RGB or raises
a one-line :class:`UserError` naming the file and the fix.
"""

from __future__ import annotations

import io
import json
import logging
import math
import numbers
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin, PngImagePlugin

from .errors import UserError, first_line
from .fingerprints import note_read

log = logging.getLogger(__name__)

#: Largest image we accept, in pixels: Pillow's own decompression-bomb limit (about 89 megapixels).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
#: Smallest side we accept: one latent position is 8 pixels, a UNet needs a few.
MIN_SIDE = 16
#: PNG text key under which results carry their parameters.
METADATA_KEY = "attndistill"

ImageInput = str | os.PathLike | Image.Image

#: What transparent pixels become: white under a photo or painting; black under a ControlNet's map (pose and
#: line-art editors export their lines over transparency, and black is a map's "nothing here").
WHITE, BLACK = (255, 255, 255), (0, 0, 0)

_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
FOLDER_MODE = 0o777 & ~_UMASK


def load_image(source: ImageInput, *, what: str = "image", labels: bool = False, flat: bool = False,
               background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Open ``source`` as an RGB image, or raise a :class:`UserError` naming it.

    Alpha is composited on ``background`` (white), EXIF orientation applied, 16-bit and float
    images scaled to 8 bits. ``what`` names the role in messages ("style image").
    ``labels``: a label map, whose integer pixels (16- or 32-bit, as segmentation
    tools write them) are ids to keep apart, not brightness: each id becomes a
    colour of its own (id 0x0102 -> #000102) instead of being scaled to 8 bits.
    ``flat``: a mask, accepted up to twice the pixel limit (Pillow's own hard limit): painted at the full
    size of a photo over the limit, which a JPEG decodes smaller, it must still be usable; its transparency is
    not warned about (its reader takes it as black).
    """
    limit = 2 * MAX_PIXELS if flat else MAX_PIXELS
    if isinstance(source, Image.Image):
        _check_size(source.size, what, limit)  # before its pixels are read
        try:
            source.load()  # a closed image, a lazily opened one whose file went: said here, not deep in a run
        except (ValueError, OSError, AttributeError) as exc:
            raise UserError(f"{what} (a PIL image) cannot be read ({exc}); pass it before closing it, or its "
                            "file's path") from None
        return _to_rgb(source, what, labels=labels, limit=limit, background=background, mask=flat)
    if not isinstance(source, str | os.PathLike):
        raise UserError(f"{what} must be a file path or a PIL image, not a {type(source).__name__}")
    if os.fspath(source) in ("", b""):
        raise UserError(f"{what} is an empty path; give an image file")
    path = Path(source)
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise UserError(f"{what} '{path}' cannot be opened ({exc.strerror}); check the path") from None
    if not exists:
        raise UserError(f"{what} '{path}' does not exist; check the path")
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a directory; pass an image file inside it")
    if not path.is_file():  # reading a pipe or a FIFO waits for its writer, maybe for ever
        raise UserError(f"{what} '{path}' is not a regular file (a pipe or a device); save the image to a file "
                        "and pass that")
    note_read(path)  # the digest its result records: the file as read now, not as it is when the run ends
    try:
        with _pillow_warnings(f"{what} '{path}'", bombs=not flat), Image.open(path) as img:
            _check_size(img.size, f"{what} '{path}'", limit)
            img.load()
            if getattr(img, "n_frames", 1) > 1:  # an animated GIF/WebP/PNG, a multi-page TIFF
                log.warning("%s '%s' has %d frames; its first is used", what, path, img.n_frames)
            return _to_rgb(ImageOps.exif_transpose(img), f"{what} '{path}'", labels=labels, limit=limit,
                           background=background, mask=flat)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        reduced = _reduced_jpeg(path, what)
        if reduced is not None:
            return reduced
        raise UserError(
            f"{what} '{path}' declares too many pixels (decompression-bomb guard, limit {limit:,}); "
            "downscale it first"
        ) from None
    except (OSError, SyntaxError, ValueError, TypeError, RuntimeError) as exc:  # TIFF, AVIF: Type-, RuntimeError
        reason = "is truncated or corrupt"
        if "cannot identify image file" in str(exc):
            reason = "is not an image Pillow can read"
        if not path.stat().st_size:
            reason = "is empty"
        raise UserError(f"{what} '{path}' {reason}; re-export it as PNG or JPEG") from None


def _reduced_jpeg(path: Path, what: str) -> Image.Image | None:
    """A JPEG over the pixel limit (a 108-megapixel phone photo) decoded at 1/2, 1/4 or 1/8 of its size.

    libjpeg scales while it decodes, so the full image is never held; every task resizes its inputs to a
    few megapixels anyway. None when it is no JPEG, or too large even at 1/8.
    """
    try:
        img = JpegImagePlugin.JpegImageFile(os.fspath(path))  # not Image.open: its guard would refuse
    except (OSError, SyntaxError, ValueError):  # not a JPEG: the caller's error stands
        return None
    with img:
        w, h = img.size
        scale = next((k for k in (2, 4, 8) if -(-w // k) * -(-h // k) <= MAX_PIXELS), None)
        if scale is None:
            return None
        img.draft("RGB", (w // scale, h // scale))  # Pillow's factor: min(w // w', h // h') = scale
        try:
            img.load()
        except (OSError, SyntaxError, ValueError):  # a JPEG that ends early: that, not its size, is the problem
            raise UserError(f"{what} '{path}' is truncated or corrupt; re-export it as PNG or JPEG") from None
        with _pillow_warnings(f"{what} '{path}'"):
            return _to_rgb(ImageOps.exif_transpose(img), f"{what} '{path}'")


@contextmanager
def _pillow_warnings(label: str, *, bombs: bool = True) -> Iterator[None]:
    """Pillow's warnings while reading an image (damaged EXIF data: "Truncated File Read") as one line naming
    the file, not raw Python warnings; its decompression-bomb warning as an error for the caller to handle
    (``bombs``), or ignored where the caller allows more pixels."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error" if bombs else "ignore", Image.DecompressionBombWarning)
        yield
    said = [w for w in caught if issubclass(w.category, UserWarning)]  # not a library's deprecation notes
    if said:
        log.warning("%s: %s (Pillow, while reading it)", label, said[0].message)


def _check_size(size: tuple[int, int], label: str, limit: int = MAX_PIXELS) -> None:
    w, h = size
    if w * h > limit:
        raise UserError(f"{label} is {w}x{h} pixels, over the limit of {limit:,}; downscale it first")
    if min(w, h) < MIN_SIDE:
        raise UserError(f"{label} is only {w}x{h} pixels; use an image of at least {MIN_SIDE}x{MIN_SIDE}")


def _to_rgb(img: Image.Image, label: str, *, labels: bool = False, limit: int = MAX_PIXELS,
            background: tuple[int, int, int] = WHITE, mask: bool = False) -> Image.Image:
    """Plain 8-bit sRGB whatever the mode and colour profile; alpha goes on ``background``; with ``labels``, integer
    ids as colours and colours as they are stored (a label's colour is a name, not a colour to convert). A ``mask``
    is not warned about its transparency, which its reader takes as black (keep)."""
    _check_size(img.size, label, limit)
    if labels and img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _ids_as_colours(np.asarray(img), label)
    if not labels:
        img = _to_srgb(img, label)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        arr = np.where(np.isfinite(arr), arr, np.nan)  # inf would stretch the scale to black
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        # the range the values are stored in, where they show it; stretched to their own extremes, a plain
        # white mask in mode "I" turned black and greys moved (100 and 200 read as 0 and 255)
        if img.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        elif img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        elif lo >= 0.0 and hi <= 255.0:  # 8-bit values in a wider mode ("L" converted to "I")
            lo, hi = 0.0, 255.0
        elif img.mode == "I" and lo >= 0.0 and hi <= 65535.0:  # a 16-bit PNG, as older Pillow reads it
            lo, hi = 0.0, 65535.0
        arr = np.nan_to_num((arr - lo) / max(hi - lo, 1e-12), nan=0.0).clip(0, 1)
        img = Image.fromarray((arr * 255 + 0.5).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")  # Pillow has no La -> RGBA
        seen = np.asarray(rgba.getchannel("A")) < 255
        if labels and seen.any():  # on white, a see-through region would read as a white region the map never drew
            share = f"{seen.mean():.1%} of it" if seen.mean() >= 0.001 else f"{int(seen.sum())} of its pixels"
            raise UserError(f"{label} has transparent pixels ({share}); a label map needs an "
                            "opaque colour in every pixel: fill them, or save the map without transparency")
        if background == WHITE and not mask and seen.mean() >= 0.01:  # a control image's black: "nothing here"
            log.warning("%s is %.0f%% transparent; those pixels are taken on white, which the run then sees as "
                        "part of the image: crop or fill them where they should not count", label, 100 * seen.mean())
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
    return img.convert("RGB")


def _to_srgb(img: Image.Image, label: str) -> Image.Image:
    """Pixels of an embedded colour profile (a phone's Display P3, Adobe RGB, a printer's CMYK) converted to
    sRGB, the space the models were trained in; taken as they are, their colours would be off."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK"):
        return img
    try:
        from PIL import ImageCms  # Pillow built without littlecms has none: the pixels stay as they are
    except ImportError:
        return img
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(source).lower():  # already sRGB: nothing to do
            return img
        return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"),
                                         renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                                         outputMode="RGBA" if img.mode == "RGBA" else "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        log.warning("%s has a colour profile that cannot be read; its pixels are taken as sRGB", label)
        return img


def _ids_as_colours(ids: np.ndarray, label: str) -> Image.Image:
    """An integer label map -> RGB with one colour per id (its 24 bits as red, green and blue)."""
    if ids.dtype.kind == "f" and not (np.isfinite(ids).all() and (ids == np.round(ids)).all()):
        raise UserError(f"{label} holds fractional values; a label map needs whole-number ids or flat colours")
    ids = ids.astype(np.int64)
    if ids.min() < 0 or ids.max() >= 2**24:
        raise UserError(f"{label} holds ids from {ids.min()} to {ids.max()}; label ids must be 0 to {2**24 - 1}")
    rgb = np.stack([(ids >> 16) & 255, (ids >> 8) & 255, ids & 255], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def round_to_multiple(value: float, multiple: int) -> int:
    """Nearest positive multiple of ``multiple``, halves up (Python's ``round`` sends them to the even
    multiple: 80 would become 64 but 112 become 128)."""
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def fit_size(size: tuple[int, int], long_side: int, multiple: int = 64) -> tuple[int, int]:
    """(width, height) with the long side ``long_side``, aspect kept, sides rounded to ``multiple``."""
    w, h = size
    scale = long_side / max(w, h)
    return round_to_multiple(w * scale, multiple), round_to_multiple(h * scale, multiple)


Box = tuple[int, int, int, int]


#: Under reference fit keep, a reference that keeps less than this share of its area once cropped is named.
KEPT_WARNING = 0.5


#: Squash warns of a reference whose aspect it changes more than this (the paper's own references are squares),
#: and of one it enlarges more than this in area (16x16 to 512x512 is 1024).
SQUASH_WARNING = 2.0
ENLARGED_WARNING = 16


def reference_boxes(sizes: Sequence[tuple[int, int]], fit: str, native: int, multiple: int,
                    names: Sequence[str] | None = None, *, warn: bool = False) -> tuple[tuple[int, int], list[Box]]:
    """The (width, height) every reference is resized to, and the part of each image that is used.

    ``fit`` is one of :data:`~attndistill.presets.REFERENCE_FITS`. "squash": whole images, native
    square. "keep": the first image's aspect at about ``native``² pixels (:func:`kept_size`); every
    image centre-cropped to that size's aspect, so none is stretched. With ``names``, a crop thinner than
    :data:`MIN_SIDE` (a reference of a very different aspect) is an error naming the image; with ``warn``
    too, so is (as a warning) one that keeps less than :data:`KEPT_WARNING` of itself: once per run, where the
    run encodes its references.
    """
    if fit == "squash":
        for (w, h), name in zip(sizes, names or [], strict=False) if warn else ():
            if (squashed := max(w / h, h / w)) > SQUASH_WARNING:
                log.warning("reference '%s' is %dx%d, squashed %.1f times to the model's %dx%d square (reference "
                            "fit squash); reference fit keep keeps its aspect", name, w, h, squashed, native, native)
            elif native * native > ENLARGED_WARNING * w * h:
                log.warning("reference '%s' is only %dx%d, enlarged %.1f times to the model's %dx%d: the run sees the "
                            "resize's blur; give a larger image", name, w, h, (native * native / (w * h)) ** 0.5,
                            native, native)
        return (native, native), [(0, 0, w, h) for w, h in sizes]
    width, height = kept_size(sizes[0], native, multiple)
    boxes = []
    for w, h in sizes:
        if w * height > h * width:  # wider than the target aspect: crop the sides
            cw, ch = max(1, round(h * width / height)), h
        else:
            cw, ch = w, max(1, round(w * height / width))
        left, top = (w - cw) // 2, (h - ch) // 2
        boxes.append((left, top, left + cw, top + ch))
        # the first reference is cut only where its aspect is beyond what keep allows (kept_size)
        cause, fix = (("the most elongated aspect reference fit 'keep' allows", "crop it to a less elongated "
                       "aspect yourself") if len(boxes) == 1 else
                      ("the first reference's aspect", "give references of similar aspects"))
        if names is not None and min(cw, ch) < MIN_SIDE:
            raise UserError(f"reference '{names[len(boxes) - 1]}' keeps only {cw}x{ch} px once cut to {cause} "
                            f"({width}x{height}, reference fit 'keep'); {fix}, or use reference fit squash")
        if warn and names is not None and cw * ch < w * h * KEPT_WARNING:
            log.warning("reference '%s' keeps %d%% of itself (%dx%d of %dx%d px) once cut to %s (%dx%d, reference "
                        "fit keep); %s, or use reference fit squash", names[len(boxes) - 1],
                        round(100 * cw * ch / (w * h)), cw, ch, w, h, cause, width, height, fix)
    return (width, height), boxes


def kept_size(size: tuple[int, int], native: int, multiple: int) -> tuple[int, int]:
    """(width, height) in multiples of ``multiple`` with the aspect of ``size`` at about ``native``² pixels.

    Of the short sides next to ``native / sqrt(aspect)``, the one whose rounded long side comes closest
    to the aspect, and then to the area (so 3:2 at 512 is 576x384, exact, not 640x384). Aspects beyond
    (native / multiple)² are cut there: the short side is one multiple and the area stays native².
    """
    long_px, short_px = max(size), min(size)
    aspect = min(long_px / short_px, (native / multiple) ** 2)
    middle = round_to_multiple(native / aspect ** 0.5, multiple)
    candidates = []
    for short in {max(multiple, middle + d * multiple) for d in (-1, 0, 1)}:
        long = round_to_multiple(short * aspect, multiple)
        shape_error = abs(math.log(long / short / aspect))
        area_error = abs(math.log(long * short / native ** 2))
        candidates.append((shape_error + area_error / 4, short, long))
    _, short, long = min(candidates)
    return (long, short) if size[0] >= size[1] else (short, long)


def fit_references(images: Sequence[Image.Image], fit: str, native: int, multiple: int,
                   names: Sequence[str] | None = None, *, warn: bool = False) -> torch.Tensor:
    """Reference images as a run sees them: (R, 3, H, W) in [0, 1], cropped and resized by ``fit``."""
    size, boxes = reference_boxes([img.size for img in images], fit, native, multiple, names, warn=warn)
    return to_tensor([img.crop(box) for img, box in zip(images, boxes, strict=True)], size)


def drawn_over(size: tuple[int, int], base: tuple[int, int]) -> bool:
    """Was an image of ``size`` (a mask, a label map) drawn over one of ``base``'s aspect, at any scale?

    One side may be a pixel off what the other side makes of the aspect (a small map's rounding, wide or
    tall) or 2% (a resize's).
    """
    def near(side: float, expected: float) -> bool:
        return abs(side - expected) <= max(1.0, 0.02 * expected)

    return near(size[1], size[0] * base[1] / base[0]) or near(size[0], size[1] * base[0] / base[1])


def check_size(size: object) -> int | tuple[int, int] | None:
    """A ``size`` argument as the API takes it: None, a long side, or (width, height), positive whole numbers."""
    def whole(v: object) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if size is None:
        return None
    if whole(size) and int(size) > 0:
        return int(size)
    if isinstance(size, tuple | list) and len(size) == 2 and all(whole(v) and int(v) > 0 for v in size):
        return int(size[0]), int(size[1])
    raise UserError(f"size must be a positive whole number (the long side) or (width, height), not {size!r}")


def parse_size(text: str, *, multiple: int = 64) -> tuple[int, int] | int:
    """Parse ``"512"`` (long side) or ``"768x512"`` (width x height, rounded to ``multiple``).

    Also as people write sizes: ``768×512``, ``768*512``, ``768 x 512``, ``512px``; but ``512 512`` is no
    size (not 512512).
    """
    found = re.fullmatch(r"\s*(\d+)\s*(?:px)?\s*(?:[x×*]\s*(\d+)\s*(?:px)?\s*)?", text.lower())
    if not found or any(int(n) <= 0 for n in found.groups() if n is not None):
        raise UserError(f"size '{text}' is not understood; use a number (long side) or WIDTHxHEIGHT")
    w, h = found.groups()
    if h is None:
        return round_to_multiple(int(w), multiple)
    return round_to_multiple(int(w), multiple), round_to_multiple(int(h), multiple)


def to_tensor(images: Image.Image | Iterable[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL image(s) -> float tensor in [0, 1] of shape (B, 3, H, W), resized to ``size`` (w, h)."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = []
    for img in images:
        if size is not None and img.size != tuple(size):
            img = img.resize(tuple(size), Image.Resampling.LANCZOS)
        arrays.append(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Tensor (B, 3, H, W) in [0, 1] -> list of PIL images."""
    arr = images.detach().float().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


def numbered_outputs(output: Path, count: int) -> tuple[Path, ...]:
    """Where ``count`` images go: ``OUT.png`` for one, ``OUT-0.png``, ``OUT-1.png``... for several."""
    if count == 1:
        return (output,)
    return tuple(output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count))


def check_output(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output",
                 option: str = "-o", why: str = "results carry their parameters in PNG text") -> Path:
    """Validate an output path before any work starts; returns it as a Path.

    ``what``, ``option`` and ``why`` (it must be a PNG) name it in errors (``--preview`` is an output too).
    """
    return check_output_file(check_png_name(path, what=what, why=why), overwrite=overwrite, what=what, option=option)


def check_output_file(path: Path, *, overwrite: bool, what: str, option: str, example: str = "out.png") -> Path:
    """An output file of any kind (a PNG, ``--loss-log``'s JSON lines) can be written where ``path`` says: no
    directory or broken link there, no existing file unless ``overwrite``, a writable folder. ``example``: a file
    name the message for a directory suggests."""
    try:
        return _check_output_path(path, overwrite=overwrite, what=what, option=option, example=example)
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise UserError(f"{what} '{path}' cannot be written: {exc.strerror or exc}; choose a shorter or other "
                        f"{option} path") from None


def check_png_name(name: str | os.PathLike, *, what: str = "output",
                   why: str = "results carry their parameters in PNG text") -> Path:
    """An output's name, before any work: not empty, and a name ending in .png."""
    if not str(name).strip():
        raise UserError(f"{what} is empty; give a file name ending in .png")
    path = Path(name)
    if path == Path("."):  # also what an empty -o becomes on the command line
        raise UserError(f"{what} '.' is the current folder; give a file name ending in .png")
    if path.suffix.lower() != ".png":
        named = path.name.lower() != ".png"
        raise UserError(f"{what} '{path}' must {'end in' if named else 'have a name before'} .png ({why})")
    return path


def check_output_kind(path: Path, *, what: str, example: str = "out.png") -> None:
    """What no output may be written over, with ``--overwrite`` or without: a broken link (or a loop of links),
    a directory, a pipe or a device (a FIFO's reader would wait for ever, no file replaces /dev/stdout whole)."""
    try:
        if path.is_symlink() and not path.exists():
            raise UserError(f"{what} '{path}' is a broken symbolic link (or a loop of them); remove it or choose "
                            "another name")
        if path.is_dir():
            raise UserError(f"{what} '{path}' is a directory; give a file name such as '{path / example}'")
        if path.exists() and not path.is_file():
            raise UserError(f"{what} '{path}' is not a regular file (a pipe or a device); give a file name")
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise UserError(f"{what} '{path}' cannot be written: {exc.strerror or exc}; choose a shorter or other "
                        "name") from None


def _check_output_path(path: Path, *, overwrite: bool, what: str, option: str, example: str) -> Path:
    check_output_kind(path, what=what, example=example)
    if path.exists() and not overwrite:
        raise UserError(f"{what} '{path}' already exists; pass --overwrite or choose another name")
    check_folder_of(path, what=what, option=option)
    return path


def check_folder_of(path: Path, *, what: str, option: str) -> None:
    """The folder ``path`` is to be written into exists and takes files, before any work."""
    folder = path.parent if str(path.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} folder '{folder}' is a file, not a folder; choose another {option} path")
    if not folder.is_dir():
        raise UserError(f"{what} folder '{folder}' does not exist; create it first")
    if not is_writable(folder):
        raise UserError(f"{what} folder '{folder}' is not writable; choose another {option} path")


def is_writable(folder: Path) -> bool:
    """Try to create a file: os.access says yes to root on read-only or immutable folders."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".attndistill-probe.", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def add_parameters(image: Image.Image, **changes: object) -> None:
    """Set ``changes`` in the parameters ``image`` carries (its ``info["parameters"]`` JSON), None removing
    a key: what a step after the task (a batch's own inputs, a grid, tiling around a task) adds to them. Input
    files set here get their fingerprints as the task's own inputs have them, so that ``info`` tells when they
    change (a batch's contents and masks had none)."""
    from .fingerprints import KEY, fingerprints

    params = json.loads(image.info.get("parameters") or "{}")
    digests = dict(params.get(KEY) or {})
    for key, value in changes.items():
        digests.pop(key, None)
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    digests.update(fingerprints({k: v for k, v in changes.items() if v is not None}))
    if digests:
        params[KEY] = digests
    else:
        params.pop(KEY, None)
    image.info["parameters"] = params_json(params)


def params_json(params: dict) -> str:
    """A result's parameters as the JSON its PNG carries; NumPy numbers (a seed drawn with NumPy) as plain ones."""
    def plain(value):
        if isinstance(value, np.generic):
            return value.item()
        raise UserError(f"parameters hold a {type(value).__name__} ({value!r}), which JSON cannot hold; pass "
                        "numbers, strings, lists and dicts")

    return json.dumps(params, sort_keys=True, default=plain)


#: Modes PNG stores; others (F, CMYK, ...) have no one right conversion, so the caller picks it.
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "I;16B"}


def save_png(image: Image.Image, path: str | os.PathLike, *, overwrite: bool = False,
             parameters: dict | None = None) -> Path:
    """Write ``image`` atomically as PNG with its parameters in a text chunk.

    The file appears complete or not at all: it is written to a temporary
    name in the same folder and renamed into place.
    """
    if not isinstance(image, Image.Image):
        raise UserError(f"save_png saves a PIL image, not a {type(image).__name__}")
    if image.mode not in _PNG_MODES:
        raise UserError(f"save_png cannot store a mode {image.mode} image as PNG; convert it first, e.g. "
                        "image.convert('RGB')")
    if 0 in image.size:
        raise UserError(f"save_png got an empty image ({image.width}x{image.height})")
    if not isinstance(path, str | os.PathLike):
        raise UserError(f"save_png needs a path as a str or Path, not a {type(path).__name__}")
    if parameters is not None and not isinstance(parameters, dict | str):
        raise UserError(f"parameters must be a dict (or its JSON text), not a {type(parameters).__name__}")
    if isinstance(parameters, str) and _json_object(parameters) is None:  # read_parameters would refuse it
        raise UserError(f"parameters text must be a JSON object, as read_parameters returns it "
                        f"(got {parameters[:40]!r})")
    path = check_output(path, overwrite=overwrite)
    info = PngImagePlugin.PngInfo()
    params = parameters if parameters is not None else image.info.get("parameters")
    if params is not None:
        info.add_text(METADATA_KEY, params if isinstance(params, str) else params_json(params))
    return atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info), overwrite=overwrite)


def _json_object(text: str) -> dict | None:
    """``text`` as the JSON object of a result's parameters; None where it is none."""
    try:
        params = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
        return None
    return params if isinstance(params, dict) else None


def save_result(image: Image.Image, path: Path, *, overwrite: bool = False,
                parameters: dict | None = None) -> tuple[Path, Path | None]:
    """:func:`save_png` for a result whose output name was checked free before its run: (where it went, None),
    or, where another file took ``path`` while it ran, (the first free ``OUT.new.png``, ``OUT.new-2.png``...
    beside it, ``path``): the other file is kept, and so is the work."""
    taken = path if not overwrite and path.exists() else None
    if taken is not None:
        path = free_name(taken)
    return save_png(image, path, overwrite=overwrite, parameters=parameters), taken


def free_name(path: Path, *, suffix: str = ".png") -> Path:
    """The first free ``OUT.new``, ``OUT.new-2``... beside ``path``, ``suffix`` kept at the end ("" for a
    folder): where a result goes when another file took its name while it ran."""
    stem = path.name[:-len(suffix)] if suffix and path.name.endswith(suffix) else path.name
    for n in range(1, 10_000):
        candidate = path.with_name(f"{stem}.new{'' if n == 1 else f'-{n}'}{suffix}")
        if not candidate.exists():
            return candidate
    return path  # 10,000 taken: let the save say that the output exists


def partial_prefix(name: str) -> str:
    """How the temp file (``PREFIX*.partial``) of an output ``name`` starts: the name cut to 200 bytes, so the
    temp name fits the file system's 255 where the name itself does."""
    return f".{name.encode()[:200].decode(errors='ignore')}."


def atomic_write(path: Path, write, *, overwrite: bool = False) -> Path:
    """Call ``write(fileobj)`` on a temp file beside ``path`` and rename it into place."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=partial_prefix(path.name), suffix=".partial", dir=path.parent)
    except OSError as exc:
        raise UserError(f"output '{path}' cannot be written ({exc.strerror}); choose another path") from None
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; results should be as readable as any new file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the target appeared meanwhile: never overwrite silently
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise UserError(f"output '{path}' already exists; pass --overwrite or choose another name") from None
            except OSError:
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException as exc:  # Ctrl-C and SIGTERM included: never leave the temp file behind
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.strerror:  # e.g. disk full
            raise UserError(f"output '{path}' could not be written ({exc.strerror}); free space or choose "
                            "another path") from None
        raise
    return path


def read_parameters(path: str | os.PathLike) -> dict:
    """The parameters a result PNG carries (empty dict if none, or not a PNG).

    Reads the chunks before the pixels only, with no pixel limit: results of ``expand`` may be larger
    than the limit :func:`load_image` keeps for inputs.
    """
    if not isinstance(path, str | os.PathLike):
        raise UserError(f"read_parameters takes a path as a str or Path, not a {type(path).__name__}; pass the path of "
                        "a PNG written by attndistill")
    if not Path(path).is_file():
        raise UserError(f"'{path}' is not a file; pass the path of a PNG written by attndistill")
    try:
        with PngImagePlugin.PngImageFile(os.fspath(path)) as img:
            text = img.text.get(METADATA_KEY)
    except SyntaxError:  # not a PNG
        return {}
    except (OSError, ValueError, EOFError) as exc:  # a PNG cut short or damaged before its text chunks end
        raise UserError(f"'{path}' is a damaged PNG ({first_line(exc)}); its parameters cannot be read") from None
    if not text:
        return {}
    params = _json_object(text)
    if params is None:
        raise UserError(f"'{path}' carries an '{METADATA_KEY}' text chunk that is not a JSON object of "
                        "parameters; it was not written by attndistill or was edited")
    return params


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Images of one size side by side in a grid of ``cols`` columns (default near-square); carries the first
    image's parameters."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    if "parameters" in images[0].info:
        grid.info["parameters"] = images[0].info["parameters"]
        add_parameters(grid, index=None, grid=len(images))
    return grid
