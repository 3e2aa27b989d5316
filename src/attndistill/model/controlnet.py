"""ControlNet for AD-guided sampling: loading, the Canny preprocessor, residuals for the denoising call.

A ControlNet steers the *denoising* UNet call only (same latents, timestep and
CFG-batched conditioning as that call, like diffusers' ControlNet pipelines);
AD's feature calls never see its residuals (ALGORITHM.md §1: features with the
null conditioning only).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..checks import non_negative
from ..errors import UserError
from ..images import BLACK, ImageInput, load_image
from .hub import cached_commit
from .loading import (
    default_variant,
    files_stamp,
    from_pretrained,
    home,
    local_or_hub,
    looks_like_hub_id,
    safetensors_only,
)
from .models import Conditioning, DiffusionModel
from .single_file import CHECKPOINT_SUFFIXES

if TYPE_CHECKING:
    from diffusers import ControlNetModel

log = logging.getLogger(__name__)

#: Canny hysteresis thresholds (the values of diffusers' and ControlNet's own examples).
CANNY_LOW, CANNY_HIGH = 100, 200


def looks_like_line_art(image: Image.Image) -> bool:
    """An edge map rather than a photo: nearly every pixel black or white, and most of them black (a white
    background's line drawing is a photo to Canny, whose edges it finds once)."""
    gray = np.asarray(image.convert("L"))
    dark, light = (gray < 32).mean(), (gray > 223).mean()
    return dark + light > 0.97 and dark > 0.6 and light > 0.001


def canny(image: Image.Image, *, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """Edge map of ``image`` with OpenCV's Canny detector: white edges on black, RGB."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)  # (H, W) uint8, 0 or 255
    return Image.fromarray(np.stack([edges] * 3, axis=-1), "RGB")


def control_tensor(image: Image.Image, size: tuple[int, int], model: DiffusionModel) -> torch.Tensor:
    """Condition image -> (1, 3, H, W) in [0, 1] at ``size`` (w, h), prepared as diffusers' pipelines do."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=model.vae_scale_factor, do_convert_rgb=True, do_normalize=False)
    w, h = size
    return processor.preprocess(image, height=h, width=w).to(model.device, torch.float32)


@dataclass
class Control:
    """A ControlNet with its condition image and scale, ready for the denoising call."""

    net: torch.nn.Module  # diffusers ControlNetModel
    image: torch.Tensor  # (1 or B, 3, H, W) in [0, 1]
    scale: float = 1.0

    @property
    def conditional_only(self) -> bool:
        """A net that pools its condition to one vector (content shuffle) steers only the conditional half of a
        CFG call, as diffusers' pipelines run it (guess mode): the unconditional half gets no residuals."""
        return bool(getattr(self.net.config, "global_pool_conditions", False))

    def guided_residuals(self, latents: torch.Tensor, t: torch.Tensor | int, cond: Conditioning,
                         uncond: Conditioning | None) -> dict:
        """UNet kwargs with the residuals for a denoising call on ``latents`` (B, 4, h, w). With ``uncond`` the
        call is CFG-batched as [uncond, cond], and so are the residuals, as in diffusers' ControlNet pipelines."""
        b = latents.shape[0]
        if uncond is None:
            return self.residuals(latents, t, cond.expand(b))
        if not self.conditional_only:
            return self.residuals(torch.cat([latents, latents]), t, Conditioning.cat([uncond.expand(b),
                                                                                      cond.expand(b)]))
        kwargs = self.residuals(latents, t, cond.expand(b))
        return {"down_block_additional_residuals": [torch.cat([torch.zeros_like(r), r])
                                                    for r in kwargs["down_block_additional_residuals"]],
                "mid_block_additional_residual": torch.cat([torch.zeros_like(kwargs["mid_block_additional_residual"]),
                                                            kwargs["mid_block_additional_residual"]])}

    def residuals(self, latents: torch.Tensor, t: torch.Tensor | int, cond: Conditioning) -> dict:
        """UNet kwargs with the ControlNet residuals for one call on ``latents`` (B, 4, h, w).

        ``latents`` and ``cond`` are exactly what the UNet call gets (CFG-batched as [uncond, cond]).
        """
        dtype = self.net.dtype
        b = latents.shape[0]
        cond = cond.expand(b)
        image = self.image.to(latents.device, dtype)
        if image.shape[0] != b:
            image = image.repeat(b // image.shape[0], 1, 1, 1)  # (B, 3, H, W); a batch of 1 or B/2 (CFG)
        added = None
        if cond.added_cond_kwargs is not None:
            added = {k: v.to(dtype) for k, v in cond.added_cond_kwargs.items()}
        with torch.no_grad():
            down, mid = self.net(latents.to(dtype), t, encoder_hidden_states=cond.encoder_hidden_states.to(dtype),
                                 controlnet_cond=image, conditioning_scale=self.scale, added_cond_kwargs=added,
                                 return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def load_controlnet(source: str | os.PathLike, *, model: DiffusionModel, allow_pickle: bool = False,
                    variant: str | None = None) -> ControlNetModel:
    """A ``ControlNetModel`` from a Hub id, a diffusers folder or one weights file (its config then comes from the
    model's UNet: :mod:`attndistill.model.controlnet_file`), on the model's device and dtype.

    Same conventions as :func:`attndistill.model.loading.load_model`: safetensors only unless ``allow_pickle``,
    the ``fp16`` variant preferred on GPUs, offline when ``HF_HUB_OFFLINE`` is set. Example:
    ``load_controlnet("lllyasviel/control_v11p_sd15_canny", model=m)``.
    """
    from diffusers import ControlNetModel

    source = home(source)
    check_controlnet_source(source)
    if Path(source).is_file():
        from .controlnet_file import load_controlnet_file

        net = load_controlnet_file(Path(source), model, allow_pickle)
    else:
        net = from_pretrained(ControlNetModel, source, default_variant(variant, model.device, model.dtype),
                              what="ControlNet", option="--controlnet",
                              use_safetensors=safetensors_only(allow_pickle), dtype=model.dtype)
        check_compatible(net, model, source)
    return net.to(model.device).requires_grad_(False).eval()


def kept_controlnet(source: str | os.PathLike, *, model: DiffusionModel, allow_pickle: bool = False
                    ) -> ControlNetModel:
    """:func:`load_controlnet`, loaded once for the runs on ``model`` that name the same ControlNet (a notebook's,
    a batch's, the web UI's: each loaded its weights again), on the model's device. One is kept per model:
    another one, changed files under the same name (or another Hub snapshot), or running out of memory
    (``release_graphs``) let it go. Between runs it waits in CPU memory (:func:`park_kept_controlnet`)."""
    def key() -> tuple:
        name = local_or_hub(source)
        return name, bool(allow_pickle), files_stamp(home(source)), cached_commit(name, "controlnet")

    if model.kept_controlnet is None or model.kept_controlnet[0] != key():
        model.kept_controlnet = None  # the old one goes before the new one loads
        net = load_controlnet(source, model=model, allow_pickle=allow_pickle)
        model.kept_controlnet = (key(), net)  # as the load left the cache (a first download makes the snapshot)
    return model.kept_controlnet[1].to(model.device)


def park_kept_controlnet(model: DiffusionModel) -> None:
    """After a task's run on a GPU, the ControlNet kept on the model goes to CPU memory: the runs without one, and
    the out-of-memory remedies that know only CUDA graphs, then have the device's memory (tasks.setup.held)."""
    kept = model.kept_controlnet
    if kept is not None and model.device.type != "cpu":
        kept[1].to("cpu")


def check_controlnet_source(source: str) -> None:
    """A local ControlNet folder must hold a config; anything else must look like a Hub id (no weights read)."""
    path = Path(source)
    hint = ("pass a folder saved with save_pretrained, a ControlNet weights file or a Hub id such as "
            "lllyasviel/control_v11p_sd15_canny")
    if path.suffix.lower() in CHECKPOINT_SUFFIXES and not path.is_dir():  # a file, never a Hub id (a/b.safetensors)
        if not path.is_file():
            raise UserError(f"ControlNet '{source}' does not exist; check the path")
        return  # one weights file (model/controlnet_file.py)
    if path.is_file():  # its config.json, say
        raise UserError(f"ControlNet '{source}' is a file but no weights file ({', '.join(CHECKPOINT_SUFFIXES)}); "
                        f"pass one, or the folder that holds the ControlNet's config.json and weights "
                        f"('{path.parent}'?)")
    if path.exists():
        if (path / "model_index.json").is_file():
            raise UserError(f"ControlNet '{source}' is a whole Stable Diffusion model (model_index.json); pass it as "
                            "the model, and a ControlNet folder or Hub id as the ControlNet")
        if not (path / "config.json").is_file():
            raise UserError(f"ControlNet '{source}' is not a diffusers ControlNet folder (no config.json); {hint}")
        try:
            kind = json.loads((path / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            raise UserError(f"ControlNet '{source}' has a config.json that is not valid JSON; {hint}") from None
        # another component (a model's unet/, a VAE) loaded as a ControlNet fails deep in diffusers, or with a
        # misleading error about its weights or widths
        if kind not in (None, "ControlNetModel"):
            raise UserError(f"ControlNet '{source}' holds a {kind}, not a ControlNetModel, the kind of ControlNet "
                            "attndistill runs; use one such as lllyasviel/control_v11p_sd15_canny")
    elif not looks_like_hub_id(source):
        raise UserError(f"ControlNet '{source}' does not exist; pass a diffusers ControlNet folder, a weights file "
                        "or a Hub id such as lllyasviel/control_v11p_sd15_canny")


def check_compatible(net, model: DiffusionModel, source: str = "ControlNet") -> None:
    """A ControlNet must match the UNet it steers (SD 1.5 ControlNets for SD 1.5, SDXL ones for SDXL)."""
    check_configs_fit(net.config, model.unet.config, source, model.source, model.vae_scale_factor)


def check_configs_fit(net_config, unet_config, source: str, model_source: str,
                      vae_scale_factor: int | None = None) -> None:
    """:func:`check_compatible` on configs alone (mappings or config objects), so a dry run can ask too: the
    model family, then what a net of the right family may still get wrong (a fine-tuned base's widths, a
    condition of other channels or scale), each named, since the run would fail deep in a convolution."""
    def get(config, key):
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    def plain(value):
        return tuple(value) if isinstance(value, list | tuple) else value

    sdxl_net = get(net_config, "addition_embed_type") == "text_time"
    sdxl_model = get(unet_config, "addition_embed_type") == "text_time"
    if sdxl_net != sdxl_model:
        raise UserError(f"ControlNet '{source}' (for {'SDXL' if sdxl_net else 'SD 1.x/2.x'}) does not fit the "
                        f"{'sdxl' if sdxl_model else 'sd15'} model '{model_source}'; use "
                        f"{'an SDXL' if sdxl_model else 'an SD 1.5'} ControlNet")
    for key, what in (("block_out_channels", "block widths"), ("cross_attention_dim", "text embedding width")):
        theirs, ours = plain(get(net_config, key)), plain(get(unet_config, key))
        if theirs != ours:
            raise UserError(f"ControlNet '{source}' has {what} {theirs} where model '{model_source}' has {ours}: it "
                            "was made for another base model; use a ControlNet trained on this model's architecture")
    channels = get(net_config, "conditioning_channels")
    if channels not in (None, 3):
        raise UserError(f"ControlNet '{source}' takes a condition of {channels} channels; attndistill gives a "
                        "ControlNet its control image in RGB (3 channels), as the usual ControlNets take it")
    embedding = get(net_config, "conditioning_embedding_out_channels")
    if vae_scale_factor and embedding and 2 ** (len(embedding) - 1) != vae_scale_factor:
        raise UserError(f"ControlNet '{source}' shrinks its condition {2 ** (len(embedding) - 1)}x where model "
                        f"'{model_source}' shrinks images {vae_scale_factor}x into latents; use a ControlNet made "
                        "for this model")


def check_control(preprocess: str, scale: object) -> float:
    """The control image's preprocessing and the residuals' scale, checked before any work; the scale as a float."""
    if preprocess not in ("none", "canny"):
        raise UserError(f"control '{preprocess}' is not known; use 'canny' or 'none' (a ready-made map)")
    return non_negative("control scale", scale)


def prepare_control(controlnet: str | os.PathLike | ControlNetModel, image: ImageInput, *, model: DiffusionModel,
                    size: tuple[int, int], preprocess: str = "none",
                    scale: float = 1.0, allow_pickle: bool = False) -> Control:
    """Load/check the ControlNet and turn the user's image into its condition at ``size`` (w, h).

    ``preprocess``: "none" (the image already is a depth/edge/pose map) or "canny".
    """
    scale = check_control(preprocess, scale)
    if isinstance(controlnet, str | os.PathLike):
        net = kept_controlnet(controlnet, model=model, allow_pickle=allow_pickle)
    else:
        check_compatible(controlnet, model)
        # a net loaded by the caller (from_pretrained: float32, on the CPU) runs beside the model's UNet,
        # whose activations its residuals join: same device and dtype, as a net loaded here gets
        net = controlnet.to(model.device, model.dtype)
    condition = load_image(image, what="control image", background=BLACK)
    if preprocess == "canny":  # edges of the image at the output size: thin lines, not resampled ones
        if looks_like_line_art(condition):
            what = f"control image '{image}'" if isinstance(image, str | os.PathLike) else "the control image"
            log.warning(f"{what} looks like an edge map already (light lines on black); --control canny traces both "
                        "sides of each line, doubling it: pass --control none for a ready-made map")
        condition = canny(condition.resize(size, Image.Resampling.LANCZOS))
    return Control(net, control_tensor(condition, size, model), scale)
