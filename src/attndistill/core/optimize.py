"""Optimisation mode (paper Algorithm 1, ALGORITHM.md §3).

Style transfer, appearance transfer and texture synthesis all optimise a
latent directly: for each DDIM timestep from T down to 0, score the latent's
attention against the reference's at that timestep (no noise added) and take
``iters`` Adam steps. One Adam optimiser lives for the whole run.
"""

from __future__ import annotations

import torch

from .engine import Distiller
from .lookahead import lookahead
from .progress import Callback, StepLoop


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
    distiller.condition_on(z.shape[-2:])  # SDXL's null conditioning of the output size
    if content_latents is not None:
        content_latents = content_latents.to(model.device)
    # reference/content features of several timesteps per UNet call (None: one call per step)
    used_content = distiller.used_content(content_latents)
    ahead = lookahead(distiller, range(len(timesteps)), lambda i: (int(timesteps[i]), ref_latents, used_content),
                      ref_latents, used_content)
    raised = ["content-weight"] if used_content is not None else []
    with StepLoop(model.device, len(timesteps), desc=desc, progress=progress, callback=callback,
                  dtype=model.dtype, raised=[*raised, "attention-scale"]) as loop, \
            distiller:
        for i, t in enumerate(timesteps):
            # reference (and content) features at (z_r, t), no noise; then `iters` Adam steps on (z, t).
            # One optimiser for the whole run: its state persists across timesteps.
            z, losses = distiller.adam_steps(z, model.timestep(t), ref_latents, content_latents,
                                             iters=iters, lr=lr, fresh=False,
                                             features=ahead.at(i).features if ahead else None)
            loop.done(i, int(t), z, losses, distiller.last_parts)
    return z.detach()
