"""Load Stable Diffusion components and wrap them in one small adapter.

:class:`DiffusionModel` is the only place that knows SD 1.5 from SDXL: it
encodes and decodes latents, builds text conditioning (the null conditioning
for feature calls included) and calls the UNet. Everything downstream works
on any diffusers UNet through it.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal, TypeVar

import torch

from .errors import NonFiniteError, UserError, is_out_of_memory
from .perf import PerfOptions

log = logging.getLogger(__name__)
T = TypeVar("T")

#: In ``DiffusionModel.graphs``: a denoising call whose capture ran out of memory, run eagerly for that shape
#: until the graphs are dropped (``guidance._predict``).
EAGER = "eager"

SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_MODEL = SD15_ID

Kind = Literal["sd15", "sdxl"]


@dataclass
class Conditioning:
    """What the UNet needs besides latent and timestep, for a batch of B."""

    encoder_hidden_states: torch.Tensor  # (B, 77, D)
    added_cond_kwargs: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (B, 1280), time_ids (B, 6)

    @property
    def batch(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def expand(self, batch: int) -> Conditioning:
        """The same conditioning for ``batch`` samples (a batch of 1 is broadcast, no copy)."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"cannot expand a conditioning of batch {self.batch} to {batch}")
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: v.expand(batch, *v.shape[1:]) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states.expand(batch, -1, -1), added)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch axis."""
        hidden = torch.cat([p.encoder_hidden_states for p in parts])
        added = None
        if parts[0].added_cond_kwargs is not None:
            added = {k: torch.cat([p.added_cond_kwargs[k] for p in parts]) for k in parts[0].added_cond_kwargs}
        return Conditioning(hidden, added)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"device '{text}' is not supported; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' was asked for but no CUDA GPU is available; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto" -> bf16 on GPUs, fp32 on CPU (ALGORITHM.md §6)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise UserError(f"dtype '{dtype}' is not supported; use fp32, bf16 or fp16")
    return table[dtype]


@dataclass
class DiffusionModel:
    """A loaded SD 1.5 or SDXL model: components plus the few calls AD needs."""

    pipe: object  # the diffusers pipeline holding the components
    kind: Kind
    source: str
    device: torch.device
    dtype: torch.dtype
    perf: PerfOptions = field(default_factory=PerfOptions)  # as applied: automatic switches decided
    asked: PerfOptions = field(default_factory=PerfOptions)  # as asked for: None where automatic
    vae_source: str | None = None  # another VAE folder swapped in (results record it, reruns need it)
    config_source: str | None = None  # the configs a single-file checkpoint was loaded with
    _null: dict = field(default_factory=dict, repr=False)
    graphs: dict = field(default_factory=dict, repr=False)  # captured CUDA graphs, reused across calls
    stats: dict = field(default_factory=dict, repr=False)  # e.g. seconds spent capturing graphs
    short_of_memory: bool = False  # a capture ran out of memory: automatic gradient checkpointing stays on

    def release_graphs(self) -> None:
        """Drop the captured CUDA graphs and hand their memory back to the device.

        Each graph keeps its intermediate tensors in a memory pool of its own, which no other work can
        use; after an out-of-memory error the next job should not have to fit beside them.
        """
        self.graphs.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def set_perf(self, perf: PerfOptions | None = None, **changes) -> DiffusionModel:
        """Apply speed/memory switches (see :class:`PerfOptions`); returns the model."""
        from .perf import apply_perf

        if perf is not None and not isinstance(perf, PerfOptions):
            raise UserError(f"perf must be a PerfOptions, not a {type(perf).__name__}")
        try:
            perf = replace(perf or self.asked, **changes)
        except TypeError as exc:  # an unknown switch
            raise UserError(f"{exc}; the switches are those of PerfOptions") from None
        apply_perf(self, perf)
        self.asked = perf
        self.graphs.clear()
        return self

    def checkpoint_to_fit(self) -> bool:
        """Turn gradient checkpointing on where it was left to the automatic setting and is off: what an AD
        iteration that ran out of memory tries (on an H200 it cut expansion's footprint from 9.6 to 6.8 GB
        for 23% more time, benchmarks/RESULTS.md run 7). False if there is nothing to turn on.

        Only the UNet's flag changes: a whole :meth:`set_perf` would also reset the attention processors
        that a running Distiller installed. The automatic setting stays on for this model from now on.
        """
        if self.asked.gradient_checkpointing is not None or self.perf.gradient_checkpointing:
            return False
        self.short_of_memory = True
        self.unet.enable_gradient_checkpointing()
        self.perf = replace(self.perf, gradient_checkpointing=True)
        return True

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler_config(self):
        return self.pipe.scheduler.config

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """Side in pixels the model was trained at (512 SD 1.5, 1024 SDXL)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_multiple(self) -> int:
        """Pixel sides must be multiples of this: the UNet halves the latent once per down block."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    def ddim_scheduler(self, steps: int):
        """A DDIM scheduler configured like the model's own (REAL-MODELS.md), set to ``steps`` steps."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        limit = scheduler.config.num_train_timesteps
        if steps < 1:
            raise UserError(f"steps must be at least 1 (got {steps})")
        if steps > limit:
            raise UserError(f"steps must be at most {limit}, the model's training timesteps (got {steps})")
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    # -- VAE -------------------------------------------------------------------------------------

    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents ``s * mean(E(x))`` (B, 4, H/8, W/8), fp32."""
        x = images.to(self.device, self._vae_dtype()) * 2 - 1
        with torch.no_grad():
            mean = self.beside_graphs(lambda: self.vae.encode(x).latent_dist.mean)
        return mean.float() * self.vae.config.scaling_factor

    def beside_graphs(self, call: Callable[[], T]) -> T:
        """``call()``; if it runs out of memory beside cached CUDA graphs, again without them.

        For the VAE's work around a run: at full resolution it peaks above the graphs' pools (SDXL's decode
        at 1024²: 2,560 MiB by a CPU count, against 913 MiB of pools with checkpointing;
        benchmarks/RESULTS.md), and the graphs sit idle while it runs. On a small card they go, and the
        next job captures them again.
        """
        for attempt in (1, 2):
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are retried
                graphs = sum(g is not EAGER for g in self.graphs.values())
                if attempt == 2 or not (graphs and is_out_of_memory(exc)):
                    raise
            # out of the except block: its traceback would keep the failed call's memory
            log.warning("out of memory in the VAE beside %d cached CUDA graphs; dropping them and trying again",
                        graphs)
            self.release_graphs()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [0, 1], fp32."""
        z = latents.to(self.device, self._vae_dtype()) / self.vae.config.scaling_factor
        with torch.no_grad():
            x = self.beside_graphs(lambda: self.vae.decode(z).sample)
        if not torch.isfinite(x).all():  # clamp would turn NaN into a black image
            raise NonFiniteError("the decoded image is NaN/Inf (the latent ran out of range); lower --lr, "
                                 "use --dtype fp32 (or an fp16-safe VAE), or check the input images")
        return (x.float() / 2 + 0.5).clamp(0, 1)

    # -- text conditioning ------------------------------------------------------------------------

    def text_encoders(self) -> list:
        return [m for m in (getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None))
                if m is not None]

    @contextmanager
    def _encoders_on_device(self):
        """With ``offload_text_encoders``, bring the encoders to the GPU for one prompt and send them back."""
        if not self.perf.offload_text_encoders or self.device.type == "cpu":
            yield
            return
        for m in self.text_encoders():
            m.to(self.device)
        try:
            yield
        finally:
            for m in self.text_encoders():
                m.to("cpu")
            torch.cuda.empty_cache()

    def encode_prompt(self, prompts: list[str], negative: list[str] | None = None,
                      size: tuple[int, int] | None = None) -> tuple[Conditioning, Conditioning | None]:
        """Prompt (and, with ``negative``, CFG negative) conditioning through the pipeline's own encoder.

        ``size`` (height, width) in pixels feeds SDXL's ``add_time_ids``.
        """
        warn_truncated(self.pipe.tokenizer, prompts + (negative or []))
        cfg = negative is not None
        with torch.no_grad(), self._encoders_on_device():
            if self.kind == "sdxl":
                pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
                    prompt=prompts, device=self.device, num_images_per_prompt=1,
                    do_classifier_free_guidance=cfg, negative_prompt=negative)
                h, w = size or (self.native_size, self.native_size)
                time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=pos.dtype)
                cond = Conditioning(pos, {"text_embeds": pooled,
                                          "time_ids": time_ids.expand(pos.shape[0], -1)})
                uncond = None
                if cfg:
                    uncond = Conditioning(neg, {"text_embeds": neg_pooled,
                                                "time_ids": time_ids.expand(neg.shape[0], -1)})
                return cond, uncond
            pos, neg = self.pipe.encode_prompt(prompts, self.device, 1, cfg, negative_prompt=negative)
            return Conditioning(pos), (Conditioning(neg) if cfg else None)

    def null_condition(self, size: tuple[int, int] | None = None) -> Conditioning:
        """Empty-prompt conditioning (batch 1) for feature calls; cached per size.

        For SDXL this is the empty prompt through both encoders, not zeros (ALGORITHM.md, REAL-MODELS.md).
        """
        key = tuple(size) if size else None
        if key not in self._null:
            self._null[key] = self.encode_prompt([""], None, size=size)[0]
        return self._null[key]

    # -- UNet ---------------------------------------------------------------------------------------

    def predict(self, latents: torch.Tensor, t: torch.Tensor | int, cond: Conditioning,
                **unet_kwargs) -> torch.Tensor:
        """``eps_theta(z, t, cond)`` in the model's dtype; ``cond`` is broadcast to the batch."""
        cond = cond.expand(latents.shape[0])
        added = None
        if cond.added_cond_kwargs is not None:
            added = {k: v.to(self.dtype) for k, v in cond.added_cond_kwargs.items()}
        return self.unet(latents.to(self.dtype), t, encoder_hidden_states=cond.encoder_hidden_states.to(self.dtype),
                         added_cond_kwargs=added, return_dict=False, **unet_kwargs)[0]


def warn_truncated(tokenizer, prompts: list[str]) -> None:
    """Warn when CLIP will cut a prompt at its 77-token limit."""
    limit = tokenizer.model_max_length
    for prompt in prompts:
        n = len(tokenizer(prompt, truncation=False).input_ids)
        if n > limit:
            log.warning("prompt has %d tokens; CLIP keeps the first %d, the rest is ignored: %.60s...",
                        n, limit, prompt)


# -- loading ---------------------------------------------------------------------------------------

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
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserError(f"model '{model}' does not exist; pass a diffusers folder, a .safetensors file "
                        "or a Hub id such as " + SD15_ID)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        index = Path(hf_hub_download(model, "model_index.json", local_files_only=local_files_only(model)))
    except LocalEntryNotFoundError:
        raise _not_available(model) from None
    except RepositoryNotFoundError:
        raise UserError(f"model '{model}' does not exist on the Hugging Face Hub; check the id") from None
    except (HfHubHTTPError, OSError) as exc:
        if "connect" in str(exc).lower() or "resolve" in str(exc).lower():
            raise _not_available(model) from None
        raise UserError(f"model '{model}' could not be fetched: {str(exc).splitlines()[0]}") from None
    return _parse_model_index(index, model)


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


def _kind_from_index(index: dict, model: str) -> Kind:
    name = index.get("_class_name")
    name = name if isinstance(name, str) else ""
    if "XL" in name:
        if "Refiner" in name or "text_encoder" not in index or index.get("text_encoder") in (None, [None, None]):
            raise UserError(f"model '{model}' is an SDXL refiner ({name}); use an SDXL base model such as {SDXL_ID}")
        return "sdxl"
    if name.startswith("StableDiffusion") and "unet" in index and "vae" in index:
        if any(k in name for k in ("Upscale", "Depth2Img", "InstructPix2Pix", "Inpaint", "unCLIP", "3")):
            raise UserError(f"model '{model}' is a {name}; attndistill runs plain SD 1.x/2.x and SDXL "
                            "text-to-image models")
        return "sd15"
    raise UserError(f"model '{model}' is a {name or 'unknown pipeline'}; attndistill runs Stable Diffusion "
                    f"1.x/2.x and SDXL models (e.g. {SD15_ID})")


def _kind_from_checkpoint(path: Path) -> Kind:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:
        raise UserError(f"checkpoint '{path}' is not a readable .safetensors file; re-download it") from None
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    return "sd15"


def load_model(model: str | os.PathLike = DEFAULT_MODEL, *, vae: str | os.PathLike | None = None,
               device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               config: str | os.PathLike | None = None, allow_pickle: bool = False,
               variant: str | None = None, perf: PerfOptions | None = None) -> DiffusionModel:
    """Load an SD 1.5 / SDXL model from a Hub id, a diffusers folder or a single ``.safetensors`` file.

    ``vae`` swaps in another ``AutoencoderKL`` folder; ``config`` is a local diffusers folder whose
    configs describe a single-file checkpoint (offline use). Weights are safetensors only unless
    ``allow_pickle``. On a GPU the ``fp16`` weight variant is preferred when the repo has one.
    Example: ``m = load_model("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda")``.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source = str(model)
    path = Path(source)
    common = dict(dtype=dtype)
    if is_checkpoint_path(path):
        check_checkpoint(path, allow_pickle)
        kind = _kind_from_checkpoint(path) if path.suffix.lower() == ".safetensors" else "sd15"
        cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
        extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        if config is not None:
            extra["config"] = str(config)
            extra["local_files_only"] = True
        try:
            pipe = cls.from_single_file(str(path), **common, **extra)
        except Exception as exc:  # diffusers raises many kinds here
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            hint = "" if config else "; offline, pass --config /path/to/a/diffusers/folder of the same architecture"
            raise UserError(f"checkpoint '{path}' could not be loaded: {msg}{hint}") from None
    else:
        kind = pipeline_kind(source)
        cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
        extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False,
                                          "feature_extractor": None}
        if variant is None and device.type == "cuda" and dtype != torch.float32:
            variant = "fp16"
        pipe = from_pretrained(cls, source, variant, use_safetensors=safetensors_only(allow_pickle), **common,
                               **extra)
    if vae is not None:
        check_vae_source(vae)
        own = pipe.vae.config.scaling_factor
        pipe.vae = from_pretrained(AutoencoderKL, str(vae), None, what="VAE", option="--vae",
                                   use_safetensors=safetensors_only(allow_pickle), dtype=dtype)
        if not math.isclose(pipe.vae.config.scaling_factor, own, rel_tol=1e-3):
            log.warning("VAE '%s' scales its latents by %g, the model's own VAE by %g: it was made for another "
                        "model (SDXL's VAE is 0.13025, SD 1.5's 0.18215), so results will be off", vae,
                        pipe.vae.config.scaling_factor, own)
    pipe.to(device)
    if dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)  # the SDXL VAE overflows in fp16
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    model = DiffusionModel(pipe=pipe, kind=kind, source=source, device=device, dtype=dtype,
                           vae_source=None if vae is None else str(vae),
                           config_source=None if config is None else str(config))
    if perf is not None:
        model.set_perf(perf)
    return model


#: Single-file checkpoint suffixes (any case); all but .safetensors are pickles.
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def is_checkpoint_path(path: Path) -> bool:
    """A single file (or what is named like one), not a diffusers folder or a Hub id."""
    return path.is_file() or path.suffix.lower() in CHECKPOINT_SUFFIXES


def check_checkpoint(path: Path, allow_pickle: bool, option: str = "--allow-pickle") -> None:
    """A single-file checkpoint exists, is one, and is safetensors unless pickles are allowed."""
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise UserError(f"model '{path}' is a file but no checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}); pass a "
                        "diffusers folder, a Hub id or a .safetensors checkpoint")
    if suffix != ".safetensors" and not allow_pickle:
        raise UserError(f"checkpoint '{path}' is a pickle file that can run code when loaded; convert it to "
                        f".safetensors or pass {option} if you trust it")


def safetensors_only(allow_pickle: bool) -> bool | None:
    """diffusers' ``use_safetensors``: True refuses pickle weights; None takes safetensors where they exist."""
    return None if allow_pickle else True


def check_vae_source(vae: str | os.PathLike) -> None:
    """``--vae`` must be a folder holding an ``AutoencoderKL`` config (read before any weights)."""
    hint = "pass a folder saved by 'attndistill finetune-vae' or a model's 'vae' subfolder"
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


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers logs a failed fetch as an error before raising it; the raise becomes our one-line error.
    Its ControlNet loader also passes huggingface_hub an argument that warns of its deprecation (not ours
    to fix)."""
    from diffusers.utils import logging as dlogging

    before = dlogging.get_verbosity()
    dlogging.set_verbosity(dlogging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
            yield
    finally:
        dlogging.set_verbosity(before)


def from_pretrained(cls, source: str, variant: str | None, *, what: str = "model", option: str = "--model",
                    **kwargs):
    """``cls.from_pretrained`` with our conventions: offline when asked, the ``variant`` weights when the
    repo has them (else the default files), and one-line errors for what the user can fix."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    path = Path(source)
    local_only = local_files_only(source)
    if variant and path.is_dir() and not any(path.rglob(f"*.{variant}.*")):
        variant = None  # a local folder without that variant: don't ask for it (diffusers logs an error)
    for attempt in ((variant, None) if variant else (None,)):
        try:
            with _quiet_diffusers():
                return cls.from_pretrained(source, variant=attempt, local_files_only=local_only, **kwargs)
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
            if "safetensors" in text and kwargs.get("use_safetensors"):
                raise UserError(f"{what} '{source}' has no .safetensors weights; convert it, or pass "
                                "--allow-pickle if you trust its pickle files") from None
            lowered = text.lower()
            if not path.is_dir() and any(w in lowered for w in ("connect", "offline", "cache", "config.json")):
                raise _not_available(source, what, option) from None
            raise UserError(f"{what} '{source}' could not be loaded: {text.splitlines()[0]}") from None
    raise AssertionError("unreachable")


@lru_cache(maxsize=1)
def cached_model(model: str, vae: str | None, device: str | None, dtype: str | None) -> DiffusionModel:
    """Keep the last loaded model so repeated API calls with the same id reuse it."""
    return load_model(model, vae=vae, device=device, dtype=dtype)


def as_model(model: DiffusionModel | str | os.PathLike | None, *, vae=None, device=None, dtype=None) -> DiffusionModel:
    """Accept a loaded model or anything :func:`load_model` takes.

    ``vae``, ``device`` and ``dtype`` load a model; with a loaded one they must agree with it, never be
    silently ignored.
    """
    if isinstance(model, DiffusionModel):
        wanted = resolve_device(device) if device is not None else model.device
        asked = {"device": (wanted.type, wanted.index or 0) != (model.device.type, model.device.index or 0),
                 "dtype": dtype is not None and resolve_dtype(dtype, model.device) != model.dtype,
                 "vae": vae is not None and str(vae) != model.vae_source}
        if any(asked.values()):
            names = " and ".join(k for k, v in asked.items() if v)
            raise UserError(f"{names} differ from the loaded model's ({model.device}, "
                            f"{str(model.dtype).removeprefix('torch.')}, VAE {model.vae_source or 'its own'}); pass "
                            f"them to load_model, or pass the model as a path")
        return model
    if model is not None and not isinstance(model, str | os.PathLike):
        raise UserError(f"model must be a loaded model (attndistill.load_model), a folder, a checkpoint file or a "
                        f"Hub id, not a {type(model).__name__}")
    return cached_model(str(model or DEFAULT_MODEL), None if vae is None else str(vae),
                        None if device is None else str(device), None if dtype is None else str(dtype))
