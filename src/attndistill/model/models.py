"""One small adapter over a loaded Stable Diffusion pipeline (``loading.py`` finds and loads it).

:class:`DiffusionModel` holds what running SD 1.5 and SDXL differs in: it
encodes and decodes latents, builds text conditioning (the null conditioning
for feature calls included) and calls the UNet. The engine and the tasks work
on any diffusers UNet through it; the family otherwise shows only in layer
numbering, ControlNet fitting and a few defaults (SDXL's memory switches).
"""

from __future__ import annotations

import gc
import logging
import re
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from PIL import Image

from ..errors import NonFiniteError, UserError, is_out_of_memory, precision_advice
from ..images import image_grid, to_pil
from .perf import PerfOptions, apply_perf

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.configuration_utils import FrozenDict

log = logging.getLogger(__name__)
T = TypeVar("T")

#: In ``DiffusionModel.graphs``: a denoising call whose capture ran out of memory, run eagerly for that shape
#: until the graphs are dropped (``guidance._predict``).
EAGER = "eager"

Kind = Literal["sd15", "sdxl"]

#: Images of a batch a preview shows, side by side (each decoded costs the preview's time again).
PREVIEW_IMAGES = 4


def free_memory() -> None:
    """Collect dropped tensors and hand the device's cached memory back (after a model or graphs go)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def check_steps(steps: int, limit: int) -> None:
    """DDIM visits at most as many timesteps as the model was trained with (``limit``, from its scheduler config)."""
    if steps < 1:
        raise UserError(f"steps must be at least 1 (got {steps})")
    if steps > limit:
        raise UserError(f"steps must be at most {limit}, the model's training timesteps (got {steps})")


def ddim_scheduler(config, steps: int) -> DDIMScheduler:
    """A DDIM scheduler from a model's scheduler ``config`` (a loaded model's, or the configs a check reads), set
    to ``steps`` steps.

    Never clipping or thresholding the predicted clean latent: those are for pixel-space models, and
    DDIM's defaults turn clipping on wherever the model's config does not say ``clip_sample`` (the PNDM and
    Euler configs many checkpoints ship), which squeezes latents of about ±4 into ±1 at every step.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(config, clip_sample=False, thresholding=False)
    check_steps(steps, scheduler.config.num_train_timesteps)
    # timesteps stay on the CPU: a loop reads each one (int(t), the scheduler's own step logic), and reading
    # a device tensor is a GPU sync; UNet calls take :meth:`timestep`
    scheduler.set_timesteps(steps)
    return scheduler


def _check_images(images: object) -> None:
    """What :meth:`DiffusionModel.encode` takes, said in one line where a caller gives something else: a conv's
    channel error, a NumPy array's missing ``.to``, or 0-255 values encoded as if they were 0-1 without a word."""
    shape = "(B, 3, H, W) in [0, 1], such as attndistill.images.to_tensor(load_image(path)) gives"
    if not torch.is_tensor(images):
        raise UserError(f"encode takes a torch tensor {shape}, not a {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or 0 in images.shape:
        raise UserError(f"encode takes images of the shape {shape}, not {tuple(images.shape)}")
    if not images.is_floating_point():
        raise UserError(f"encode takes float images {shape}, not {images.dtype}; divide 8-bit values by 255")
    low, high = float(images.min()), float(images.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise UserError(f"encode takes images {shape}; these range from {low:g} to {high:g}"
                        + ("; divide 8-bit values by 255" if high > 2 else ""))


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
        raise UserError(f"device '{device}' was asked for but no CUDA GPU is available; use --device cpu "
                        "(device=\"cpu\" from Python)")
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


#: Null conditionings kept per model (one per output size on SDXL).
MAX_CACHED_NULLS = 16


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
    #: that folder's digest as it was loaded: what results record, though it may be tuned again while loaded
    vae_digest: str | None = None
    config_source: str | None = None  # the configs a single-file checkpoint was loaded with
    allow_pickle: bool = False  # loaded with pickle files allowed: results record it, so reruns may load them too
    hub_commits: dict = field(default_factory=dict)  # {"model"/"vae": commit} of the Hub snapshots loaded
    _null: dict = field(default_factory=dict, repr=False)
    graphs: dict = field(default_factory=dict, repr=False)  # captured CUDA graphs, reused across calls
    stats: dict = field(default_factory=dict, repr=False)  # e.g. seconds spent capturing graphs
    short_of_memory: bool = False  # a capture ran out of memory: automatic gradient checkpointing stays on
    encoding_vae: Any = field(default=None, repr=False)  # the model's own VAE while a tuned one decodes (using_vae)
    #: held by a task's run (tasks.setup.held): it puts its own attention processors, padding or VAE on the
    #: model, which another thread's run at the same time would take for the model's own
    lock: Any = field(default_factory=threading.RLock, repr=False, compare=False)
    #: (key, ControlNetModel): the last ControlNet runs named, kept for the next ones (controlnet.kept_controlnet)
    kept_controlnet: Any = field(default=None, repr=False, compare=False)

    def release_graphs(self) -> None:
        """Drop the captured CUDA graphs, and the ControlNet kept between runs, and hand their memory back.

        Each graph keeps its intermediate tensors in a memory pool of its own, which no other work can
        use; after an out-of-memory error the next job should not have to fit beside them (a ControlNet
        loads again when a run names it).
        """
        self.graphs.clear()
        self.kept_controlnet = None
        free_memory()

    def set_perf(self, perf: PerfOptions | None = None, **changes) -> DiffusionModel:
        """Apply speed/memory switches (see :class:`PerfOptions`); returns the model."""
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
    def unet(self) -> UNet2DConditionModel:
        return self.pipe.unet

    @property
    def vae(self) -> AutoencoderKL:
        return self.pipe.vae

    @property
    def scheduler_config(self) -> FrozenDict:
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

    def ddim_scheduler(self, steps: int) -> DDIMScheduler:
        """A DDIM scheduler configured like the model's own (REAL-MODELS.md), set to ``steps`` steps."""
        return ddim_scheduler(self.scheduler_config, steps)

    def timestep(self, t: torch.Tensor | int) -> torch.Tensor:
        """Timestep ``t`` (an int or a CPU tensor) as a 0-dim long tensor on the model's device, for UNet calls.

        Filled in on the device (a kernel): a copy of CPU memory to the GPU would wait for all queued GPU
        work (a sync), and every step would leave the GPU idle while Python prepares the next.
        """
        return torch.full((), int(t), dtype=torch.long, device=self.device)

    # -- VAE -------------------------------------------------------------------------------------

    def _vae_dtype(self, vae=None) -> torch.dtype:
        return next((self.vae if vae is None else vae).parameters()).dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents ``s * mean(E(x))`` (B, 4, H/8, W/8), fp32.

        Always with the model's own encoder: a tuned VAE (VAE*) only decodes, so a task encodes the same
        latents whether it swaps one in before or after its encoding.
        """
        _check_images(images)
        vae = self.vae if self.encoding_vae is None else self.encoding_vae
        x = images.to(self.device, self._vae_dtype(vae)) * 2 - 1
        with torch.no_grad():
            mean = self.beside_graphs(lambda: vae.encode(x).latent_dist.mean)
        return mean.float() * vae.config.scaling_factor

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
            advice = precision_advice(z.dtype)
            advice += " (or an fp16-safe VAE)" if advice else ""
            raise NonFiniteError(f"the decoded image is NaN/Inf (the latent ran out of range); lower --lr{advice}, "
                                 "or check the input images")
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def preview(self, latents: torch.Tensor, *, side: int = 32, most: int = PREVIEW_IMAGES) -> Image.Image:
        """The batch's first ``most`` latents decoded at most ``side`` latents across each, side by side: a cheap
        look at a running job (the web UI's live preview, ``--preview``) that shows every image of a small batch."""
        z = latents[:most].detach().float()  # (n, 4, h, w)
        h, w = z.shape[-2:]
        if max(h, w) > side:
            scale = side / max(h, w)
            z = torch.nn.functional.interpolate(z, size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                                mode="area")
        images = to_pil(self.decode(z))
        return images[0] if len(images) == 1 else image_grid(images, cols=len(images))  # one row

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
        warn_truncated(self.pipe.tokenizer, prompts)
        warn_truncated(self.pipe.tokenizer, negative or [], what="negative prompt")
        warn_prompt_syntax(prompts)
        warn_prompt_syntax(negative or [], what="negative prompt")
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
        key = tuple(size) if size and self.kind == "sdxl" else None  # only SDXL's carries a size (add_time_ids)
        if key not in self._null:
            if len(self._null) >= MAX_CACHED_NULLS:  # a long-lived process meets many sizes: the oldest goes
                del self._null[next(iter(self._null))]
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


#: Prompt syntax of other tools (A1111, ComfyUI) that CLIP would read as words: "(best quality:1.2)" weights,
#: "<lora:name:0.8>" and "<hypernet:...>" tags.
FOREIGN_SYNTAX = re.compile(r"\([^()]*[^\d\s:()]\s*:\s*[+-]?\d*\.?\d+\s*\)|<(?:lora|lyco|hypernet):[^<>]*>",
                            re.IGNORECASE)  # "(scale 1:50)" is a ratio, no weight


def warn_prompt_syntax(prompts: list[str], what: str = "prompt") -> None:
    """Warn of weights and tags other tools read in a prompt: here the prompt goes to CLIP as plain text."""
    for prompt in dict.fromkeys(prompts):  # a batch repeats its prompt: one warning
        found = [m.group(0) for m in FOREIGN_SYNTAX.finditer(prompt)]
        if found:
            shown = "', '".join(found[:3]) + ("', ..." if len(found) > 3 else "'")
            log.warning("%s has '%s, syntax of other tools that attndistill does not read: CLIP sees the brackets, "
                        "colons and numbers as words; write the words plainly", what, shown)


def warn_truncated(tokenizer, prompts: list[str], what: str = "prompt") -> None:
    """Warn when CLIP will cut a prompt at its 77-token limit (once per prompt of a batch)."""
    limit = tokenizer.model_max_length
    for prompt in dict.fromkeys(prompts):
        ids = tokenizer(prompt, truncation=False, verbose=False).input_ids  # our warning, not its own
        if len(ids) > limit:  # CLIP keeps its start token, the first limit - 2 words' tokens and its end token
            dropped = tokenizer.decode(ids[limit - 1:-1], skip_special_tokens=True).strip()
            log.warning("%s has %d tokens; CLIP keeps the first %d, so its end is ignored: '%s'", what, len(ids), limit,
                        dropped if len(dropped) <= 60 else dropped[:57] + "...")
