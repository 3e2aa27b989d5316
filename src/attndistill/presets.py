"""Task defaults: the one source of truth for ALGORITHM.md §6.

The API, the CLI and the web UI all read :data:`PRESETS`; nothing else
hard-codes a step count, a learning rate or a loss weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal

from .errors import UserError

Mode = Literal["optimize", "sample", "multidiffusion"]

#: How reference images meet the model. "squash": each resized to the native square, as the paper's
#: code does (a non-square reference is stretched). "keep": the first reference's aspect ratio at about
#: the native area; other references are centre-cropped to that aspect, so none is stretched.
REFERENCE_FITS = ("squash", "keep")
DEFAULT_REFERENCE_FIT = "squash"


@dataclass(frozen=True)
class Preset:
    """Default settings of one task (ALGORITHM.md §6)."""

    task: str
    mode: Mode
    steps: int  # DDIM steps (optimisation: timesteps visited)
    iters: int  # Adam iterations per timestep
    lr: float  # Adam learning rate on the latent
    content_weight: float  # lambda of the content loss
    guidance: float = 1.0  # classifier-free guidance scale (sampling only)
    guidance_rescale: float = 0.0  # CFG rescale of zero-terminal-SNR models, 0 (off) to 1 (sampling only)
    adain: bool = False  # AdaIN of the latent to the noised reference (sampling only)
    attention_scale: float = 1.0  # `a` in the ideal attention
    init: Literal["content", "random", "labels", "layout"] = "random"  # what a run starts from (recorded)
    stride: int = 8  # MultiDiffusion view stride in latents
    reference_fit: str = DEFAULT_REFERENCE_FIT  # one of REFERENCE_FITS

    def override(self, **changes: object) -> Preset:
        """A copy with the non-None values of ``changes`` applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


#: Read-only: one process's tasks, CLI, web UI and batch runner all read their defaults here.
PRESETS: Mapping[str, Preset] = MappingProxyType({
    p.task: p
    for p in (
        Preset("style", "optimize", steps=200, iters=1, lr=0.05, content_weight=0.25, init="content"),
        Preset("appearance", "optimize", steps=200, iters=1, lr=0.05, content_weight=0.2, init="content"),
        Preset("texture", "optimize", steps=300, iters=1, lr=0.05, content_weight=0.0),
        Preset("texture-masked", "optimize", steps=200, iters=1, lr=0.05, content_weight=0.15, init="labels"),
        Preset("texture-sample", "sample", steps=50, iters=3, lr=0.05, content_weight=0.0, guidance=1.0),
        Preset("t2i", "sample", steps=50, iters=3, lr=0.015, content_weight=0.0, guidance=7.5, adain=True),
        Preset("t2i-sdxl", "sample", steps=50, iters=2, lr=0.015, content_weight=0.0, guidance=7.0, adain=True),
        Preset("expand", "multidiffusion", steps=50, iters=2, lr=0.05, content_weight=0.0, guidance=1.0),
    )
})


#: MultiDiffusion (ALGORITHM.md §4): view side in latents (64: 512 px on SD 1.5), views per batched
#: UNet call, and the decoder tile side and feathered overlap in latents for large canvases.
VIEW = 64
VIEW_BATCH = 8
DECODE_TILE = 64
DECODE_OVERLAP = 16

#: SDEdit layout control (ALGORITHM.md §4): the noise level a layout starts from, in (0, 1]; the spec
#: leaves it open, 0.8 keeps the layout's colours and lets the texture redraw its details.
LAYOUT_STRENGTH = 0.8

#: VAE* decoder fine-tuning (ALGORITHM.md §5): Adam steps and learning rate.
VAE_TUNING_STEPS = 75
VAE_TUNING_LR = 1e-4


def get_preset(task: str) -> Preset:
    """The preset of ``task``; an unknown one is a :class:`UnknownTask` (a ``UserError`` and a ``KeyError``)
    naming the known tasks."""
    try:
        return PRESETS[task]
    except (KeyError, TypeError):
        raise UnknownTask(f"unknown task {task!r}; known: {', '.join(PRESETS)}") from None


class UnknownTask(UserError, KeyError):
    def __str__(self) -> str:  # KeyError's would quote the message
        return str(self.args[0])
