"""Single-file ControlNets: one ``.safetensors`` file (or, with ``allow_pickle``, a ``.pth``), as lllyasviel's
ControlNet 1.x files and many shared SDXL ControlNets come, in the original layout or diffusers' own.

A file carries no config, and diffusers would fetch one from the Hub by guessing the file's kind. A ControlNet is
a copy of its UNet's encoder, so the model's UNet config describes it, all but its condition encoder, whose widths
the weights' shapes give. diffusers converts the weights. A variant the UNet config does not describe (an SDXL
"-mid" or "-small" ControlNet, a union ControlNet, whose weights then do not fit) is refused by name, as are files
that are no whole ControlNet (a "difference" file, a Control-LoRA). Whether a ControlNet pools its condition
(shuffle) no weight shows: as in webui's and ComfyUI's loaders, a file named "shuffle" does.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import UserError, first_line
from .loading import quiet_diffusers
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
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # torch's weights-only unpickler: tensors and plain containers, no code
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"ControlNet '{path}' could not be read ({first_line(exc)}); download it again") from None
    state = unwrap_state(state)
    if not isinstance(state, dict):
        raise UserError(f"ControlNet '{path}' holds no named tensors; pass a ControlNet's weights file")
    return state


def own_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors under the names of its own layout: in a file that holds more (ControlNet 1.0's hold
    the whole model), those under its prefix, the prefix cut."""
    return {k.removeprefix(LDM_PREFIX): state[k] for k in own_names(state)}


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


def condition_widths(state: dict[str, torch.Tensor]) -> tuple[list[int], int]:
    """(the condition encoder's widths, the condition's channels) from the weights' shapes: the first convolution,
    then the second of each pair, which widens (diffusers' ``blocks.1, 3, 5``; originally ``input_hint_block.4, 8,
    12``)."""
    if HINT_IN[0] in state:
        first, name = state[HINT_IN[0]], "controlnet_cond_embedding.blocks.{}.weight"
        widening = [name.format(2 * i + 1) for i in range(len(state))]
    else:
        first, name = state[HINT_IN[1]], "input_hint_block.{}.weight"
        widening = [name.format(4 * i + 4) for i in range(len(state))]
    widths = [first.shape[0]]
    for key in widening:
        if key not in state:
            break
        widths.append(state[key].shape[0])
    return widths, first.shape[1]


def controlnet_config(unet_config, state: dict[str, torch.Tensor], name: str) -> dict:
    """A ControlNet config for weights ``state`` in a file called ``name``: ``unet_config``'s encoder, the weights'
    condition encoder, pooled conditions for a file named shuffle."""
    from diffusers import ControlNetModel

    accepted = inspect.signature(ControlNetModel.__init__).parameters
    config = {k: v for k, v in dict(unet_config).items() if k in accepted}
    widths, channels = condition_widths(state)
    config.update(conditioning_embedding_out_channels=widths, conditioning_channels=channels,
                  global_pool_conditions="shuffle" in name.lower(), _class_name=ControlNetModel.__name__)
    return config


def load_controlnet_file(path: Path, model: DiffusionModel, allow_pickle: bool = False) -> ControlNetModel:
    """A ControlNet from one weights file, for ``model`` (whose UNet config describes it), in its dtype."""
    from diffusers import ControlNetModel

    state = read_weights(path, allow_pickle)
    check_names(path, state, model.kind, model.source)
    state = own_weights(state)
    config = controlnet_config(model.unet.config, state, path.name)
    state = _diffusers_names(state, config)
    with torch.device("meta"):
        expected = ControlNetModel.from_config(config).state_dict().keys()
    missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or extra:
        names = (missing or extra)[:2]
        raise UserError(f"ControlNet '{path}' is not built like the UNet of model '{model.source}': "
                        f"{len(missing)} of its tensors are missing and {len(extra)} have no place "
                        f"({', '.join(names)}{', ...' if len(missing or extra) > 2 else ''}); {FOLDER_HINT}")
    with tempfile.TemporaryDirectory(prefix="attndistill-controlnet-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        try:
            with quiet_diffusers():
                net = ControlNetModel.from_single_file(state, config=folder, torch_dtype=model.dtype,
                                                       local_files_only=True)
        except Exception as exc:  # a tensor of another shape: another architecture than the model's
            raise UserError(f"ControlNet '{path}' does not fit the UNet of model '{model.source}' "
                            f"({first_line(exc)}); {FOLDER_HINT}") from None
    return net


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
