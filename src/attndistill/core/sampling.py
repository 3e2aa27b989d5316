"""AD-guided sampling (paper Algorithm 2, ALGORITHM.md §4): one DDIM loop for every sampling task.

Text-to-image (SD 1.5 and SDXL), ControlNet-conditioned generation, texture
sampling and SDEdit layouts all run :func:`sample`: the ordinary DDIM loop of
diffusers' pipelines (user prompt, classifier-free guidance, optional
ControlNet residuals) and, after each scheduler step, an AD update of the new
latent at ``t'`` (:func:`attndistill.core.guidance.guide_latents`). With
``iters=0`` only AdaIN (where on) guides the latent, as ALGORITHM.md §4 has it;
with AdaIN off as well the loop is a plain DDIM generation, equal to diffusers'
own pipeline output.
"""

from __future__ import annotations

import logging

import torch

from ..checks import number
from ..errors import UserError
from ..model.controlnet import Control
from ..model.models import Conditioning, DiffusionModel
from .engine import Distiller
from .guidance import cfg_noise, guide_latents, previous_timestep, reference_lookahead
from .progress import Callback, StepLoop

log = logging.getLogger(__name__)


def prompt_conditioning(model: DiffusionModel, prompt: str, negative_prompt: str | None = None, *,
                        guidance: float, size: tuple[int, int]) -> tuple[Conditioning, Conditioning | None]:
    """(cond, uncond) of the denoising call, batch 1; ``uncond`` is None when guidance <= 1 (no CFG).

    As in diffusers: the negative is the empty prompt, or zeros when the pipeline's config says
    ``force_zeros_for_empty_prompt`` (SDXL) and no negative prompt is given. ``size`` is (h, w) pixels.
    """
    if guidance <= 1.0:
        if negative_prompt:
            log.warning("the negative prompt is not used: guidance %g turns classifier-free guidance off "
                        "(raise --guidance above 1 to use it)", guidance)
        return model.encode_prompt([prompt], None, size=size)[0], None
    if negative_prompt is None and getattr(model.pipe.config, "force_zeros_for_empty_prompt", False):
        cond = model.encode_prompt([prompt], None, size=size)[0]
        added = cond.added_cond_kwargs
        if added is not None:
            added = {**added, "text_embeds": torch.zeros_like(added["text_embeds"])}
        return cond, Conditioning(torch.zeros_like(cond.encoder_hidden_states), added)
    return model.encode_prompt([prompt], [negative_prompt or ""], size=size)


def first_step(steps: int, strength: float) -> int:
    """Index of the first of ``steps`` DDIM steps that SDEdit at ``strength`` runs; an error if none is left."""
    if not 0 < number("strength", strength) <= 1:
        raise UserError(f"strength must be in (0, 1] (got {strength}); 1 starts from pure noise")
    first = steps - min(int(steps * strength), steps)
    if first >= steps:
        raise UserError(f"strength {strength} leaves no step to run with {steps} steps; raise --strength or --steps")
    return first


def sdedit_start(model: DiffusionModel, init: torch.Tensor, noise: torch.Tensor, *, steps: int,
                 strength: float) -> tuple[torch.Tensor, int]:
    """SDEdit: ``init`` latents (B, 4, h, w) noised to the step that ``strength`` in (0, 1] starts from.

    Returns (start latents, index of the first step to run), as diffusers' img2img pipelines count it.
    """
    first = first_step(steps, strength)
    scheduler = model.ddim_scheduler(steps)
    t = scheduler.timesteps[first : first + 1]
    return scheduler.add_noise(init.to(model.device), noise.to(model.device, init.dtype), t), first


def _denoise(model: DiffusionModel, scheduler, z: torch.Tensor, t: torch.Tensor, cond: Conditioning,
             uncond: Conditioning | None, guidance: float, control: Control | None,
             rescale: float = 0.0) -> torch.Tensor:
    """The noise prediction of one DDIM step: CFG, and ControlNet residuals on the same batched input."""
    x = scheduler.scale_model_input(z, t)
    t = model.timestep(t)  # the UNet's copy on the device; the scheduler keeps the CPU one (no sync)
    kwargs = {} if control is None else control.guided_residuals(x, t, cond, uncond)
    return cfg_noise(model, x, t, cond, uncond, guidance, rescale, **kwargs)


def sample(distiller: Distiller, latents: torch.Tensor, ref_latents: torch.Tensor, *, cond: Conditioning,
           uncond: Conditioning | None = None, guidance: float = 1.0, guidance_rescale: float = 0.0, steps: int,
           iters: int, lr: float,
           adain: bool = False, start_t: int | None = None, content_latents: torch.Tensor | None = None,
           control: Control | None = None, start_step: int = 0, generator: torch.Generator | None = None,
           callback: Callback | None = None, progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """Run Algorithm 2 and return the final latents (B, 4, h, w), fp32.

    latents: start latents (noise scaled by the scheduler's ``init_noise_sigma``, or SDEdit latents
    noised to ``start_step``); ref_latents: (R, 4, hr, wr) clean reference latents; cond/uncond: the
    denoising call's conditioning (batch 1 or B; ``uncond`` None or ``guidance`` <= 1: no CFG);
    guidance_rescale: diffusers' CFG rescale (:func:`~attndistill.core.guidance.cfg_noise`);
    content_latents: (1 or B, 4, h, w) for the content loss (weighted by the distiller's lambda);
    start_t: AD only at steps whose timestep is below it (default every step); generator: the CPU
    generator of the reference noise. The distiller's feature calls use its null conditioning and
    never the ControlNet; the denoising call runs with its capture paused.
    """
    model = distiller.model
    scheduler = model.ddim_scheduler(steps)
    timesteps = scheduler.timesteps[start_step:]
    if guidance <= 1.0:
        uncond = None
        if guidance_rescale > 0:
            log.warning("guidance rescale %g is not used: guidance %g turns classifier-free guidance off (raise "
                        "--guidance above 1 to use it)", guidance_rescale, guidance)
    z = latents.detach().to(model.device, torch.float32)
    ref_latents = ref_latents.to(model.device)
    distiller.condition_on(z.shape[-2:])  # SDXL's null conditioning of the output size
    ahead = reference_lookahead(distiller, timesteps, ref_latents, scheduler=scheduler, generator=generator,
                                content_latents=content_latents, start_t=start_t) if iters > 0 else None
    raised = ["content-weight"] * (distiller.used_content(content_latents) is not None) + \
        ["attention-scale"] + ["guidance"] * (uncond is not None) + ["control-scale"] * (control is not None)
    with StepLoop(model.device, len(timesteps), desc=desc, progress=progress, callback=callback,
                  dtype=model.dtype, raised=raised) as loop, \
            distiller:
        for i, t in enumerate(timesteps):
            t_int = int(t)
            # 1. one DDIM step with the user's prompt, CFG and ControlNet; AD records nothing here
            with distiller.store.paused():
                eps = _denoise(model, scheduler, z, t, cond, uncond, guidance, control, guidance_rescale)
            z = scheduler.step(eps, t, z, eta=0.0, return_dict=False)[0].float()
            # 2. AD at t' = t - T/steps on the new latent: AdaIN, noised reference, fresh Adam
            losses: list[torch.Tensor] = []
            t_prime = previous_timestep(t_int, scheduler)
            if (iters > 0 or adain) and (start_t is None or t_int < start_t):
                z, losses = guide_latents(distiller, z, t_prime, ref_latents, scheduler=scheduler, iters=iters,
                                          lr=lr, adain_on=adain, content_latents=content_latents,
                                          generator=generator, ahead=ahead.at(i) if ahead else None)
            loop.done(i, t_int, z, losses, distiller.last_parts, ad_timestep=t_prime)
    return z
