"""Optimisation mode (paper Algorithm 1, ALGORITHM.md §3).

Style transfer, appearance transfer and texture synthesis all optimise a
latent directly: for each DDIM timestep from T down to 0, score the latent's
attention against the reference's at that timestep (no noise added) and take
``iters`` Adam steps. One Adam optimiser lives for the whole run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import NonFiniteError
from .engine import Distiller
from .lookahead import lookahead


@dataclass
class StepInfo:
    """What a callback sees after each timestep (optimisation) or denoising step (sampling)."""

    step: int  # 0-based
    total: int
    timestep: int
    loss: float  # loss after the last inner iteration's forward (before its Adam step)
    latents: torch.Tensor  # current latents (B, 4, h, w), detached
    losses: list[float] | None = None  # every inner iteration's loss at this step
    #: "" for the run's own steps; a task's decoder tuning (tune_vae) reports "tuning the VAE decoder", its
    #: latents empty: a callback may raise to stop the run there too
    stage: str = ""


Callback = Callable[[StepInfo], None]


def report_progress(bar, callback: Callback | None, info: StepInfo, losses: list[torch.Tensor],
                    every: int = 10, advance: int = 1) -> None:
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
    bar.set_postfix(**({"loss": f"{info.loss:.4f}"} if values else {}), t=info.timestep)  # 0 iters: no loss
    if callback is not None:
        callback(info)


class FiniteGuard:
    """NaN/Inf watch that does not stall the GPU: flags are kept on the device, read every few steps.

    ``update`` records the first step at which a watched tensor was not finite (device ops only);
    ``check`` reads that flag (a sync) every ``every`` steps and at the end, and raises with the
    exact step and timestep where it happened.
    """

    def __init__(self, device: torch.device, every: int = 10) -> None:
        self.every = every
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.what = torch.full((), 0, device=device, dtype=torch.long)
        self.timesteps: list[int] = []

    def update(self, step: int, timestep: int, latents: torch.Tensor, losses: list[torch.Tensor]) -> None:
        self.timesteps.append(timestep)
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
            raise NonFiniteError(f"the {what} became NaN/Inf at step {bad} (timestep {self.timesteps[bad]}); "
                                 "lower --lr (or a raised --content-weight, --attention-scale, --guidance or "
                                 "--control-scale), use --dtype fp32, or check the input images")


def optimize_latents(distiller: Distiller, init: torch.Tensor, ref_latents: torch.Tensor, *,
                     content_latents: torch.Tensor | None = None, steps: int, iters: int, lr: float,
                     callback: Callback | None = None, progress: bool = True,
                     desc: str = "optimising") -> torch.Tensor:
    """Run Algorithm 1 and return the optimised latents (B, 4, h, w), fp32.

    init: start latents (the content latent, or noise); ref_latents: (R, 4, hr, wr) clean reference
    latents; content_latents: (1 or B, 4, h, w) for the content loss.
    """
    model = distiller.model
    timesteps = model.ddim_scheduler(steps).timesteps
    z = init.detach().to(model.device, torch.float32)
    ref_latents = ref_latents.to(model.device)
    if content_latents is not None:
        content_latents = content_latents.to(model.device)
    bar = tqdm(total=len(timesteps), desc=desc, disable=not progress, dynamic_ncols=True)
    guard = FiniteGuard(model.device)
    # reference/content features of several timesteps per UNet call (None: one call per step)
    used_content = distiller.used_content(content_latents)
    ahead = lookahead(distiller, range(len(timesteps)), lambda i: (int(timesteps[i]), ref_latents, used_content),
                      ref_latents, used_content)
    try:
        with distiller:
            for i, t in enumerate(timesteps):
                t_int = int(t)
                # reference (and content) features at (z_r, t), no noise; then `iters` Adam steps on (z, t).
                # One optimiser for the whole run: its state persists across timesteps.
                z, losses = distiller.adam_steps(z, t.to(model.device), ref_latents, content_latents,
                                                 iters=iters, lr=lr, fresh=False,
                                                 features=ahead.at(i).features if ahead else None)
                guard.update(i, t_int, z, losses)
                guard.check(i, final=i == len(timesteps) - 1)
                report_progress(bar, callback, StepInfo(i, len(timesteps), t_int, math.nan, z), losses)
    finally:
        bar.close()
    return z.detach()
