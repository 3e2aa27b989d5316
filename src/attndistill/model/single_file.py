"""Single-file checkpoints (A1111/ComfyUI): what a file is, which family, and what it lacks, read from its tensor
names before diffusers reads its weights, so that each mistake is one line naming the file and the fix."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError
from .models import Kind

#: Suffixes of single-file checkpoints (any case) and of weights files: all but .safetensors are pickles,
#: which --allow-pickle lets a load read.
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def is_checkpoint_path(path: Path) -> bool:
    """A single file (or what is named like one), not a diffusers folder or a Hub id."""
    return path.is_file() or path.suffix.lower() in CHECKPOINT_SUFFIXES


def check_checkpoint(path: Path, allow_pickle: bool, option: str = "--allow-pickle") -> None:
    """A single-file checkpoint exists, is one, and is safetensors unless pickles are allowed."""
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise UserError(f"model '{path}' is a file but no checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}); pass a "
                        "diffusers folder, a Hub id or a .safetensors checkpoint")
    if suffix != ".safetensors" and not allow_pickle:
        raise UserError(f"checkpoint '{path}' is a pickle file that can run code when loaded; convert it to "
                        f".safetensors or pass {option} if you trust it")


def checkpoint_keys(path: Path) -> list[str] | None:
    """Tensor names of a single-file checkpoint, its weights unread (a pickle's are memory-mapped, and unpickled
    with torch's weights-only loader, which runs no code); None for a pickle this cannot read (an old format, or
    objects beyond tensors), which the load itself then judges. Call it on a pickle only where pickles are
    allowed."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception:
            raise UserError(f"checkpoint '{path}' is not a readable .safetensors file; re-download it") from None
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return None
    state = unwrap_state(state)
    return [k for k in state if isinstance(k, str)] if isinstance(state, dict) else None


def unwrap_state(state):
    """A checkpoint's tensors where Lightning nested them under ``state_dict``, once or more (SD 2.1
    ControlNets: twice)."""
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def kind_from_checkpoint(path: Path, keys: list[str] | None = None) -> Kind:
    """sd15 or sdxl from a single file's tensor names (``keys``: read already); sd15 where a pickle's cannot be
    read."""
    keys = checkpoint_keys(path) if keys is None else keys
    if keys is None:
        return "sd15"
    if not any(k.startswith("model.diffusion_model.") for k in keys):  # diffusers would look for it on the Hub
        raise UserError(f"checkpoint '{path}' holds {weights_kind(keys)}, not a whole Stable Diffusion checkpoint "
                        "(UNet, VAE and text encoder in one file); pass such a file or a diffusers model folder")
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    return "sd15"


def vae_given(path: Path, keys: list[str] | None, vae: str | os.PathLike | None, load_vae) -> dict:
    """A pruned checkpoint has no VAE of its own (no "baked" VAE): ``--vae`` must give one, passed in before
    diffusers looks for it in the file."""
    if keys is None or any(k.startswith("first_stage_model.") for k in keys):
        return {}
    if vae is None:
        raise UserError(f"checkpoint '{path}' has no VAE of its own (a checkpoint pruned of its VAE); pass --vae "
                        "with an AutoencoderKL folder made for it, such as the base model's vae/ folder")
    return {"vae": load_vae()}


FAMILY = {"sd15": "SD 1.x/2.x", "sdxl": "SDXL"}


def weights_kind(keys: list[str]) -> str:
    """What a single weights file without a Stable Diffusion UNet holds, as far as its tensor names tell."""
    if any("lora" in k.lower() for k in keys):
        return "LoRA weights"
    if any(k.startswith("model_ema.") for k in keys):  # a training checkpoint's averaged copy, keys flattened
        return "only the EMA copy of a UNet (model_ema.*), which diffusers does not load"
    if any(k.startswith("up_blocks.") for k in keys):  # a VAE's are under decoder.
        return "a diffusers UNet's weights"
    if any(k.startswith(("down_blocks.", "mid_block.")) for k in keys):  # a VAE's are under encoder.
        return "the weights of one diffusers component (a UNet or ControlNet)"
    if any("text_model." in k or k.startswith(("embeddings.", "encoder.layers.")) for k in keys):
        return "a text encoder's weights"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "a VAE's weights"
    return f"{len(keys)} tensors with no Stable Diffusion UNet among them" if keys else "no tensors"
