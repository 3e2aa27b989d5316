"""The shell every step loop shares: a progress bar with the loss, a NaN/Inf watch, the callback.

Algorithm 1 (:mod:`.optimize`), Algorithm 2 (:mod:`.sampling`) and MultiDiffusion (:mod:`.multidiffusion`)
differ in what a step does, not in how it is watched: each runs inside a :class:`StepLoop`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import StepDiverged, precision_advice


@dataclass
class StepInfo:
    """What a callback sees after each timestep (optimisation) or denoising step (sampling)."""

    step: int  # 0-based
    total: int
    timestep: int
    loss: float  # loss after the last inner iteration's forward (before its Adam step)
    latents: torch.Tensor = field(repr=False)  # current latents (B, 4, h, w), detached (a print shows the rest)
    losses: list[float] | None = None  # every inner iteration's loss at this step
    #: the terms of ``loss`` where a content loss takes part: {"ad": L_AD, "content": L_content}, loss being
    #: L_AD + lambda * L_content (ALGORITHM.md); None without a content term
    parts: dict[str, float] | None = None
    #: "" for the run's own steps; a task's decoder tuning (tune_vae) reports "tuning the VAE decoder", its
    #: latents empty: a callback may raise to stop the run there too
    stage: str = ""
    #: AD-guided sampling (ALGORITHM.md §4): the timestep t' its AD iterations ran at, the next step's; None where
    #: they ran at ``timestep`` (optimisation) or no AD ran
    ad_timestep: int | None = None


Callback = Callable[[StepInfo], None]


def _report_progress(bar, callback: Callback | None, info: StepInfo, losses: list[torch.Tensor],
                     every: int = 10, advance: int = 1, parts: dict[str, torch.Tensor] | None = None) -> None:
    """Advance the bar; read the loss (a GPU sync) only every few steps or when a callback wants it.

    ``advance=0`` for loops that move the bar themselves (MultiDiffusion: once per view batch).
    """
    bar.update(advance)
    if callback is None and (info.step + 1) % every and info.step + 1 != info.total:
        return
    values = [float(v) for v in losses]
    info.loss, info.losses = (values[-1] if values else math.nan), values
    if callback is not None:  # its own copy: the run goes on in the same (static) buffer
        info.latents = info.latents.detach().clone()
        if values and parts and "content" in parts:  # this step's own terms: a step without iterations has none
            info.parts = {k: float(v) for k, v in parts.items()}
    # in a log, said with the bar's next line only; a disabled bar has no mininterval
    in_log = getattr(bar, "mininterval", 0) >= LOG_BAR_INTERVAL_S
    bar.set_postfix(**({"loss": f"{info.loss:.4f}"} if values else {}), t=info.timestep,  # 0 iters: no loss
                    refresh=not in_log)
    if callback is not None:
        callback(info)


class _FiniteGuard:
    """NaN/Inf watch that does not stall the GPU: flags are kept on the device, read every few steps.

    ``update`` records the first step at which a watched tensor was not finite (device ops only);
    ``check`` reads that flag (a sync) every ``every`` steps and at the end, and raises with the
    exact step (counted from 1, as the progress bar counts) and timestep where it happened.
    """

    def __init__(self, device: torch.device, total: int, every: int = 10, *,
                 dtype: torch.dtype = torch.float32, raised: Sequence[str] = ()) -> None:
        self.every, self.total, self.dtype, self.raised = every, total, dtype, tuple(raised)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.what = torch.full((), 0, device=device, dtype=torch.long)
        self.timesteps: list[tuple[int, int | None]] = []  # each step's timestep and AD timestep

    def update(self, step: int, timestep: int, latents: torch.Tensor, losses: list[torch.Tensor],
               ad_timestep: int | None = None) -> None:
        self.timesteps.append((timestep, ad_timestep))
        loss_ok = torch.isfinite(torch.stack(losses)).all() if losses else torch.ones((), dtype=torch.bool,
                                                                                          device=latents.device)
        ok = loss_ok & torch.isfinite(latents).all()
        new_bad = (self.first_bad < 0) & ~ok
        self.first_bad = torch.where(new_bad, step, self.first_bad)
        self.what = torch.where(new_bad, torch.where(loss_ok, 2, 1), self.what)

    def check(self, step: int, *, final: bool = False) -> None:
        if not final and (step + 1) % self.every:
            return
        bad = int(self.first_bad)
        if bad >= 0:
            what = "loss" if int(self.what) == 1 else "latent"
            options = [f"--{name}" for name in self.raised]
            also = f" (or a raised {' or '.join(filter(None, [', '.join(options[:-1]), options[-1]]))})" \
                if options else ""
            timestep, ad_timestep = self.timesteps[bad]
            raise StepDiverged(f"the {what} became NaN/Inf at step {bad + 1} of {self.total} "
                               f"(timestep {timestep}); lower --lr{also}"
                               f"{precision_advice(self.dtype)}, or check the input images",
                               step=bad + 1, timestep=timestep, ad_timestep=ad_timestep)


#: Seconds between two updates of a bar written to a file or pipe (a job's log): each one is a line there, and
#: one a step filled a 200-step run's log with 200 lines; a terminal redraws its line as often as tqdm likes.
LOG_BAR_INTERVAL_S = 30.0


def progress_bar(total: int, desc: str, *, disable: bool = False) -> tqdm:
    """A tqdm bar on stderr: redrawn in place on a terminal or in a notebook (tqdm.auto's widget), a line every
    :data:`LOG_BAR_INTERVAL_S` in a log."""
    try:
        terminal = sys.stderr.isatty() or tqdm.__module__.endswith("notebook")
    except (AttributeError, ValueError):  # a closed or stand-in stream
        terminal = False
    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True,
                mininterval=0.1 if terminal else LOG_BAR_INTERVAL_S)


class StepLoop:
    """A run's steps, watched: ``done`` after each step checks for NaN/Inf, moves the bar, calls back.

    ``bar_total``/``advance``: a loop that moves the bar itself (MultiDiffusion: once per view batch,
    through :meth:`tick`) gives its own total and ``advance=0``. The bar is closed on leaving the block.
    ``raised``: the run's settings besides its lr that a diverging run may have too high, by their option names
    (``"content-weight"``): what the advice on NaN names, and only those.
    """

    def __init__(self, device: torch.device, total: int, *, desc: str, progress: bool,
                 callback: Callback | None, bar_total: int | None = None, advance: int = 1,
                 dtype: torch.dtype = torch.float32, raised: Sequence[str] = ()) -> None:
        self.total, self.callback, self.advance = total, callback, advance
        self.bar = progress_bar(total if bar_total is None else bar_total, desc, disable=not progress)
        # the model's dtype and the run's settings that may be too high (CLI names): what the advice on NaN says
        self.guard = _FiniteGuard(device, total, dtype=dtype, raised=raised)

    def __enter__(self) -> StepLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def tick(self) -> None:
        """One unit of the bar within a step."""
        self.bar.update()

    def done(self, step: int, timestep: int, latents: torch.Tensor, losses: list[torch.Tensor],
             parts: dict[str, torch.Tensor] | None = None, ad_timestep: int | None = None) -> None:
        """After step ``step`` (0-based) at ``timestep``: latents and the losses of its inner iterations;
        ``parts``: the loss terms of its last iteration (``Distiller.last_parts``), read for a callback only;
        ``ad_timestep``: where those iterations ran at another timestep (sampling's t')."""
        ad_timestep = ad_timestep if losses else None  # a step without AD iterations ran none at t'
        self.guard.update(step, timestep, latents, losses, ad_timestep)
        self.guard.check(step, final=step == self.total - 1)
        info = StepInfo(step, self.total, timestep, math.nan, latents, ad_timestep=ad_timestep)
        _report_progress(self.bar, self.callback, info, losses, advance=self.advance, parts=parts)
