"""AD guidance inside a sampler (paper Algorithm 2, ALGORITHM.md §4): the per-step pieces.

Every sampling task (text-to-image, ControlNet, texture sampling, SDEdit
layouts, MultiDiffusion expansion) runs an ordinary DDIM loop and, after each
scheduler step, calls :func:`guide_latents` on the new latent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from ..errors import is_out_of_memory
from ..model.compiling import static_program
from ..model.models import EAGER, Conditioning, DiffusionModel
from .engine import Distiller, evict_graphs
from .lookahead import Ahead, ReferenceLookahead, lookahead
from .stepper import StaticCall

log = logging.getLogger(__name__)


def adain(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per channel: normalise ``x`` (B, C, H, W) by its own spatial mean/std, rescale to ``ref``'s.

    ``ref`` (R, C, h, w) statistics are taken over batch and space with the unbiased std (``torch.std``).
    """
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True) + eps
    ref_mean = ref.mean(dim=(0, 2, 3), keepdim=True)
    ref_std = ref.std(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / std * ref_std + ref_mean


def previous_timestep(t: int, scheduler) -> int:
    """``t' = max(t - T/steps, 0)``: the timestep the scheduler step has just produced a latent for."""
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return max(int(t) - step, 0)


def noised(scheduler, latents: torch.Tensor, t: int, generator: torch.Generator | None) -> torch.Tensor:
    """``add_noise(latents, n, t)`` with fresh Gaussian noise ``n`` drawn on the CPU (device-independent seeds).

    On CUDA the noise goes over from pinned memory without waiting: a plain copy of CPU memory to the
    GPU waits for all queued GPU work first (a sync), and this runs at every step of a sampler.
    """
    noise = torch.randn(latents.shape, generator=generator)
    if latents.device.type == "cuda":
        noise = noise.pin_memory()
    noise = noise.to(latents.device, latents.dtype, non_blocking=True)
    t = torch.full((1,), int(t), device=latents.device, dtype=torch.long)  # made on the device: no copy
    return scheduler.add_noise(latents, noise, t)


def cfg_noise(model: DiffusionModel, latents: torch.Tensor, t: torch.Tensor | int, cond: Conditioning,
              uncond: Conditioning | None, guidance: float, rescale: float = 0.0, **unet_kwargs) -> torch.Tensor:
    """Noise prediction with classifier-free guidance (one batched UNet call when ``uncond`` is given).

    ``cond``/``uncond`` have batch 1 or the latents' batch. Extra ``unet_kwargs`` (e.g. ControlNet
    residuals, already batched as [uncond, cond]) go to the denoising call only. ``rescale`` in [0, 1]
    brings the guided prediction's spread back towards the conditional one's, as diffusers'
    ``guidance_rescale`` does: zero-terminal-SNR models over-expose without it.
    """
    b = latents.shape[0]
    with torch.no_grad():
        if uncond is None or guidance == 1.0:
            return _predict(model, latents, t, cond.expand(b), unet_kwargs).float()
        both = Conditioning.cat([uncond.expand(b), cond.expand(b)])
        eps_uncond, eps_cond = _predict(model, torch.cat([latents, latents]), t, both, unet_kwargs).float().chunk(2)
        guided = eps_uncond + guidance * (eps_cond - eps_uncond)
        if rescale > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            guided = rescale_noise_cfg(guided, eps_cond, guidance_rescale=rescale)
        return guided


def _predict(model: DiffusionModel, x: torch.Tensor, t, cond: Conditioning, unet_kwargs: dict) -> torch.Tensor:
    """A no-grad UNet call, replayed from a CUDA graph when the model's perf options allow it (and a compiled
    program with ``compiled_calls``; a ControlNet's residuals go to the uncompiled call)."""
    graphs = model.perf.cuda_graphs
    if unet_kwargs:
        return model.predict(x, t, cond, **unet_kwargs)
    if model.device.type != "cuda" or graphs is False:
        return denoiser(model)(x, t, cond)
    key = ("predict", tuple(x.shape), tuple(cond.encoder_hidden_states.shape),
           None if cond.added_cond_kwargs is None else tuple(sorted((k, tuple(v.shape))
                                                                    for k, v in cond.added_cond_kwargs.items())))
    graph = model.graphs.get(key)
    if graph is EAGER:
        return denoiser(model)(x, t, cond)
    if graph is None:
        failure = None
        try:
            graph = model.graphs[key] = GraphedPredict(model, x, t, cond)
            evict_graphs(model.graphs, "predict")
        except Exception as exc:  # handled below: inside except, its traceback keeps the capture's memory
            failure = (is_out_of_memory(exc), f"{type(exc).__name__}: {exc}")
        if failure is not None:  # fall back to eager calls, loudly, and stop trying
            log.warning("CUDA graph capture of the denoising call failed (%s); running it eagerly", failure[1])
            if failure[0]:  # out of memory: for this shape until the model's graphs are dropped (the next job)
                model.graphs[key] = EAGER
            else:  # something this setup cannot do: for good (also when the perf options are set again)
                model.perf = replace(model.perf, cuda_graphs=False)
                model.asked = replace(model.asked, cuda_graphs=False)
            return denoiser(model)(x, t, cond)
    return graph(x, t, cond)


def denoiser(model: DiffusionModel) -> Callable[..., torch.Tensor]:
    """``model.predict``, or its compiled program (static shapes) where ``model.perf.compiled_calls`` asks for
    it: one program per batch and conditioning shape, shared by every run of the process."""
    if not model.perf.compiled_calls:
        return model.predict
    program = static_program(DiffusionModel.predict, "the denoising call (--compiled-calls)")

    def predict(x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        # a timestep given as a number would be compiled in: a program per step
        return program(model, x, t, cond) if torch.is_tensor(t) else model.predict(x, t, cond)

    return predict


class GraphedPredict:
    """``model.predict`` captured as a CUDA graph over static inputs (the denoising call of a sampler)."""

    def __init__(self, model: DiffusionModel, x: torch.Tensor, t, cond: Conditioning) -> None:
        self.x = x.detach().clone()
        self.t = torch.as_tensor(t, device=x.device).reshape(()).clone()
        self.cond = Conditioning(cond.encoder_hidden_states.detach().clone(),
                                 None if cond.added_cond_kwargs is None else
                                 {k: v.detach().clone() for k, v in cond.added_cond_kwargs.items()})
        predict = denoiser(model)
        self.call = StaticCall(lambda: predict(self.x, self.t, self.cond), capture=True, grad=False)

    def __call__(self, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        self.x.copy_(x)
        self.t.copy_(torch.as_tensor(t, device=self.t.device).reshape(()))
        self.cond.encoder_hidden_states.copy_(cond.encoder_hidden_states)
        if cond.added_cond_kwargs is not None:
            for k, v in cond.added_cond_kwargs.items():
                self.cond.added_cond_kwargs[k].copy_(v)
        return self.call().clone()


def reference_lookahead(distiller: Distiller, timesteps, ref_latents: torch.Tensor, *, scheduler,
                        content_latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
                        start_t: int | None = None, auto: bool = True) -> ReferenceLookahead | None:
    """Algorithm 2's noised reference/content latents and their features, several steps per UNet call.

    None where ``model.perf`` has it off (:meth:`PerfOptions.lookahead_rows`, which explains ``auto``).
    The noise is drawn in the order the step-by-step path draws it (reference, then content, step
    after step), so the results match it.
    """
    device = distiller.model.device
    ref_latents = ref_latents.to(device)
    content_latents = None if content_latents is None else content_latents.to(device)
    used_content = distiller.used_content(content_latents)

    def inputs(i: int):
        t_prime = previous_timestep(int(timesteps[i]), scheduler)
        ref_t = noised(scheduler, ref_latents, t_prime, generator)
        content_t = None if content_latents is None else noised(scheduler, content_latents, t_prime, generator)
        return t_prime, ref_t, content_t if used_content is not None else None

    schedule = [i for i, t in enumerate(timesteps) if start_t is None or int(t) < start_t]
    return lookahead(distiller, schedule, inputs, ref_latents, used_content, auto=auto)


def guide_latents(distiller: Distiller, latents: torch.Tensor, t_prime: int, ref_latents: torch.Tensor, *,
                  scheduler, iters: int, lr: float, adain_on: bool = False,
                  content_latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  ref_is_noised: bool = False, reference_key=None,
                  ahead: Ahead | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One AD update of ``latents`` (B, 4, h, w) at ``t_prime``; returns (new latents, loss per iteration).

    Losses are 0-dim device tensors (read them sparingly: each read is a GPU sync).

    1. optional AdaIN to the noised reference; 2. reference (and content) features of the noised
    latents at ``t_prime`` under no-grad; 3. a fresh Adam over the latents, ``iters`` steps.
    The distiller must be entered (``with distiller:``). ``iters=0`` leaves the latents untouched
    (apart from AdaIN). ``ref_is_noised``: ``ref_latents`` already carry this step's noise (callers
    that share one noised reference across calls, with a ``reference_key`` for the distiller).
    ``ahead``: this step's noised latents and their features, computed ahead (:mod:`attndistill.core.lookahead`);
    no noise is drawn then.
    """
    device = distiller.model.device
    if ahead is not None:
        ref_t = ahead.ref
    elif ref_is_noised:
        ref_t = ref_latents.to(device)
    else:
        ref_t = noised(scheduler, ref_latents.to(device), t_prime, generator)
    z = latents.detach().float()
    if adain_on:
        z = adain(z, ref_t)
    if iters == 0:
        return z, []
    content_t = None
    if ahead is not None:
        content_t = ahead.content
    elif content_latents is not None:
        content_t = noised(scheduler, content_latents.to(device), t_prime, generator)
    t = distiller.model.timestep(t_prime)
    # a fresh optimiser every step (Algorithm 2): the stepper's Adam state is reset
    z, losses = distiller.adam_steps(z, t, ref_t, content_t, iters=iters, lr=lr, fresh=True,
                                     reference_key=reference_key, features=ahead.features if ahead else None)
    return z.clone(), losses
