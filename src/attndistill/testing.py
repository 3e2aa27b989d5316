"""Tiny random-weight models for tests, examples and CPU benchmarks.

Built from diffusers configs under a fixed seed, with a CLIP tokenizer made
from a small vocabulary written locally (no downloads), saved with
``save_pretrained`` so they load through the same path users take.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

TINY_UNET = dict(
    block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
TINY_VAE = dict(
    block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    norm_num_groups=8, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
#: SDXL's two text encoders differ in width (768 and 1280 in the real model); so do the tiny ones, or
#: single-file loading could not tell their weights apart. Cross-attention sees both, concatenated.
TINY_SDXL_TEXT_WIDTHS = (32, 48)
TINY_SDXL_UNET_EXTRAS = dict(
    cross_attention_dim=sum(TINY_SDXL_TEXT_WIDTHS), addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=(1, 2, 1),
    use_linear_projection=True)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000, prediction_type="epsilon")


def write_tiny_tokenizer(folder: Path, max_length: int = 77):
    """A CLIP tokenizer whose vocabulary is the letters, digits and a few merges; any prompt tokenizes."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = ["<|startoftext|>", "<|endoftext|>", "<unk>"] + chars + [c + "</w>" for c in chars]
    merges = ["#version: 0.2", "t h", "th e</w>", "a n", "an d</w>", "e r</w>"]
    vocab += ["th", "the</w>", "an", "and</w>", "er</w>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    return tok


def _text_encoder(tokenizer, hidden: int, with_projection: bool, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection_dim, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def build_tiny_sd15(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny SD-1.5-shaped pipeline (7 self-attention layers, 8x VAE) to ``folder``; returns it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    tokenizer = write_tiny_tokenizer(folder / "_tokenizer_src")
    text_encoder = _text_encoder(tokenizer, 32, with_projection=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny SDXL-shaped pipeline (two text encoders, text_time added conditioning) to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = write_tiny_tokenizer(folder / "_tokenizer_src")
    tokenizer_2 = write_tiny_tokenizer(folder / "_tokenizer_2_src")
    text_encoder = _text_encoder(tokenizer, TINY_SDXL_TEXT_WIDTHS[0], with_projection=False)
    text_encoder_2 = _text_encoder(tokenizer_2, TINY_SDXL_TEXT_WIDTHS[1], with_projection=True, projection_dim=32)
    unet = UNet2DConditionModel(**{**TINY_UNET, **TINY_SDXL_UNET_EXTRAS})
    vae = AutoencoderKL(**{**TINY_VAE, "force_upcast": True})
    scheduler = DDIMScheduler(**{**SD15_SCHEDULER, "timestep_spacing": "leading"})
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def full_size_unet(config_path: str | Path, device: str | torch.device = "meta", dtype=torch.float32):
    """A full-size UNet with random weights from a real config (``meta``: no memory allocated)."""
    from diffusers import UNet2DConditionModel

    config = json.loads(Path(config_path).read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device(device):
        return UNet2DConditionModel(**config).to(dtype)


def build_tiny_controlnet(folder: str | Path, sdxl: bool = False, seed: int = 0) -> Path:
    """Save a tiny ControlNet matching :func:`build_tiny_sd15` (or :func:`build_tiny_sdxl`) to ``folder``.

    Its zero-initialised output convolutions get random weights, so its residuals are not zero and
    tests can see them.
    """
    from diffusers import ControlNetModel

    folder = Path(folder)
    torch.manual_seed(seed)
    config = {k: v for k, v in TINY_UNET.items() if k not in ("sample_size", "out_channels", "up_block_types")}
    if sdxl:  # the same extras as build_tiny_sdxl's UNet
        config.update(TINY_SDXL_UNET_EXTRAS)
    net = ControlNetModel(**config, conditioning_embedding_out_channels=(8, 8, 16, 16))
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(conv.weight, std=0.05)
            torch.nn.init.normal_(conv.bias, std=0.05)
    net.save_pretrained(folder, safe_serialization=True)
    return folder


def full_size_model(kind: str, configs: str | Path, *, device: str = "cuda", dtype=torch.bfloat16):
    """A full-size SD 1.5 or SDXL :class:`DiffusionModel` with random weights, built in memory.

    For speed and memory measurements only (speed does not depend on weight values). ``configs``
    is the folder of real architecture configs; the tokenizer is the tiny local one.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from .model.models import DiffusionModel

    configs = Path(configs)
    prefix = "sdxl" if kind == "sdxl" else "sd15"

    def cfg(name: str) -> dict:
        data = json.loads((configs / f"{name}.json").read_text())
        return {k: v for k, v in data.items() if not k.startswith("_") and k != "architectures"}

    torch.manual_seed(0)
    tmp = Path(torch.hub.get_dir()) / "attndistill-tokenizer"
    tokenizer = write_tiny_tokenizer(tmp)
    previous = torch.get_default_dtype()
    # built in ``dtype`` from the start: made in float32 and then cast, SDXL's UNet alone would peak at 9.8 GB
    torch.set_default_dtype(dtype)
    try:
        modules = _build_modules(kind, prefix, cfg, tokenizer, device, dtype)
    finally:
        torch.set_default_dtype(previous)
    unet, vae, text_encoder, text_encoder_2 = modules
    scheduler = DDIMScheduler(**cfg(f"{prefix}-scheduler"))
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    for module in (unet, vae, text_encoder) + ((text_encoder_2,) if kind == "sdxl" else ()):
        module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return DiffusionModel(pipe=pipe, kind="sdxl" if kind == "sdxl" else "sd15", source=f"random-{prefix}",
                          device=torch.device(device), dtype=dtype)


def _build_modules(kind: str, prefix: str, cfg, tokenizer, device: str, dtype) -> tuple:
    """UNet, VAE and text encoder(s) of the real architectures, with random weights, on ``device``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_encoder_2 = None
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg(f"{prefix}-unet")).to(dtype)
        vae = AutoencoderKL(**cfg(f"{prefix}-vae")).to(dtype)
        te_cfg = {k: v for k, v in cfg("sd15-text-encoder").items() if k != "model_type"}
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg, eos_token_id=tokenizer.eos_token_id)).to(dtype)
        if kind == "sdxl":
            te2_cfg = {k: v for k, v in cfg("sdxl-text-encoder-2").items() if k != "model_type"}
            text_encoder_2 = CLIPTextModelWithProjection(
                CLIPTextConfig(**te2_cfg, eos_token_id=tokenizer.eos_token_id)).to(dtype)
    return unet, vae, text_encoder, text_encoder_2
