"""VAE*: fine-tune only the decoder on the reference image (ALGORITHM.md §5).

The stock decoder blurs fine texture; fitting it to the reference for a few
dozen Adam steps recovers the detail. The encoder, and hence every latent the
run optimises, is untouched: only ``vae.decoder`` receives gradients. The
tuned VAE is a plain diffusers ``AutoencoderKL``, savable as a folder that
``--vae DIR`` (and ``AutoencoderKL.from_pretrained``) loads.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checks import positive, whole
from ..core.progress import Callback, StepInfo, progress_bar
from ..errors import NonFiniteError, UserError
from ..images import (
    FILE_MODE,
    FOLDER_MODE,
    ImageInput,
    check_folder_of,
    fit_references,
    load_image,
    params_json,
    partial_prefix,
)
from ..model.loading import as_model, check_vae_source
from ..model.models import DiffusionModel
from ..model.single_file import CHECKPOINT_SUFFIXES
from ..presets import DEFAULT_REFERENCE_FIT, VAE_TUNING_LR, VAE_TUNING_STEPS
from ..version import __version__
from .setup import (
    as_list,
    check_callback,
    check_reference_fit,
    describe_input,
    held,
    model_parameters,
    public_task,
    with_provenance,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


def reconstruction_l1(vae: AutoencoderKL, x: torch.Tensor) -> float:
    """``mean|D(mean(E(x))) - x|`` for images ``x`` (B, 3, H, W) in [-1, 1]."""
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        x = x.to(next(vae.parameters()).device, dtype)
        return float((vae.decode(vae.encode(x).latent_dist.mean).sample.float() - x.float()).abs().mean())


def _decodes(vae: AutoencoderKL, z: torch.Tensor) -> bool:
    """Finite weights that decode ``z`` to a finite image: a last step of a huge lr left finite weights of 1e30
    that decode to NaN, saved as a VAE that failed only in the run that used it."""
    if not all(bool(p.isfinite().all()) for p in vae.decoder.parameters()):
        return False
    with torch.no_grad():
        return bool(torch.isfinite(vae.decode(z).sample).all())


class TuningDiverged(NonFiniteError):
    """The decoder's tuning became NaN/Inf after an update: its lr is too high for these weights."""

    def __init__(self, where: str, lr: float) -> None:
        self.where, self.lr = where, lr
        super().__init__(f"VAE tuning diverged {where}; lower its lr (now {lr}, default {VAE_TUNING_LR})")


#: Most decoder tuning steps: 75 is the paper's; 10,000 is hours of a GPU, more is a slip of the keyboard.
MAX_TUNING_STEPS = 10_000


def check_tuning(steps: object, lr: object) -> None:
    """VAE* settings, checked before any model loads."""
    steps = whole("VAE tuning steps", steps)
    if steps < 1:
        raise UserError(f"VAE tuning steps must be at least 1 (got {steps})")
    if steps > MAX_TUNING_STEPS:
        raise UserError(f"VAE tuning steps must be at most {MAX_TUNING_STEPS} (got {steps}); "
                        f"the paper tunes {VAE_TUNING_STEPS}")
    positive("VAE tuning lr", lr)


def tune_decoder(vae: AutoencoderKL, images01: torch.Tensor, *, steps: int = VAE_TUNING_STEPS,
                 lr: float = VAE_TUNING_LR, callback: Callable[[int, float], None] | None = None) -> AutoencoderKL:
    """A copy of ``vae`` (fp32) whose decoder is fitted to ``images01`` (B, 3, H, W) in [0, 1].

    ``z = mean(E(x))`` is computed once and held fixed; Adam minimises ``mean|D(z) - x|`` over the
    decoder's parameters only. ``callback(step, loss)`` sees the loss before each step.
    """
    check_tuning(steps, lr)
    tuned = copy.deepcopy(vae).to(torch.float32).eval().requires_grad_(False)
    tiled = tuned.use_tiling  # the run's --vae-tiling, for the decodes that use the tuned VAE (tune_vae)
    tuned.disable_tiling()  # the tuned weights must not depend on it: no record of them names it
    device = next(tuned.parameters()).device
    x = images01.to(device, torch.float32) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    with torch.no_grad():
        z = torch.cat([tuned.encode(x[i:i + 1]).latent_dist.mean for i in range(len(x))])  # fixed, one at a time
    tuned.decoder.requires_grad_(True)
    if device.type == "cuda":
        tuned.enable_gradient_checkpointing()  # a 1024^2 decoder backward is large
    optimizer = torch.optim.Adam(tuned.decoder.parameters(), lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            for i in range(len(x)):  # one image at a time: one decoder backward's memory, the mean's gradient
                part = (tuned.decode(z[i:i + 1]).sample - x[i:i + 1]).abs().mean() / len(x)
                if not torch.isfinite(part):
                    if step == 0:  # before any update: no lr is to blame (tuning runs in fp32)
                        raise NonFiniteError("the VAE decodes the reference to NaN/Inf before any tuning: its "
                                             "decoder's weights are broken; load the model again or pass a working "
                                             "VAE with --vae")
                    raise TuningDiverged(f"at step {step + 1} (loss {float(part.detach()) * len(x)})", lr)
                part.backward()
                loss += float(part.detach())
            optimizer.step()
            if callback is not None:
                callback(step, loss)
    if not _decodes(tuned, z[:1]):  # the last step's update: weights out of range, or a decoder that overflows
        raise TuningDiverged("in its last step", lr)
    if device.type == "cuda":
        tuned.disable_gradient_checkpointing()
    tuned.use_tiling = tiled
    return tuned.requires_grad_(False).eval()


#: The :class:`~attndistill.core.progress.StepInfo` stage of decoder-tuning steps.
TUNING_STAGE = "tuning the VAE decoder"


@public_task
def finetune_vae(reference: ImageInput | Sequence[ImageInput], *, model: DiffusionModel | str | None = None,
                 steps: int = VAE_TUNING_STEPS, lr: float = VAE_TUNING_LR, reference_fit: str | None = None,
                 vae: str | None = None, device: str | None = None, dtype: str | None = None, progress: bool = True,
                 callback: Callback | None = None, warn_crops: bool = True) -> AutoencoderKL:
    """VAE* (ALGORITHM.md §5): a copy of the model's ``AutoencoderKL`` (fp32) with its decoder fine-tuned on
    ``reference`` (one image or several, each as the tasks encode it: about the model's native area,
    fitted by ``reference_fit``, "squash" or "keep"; several: the mean of their losses).

    The model itself is not changed; ``model``, ``vae``, ``device`` and ``dtype`` as the tasks take them.
    ``callback`` sees a :class:`~attndistill.core.progress.StepInfo` after each step, as the tasks' callbacks
    do; its latents are empty (the decoder's weights are what change) and raising from it stops the
    tuning. ``warn_crops=False``: a task that encoded the same references has already named any that
    reference fit keep cuts to less than half. Save the result with :func:`save_vae` (or
    ``save_pretrained``) and pass the folder as ``--vae`` to any command, or load a model with it: a loaded
    model keeps its own VAE, so a task refuses ``vae=`` beside one (it takes it beside a model path)::

        vae = finetune_vae("wood.jpg", model=model)
        save_vae(vae, "wood-vae")          # later: --vae wood-vae
        tuned = load_model("stable-diffusion-v1-5/stable-diffusion-v1-5", vae="wood-vae")
    """
    check_callback(callback)
    model = held(as_model(model, vae=vae, device=device, dtype=dtype))

    references = as_list(reference)
    if not references:
        raise UserError("no reference image given for VAE tuning; pass at least one")
    reference_fit = check_reference_fit(DEFAULT_REFERENCE_FIT if reference_fit is None else reference_fit)
    images = fit_references([load_image(r, what="reference image") for r in references], reference_fit,
                            model.native_size, model.latent_multiple, names=[describe_input(r) for r in references],
                            warn=warn_crops)
    bar = None
    if progress:
        bar = progress_bar(steps, "tuning VAE decoder")

    def report(step: int, loss: float) -> None:
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}")  # the L1 of the decode, as every bar says loss
            bar.update()
        if callback is not None:
            callback(StepInfo(step, steps, 0, loss, torch.empty(0), [loss], stage=TUNING_STAGE))

    try:
        def attempt():  # a second one (out of memory beside cached graphs) starts over, and so does the bar
            if bar is not None:
                bar.reset()
            return tune_decoder(model.vae, images, steps=steps, lr=lr, callback=report)

        # a decoder's backward at full size is the largest VAE work there is: the run's idle graphs may have to go
        tuned = model.beside_graphs(attempt)
    finally:
        if bar is not None:
            bar.close()
    # how it was made, as a result's PNG says it: save_vae writes it beside the weights (PARAMETERS_FILE)
    tuned.attndistill_parameters = with_provenance({
        "task": "finetune-vae", "version": __version__, "reference": [describe_input(r) for r in references],
        "reference_fit": reference_fit, **model_parameters(model), "steps": steps, "lr": lr}, model)
    return tuned


@contextmanager
def using_vae(model: DiffusionModel, vae: AutoencoderKL | None) -> Iterator[DiffusionModel]:
    """Decode with ``vae`` for the ``with`` block; the model's own VAE keeps encoding, and comes back after.

    ``None`` is a no-op.
    """
    if vae is None:
        yield model
        return
    original, encoding = model.pipe.vae, model.encoding_vae
    model.encoding_vae = original if encoding is None else encoding
    model.pipe.vae = vae
    try:
        yield model
    finally:
        model.pipe.vae, model.encoding_vae = original, encoding


@contextmanager
def tuned_vae(model: DiffusionModel, references: Sequence[ImageInput] | None, *, reference_fit: str | None = None,
              progress: bool = False, callback: Callback | None = None) -> Iterator[DiffusionModel]:
    """For one run: fine-tune a copy of the decoder on every reference and decode with it (None: no-op).
    ``callback``: the run's, which sees the tuning's steps as stage :data:`TUNING_STAGE`."""
    try:
        vae = None if references is None else finetune_vae(references, model=model, reference_fit=reference_fit,
                                                           lr=VAE_TUNING_LR, progress=progress, callback=callback,
                                                           warn_crops=False)
    except TuningDiverged as exc:  # --tune-vae has no lr of its own to lower: the VAE command has
        raise NonFiniteError(f"VAE tuning (--tune-vae) diverged {exc.where} at lr {exc.lr}; make the decoder "
                             "with 'attndistill finetune-vae' and a lower learning rate, then pass --vae with the "
                             "folder it writes instead of --tune-vae") from None
    with using_vae(model, vae):
        yield model


def _file_kind(path: Path) -> str | None:
    """"an image" or "a weights file" where ``path``'s suffix is one (Pillow's formats, checkpoints), else None."""
    from PIL import Image

    suffix = path.suffix.lower()
    if suffix in Image.registered_extensions():
        return "an image"
    return "a weights file" if suffix in CHECKPOINT_SUFFIXES else None


def check_vae_folder(folder: str | os.PathLike, *, overwrite: bool = False,
                     reads: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Validate a VAE output folder before any work starts. ``reads``: the model, VAE and config folders the
    run loads: --overwrite must never replace them (a model's own vae/ looks like any saved VAE)."""
    folder = Path(folder)
    if folder.is_symlink():  # replacing it would replace the link, or (rmtree) refuse after the work is done
        raise UserError(f"output '{folder}' is a symbolic link; give the folder's real path or another name")
    for source in reads:
        if source is not None and Path(source).is_dir() and _within(folder, Path(source)):
            raise UserError(f"output folder '{folder}' is in '{source}', which this run loads; give the tuned VAE a "
                            "folder of its own")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output '{folder}' is a file; give a folder name for the VAE")
    if not folder.exists() and (like := _file_kind(folder)):  # -o vae.png meant a file: said, not made a folder
        raise UserError(f"output '{folder}' is named like {like}, but the tuned VAE is a folder (config and "
                        "weights); give a folder name such as 'my-vae'")
    if folder.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise UserError(f"output folder '{folder}' is the current folder or holds it; give the VAE folder a name")
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise UserError(f"output folder '{folder}' already exists and is not empty; pass --overwrite or "
                            "choose another name")
        if not _is_vae_folder(folder):  # --overwrite replaces a VAE, never a folder of other things
            raise UserError(f"output folder '{folder}' holds files that are not a saved VAE; --overwrite only "
                            "replaces a VAE folder, so choose another name")
    check_folder_of(folder, what="output", option="-o")
    return folder


def _within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder``, inside it, or inside one of its subfolders wherever a link takes that (a
    model's vae/ may be a link to a VAE shared by several models)."""
    path = path.resolve()
    places = [folder, *(child for child in folder.iterdir() if child.is_dir())]
    return any(path == place.resolve() or place.resolve() in path.parents for place in places)


#: How a tuned VAE was made (reference, model, steps, lr, versions), saved beside its weights.
PARAMETERS_FILE = "attndistill.json"
#: What saving a VAE writes: ``save_pretrained``'s files (the weights in either format) and ours.
VAE_FILES = {"config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", PARAMETERS_FILE}


def _is_vae_folder(folder: Path) -> bool:
    """Nothing but what saving a VAE writes, with an ``AutoencoderKL`` config (as ``--vae`` checks it)."""
    if not {p.name for p in folder.iterdir()} <= VAE_FILES:
        return False
    try:
        check_vae_source(folder)
    except UserError:
        return False
    return True


def save_vae(vae: AutoencoderKL, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save ``vae`` as a diffusers ``AutoencoderKL`` folder (safetensors); the folder appears complete or not at all."""
    if not callable(getattr(vae, "save_pretrained", None)):  # save_vae("wood-vae", vae): the arguments swapped
        raise UserError(f"save_vae takes the VAE that finetune_vae returned, then the folder: not a "
                        f"{type(vae).__name__} first")
    folder = check_vae_folder(folder, overwrite=overwrite)
    parent = folder.parent if str(folder.parent) else Path(".")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(folder.name), suffix=".partial", dir=parent))
    except OSError as exc:
        raise UserError(f"output folder '{folder}' cannot be written ({exc.strerror}); choose another path") from None
    old = None  # the folder replaced: moved aside until the new one is in place, so an interrupt loses neither
    try:
        vae.save_pretrained(tmp, safe_serialization=True)
        parameters = getattr(vae, "attndistill_parameters", None)
        if parameters:
            (tmp / PARAMETERS_FILE).write_text(params_json(parameters) + "\n")
        for path in tmp.iterdir():  # mkdtemp makes 0700 and safetensors 0600: as readable as any new folder
            path.chmod(FILE_MODE)
        tmp.chmod(FOLDER_MODE)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=partial_prefix(folder.name), suffix=".old", dir=parent))
            os.replace(folder, old)  # onto the empty folder mkdtemp made
        os.replace(tmp, folder)
    except BaseException as exc:  # Ctrl-C included: no half-written folder, and the old one back in its place
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            with contextlib.suppress(OSError):
                os.replace(old, folder)
        from safetensors import SafetensorError

        reason = exc.strerror if isinstance(exc, OSError) else None
        if isinstance(exc, SafetensorError) and "I/O error: " in str(exc):  # its writer's OSError, as text
            reason = str(exc).split("I/O error: ", 1)[1].split(" (os error")[0]
        if reason:  # e.g. disk full
            raise UserError(f"output folder '{folder}' could not be written ({reason}); free space or "
                            "choose another path") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder
