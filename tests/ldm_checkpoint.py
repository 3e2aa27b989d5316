"""Test helper: a diffusers SD 1.5 / SDXL pipeline folder -> one original-layout ``.safetensors`` file.

Single-file checkpoints (the format most community models are shared in) use the
original Stable Diffusion key names. diffusers ships only the other direction,
so this is its inverse, checked against it: diffusers' own ``convert_ldm_*``
functions must give back every tensor (``tests/test_single_file.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _top_level(kind: str) -> dict[str, str]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING[kind]
    if kind == "unet":  # SDXL's added (pooled text + size) embedding is a label embedding there
        return {**table["layers"], **table["addition_embed_type"]}
    return dict(table)


def _rename_first(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights -> ``model.diffusion_model.*`` keys (input/middle/output blocks)."""
    top, per = _top_level("unet"), config["layers_per_block"] + 1  # LDM entries per down/up block
    out = {}
    for key, value in state.items():
        p = key.split(".")
        rest = ".".join(p[4:])
        if key in top:
            ldm = top[key]
        elif p[0] == "down_blocks" and p[2] == "downsamplers":
            ldm = f"input_blocks.{1 + int(p[1]) * per + per - 1}.0.op.{p[-1]}"
        elif p[0] == "down_blocks":
            index = 1 + int(p[1]) * per + int(p[3])
            ldm = (f"input_blocks.{index}.0.{_rename_first(rest, RESNET)}" if p[2] == "resnets"
                   else f"input_blocks.{index}.1.{rest}")
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            ldm = (f"middle_block.{2 * int(p[2])}.{_rename_first(rest, RESNET)}" if p[1] == "resnets"
                   else f"middle_block.1.{rest}")
        elif p[0] == "up_blocks" and p[2] == "upsamplers":
            attentions = any(k.startswith(f"up_blocks.{p[1]}.attentions.") for k in state)
            ldm = f"output_blocks.{int(p[1]) * per + per - 1}.{2 if attentions else 1}.conv.{p[-1]}"
        elif p[0] == "up_blocks":
            index = int(p[1]) * per + int(p[3])
            ldm = (f"output_blocks.{index}.0.{_rename_first(rest, RESNET)}" if p[2] == "resnets"
                   else f"output_blocks.{index}.1.{rest}")
        else:
            raise KeyError(f"no LDM name for UNet weight {key}")
        out["model.diffusion_model." + ldm] = value
    return out


def controlnet_to_ldm(state: dict[str, torch.Tensor], config: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """ControlNetModel weights -> the original layout of ControlNet 1.x files: its encoder named as the UNet's
    (input and middle blocks), the condition encoder ``input_hint_block.*`` (convolutions at even indices, SiLUs
    between), ``zero_convs.N.0`` and ``middle_block_out.0``; ``prefix`` "control_model." as in files holding more."""
    shared = {k: v for k, v in state.items() if not k.startswith(("controlnet_", "time_proj"))}
    out = {k.removeprefix("model.diffusion_model."): v for k, v in unet_to_ldm(shared, config).items()}
    blocks = len({k.split(".")[2] for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    for key, value in state.items():
        p = key.split(".")
        if p[0] == "controlnet_cond_embedding":
            index = 0 if p[1] == "conv_in" else 2 * blocks + 2 if p[1] == "conv_out" else 2 * int(p[2]) + 2
            out[f"input_hint_block.{index}.{p[-1]}"] = value
        elif p[0] == "controlnet_down_blocks":
            out[f"zero_convs.{p[1]}.0.{p[-1]}"] = value
        elif p[0] == "controlnet_mid_block":
            out[f"middle_block_out.0.{p[-1]}"] = value
    return {prefix + k: v for k, v in out.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights -> ``first_stage_model.*`` keys (decoder blocks numbered bottom-up)."""
    top, blocks = _top_level("vae"), len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        p = key.split(".")
        if key in top:
            ldm = top[key]
        elif p[1] == "down_blocks" and p[3] == "downsamplers":
            ldm = f"encoder.down.{p[2]}.downsample.conv.{p[-1]}"
        elif p[1] == "down_blocks":
            ldm = f"encoder.down.{p[2]}.block.{p[4]}.{'.'.join(p[5:])}".replace("conv_shortcut", "nin_shortcut")
        elif p[1] == "up_blocks" and p[3] == "upsamplers":
            ldm = f"decoder.up.{blocks - 1 - int(p[2])}.upsample.conv.{p[-1]}"
        elif p[1] == "up_blocks":
            ldm = f"decoder.up.{blocks - 1 - int(p[2])}.block.{p[4]}.{'.'.join(p[5:])}".replace(
                "conv_shortcut", "nin_shortcut")
        elif p[1] == "mid_block" and p[2] == "resnets":
            ldm = f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}".replace("conv_shortcut", "nin_shortcut")
        elif p[1] == "mid_block":
            name = VAE_ATTENTION[p[4]]
            ldm = f"{p[0]}.mid.attn_1.{name}.{p[-1]}"
            if value.dim() == 2:  # the original attention uses 1x1 convolutions
                value = value[:, :, None, None]
        else:
            raise KeyError(f"no LDM name for VAE weight {key}")
        out["first_stage_model." + ldm] = value
    return out


OPEN_CLIP = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection weights -> OpenCLIP names (SDXL's second text encoder, fused q/k/v)."""
    out, qkv = {}, {}
    for key, value in state.items():
        k = key.removeprefix("text_model.")
        if k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.rsplit(".", 1)[1]] = value
        elif k == "text_projection.weight":
            out["text_projection"] = value.T
        elif k.startswith("encoder.layers."):
            _, _, layer, rest = k.split(".", 3)
            proj, _, param = rest.removeprefix("self_attn.").partition(".")
            if proj in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault((layer, param), {})[proj] = value
                continue
            for new, old in OPEN_CLIP:
                rest = rest.replace(new, old)
            out[f"transformer.resblocks.{layer}.{rest}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for text encoder weight {key}")
    for (layer, param), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def write_ldm_checkpoint(folder: Path, path: Path) -> Path:
    """Write the pipeline in ``folder`` (SD 1.5 or SDXL layout) as one original-layout safetensors file."""
    def weights(part: str) -> tuple[dict, dict]:
        files = sorted((folder / part).glob("*.safetensors"))
        state = {k: v for f in files for k, v in load_file(f).items()}
        return state, json.loads((folder / part / "config.json").read_text())

    unet, unet_config = weights("unet")
    vae, vae_config = weights("vae")
    text, _ = weights("text_encoder")
    sdxl = (folder / "text_encoder_2").is_dir()
    prefix = "conditioner.embedders.0.transformer.text_model." if sdxl else "cond_stage_model.transformer.text_model."
    state = {**unet_to_ldm(unet, unet_config), **vae_to_ldm(vae, vae_config),
             **{prefix + k.removeprefix("text_model."): v  # transformers 5 dropped this level; originals have it
                for k, v in text.items()}}
    if sdxl:
        state.update({"conditioner.embedders.1.model." + k: v
                      for k, v in open_clip_to_ldm(weights("text_encoder_2")[0]).items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
