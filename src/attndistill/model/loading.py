"""Find and load Stable Diffusion components: Hub ids, local folders and single-file checkpoints.

Loading is where users meet the network, the cache and other people's files, so each failure here
becomes one line that names the model and the fix (not cached while offline, pickle weights, a damaged
file, a folder that lacks a component). What it returns is a :class:`~attndistill.model.models.DiffusionModel`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import UserError, first_line, is_out_of_memory
from ..fingerprints import path_digest
from .models import DiffusionModel, Kind, free_memory, resolve_device, resolve_dtype
from .perf import PerfOptions
from .single_file import (
    CHECKPOINT_SUFFIXES,
    FAMILY,
    check_checkpoint,
    checkpoint_keys,
    is_checkpoint_path,
    kind_from_checkpoint,
    vae_given,
)

log = logging.getLogger(__name__)

SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_MODEL = SD15_ID


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


#: (when, result) of the last look for the Hub's host; a long-running web UI looks again after a minute.
_hub_probe: tuple[float, bool] | None = None
#: How long the look may take in all (name lookup aside): each address gets what is left of it.
_PROBE_SECONDS = 3.0


def _hub_unreachable() -> bool:
    """True when the Hub's host takes no connection at all (no network, no DNS).

    huggingface_hub would retry each request with back-off for about half a minute before it falls back
    to the cache or fails; one look of at most 3 s tells the same. Where requests go through a proxy
    (from the environment or the system's settings, as huggingface_hub's httpx finds them) the host is
    not ours to reach directly, so the libraries' own requests decide; so they do for an endpoint
    without a host.
    """
    global _hub_probe
    if _hub_probe is not None and time.monotonic() - _hub_probe[0] < 60:
        return _hub_probe[1]
    import urllib.request
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    try:
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        return False
    proxies = urllib.request.getproxies()
    if not host or ((proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host)):
        return False
    deadline = time.monotonic() + _PROBE_SECONDS
    unreachable = True
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:  # no name service, or no such name
        addresses = []
    for *_, address in addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            socket.create_connection(address[:2], timeout=left).close()
            unreachable = False
            break
        except OSError:
            continue
    _hub_probe = (time.monotonic(), unreachable)
    return unreachable


def local_files_only(source: str | os.PathLike) -> bool:
    """Load ``source`` from disk only: a local folder, ``HF_HUB_OFFLINE``, or a Hub that cannot be reached
    (then a cached model loads at once and a missing one fails at once, in one line)."""
    return Path(source).is_dir() or _offline() or _hub_unreachable()


def _not_available(source: str, what: str = "model", option: str = "--model") -> UserError:
    return UserError(
        f"{what} '{source}' is not in the local Hugging Face cache and the Hub cannot be reached"
        f"{' (HF_HUB_OFFLINE is set)' if _offline() else ''}; check the id and download it once online, "
        f"or pass {option} /path/to/a/local/diffusers/folder")


def _read_model_index(model: str) -> dict:
    """model_index.json of a local folder or a Hub repo (cache first)."""
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise UserError(f"model folder '{model}' has no model_index.json; it is not a diffusers model "
                            "folder (for a single .safetensors checkpoint pass the file itself)")
        return _parse_model_index(index, model)
    if not looks_like_hub_id(model):
        raise UserError(f"model '{model}' does not exist; pass a diffusers folder, a .safetensors file "
                        "or a Hub id such as " + SD15_ID)
    index = hub_file(model, "model_index.json")
    return _parse_model_index(index, model)


def hub_file(repo: str, filename: str, *, what: str = "model", option: str = "--model") -> Path:
    """``filename`` of the Hub repository ``repo``: from the cache, or downloaded where the Hub can be reached;
    a one-line error naming ``what`` (and ``option``) where it cannot be had."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=local_files_only(repo)))
    except HFValidationError:
        raise UserError(f"{what} '{repo}' is neither a folder here nor a Hub id; check the path") from None
    except LocalEntryNotFoundError:
        raise _not_available(repo, what, option) from None
    except RepositoryNotFoundError:
        raise UserError(f"{what} '{repo}' does not exist on the Hugging Face Hub; check the id") from None
    except EntryNotFoundError:
        raise UserError(f"{what} '{repo}' has no {filename} at the top of its Hub repository; check the id") from None
    except (HfHubHTTPError, OSError) as exc:
        if "connect" in str(exc).lower() or "resolve" in str(exc).lower():
            raise _not_available(repo, what, option) from None
        raise UserError(f"{what} '{repo}' could not be fetched: {first_line(exc)}") from None


def _parse_model_index(index: Path, model: str) -> dict:
    """The index as a dict; a damaged file (an interrupted download, a hand edit) is a one-line error."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        data = None
    if not isinstance(data, dict):
        raise UserError(f"model '{model}' has a model_index.json that is not a diffusers model index (a JSON "
                        f"object): {index}; download the model again")
    return data


#: The components a task needs, by model kind; the safety checker and feature extractor are never loaded.
_NEEDED = {"sd15": ("scheduler", "text_encoder", "tokenizer", "unet", "vae"),
           "sdxl": ("scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "unet", "vae")}


def pipeline_kind(source: str) -> Kind:
    """sd15 or sdxl from a diffusers folder's or Hub repo's model_index.json (no weights read); a local
    folder must hold every component a task needs."""
    kind = _kind_from_index(_read_model_index(source), source)
    if Path(source).is_dir():
        _check_components(Path(source), kind)
    return kind


def _check_components(folder: Path, kind: Kind) -> None:
    """Every needed component's subfolder is there: without ``tokenizer/`` transformers builds an empty
    tokenizer that fails only at the first prompt, with an error that names neither the folder nor the fix."""
    for name in _NEEDED[kind]:
        if not (folder / name).is_dir():
            raise UserError(f"model folder '{folder}' has no {name}/ folder, which a Stable Diffusion pipeline needs; "
                            "download the model again (or copy that folder from a complete copy)")
        if name.startswith("tokenizer") and not _has_vocabulary(folder / name):
            raise UserError(f"model folder '{folder}' has no vocabulary in {name}/ (vocab.json and merges.txt, or "
                            "tokenizer.json): every prompt would read as unknown words; download the model again "
                            "(or copy that folder from a complete copy)")


def _has_vocabulary(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))


def _check_tokenizers(pipe, source: str) -> None:
    """Each tokenizer fits its text encoder. One whose files lack the vocabulary loads as a few special tokens
    and turns every prompt into unknown tokens without a word; one without its config has no length limit, and
    the first prompt fails deep inside transformers."""
    for name, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tokenizer, encoder_module = getattr(pipe, name, None), getattr(pipe, encoder, None)
        if tokenizer is None or encoder_module is None:
            continue
        config = encoder_module.config
        if len(tokenizer) < config.vocab_size // 2:
            raise UserError(f"model '{source}': its {name} knows {len(tokenizer)} tokens where its {encoder} has "
                            f"{config.vocab_size}; the {name} files lack the vocabulary (vocab.json and merges.txt, "
                            "or tokenizer.json): download the model again")
        tokenizer.model_max_length = min(tokenizer.model_max_length, config.max_position_embeddings)


def check_latent_channels(unet_in: int, unet_out: int, latent: int, source: str,
                          vae: str | os.PathLike | None) -> None:
    """The UNet denoises exactly the VAE's latents. Inpainting (9 input channels) and image-editing (8) UNets
    often sit in folders indexed as a plain text-to-image pipeline; a VAE of another family makes latents of
    another width. Either would fail in the first UNet call with a shape error that names neither."""
    if vae is not None and latent != unet_out:
        raise UserError(f"VAE '{vae}' makes latents of {latent} channels where the UNet takes {unet_out}; "
                        "pass a VAE made for this model, such as one saved by 'attndistill finetune-vae'")
    if unet_in != latent or unet_out != latent:
        raise UserError(f"model '{source}': its UNet takes {unet_in} input channels where its VAE's latents "
                        f"have {latent}, as an inpainting or image-editing model's does; attndistill runs "
                        f"text-to-image models such as {SD15_ID} or {SDXL_ID}")


def _check_noise_schedule(pipe, source: str) -> None:
    """Sampling is DDIM on the model's own beta schedule. A model trained with an EDM schedule (Playground v2.5:
    sigmas, no betas) would be sampled on DDIM's default betas, a schedule it never saw: noise, not an error."""
    scheduler = pipe.scheduler
    if "EDM" in type(scheduler).__name__ or "sigma_data" in scheduler.config:
        raise UserError(f"model '{source}' is trained with an EDM noise schedule (its scheduler config gives sigmas, "
                        "not betas), which DDIM sampling cannot follow; attndistill runs models with a beta schedule, "
                        "as SD 1.x/2.x and SDXL base")
    _check_positive(scheduler.config.get("num_train_timesteps"), source, "scheduler", "num_train_timesteps")
    _check_positive(pipe.unet.config.sample_size, source, "unet", "sample_size")


def _check_positive(value, source: str, part: str, key: str) -> None:
    """A config number every run divides or sizes by (a hand-edited 0 or -5 failed deep in a run)."""
    values = value if isinstance(value, list | tuple) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise UserError(f"model '{source}' has {part}/ config {key} {value!r}, not a positive whole number; "
                        "download the model again")


def _kind_from_index(index: dict, model: str) -> Kind:
    name = index.get("_class_name")
    name = name if isinstance(name, str) else ""
    if "XL" in name:
        if "Refiner" in name:
            raise UserError(f"model '{model}' is an SDXL refiner ({name}); use an SDXL base model such as {SDXL_ID}")
        if "text_encoder" not in index or index.get("text_encoder") in (None, [None, None]):
            raise UserError(f"model '{model}' has no first text encoder (text_encoder), as an SDXL refiner has none; "
                            f"use an SDXL base model such as {SDXL_ID}")
        return "sdxl"
    if name.startswith("StableDiffusion") and "unet" in index and "vae" in index:
        if any(k in name for k in ("Upscale", "Depth2Img", "InstructPix2Pix", "Inpaint", "unCLIP", "3")):
            raise UserError(f"model '{model}' is a {name}; attndistill runs plain SD 1.x/2.x and SDXL "
                            "text-to-image models")
        return "sd15"
    what = f"is a {name}" if name else "names no pipeline in its model_index.json"
    raise UserError(f"model '{model}' {what}; attndistill runs Stable Diffusion 1.x/2.x and SDXL models (e.g. "
                    f"{SD15_ID})")


def single_file_kind(path: Path, keys: list[str] | None, config: str | os.PathLike | None) -> Kind:
    """The family of a single file by its tensor names, which ``--config`` must describe too (else diffusers
    fails on the first tensor of another shape); by ``--config`` alone where the names cannot be read."""
    kind = None if keys is None else kind_from_checkpoint(path, keys)
    if config is None:
        return kind or "sd15"
    if not Path(config).is_dir():
        raise UserError(f"--config '{config}' is no folder; pass the diffusers folder of a model of the checkpoint's "
                        "architecture (its model_index.json and component configs)")
    described = pipeline_kind(str(config))
    if kind is not None and described != kind:
        raise UserError(f"checkpoint '{path}' is an {FAMILY[kind]} checkpoint but --config '{config}' describes an "
                        f"{FAMILY[described]} model; pass a diffusers folder of the checkpoint's family")
    return described


def local_or_hub(source: str | os.PathLike) -> str:
    """A model, VAE or ControlNet as a result records it: a local path made absolute (while the folder it is
    relative to is still the current one), a Hub id as it is."""
    source = home(source)
    return os.path.abspath(source) if os.path.exists(source) else source


def home(source: str | os.PathLike) -> str:
    """``~/models/sd`` with the home folder spelled out, as a shell does for the CLI (the web UI's boxes, the
    API and batch files get the ``~`` as typed); anything else as it is (a Hub id never starts with ``~``)."""
    source = os.fspath(source)
    return os.path.expanduser(source) if source.startswith("~") else source


@torch.inference_mode(False)  # weights made inside a caller's inference_mode could take no part in AD's backward
def load_model(model: str | os.PathLike = DEFAULT_MODEL, *, vae: str | os.PathLike | None = None,
               device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               config: str | os.PathLike | None = None, allow_pickle: bool = False,
               variant: str | None = None, perf: PerfOptions | None = None) -> DiffusionModel:
    """Load an SD 1.5 / SDXL model from a Hub id, a diffusers folder or a single ``.safetensors`` file.

    ``vae`` swaps in another ``AutoencoderKL`` folder; ``config`` is a local diffusers folder whose
    configs describe a single-file checkpoint (offline use). Weights are safetensors only unless
    ``allow_pickle``. On a GPU the ``fp16`` weight variant is preferred when the repo has one; a folder that
    holds only one variant's weights loads those.
    Example: ``m = load_model("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda")``.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as dlogging

    from .hub import hub_commits

    dlogging.set_verbosity_error()
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source = home(model)
    vae = None if vae is None else home(vae)
    config = None if config is None else home(config)
    path = Path(source)
    check_config_use(source, config)
    common = dict(dtype=dtype)

    def load_vae():
        check_vae_source(vae)
        return from_pretrained(AutoencoderKL, str(vae), None, what="VAE", option="--vae",
                               use_safetensors=safetensors_only(allow_pickle), dtype=dtype)

    given = {}  # components passed in rather than read from the model
    if is_checkpoint_path(path):
        check_checkpoint(path, allow_pickle)
        keys = checkpoint_keys(path)
        kind = single_file_kind(path, keys, config)
        given = vae_given(path, keys, vae, load_vae)
        cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
        extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        if config is not None:
            extra["config"] = str(config)
            extra["local_files_only"] = True
        try:
            pipe = cls.from_single_file(str(path), **common, **extra, **given)
        except Exception as exc:  # diffusers raises many kinds here
            msg = first_line(exc) or type(exc).__name__
            if config is None and _unreachable(exc):  # diffusers fetches the architecture's configs from the Hub
                raise UserError(f"checkpoint '{path}' needs the configs of its architecture, which diffusers fetches "
                                "from the Hugging Face Hub, and the Hub cannot be reached; pass --config "
                                "/path/to/a/diffusers/folder of the same architecture") from None
            hint = "" if config else "; offline, pass --config /path/to/a/diffusers/folder of the same architecture"
            raise UserError(f"checkpoint '{path}' could not be loaded: {msg}{hint}") from None
    else:
        kind = pipeline_kind(source)
        cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
        extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False,
                                          "feature_extractor": None}
        pipe = from_pretrained(cls, source, default_variant(variant, device, dtype),
                               use_safetensors=safetensors_only(allow_pickle), **common, **extra)
    _check_tokenizers(pipe, source)
    if vae is not None and "vae" not in given:
        own = pipe.vae.config.scaling_factor
        pipe.vae = load_vae()
        if not math.isclose(pipe.vae.config.scaling_factor, own, rel_tol=1e-3):
            log.warning("VAE '%s' scales its latents by %g, the model's own VAE by %g: it was made for another "
                        "model (SDXL's VAE is 0.13025, SD 1.5's 0.18215), so results will be off", vae,
                        pipe.vae.config.scaling_factor, own)
    check_latent_channels(pipe.unet.config.in_channels, pipe.unet.config.out_channels,
                          pipe.vae.config.latent_channels, source, vae)
    _check_noise_schedule(pipe, source)
    pipe.to(device)
    if dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)  # the SDXL VAE overflows in fp16
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    # local paths absolute now: results record them, and a later change of folder must not break their reruns
    model = DiffusionModel(pipe=pipe, kind=kind, source=local_or_hub(source), device=device, dtype=dtype,
                           vae_source=None if vae is None else local_or_hub(vae),
                           config_source=None if config is None else local_or_hub(config),
                           allow_pickle=bool(allow_pickle))
    model.hub_commits = hub_commits({"model": model.source, "vae": model.vae_source})  # as loaded, before any update
    model.vae_digest = path_digest(model.vae_source)  # None for a Hub id (its commit is recorded)
    if perf is not None:
        model.set_perf(perf)
    return model


def _unreachable(exc: BaseException) -> bool:
    """Whether a load failed for want of the Hub (offline, no network): its error or one it grew from says so."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen: BaseException | None = exc
    while seen is not None:
        text = f"{type(seen).__name__}: {seen}".lower()
        if isinstance(seen, LocalEntryNotFoundError | ConnectionError | socket.gaierror) or any(
                w in text for w in ("connecterror", "connection", "name or service not known", "offline")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def check_config_use(source: str, config: str | os.PathLike | None) -> None:
    """``config`` describes a single-file checkpoint; a folder or Hub id has configs of its own, which the load
    would take, while the result recorded a config it never used."""
    if config is not None and not is_checkpoint_path(Path(source)):
        raise UserError(f"--config describes a single-file checkpoint's architecture, but '{source}' is a diffusers "
                        "folder or Hub id with configs of its own; drop --config")


#: A Hub repository id as huggingface_hub takes one: ``owner/name`` of letters, digits, ``_``, ``-`` and ``.``, neither
#: part starting or ending with ``-`` or ``.`` (a path with a space or ``..`` is no id: it raised a raw error).
_HUB_PART = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?!.*(?:--|\.\.)){_HUB_PART}/{_HUB_PART}")


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` that is no local path: what may be asked of the Hub (or its cache) when no folder exists."""
    return _HUB_ID.fullmatch(name) is not None


def default_variant(variant: str | None, device: torch.device, dtype: torch.dtype) -> str | None:
    """The weights variant to ask for: the ``fp16`` files where half precision runs on a GPU (REAL-MODELS.md:
    half the download; ``from_pretrained`` falls back to the default files where a repo has none)."""
    if variant is None and device.type == "cuda" and dtype != torch.float32:
        return "fp16"
    return variant


def safetensors_only(allow_pickle: bool) -> bool | None:
    """diffusers' ``use_safetensors``: True refuses pickle weights; None takes safetensors where they exist."""
    return None if allow_pickle else True


def check_vae_source(vae: str | os.PathLike) -> None:
    """``--vae`` must be a folder, or a Hub repository, holding an ``AutoencoderKL`` config (read before any
    weights)."""
    hint = ("pass a folder saved by 'attndistill finetune-vae', a model's 'vae' subfolder or the Hub id of a VAE "
            "(such as madebyollin/sdxl-vae-fp16-fix)")
    name = os.fspath(vae)
    if not os.path.exists(name) and looks_like_hub_id(name):
        config = hub_file(name, "config.json", what="VAE", option="--vae")
    else:
        config = Path(vae) / "config.json"
    if not config.is_file():
        raise UserError(f"VAE '{vae}' is not a diffusers AutoencoderKL folder (no config.json); {hint}")
    try:
        kind = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"VAE '{vae}' has a config.json that is not valid JSON; {hint}") from None
    if kind != "AutoencoderKL":
        raise UserError(f"VAE '{vae}' holds a {kind or 'component without a _class_name'}, not an AutoencoderKL; "
                        f"{hint}")


class _UnusedWeights(logging.Handler):
    """diffusers' warning that a checkpoint holds tensors its model has no place for, kept to be said in our words:
    (model class, tensor names) for each."""

    PATTERN = re.compile(r"were not used when initializing (\w+):\s*\['(.*)'\]", re.S)

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.found: list[tuple[str, list[str]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = self.PATTERN.search(record.getMessage())
        if match:
            self.found.append((match[1], match[2].split(", ")))


@contextmanager
def _quiet_diffusers() -> Iterator[list[tuple[str, list[str]]]]:
    """diffusers logs a failed fetch as an error before raising it; the raise becomes our one-line error. Its
    warnings are not printed either, but the one about weights a model has no place for is kept (yielded), since
    :func:`from_pretrained` says it. Its ControlNet loader also passes huggingface_hub an argument that warns of its
    deprecation (not ours to fix)."""
    from diffusers.utils import logging as dlogging

    root = logging.getLogger("diffusers")
    before, printing = dlogging.get_verbosity(), list(root.handlers)

    def silent(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL

    unused = _UnusedWeights()
    dlogging.set_verbosity(dlogging.WARNING)
    for handler in printing:
        handler.addFilter(silent)
    root.addHandler(unused)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
            yield unused.found
    finally:
        root.removeHandler(unused)
        for handler in printing:
            handler.removeFilter(silent)
        dlogging.set_verbosity(before)


def _say_unused(found: list[tuple[str, list[str]]], what: str, source: str) -> None:
    """A checkpoint with tensors its config has no place for was loaded without them: a variant its config does
    not describe (a union ControlNet under a plain config, say) runs, but not as it was trained."""
    for model_class, keys in found:
        log.warning(f"{what} '{source}' holds {len(keys)} {model_class} weights its config has no place for "
                    f"({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''}), left out; if it is a variant its "
                    "config.json does not describe, its results will be off: use a config that matches its weights")


def from_pretrained(cls, source: str, variant: str | None, *, what: str = "model", option: str = "--model",
                    **kwargs):
    """``cls.from_pretrained`` with our conventions: offline when asked, the ``variant`` weights when the
    repo has them (else the default files), and one-line errors for what the user can fix."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    path = Path(source)
    local_only = local_files_only(source)
    if path.is_dir():
        only = _only_variant(path)
        if only:
            variant = only  # its only weights: without asking for them diffusers finds none
        elif variant and not any(path.rglob(f"*.{variant}.*")):
            variant = None  # a local folder without that variant: don't ask for it (diffusers logs an error)
    elif variant is None:
        from .hub import cached_snapshot

        # a Hub cache that a GPU run in half precision filled with the fp16 files only: a CPU or fp32 run of the
        # same id found "no .safetensors weights" there, where the same files in a folder loaded
        snapshot = cached_snapshot(source, "model_index.json") or cached_snapshot(source, "config.json")
        if snapshot is not None:
            variant = _only_variant(snapshot)
    for attempt in ((variant, None) if variant else (None,)):
        try:
            with _quiet_diffusers() as unused:
                loaded = cls.from_pretrained(source, variant=attempt, local_files_only=local_only, **kwargs)
        except LocalEntryNotFoundError:
            raise _not_available(source, what, option) from None
        except (OSError, ValueError) as exc:
            text = str(exc)
            if attempt is not None and ("variant" in text or "fp16" in text):
                continue  # no fp16 variant: fall back to the default weights
            damaged = re.search(r"checkpoint file for '([^']+)'", text)
            if damaged:
                raise UserError(f"{what} '{source}' has a damaged weights file: {damaged.group(1)} (cut short "
                                "or not a weights file); download it again") from None
            named = re.search(r"no file named \S+ found in directory (.+?)\.?$", text)  # a component's folder
            if named and Path(named.group(1)).is_dir() and not any(
                    p.suffix in CHECKPOINT_SUFFIXES for p in Path(named.group(1)).rglob("*")):
                raise UserError(f"{what} '{source}' has no weights in {named.group(1)}, neither .safetensors nor "
                                "pickle files; download it again") from None
            if "safetensors" in text and kwargs.get("use_safetensors"):
                raise UserError(f"{what} '{source}' has no .safetensors weights; convert it, or pass "
                                "--allow-pickle if you trust its pickle files") from None
            if isinstance(exc, json.JSONDecodeError):  # a tokenizer's or config's JSON, cut or hand-edited
                raise UserError(f"{what} '{source}' has a damaged JSON file ({exc.msg}, line {exc.lineno}); download "
                                "it again") from None
            if "ignore_mismatched_sizes" in text and path.is_dir():  # diffusers' advice is for its callers, not ours
                raise _config_misfit(what, source, text) from None
            lowered = text.lower()
            if not path.is_dir() and any(w in lowered for w in ("connect", "offline", "cache", "config.json")):
                raise _not_available(source, what, option) from None
            raise UserError(f"{what} '{source}' could not be loaded: {first_line(exc)}") from None
        except (IndexError, KeyError, TypeError, AttributeError, ZeroDivisionError, NotImplementedError,
                RuntimeError) as exc:  # RuntimeError: transformers' mismatched sizes; NotImplemented: a scheduler's
            if not path.is_dir() or is_out_of_memory(exc):
                raise
            if "ignore_mismatched_sizes" in str(exc):  # transformers: the sizes are in its log, not the message
                raise _config_misfit(what, source, str(exc)) from None
            # diffusers building a part from a hand-edited config (num_train_timesteps 0, a list for an object)
            raise UserError(f"{what} '{source}' could not be built from its configs ({type(exc).__name__}: "
                            f"{first_line(exc)}); a config.json may be damaged: download it again") from None
        else:
            _check_complete(loaded, what, source)
            _say_unused(unused, what, source)
            return loaded
    raise AssertionError("unreachable")


def _config_misfit(what: str, source: str, text: str) -> UserError:
    """A component's config.json that makes tensors of other shapes than its weights hold, said with the first."""
    size = r"(torch\.Size\(\[[^\]]*\]\))"
    shapes = re.search(rf"(\S+) expected shape {size},? but got {size}", text)
    where = f" ({shapes[1]}: the config makes {shapes[2]}, the weights hold {shapes[3]})" if shapes else ""
    return UserError(f"{what} '{source}': a config.json does not fit its weights{where}; one of them may be damaged "
                     "or from another model: download it again")


def _check_complete(loaded, what: str, source: str) -> None:
    """Every tensor a config asks for came from the weights. diffusers leaves missing ones on the meta device
    without a word, and the first move to a device fails with "Cannot copy out of meta tensor"."""
    parts = {"": loaded} if isinstance(loaded, torch.nn.Module) else {
        f"{name}/": module for name, module in getattr(loaded, "components", {}).items()
        if isinstance(module, torch.nn.Module)}
    for folder, module in parts.items():
        missing = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
        if missing:
            raise UserError(f"{what} '{source}': the weights in {folder or 'it'} lack {len(missing)} tensors of its "
                            f"config ({', '.join(missing[:2])}{', ...' if len(missing) > 2 else ''}); download it "
                            "again" + (f" (or copy {folder} from a complete copy)" if folder else ""))


def _only_variant(folder: Path) -> str | None:
    """The variant (``fp16`` ...) of every weights file in a folder where all of them have one and the same, as
    in a folder saved with ``variant="fp16"`` only; None where any has the default name."""
    variants = set()
    for file in folder.rglob("*"):
        if file.suffix in (".safetensors", ".bin") and file.is_file():
            parts = file.name.split(".")  # name.fp16.safetensors, name.fp16-00001-of-00002.safetensors
            variants.add(parts[1].split("-")[0] if len(parts) == 3 else None)
    return variants.pop() if len(variants) == 1 else None


class ModelSlot:
    """The one model a process keeps loaded (API calls by name, the web UI): reused while the same one is asked
    for, and released before another one loads, since two SDXL models may not fit on one GPU."""

    def __init__(self, *, device: str | None = None, dtype: str | None = None, perf=None,
                 config: str | None = None, allow_pickle: bool = False) -> None:
        self.device, self.dtype, self.perf = device, dtype, perf  # perf: PerfOptions (the CLI's speed flags)
        # how single-file checkpoints load (the web UI's --config and --allow-pickle): the configs describe
        # single files only, so a folder or Hub id loads without them
        self.config, self.allow_pickle = config, allow_pickle
        self.key: tuple | None = None  # (model, vae, device, dtype, what their local files hold now)
        self.model: DiffusionModel | None = None
        self._lock = threading.Lock()

    def _key(self, model: str | None, vae: str | None, device: str | None, dtype: str | None) -> tuple:
        device = self.device if device is None else device
        dtype = self.dtype if dtype is None else dtype
        vae = (vae or "").strip()
        key = (home((model or "").strip() or DEFAULT_MODEL), home(vae) if vae else None, device, dtype)
        return key + (files_stamp(key[0]), files_stamp(key[1]))

    def holds(self, model: str | None, vae: str | None = None) -> bool:
        """Whether :meth:`get` would hand out the loaded model as it is (no load)."""
        return self.model is not None and self.key == self._key(model, vae, None, None)

    def get(self, model: str | None, vae: str | None = None, *, device: str | None = None,
            dtype: str | None = None) -> DiffusionModel:
        """The model for (``model``, ``vae``, ``device``, ``dtype``; the last two default to the slot's),
        loading it (and freeing the previous one) when it changed."""
        key = self._key(model, vae, device, dtype)
        with self._lock:
            if self.key != key or self.model is None:
                self._release()
                single = is_checkpoint_path(Path(key[0]))
                self.model = load_model(key[0], vae=key[1], device=key[2], dtype=key[3], perf=self.perf,
                                        config=self.config if single else None, allow_pickle=self.allow_pickle)
                self.key = key
            return self.model

    def _release(self) -> None:
        self.model, self.key = None, None
        free_memory()

    def describe(self) -> str:
        m = self.model
        if m is None:
            return "no model loaded: the next run loads it"
        vae = f" with VAE `{self.key[1]}`" if self.key and self.key[1] else ""
        predicts = m.scheduler_config.get("prediction_type", "epsilon")
        kind = m.kind + (f", {predicts.replace('_', '-')}" if predicts != "epsilon" else "")  # SD 2.x: v-prediction
        return f"loaded `{m.source}`{vae} ({kind}, {m.device}, {str(m.dtype).removeprefix('torch.')})"


def files_stamp(source: str | None) -> tuple:
    """Names, sizes and modification times of a local model's or VAE's files (a folder and its component
    folders, or a checkpoint file); () for a Hub id. A slot reloads a model whose files changed under the
    same name: a VAE saved again with ``finetune-vae --overwrite`` was otherwise decoded with its old weights
    while results recorded the folder."""
    path = Path(source) if source else None
    if path is None or not path.exists():
        return ()
    files = [path] if path.is_file() else [*path.glob("*"), *path.glob("*/*")]
    stamp = []
    for file in sorted(files):
        try:
            info = file.stat()
        except OSError:
            continue
        if not file.is_dir():
            stamp.append((str(file), info.st_size, info.st_mtime_ns))
    return tuple(stamp)


#: The model that API calls naming one by path or Hub id share.
_NAMED = ModelSlot()


def as_model(model: DiffusionModel | str | os.PathLike | None, *, vae: str | os.PathLike | None = None,
             device: str | None = None, dtype: str | None = None) -> DiffusionModel:
    """Accept a loaded model or anything :func:`load_model` takes.

    ``vae``, ``device`` and ``dtype`` load a model; with a loaded one they must agree with it, never be
    silently ignored.
    """
    if vae is not None and not isinstance(vae, str | os.PathLike):
        raise UserError(f"vae must be a folder or a Hub id, not a {type(vae).__name__}; save a tuned VAE with "
                        "save_vae(vae, folder) and load the model with it (load_model(..., vae=folder)), or pass "
                        "tune_vae=True to tune one for the run")
    if isinstance(model, DiffusionModel):
        wanted = resolve_device(device) if device is not None else model.device
        asked = {"device": (wanted.type, wanted.index or 0) != (model.device.type, model.device.index or 0),
                 "dtype": dtype is not None and resolve_dtype(dtype, model.device) != model.dtype,
                 "vae": vae is not None and local_or_hub(vae) != model.vae_source}
        if any(asked.values()):
            differing = [k for k, v in asked.items() if v]
            names = " and ".join(differing) + (" differs" if len(differing) == 1 else " differ")
            raise UserError(f"{names} from the loaded model's ({model.device}, "
                            f"{str(model.dtype).removeprefix('torch.')}, VAE {model.vae_source or 'its own'}); pass "
                            f"them to load_model, or pass the model as a path")
        return model
    if model is not None and not isinstance(model, str | os.PathLike):
        raise UserError(f"model must be a loaded model (attndistill.load_model), a folder, a checkpoint file or a "
                        f"Hub id, not a {type(model).__name__}")
    # keyed by what the names mean now: the same relative name in another folder is another model
    return _NAMED.get(local_or_hub(model or DEFAULT_MODEL), None if vae is None else local_or_hub(vae),
                      device=None if device is None else str(device), dtype=None if dtype is None else str(dtype))
