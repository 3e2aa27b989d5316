"""Single-file ControlNets: one ``.safetensors`` file (or, with ``allow_pickle``, a ``.pth``), as lllyasviel's
ControlNet 1.x files and many shared SDXL ControlNets come, in the original layout or diffusers' own.

A file carries no config, and diffusers would fetch one from the Hub by guessing the file's kind. A ControlNet is
a copy of its UNet's encoder, so the model's UNet config describes it, all but its condition encoder, whose widths
the weights' shapes give. diffusers' conversion renames the original layout's tensors, which are then assigned
to that architecture, built without memory. A variant the UNet config does not describe (an SDXL "-mid" or
"-small" ControlNet, a union ControlNet, whose weights then do not fit) is refused by name, as are files that are
no whole ControlNet (a "difference" file, a Control-LoRA). Whether a ControlNet pools its condition
(shuffle) no weight shows: as in webui's and ComfyUI's loaders, a file named "shuffle" does.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from .single_file import FAMILY, check_checkpoint, checkpoint_keys, unwrap_state, weights_kind

if TYPE_CHECKING:
    from diffusers import ControlNetModel

    from .models import DiffusionModel

#: Key prefix of a ControlNet inside an original-layout file (ControlNet 1.0's files hold the whole model too).
LDM_PREFIX = "control_model."
#: The condition encoder's first convolution: in diffusers' names, in the original ones.
HINT_IN = ("controlnet_cond_embedding.conv_in.weight", "input_hint_block.0.weight")
#: A tensor only SDXL's ControlNets have (its added text and size embedding): diffusers' name, the original one.
SDXL_ONLY = ("add_embedding.linear_1.weight", "label_emb.0.0.weight")
#: Where a file that is not of the model's architecture is sent.
FOLDER_HINT = "pass its diffusers folder (config.json beside the weights) instead"


#: Tensor names that mark a file as no whole ControlNet, and what it is then.
NOT_WHOLE = {
    "difference": "a \"difference\" ControlNet (weights stored as differences from SD 1.5's UNet), which "
                  "attndistill does not add back; use the full ControlNet file",
    "lora_controlnet": "a Control-LoRA, which attndistill does not load; use a full ControlNet",
}


def read_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Every named tensor in ``path`` (Lightning's ``state_dict`` wrappers opened)."""
    check_checkpoint(path, allow_pickle)
    safetensors = path.suffix.lower() == ".safetensors"
    try:
        if safetensors:
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # torch's weights-only unpickler: tensors and plain containers, no code
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # cut short, or another format under this suffix: the reader's own words say neither
        kind = ".safetensors" if safetensors else "PyTorch pickle (.pth, .ckpt, .bin)"
        raise UserError(f"ControlNet '{path}' is not a readable {kind} file (cut short, or another format under "
                        "this suffix); download it again") from None
    state = unwrap_state(state)
    if not isinstance(state, dict):
        raise UserError(f"ControlNet '{path}' holds no named tensors; pass a ControlNet's weights file")
    return state


def own_weights(path: Path, state: dict) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors under the names of its own layout: in a file that holds more (ControlNet 1.0's hold
    the whole model), those under its prefix, the prefix cut. Each must be a finite floating-point tensor: a
    NaN in a ControlNet would surface as a diverging run whose advice never names the file."""
    own = {k.removeprefix(LDM_PREFIX): state[k] for k in own_names(state)}
    for problem, bad in (
            ("entries that are not tensors", [k for k, v in own.items() if not torch.is_tensor(v)]),
            ("integer or boolean tensors where weights are floating-point",
             [k for k, v in own.items() if torch.is_tensor(v) and not v.is_floating_point()]),
            ("weights that are NaN or infinite",
             [k for k, v in own.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()])):
        if bad:
            raise UserError(f"ControlNet '{path}' holds {len(bad)} {problem} ({', '.join(bad[:2])}"
                            f"{', ...' if len(bad) > 2 else ''}): it is damaged or no ControlNet; download it again")
    return own


def own_names(names) -> list[str]:
    """The ControlNet's tensor names among ``names``: in a file that holds more, those under its prefix."""
    return [k for k in names if k.startswith(LDM_PREFIX)] if any(k.startswith(LDM_PREFIX) for k in names) \
        else list(names)


def check_names(path: Path, names, kind: str, model_source: str) -> None:
    """What a file's tensor names tell before its weights are read: a whole ControlNet, of the model's family
    (``kind``)."""
    marked = next((what for marker, what in NOT_WHOLE.items() if marker in names), None)
    if marked:
        raise UserError(f"ControlNet '{path}' is {marked}")
    names = {k.removeprefix(LDM_PREFIX) for k in own_names(names)}
    if not names & set(HINT_IN):
        raise UserError(f"ControlNet '{path}' holds {weights_kind(sorted(names))}, not a ControlNet (no condition "
                        "encoder); pass a ControlNet's file or folder")
    sdxl_net, sdxl_model = bool(names & set(SDXL_ONLY)), kind == "sdxl"
    if sdxl_net != sdxl_model:
        raise UserError(f"ControlNet '{path}' (for {FAMILY['sdxl' if sdxl_net else 'sd15']}) does not fit the "
                        f"{kind} model '{model_source}'; use {'an SDXL' if sdxl_model else 'an SD 1.5'} ControlNet")


def check_controlnet_file(path: Path, allow_pickle: bool, kind: str, model_source: str) -> None:
    """:func:`check_names` by the file's names alone (a dry run's check; a pickle this cannot read unpickled
    without running code is left to the load)."""
    check_checkpoint(path, allow_pickle)
    names = checkpoint_keys(path)
    if names is not None:
        check_names(path, names, kind, model_source)


def condition_widths(path: Path, state: dict[str, torch.Tensor]) -> tuple[list[int], int]:
    """(the condition encoder's widths, the condition's channels) from the weights' shapes: the first convolution,
    then the second of each pair, which widens (diffusers' ``blocks.1, 3, 5``; originally ``input_hint_block.4, 8,
    12``)."""
    if HINT_IN[0] in state:
        first, name = HINT_IN[0], "controlnet_cond_embedding.blocks.{}.weight"
        widening = [name.format(2 * i + 1) for i in range(len(state))]
    else:
        first, name = HINT_IN[1], "input_hint_block.{}.weight"
        widening = [name.format(4 * i + 4) for i in range(len(state))]
    convs = [first]
    for key in widening:
        if key not in state:
            break
        convs.append(key)
    flat = next((k for k in convs if state[k].dim() != 4), None)
    if flat is not None:
        raise UserError(f"ControlNet '{path}' has a condition encoder whose convolution {flat} is of shape "
                        f"{tuple(state[flat].shape)}, not (out, in, height, width): it is damaged or no ControlNet; "
                        "download it again")
    return [state[k].shape[0] for k in convs], state[first].shape[1]


def controlnet_config(unet_config, state: dict[str, torch.Tensor], path: Path) -> dict:
    """A ControlNet config for weights ``state`` in file ``path``: ``unet_config``'s encoder, the weights' condition
    encoder, pooled conditions for a file named shuffle."""
    from diffusers import ControlNetModel

    accepted = inspect.signature(ControlNetModel.__init__).parameters
    config = {k: v for k, v in dict(unet_config).items() if k in accepted}
    widths, channels = condition_widths(path, state)
    config.update(conditioning_embedding_out_channels=widths, conditioning_channels=channels,
                  global_pool_conditions="shuffle" in path.name.lower(), _class_name=ControlNetModel.__name__)
    return config


def load_controlnet_file(path: Path, model: DiffusionModel, allow_pickle: bool = False) -> ControlNetModel:
    """A ControlNet from one weights file, for ``model`` (whose UNet config describes it), in its dtype."""
    from diffusers import ControlNetModel

    state = read_weights(path, allow_pickle)
    check_names(path, state, model.kind, model.source)
    state = own_weights(path, state)
    config = controlnet_config(model.unet.config, state, path)
    state = _diffusers_names(state, config)
    with torch.device("meta"):  # the architecture without memory; the file's tensors are assigned to it below
        net = ControlNetModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or extra:
        names = (missing or extra)[:2]
        raise UserError(f"ControlNet '{path}' is not built like the UNet of model '{model.source}': "
                        f"{len(missing)} of its tensors are missing and {len(extra)} have no place "
                        f"({', '.join(names)}{', ...' if len(missing or extra) > 2 else ''}); {FOLDER_HINT}")
    other = next((k for k in expected if tuple(state[k].shape) != expected[k]), None)
    if other is not None:  # widths of another base model (an SD 2.x ControlNet for SD 1.5), or a damaged tensor
        raise UserError(f"ControlNet '{path}' does not fit the UNet of model '{model.source}': its {other} is of shape "
                        f"{tuple(state[other].shape)} where this model's architecture has {expected[other]}; use a "
                        "ControlNet made for this model")
    net.load_state_dict(state, strict=True, assign=True)  # names and shapes checked above
    return net.to(model.dtype)


def _diffusers_names(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The weights under diffusers' names (diffusers' own conversion of the original layout, which leaves SDXL's
    added embedding out, so it is mapped here by diffusers' own table; a diffusers file's names stay)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    if HINT_IN[0] in state:
        return state
    converted = convert_controlnet_checkpoint(state, config)
    if config.get("addition_embed_type"):
        table = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]
        converted.update({ours: state[theirs] for ours, theirs in table.items() if theirs in state})
    return {k: v for k, v in converted.items() if v is not None}  # None: absent from the file
