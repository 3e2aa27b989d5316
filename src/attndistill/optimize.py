"""Optimisation mode (paper Algorithm 1, ALGORITHM.md §3).

Style transfer, appearance transfer and texture synthesis all optimise a
latent directly: for each DDIM timestep from T down to 0, score the latent's
attention against the reference's at that timestep (no noise added) and take
``iters`` Adam steps. One Adam optimiser lives for the whole run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .engine import Distiller
from .errors import NonFiniteError


@dataclass
class StepInfo:
    """What a callback sees after each timestep (optimisation) or denoising step (sampling)."""

    step: int  # 0-based
    total: int
    timestep: int
    loss: float  # loss after the last inner iteration's forward (before its Adam step)
    latents: torch.Tensor  # current latents (B, 4, h, w), detached
    losses: list[float] | None = None  # every inner iteration's loss at this step


Callback = Callable[[StepInfo], None]


def ddim_timesteps(model, steps: int) -> torch.Tensor:
    """Timesteps of a DDIM scheduler configured like the model's, descending."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def check_finite(value: torch.Tensor, what: str, step: int, timestep: int) -> None:
    """Stop with a clear message instead of producing a black image."""
    if not torch.isfinite(value).all():
        raise NonFiniteError(f"the {what} became NaN/Inf at step {step} (timestep {timestep}); lower --lr, "
                             "use --dtype fp32, or check the input images")


def optimize_latents(distiller: Distiller, init: torch.Tensor, ref_latents: torch.Tensor, *,
                     content_latents: torch.Tensor | None = None, steps: int, iters: int, lr: float,
                     callback: Callback | None = None, progress: bool = True,
                     desc: str = "optimising") -> torch.Tensor:
    """Run Algorithm 1 and return the optimised latents (B, 4, h, w), fp32.

    init: start latents (the content latent, or noise); ref_latents: (R, 4, hr, wr) clean reference
    latents; content_latents: (1 or B, 4, h, w) for the content loss.
    """
    model = distiller.model
    timesteps = ddim_timesteps(model, steps)
    z = init.detach().to(model.device, torch.float32)
    ref_latents = ref_latents.to(model.device)
    if content_latents is not None:
        content_latents = content_latents.to(model.device)
    bar = tqdm(total=len(timesteps), desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        with distiller:
            for i, t in enumerate(timesteps):
                t_int = int(t)
                # reference (and content) features at (z_r, t), no noise; then `iters` Adam steps on (z, t).
                # One optimiser for the whole run: its state persists across timesteps.
                z, losses = distiller.adam_steps(z, t.to(model.device), ref_latents, content_latents,
                                                 iters=iters, lr=lr, fresh=False)
                values = torch.stack(losses).float().cpu().tolist()
                check_finite(torch.tensor(values), "loss", i, t_int)
                check_finite(z, "latent", i, t_int)
                bar.set_postfix(loss=f"{values[-1]:.4f}", t=t_int)
                bar.update()
                if callback is not None:
                    callback(StepInfo(i, len(timesteps), t_int, values[-1], z, values))
    finally:
        bar.close()
    return z.detach()
