"""attndistill: Attention Distillation (CVPR 2025) for Stable Diffusion.

Transfer the style, appearance or texture of reference images onto new ones::

    import attndistill as ad
    model = ad.load_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    image = ad.style_transfer("content.jpg", "style.jpg", model=model)
    ad.save_png(image, "out.png")
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("attndistill")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

from .core.engine import Distiller, parse_layers  # noqa: E402
from .errors import UserError  # noqa: E402
from .images import load_image, read_parameters, save_png  # noqa: E402
from .model.loading import load_model  # noqa: E402
from .model.models import DiffusionModel  # noqa: E402
from .presets import PRESETS, Preset, get_preset  # noqa: E402
from .tasks.generate import layout_texture, text_to_image, texture_sampling  # noqa: E402
from .tasks.textures import expand_texture, masked_texture_synthesis, with_texture_options  # noqa: E402
from .tasks.transfer import appearance_transfer, style_transfer, style_transfer_batch, texture_synthesis  # noqa: E402
from .tasks.vae_tuning import finetune_vae  # noqa: E402

__all__ = [
    "PRESETS", "DiffusionModel", "Distiller", "Preset", "UserError", "__version__", "appearance_transfer",
    "get_preset", "load_image", "load_model", "parse_layers", "read_parameters", "save_png", "style_transfer",
    "style_transfer_batch", "texture_synthesis",
    "layout_texture", "text_to_image", "texture_sampling",
    "expand_texture", "finetune_vae", "masked_texture_synthesis", "with_texture_options",
]
