"""Performance switches: how a loaded model runs on its device, the same for every task.

They live on the model (``model.perf``) so that every task, the CLI, the batch
runner and the web UI honour them without threading options through each call.
Each switch keeps results the same up to floating-point reordering; the fast
path is the default where it is safe (CUDA), the plain path elsewhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from .compiling import compiled
from .group_norm import swap_group_norms

#: UNet blocks that ``compile`` compiles (regional compilation): the repeated blocks outside attention,
#: whose GroupNorm/SiLU/GEGLU chains fuse well. Attention keeps its processors, which record features.
COMPILED_BLOCKS = ("ResnetBlock2D", "FeedForward")
#: Switches that change a result's pixels (by rounding; VAE tiling by decoding in tiles): each result
#: records those that differ from the defaults, so that a rerun can set them (``info --job``).
PIXEL_SWITCHES = ("fused", "compile", "compiled_loss", "compiled_calls", "channels_last", "channels_last_norms",
                  "compiled_norms", "cudnn_benchmark", "lookahead_batch", "feed_forward_chunks", "attention_slicing",
                  "vae_tiling")
#: Cards with less memory keep the text encoders in CPU memory by default: SDXL T2I then peaks at
#: 8.3 GB instead of 9.9 GB of allocated memory (H200, run 2 in benchmarks/RESULTS.md). With
#: checkpointing too (the default below this size) SDXL T2I ran under a 9 GB cap on the allocator (run 8).
SMALL_CARD_GIB = 16
#: Automatic look-ahead (``lookahead_batch=None`` on CUDA): rows of one call times latent pixels per
#: row, at most this many: 16 rows of SD 1.5's 64x64 latents, 4 of SDXL's 128x128 (H200, runs 5 and 6 in
#: benchmarks/RESULTS.md: in run 6's full runs 8 rows were slower in every case and saved 0-0.09 GB).
LOOKAHEAD_LATENT_PIXELS = 16 * 64 * 64


#: With ``vae_tiling``, tiles of at most this many pixels a side. SDXL's decode at 1024² peaks at 2,560
#: MiB whole and 646 MiB in 512-pixel tiles (CPU count, bf16, benchmarks/run_memory.py).
VAE_TILE_PIXELS = 512


#: Switches that act on CUDA devices only: asked for on another, they are said to change nothing there.
CUDA_ONLY = ("cuda_graphs", "lookahead_overlap", "cudnn_benchmark", "cpu_offload", "offload_text_encoders")

log = logging.getLogger(__name__)
_said_unused: set[tuple[str, ...]] = set()

#: Switches whose None means "decided for the device" (see each one's comment).
AUTOMATIC = ("fused", "cuda_graphs", "channels_last", "cudnn_benchmark", "gradient_checkpointing",
             "offload_text_encoders")


@dataclass(frozen=True)
class PerfOptions:
    """Speed and memory switches; None (the switches in :data:`AUTOMATIC`) is decided for the device and
    card, as each one's comment says."""

    fused: bool | None = None  # reference, content and target latents in one UNet call
    cuda_graphs: bool | None = None  # replay the reference call, each AD iteration and the denoising call as graphs
    early_exit: bool = True  # stop the UNet after the last captured self-attention layer
    compile: bool = False  # torch.compile the UNet's ResNet and feed-forward blocks (first calls compile)
    # each AD iteration's loss (the target's whole UNet forward, the ideal attentions, the L1 terms) as one
    # torch.compile program of static shapes, its backward compiled with it: the norms, activations and
    # additions around the convolutions and attention fuse, and the UNet's tail after the last recorded
    # layer is dropped as dead code. A program (minutes to compile) per latent shape and loss; masked AD takes
    # the uncompiled loss. On an H200 (run 14) 18-22% faster in cases a, b and c. It and compiled_calls
    # take the place of ``compile``'s blocks and of ``compiled_norms``
    compiled_loss: bool = False
    # the UNet calls without gradients as compiled programs of static shapes, a program per call shape: the
    # feature calls (reference, content, look-ahead), whose tail after the last recorded layer is dead code
    # there too, and the samplers' denoising call (not with a ControlNet). On an H200 (run 15) with compiled_loss:
    # texture synthesis 9% faster than with compiled_loss alone
    compiled_calls: bool = False
    # UNet weights in NHWC layout, which tensor-core convolutions prefer (None: on for CUDA; on an H200 it
    # spares cuDNN a layout transposition around every convolution)
    channels_last: bool | None = None
    # with channels_last: the UNet's GroupNorms read and write NHWC (group_norm.py) instead of PyTorch's,
    # whose CUDA kernel copies each input to NCHW and back; off under ``compile``, which fuses its own
    channels_last_norms: bool = False
    # the UNet's GroupNorms (with the SiLU after each ResNet block's norm) as small compiled programs whose
    # kernels keep the input's layout, forward and backward (group_norm.py); a handful of programs a
    # process, not one per block shape as ``compile``; off under ``compile``, ahead of channels_last_norms.
    # Off by default: on an H200 (run 8) 4-8% faster at batch 1, 6% slower at batch 8; ~17 s to compile
    compiled_norms: bool = False
    # cuDNN times its convolution algorithms for each new shape once and keeps the fastest (CUDA; a
    # process-wide setting: None leaves it as the process has it, True/False set it)
    cudnn_benchmark: bool | None = None
    # rows of one UNet call computing the reference features of upcoming steps (1: off; None: CUDA only,
    # up to LOOKAHEAD_LATENT_PIXELS of latent per call, and not in MultiDiffusion)
    lookahead_batch: int | None = None
    # compute the next look-ahead call on a second CUDA stream while the current steps run (the batch-1
    # iterations leave most of the card idle); same kernels and results, more memory while both run
    lookahead_overlap: bool = False
    # no-grad feature calls (look-ahead, reference and content) run the transformer blocks' feed-forward
    # layers a few rows at a time (features.FEED_FORWARD_CHUNK_PIXELS says how many and what it saves); the
    # AD iterations are never chunked
    feed_forward_chunks: bool = True
    # recompute activations in the backward pass: less memory, slower (None: on for SDXL on cards under
    # SMALL_CARD_GIB, and wherever a CUDA graph's capture runs out of memory: DiffusionModel.checkpoint_to_fit.
    # On an H200, run 7: SDXL T2I reserved 12.9 GB instead of 17.1 in 11.9 s instead of 10.3, expansion
    # 6.8 GB instead of 9.6 in 24.4 s instead of 19.9)
    gradient_checkpointing: bool | None = None
    attention_slicing: bool = False  # attention in slices: less memory, slower
    vae_tiling: bool = False  # decode/encode in tiles: large images in bounded memory
    cpu_offload: bool = False  # keep idle components in CPU memory (diffusers' model offload)
    # text encoders wait in CPU memory and visit the GPU to encode a prompt (None: on cards under 16 GiB)
    offload_text_encoders: bool | None = None

    def __post_init__(self) -> None:
        from ..errors import UserError

        for name, value in vars(self).items():
            if name == "lookahead_batch":
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                    raise UserError(f"lookahead_batch must be a whole number of at least 1 (got {value!r})")
            elif not (isinstance(value, bool) or (value is None and name in AUTOMATIC)):
                raise UserError(f"{name} must be True or False (got {value!r})")

    @classmethod
    def plain(cls) -> PerfOptions:
        """Every optimisation off: the reference path for equality tests and benchmarks."""
        return cls(fused=False, cuda_graphs=False, early_exit=False, channels_last=False, lookahead_batch=1,
                   feed_forward_chunks=False, gradient_checkpointing=False)

    def uses_channels_last(self, device: torch.device) -> bool:
        return self.channels_last if self.channels_last is not None else device.type == "cuda"

    def lookahead_rows(self, device: torch.device, latent_pixels: int, rows_per_step: int, *,
                       auto: bool = True) -> int:
        """Rows of one look-ahead call for steps of ``rows_per_step`` rows of ``latent_pixels`` each.

        0 when look-ahead is off or a call would hold a single step: then each step computes its own
        features (with CUDA graphs), which is no slower than a one-step look-ahead call. ``auto=False``:
        the automatic setting means off (where the reference is a small part of a step's work).
        """
        rows = self.lookahead_batch
        if rows is None:
            rows = LOOKAHEAD_LATENT_PIXELS // latent_pixels if auto and device.type == "cuda" else 1
        return rows if rows >= 2 * rows_per_step else 0


def pixel_switches(perf: PerfOptions) -> dict[str, object]:
    """The :data:`PIXEL_SWITCHES` of ``perf`` that differ from the defaults (what a result records)."""
    default = PerfOptions()
    return {k: getattr(perf, k) for k in PIXEL_SWITCHES if getattr(perf, k) != getattr(default, k)}


def apply_perf(model, perf: PerfOptions) -> None:
    """Switch the model's components to ``perf`` (idempotent; switches can be turned off again)."""
    unet, vae = model.unet, model.vae
    # the text encoders do wait in CPU memory beside another accelerator (MPS): only on the CPU is that nothing
    unused = tuple(name for name in CUDA_ONLY if getattr(perf, name) and (
        model.device.type == "cpu" or name != "offload_text_encoders")) if model.device.type != "cuda" else ()
    if unused and (model.device.type, *unused) not in _said_unused:  # once: every run sets its model's switches
        _said_unused.add((model.device.type, *unused))
        log.warning("%s act%s on CUDA GPUs only: on %s %s nothing", " and ".join(
            "--" + name.replace("_", "-") for name in unused), "" if len(unused) > 1 else "s", model.device.type,
            "they change" if len(unused) > 1 else "it changes")
    if perf.gradient_checkpointing is None:
        perf = replace(perf, gradient_checkpointing=(model.kind == "sdxl" and small_card(model.device))
                       or model.short_of_memory)
    if perf.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    elif getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()
    # a whole-call program would stop at each compiled block (they set the compiler's limits)
    compile_blocks(unet, perf.compile and not (perf.compiled_loss or perf.compiled_calls))
    swap_group_norms(unet, _norm_kind(perf, model.device))
    unet.to(memory_format=torch.channels_last if perf.uses_channels_last(model.device) else torch.contiguous_format)
    if model.device.type == "cuda" and perf.cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = perf.cudnn_benchmark
    if perf.attention_slicing:
        unet.set_attention_slice("auto")
    elif any(type(p).__name__.startswith("Sliced") for p in unet.attn_processors.values()):
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())  # slicing off again: the processor a fresh load has
    set_vae_tiling(vae, perf.vae_tiling)
    if perf.cpu_offload and model.device.type == "cuda":
        # components move between devices: captured graphs would point at stale memory, and a second
        # stream would race the moves
        perf = replace(perf, cuda_graphs=False, lookahead_overlap=False)
        model.pipe.enable_model_cpu_offload(device=model.device)
    if perf.offload_text_encoders is None:
        perf = replace(perf, offload_text_encoders=small_card(model.device))
    for encoder in model.text_encoders():
        encoder.to("cpu" if perf.offload_text_encoders else model.device)
    model.perf = perf


def _norm_kind(perf: PerfOptions, device: torch.device) -> str | None:
    """Which GroupNorms the UNet runs (group_norm.NORM_KINDS; None: PyTorch's own)."""
    if perf.compile or perf.compiled_loss or perf.compiled_calls:  # their programs fuse their own norms
        return None
    if perf.compiled_norms:
        return "compiled"
    if perf.channels_last_norms and perf.uses_channels_last(device):
        return "nhwc"
    return None


def set_vae_tiling(vae, on: bool) -> None:
    """The VAE in tiles of at most :data:`VAE_TILE_PIXELS` a side (``on``), or whole.

    diffusers tiles only images larger than the VAE's sample size, 1024 for SDXL's: SDXL's own size was not
    tiled at all, and its decode is the peak of SDXL T2I by a CPU count (benchmarks/RESULTS.md).
    """
    sample = vae.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    if on:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    tile = min(sample, VAE_TILE_PIXELS) if on else sample
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)


def small_card(device: torch.device) -> bool:
    """A CUDA card with under :data:`SMALL_CARD_GIB` of memory (consumer cards of 8-12 GB)."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_properties(device).total_memory < SMALL_CARD_GIB * 2**30


def compile_blocks(unet, on: bool) -> None:
    """Compile (or restore) the :data:`COMPILED_BLOCKS` of ``unet`` (:func:`compiling.compiled`: once per
    process and block shape, not per task or job)."""
    for module in unet.modules():
        if type(module).__name__ not in COMPILED_BLOCKS:
            continue
        is_compiled = getattr(module, "_compiled_call_impl", None) is not None
        if on and not is_compiled:
            module._compiled_call_impl = compiled(module._call_impl)  # what nn.Module.compile does
        elif not on and is_compiled:
            module._compiled_call_impl = None  # None is nn.Module's uncompiled state
