"""attndistill: Attention Distillation (CVPR 2025) for Stable Diffusion.

Transfer the style, appearance or texture of reference images onto new ones::

    import attndistill as ad
    model = ad.load_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    image = ad.style_transfer("content.jpg", "style.jpg", model=model)
    ad.save_png(image, "out.png")
"""

from .core.engine import Distiller, parse_layers
from .core.progress import Callback, StepInfo
from .errors import UserError
from .images import load_image, read_parameters, save_png
from .model.loading import load_model
from .model.models import DiffusionModel
from .presets import PRESETS, Preset, get_preset
from .tasks.generate import layout_texture, text_to_image, texture_sampling
from .tasks.textures import expand_texture, masked_texture_synthesis, with_texture_options
from .tasks.transfer import appearance_transfer, style_transfer, style_transfer_batch, texture_synthesis
from .tasks.vae_tuning import finetune_vae, save_vae
from .version import __version__

__all__ = [
    "PRESETS", "Callback", "DiffusionModel", "Distiller", "Preset", "StepInfo", "UserError", "__version__",
    "appearance_transfer",
    "get_preset", "load_image", "load_model", "parse_layers", "read_parameters", "save_png", "style_transfer",
    "style_transfer_batch", "texture_synthesis",
    "layout_texture", "text_to_image", "texture_sampling",
    "expand_texture", "finetune_vae", "masked_texture_synthesis", "save_vae", "with_texture_options",
]
