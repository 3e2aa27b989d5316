"""Checks of batch jobs before any model work: images readable, numbers in range, outputs writable.

Reads configs, never weights, so a dry run reports every bad line of a jobs file at once and a real run
fails no job on input it could have rejected up front. The library's own checks are reused (presets,
sizes, expansion, text-to-image options), so a job is refused here exactly when the task would refuse it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..presets import Preset
from .jobs import Job, ModelSpec, _fail, _unexpected, carries_job

_PRESET_FIELDS = ("steps", "iters", "lr", "content_weight", "guidance", "guidance_rescale", "adain",
                  "attention_scale", "stride", "reference_fit")
#: Per task, the input whose aspect sets the output size when ``size`` is one number (first one given).
_LIKE = {"style": ("content",), "appearance": ("structure",), "texture-masked": ("target_labels",),
         "texture-layout": ("layout",), "t2i": ("control_image", "content")}
#: text_to_image's options that go together, with their defaults (checked by generate.check_t2i_options).
_T2I_OPTIONS = {"controlnet": None, "control_image": None, "control": "none", "control_scale": 1.0, "content": None,
                "content_weight": None}
#: Tasks that sample with the DDIM scheduler (guidance, start_t) rather than optimise.
_SAMPLING = ("texture-sample", "texture-layout", "t2i")
#: Model geometry when its configs cannot be read without weights (documented defaults per kind).
_DEFAULT_GEOMETRY = {"sd15": (8, 64, 512), "sdxl": (8, 32, 1024)}  # VAE factor, size multiple, native size


# -- validation (no model weights) ------------------------------------------------------------------

def check_options(preset_name: str, args: Mapping[str, Any], *, t2i: bool = False) -> Preset:
    """A run's options that need no model: numbers in range, options that go together, layer syntax.

    Batch lines and CLI commands both check these before any model loads, so a typo fails at once
    instead of after a download. Returns the preset with ``args`` applied.
    """
    from ..core.engine import check_layer_text
    from ..presets import get_preset
    from ..tasks.setup import check_run, check_settings

    preset = get_preset(preset_name).override(**{k: args[k] for k in _PRESET_FIELDS if k in args})
    preset = check_settings(preset)
    if args.get("strength") is not None:
        from ..core.sampling import first_step

        first_step(preset.steps, args["strength"])
    if args.get("seed") is not None:
        check_run(seed=args["seed"])
    if args.get("tile") is not None:
        from ..model.tiling import check_axes

        check_axes(args["tile"])
    if t2i:
        from ..tasks.generate import check_t2i_options

        check_t2i_options(**{k: args.get(k, default) for k, default in _T2I_OPTIONS.items()})
    check_layer_text(args.get("layers"))
    return preset


class Validator:
    """Deep checks of a job before any model work: images readable, numbers in range, outputs writable.

    Images and models are checked once each however many jobs use them.
    """

    def __init__(self, out_dir: Path, *, labels: Mapping[str, str] | None = None) -> None:
        """``labels``: how errors name an input (``{"reference": "texture image"}``); by default its key's words."""
        self.out_dir = out_dir
        self.labels = dict(labels or {})
        self._images: dict[str, str | None] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        self._models: dict[ModelSpec, str | None] = {}
        self._unets: dict[ModelSpec, dict | None] = {}
        self._layers: dict[ModelSpec, Any] = {}
        self._geometry: dict[ModelSpec, Any] = {}

    def check(self, job: Job) -> None:
        """Raise a :class:`UserError` that names the line when ``job`` cannot run."""
        if job.error:
            raise UserError(job.error)
        try:
            self._check(job)
        except UserError as exc:
            raise _fail(job.line, str(exc)) from None
        except Exception as exc:  # a check that did not foresee this input: this job's error, never the run's
            raise _fail(job.line, _unexpected(exc)) from None

    def _check(self, job: Job) -> None:
        self.check_inputs(job)
        for path in job.outputs:
            if path.exists() and not job.overwrite and not carries_job(path, job.id):
                raise UserError(f"output '{path}' already exists; delete it, set \"overwrite\": true or another "
                                "'output'")
            if path.is_dir():
                raise UserError(f"output '{path}' is a directory; set another 'output'")
            blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
            if blocking is not None:
                raise UserError(f"output '{path}' cannot be made: '{blocking}' is a file, not a folder; set another "
                                "'output'")

    def check_inputs(self, job: Job, *, model: bool = True, side_files: dict[str, Path | None] | None = None) -> None:
        """Everything :meth:`check` checks but the outputs, raising the bare :class:`UserError`: what a
        command checks before its model loads (``model=False``: the command's load checks the model itself,
        in the command's words). ``side_files``: a command's other files by option (``--preview``), which
        must not be an input either."""
        spec = job.spec
        inputs = set()
        for name in spec.paths:
            value = job.args.get(name)
            for item in value if isinstance(value, list) else [] if value is None else [value]:
                self._image(item, name)
                inputs.add(Path(item).resolve())
        for path in job.outputs:  # even with overwrite: the result's parameters name its inputs for reruns
            if _is_one_of(path, inputs):
                raise UserError(f"output '{path}' is an input of this run, which its result must not replace; "
                                "choose another output name")
        for option, path in (side_files or {}).items():  # an earlier run's preview, taken as this run's style
            if path is not None and _is_one_of(path, inputs):
                raise UserError(f"{option} '{path}' is an input of this run, which the run must not replace; give "
                                f"the {option.removeprefix('--')} file another name")
        preset = check_options(spec.preset, job.args, t2i=job.task == "t2i")
        if job.task == "t2i":
            from ..tasks.generate import check_prompt

            check_prompt(job.args.get("prompt"))
        mask = self._check_mask(job) if job.args.get("mask") is not None else None
        if job.task == "texture-masked":  # maps that fit their textures, every target colour in a reference map
            from ..tasks.textures import check_label_maps

            check_label_maps(job.args["reference"], job.args["ref_labels"], job.args["target_labels"],
                             job.args.get("size"))
        if model:
            self._model(job.model)
        self._check_geometry(job, preset, mask)
        if job.args.get("controlnet"):
            self._controlnet(job.args["controlnet"], job.model)
        if job.args.get("layers") is not None:
            self._check_layers(job.args["layers"], job.model)
        from ..model.models import check_steps

        check_steps(preset.steps, self._shell(job.model).scheduler_config.num_train_timesteps)  # its configs' count

    def _check_mask(self, job: Job):
        """What the task checks of a mask before its model loads: its aspect, its white, the tiling (against the
        size of the content image, read by the inputs' check)."""
        from ..tasks.regions import load_mask

        role = "structure" if job.task == "appearance" else "content"
        return load_mask(job.args["mask"], _Sized(self._sizes[job.args[role]]), tile=job.args.get("tile"),
                         what=f"{role} image")

    def _check_geometry(self, job: Job, preset, mask=None) -> None:
        """Checks that need the model's sizes and scheduler, from its configs (no weights): the canvas size,
        expand's views, the references' crops under reference fit keep, a mask's white against the result's
        latent cells, the sampling tasks' guidance and start_t."""
        args = job.args
        references = args.get(job.spec.reference)
        references = references if isinstance(references, list) else [] if references is None else [references]
        cropped = preset.reference_fit == "keep" and len(references) > 1  # each reference cut to the first's aspect
        if (job.task != "expand" and args.get("size") is None and job.task not in _SAMPLING + ("style",)
                and not cropped and mask is None):
            return
        shell = self._shell(job.model)
        if cropped and shell.from_configs:  # a reference cut to a sliver: refused by name, as the run would
            from ..images import reference_boxes

            reference_boxes([self._sizes[r] for r in references], "keep", shell.native_size, shell.latent_multiple,
                            names=references)
        if job.task == "expand":
            from ..presets import VIEW
            from ..tasks.textures import canvas_size, check_expansion

            check_expansion(preset, args["size"], **{k: args[k] for k in ("view", "view_batch", "decode_tile")
                                                     if k in args})
            canvas_size(shell, args["size"], args.get("view", VIEW), warn=False)
        elif args.get("size") is not None or job.task == "style" or mask is not None:
            from ..tasks.setup import target_size

            like = next((args[n] for n in _LIKE.get(job.task, ()) if args.get(n)), None)
            like = like[0] if isinstance(like, list) else like
            size = self._sizes.get(like) if like is not None else None
            planned = target_size(shell, args.get("size"), like=_Sized(size) if size else None, warn=False)
            if shell.from_configs and size:  # the batch runner groups style jobs by the size they will have
                job.planned_size = planned
            if mask is not None and shell.from_configs:  # white enough to cover a latent cell of the result
                from ..tasks.regions import update_mask

                update_mask(mask, planned, shell.vae_scale_factor, args["mask"])
        if job.task in _SAMPLING:
            from ..tasks.generate import check_sampling

            check_sampling(preset, args.get("start_t"), shell)

    def _image(self, path: str, name: str) -> None:
        from ..images import load_image

        if path not in self._images:
            what = self.labels.get(name) or name.replace("_", " ") + ("" if name.endswith("image") else " image")
            try:
                self._sizes[path] = load_image(path, what=what, flat=name == "mask",
                                               labels=name in ("ref_labels", "target_labels")).size
                self._images[path] = None
            except UserError as exc:
                self._images[path] = str(exc)
        if self._images[path]:
            raise UserError(self._images[path])

    def _model(self, model: ModelSpec) -> None:
        if model not in self._models:
            try:
                check_model(model)
                self._models[model] = None
            except UserError as exc:
                self._models[model] = str(exc)
        if self._models[model]:
            raise UserError(self._models[model])

    def _shell(self, model: ModelSpec):
        """What the checks need of ``model``'s sizes and scheduler, from its configs (see :func:`_geometry`)."""
        if model not in self._geometry:
            self._geometry[model] = _geometry(model, self._unet(model))
        return self._geometry[model]

    def _unet(self, model: ModelSpec) -> dict | None:
        """The UNet config of ``model`` (read once per model; None when there is none to be had)."""
        if model not in self._unets:
            from diffusers import UNet2DConditionModel

            self._unets[model] = _config(UNet2DConditionModel, _model_folder(model), subfolder="unet")
        return self._unets[model]

    def _controlnet(self, source: str, model: ModelSpec) -> None:
        from diffusers import ControlNetModel

        from ..model.controlnet import check_configs_fit, check_controlnet_source

        check_controlnet_source(source)
        if Path(source).is_file():  # one weights file: what its tensor names say (model/controlnet_file.py)
            from ..model.controlnet_file import check_controlnet_file

            check_controlnet_file(Path(source), model.allow_pickle, _kind(model), model.source or _default_model())
            return
        net, unet = _config(ControlNetModel, source), self._unet(model)
        if net is not None and unet is not None:  # configs to be had (local or cached): do they fit?
            check_configs_fit(net, unet, source, model.source or _default_model(), self._shell(model).vae_scale_factor)

    def _check_layers(self, layers: Any, model: ModelSpec) -> None:
        from ..core.engine import parse_layers

        if model not in self._layers:
            self._layers[model] = _meta_model(self._unet(model))
        shell = self._layers[model]
        if shell is not None:
            parse_layers(layers, shell)  # range checked against the model's own layer count


def _is_one_of(path: Path, files: set[Path]) -> bool:
    """``path`` names one of ``files`` (resolved), also under another name: a case-insensitive file system,
    a hard link. A name the file system refuses is none of them (the output checks say what is wrong)."""
    try:
        return path.resolve() in files or (path.exists() and any(os.path.samefile(path, f) for f in files))
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python 3.11's resolve)
        return False


@dataclass(frozen=True)
class _Sized:
    """Stands in for an image whose size is all a check needs."""

    size: tuple[int, int]

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]


def _model_folder(model: ModelSpec) -> str:
    """Where ``model``'s configs are: its folder or Hub id, or for a single file the ``config`` folder."""
    source = model.source or _default_model()
    return model.config if model.config and Path(source).is_file() else source


def _geometry(model: ModelSpec, unet: dict | None):
    """Sizes and scheduler of ``model`` as the loaded model would report them, from its configs (no weights);
    the documented defaults of its kind when there are no configs to be had."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, DDIMScheduler

    folder = _model_folder(model)
    vae = _config(AutoencoderKL, model.vae) if model.vae else _config(AutoencoderKL, folder, subfolder="vae")
    scheduler = _config(DDIMScheduler, folder, subfolder="scheduler")
    factor, multiple, native = _DEFAULT_GEOMETRY[_kind(model)]
    if vae and vae.get("block_out_channels"):
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
    if unet and unet.get("down_block_types") and unet.get("sample_size"):
        multiple = factor * 2 ** (len(unet["down_block_types"]) - 1)
        sample = unet["sample_size"]
        native = int(sample[0] if isinstance(sample, list | tuple) else sample) * factor
    timesteps = int((scheduler or {}).get("num_train_timesteps") or 1000)
    shell = SimpleNamespace(vae_scale_factor=factor, latent_multiple=multiple, native_size=native,
                            scheduler_config=SimpleNamespace(num_train_timesteps=timesteps),
                            from_configs=bool(vae and unet and unet.get("down_block_types")
                                              and unet.get("sample_size")))
    if scheduler:  # its timesteps as the run will take them: a start_t below all of them is known now
        from ..model.models import ddim_scheduler

        shell.ddim_scheduler = lambda steps: ddim_scheduler(scheduler, steps)
    return shell


def _kind(model: ModelSpec) -> str:
    """sd15 or sdxl, from model_index.json or a checkpoint's keys (no weights read; a pickle's only where the
    job allows pickles); sd15 when unknown."""
    from ..model.loading import pipeline_kind
    from ..model.single_file import kind_from_checkpoint

    source = model.source or _default_model()
    try:
        if Path(source).is_file():
            if not (source.lower().endswith(".safetensors") or model.allow_pickle):
                return "sd15"  # the load refuses it anyway
            return kind_from_checkpoint(Path(source))
        return pipeline_kind(source)
    except Exception:
        return "sd15"


def check_model(model: ModelSpec, *, pickle_option: str = '"allow_pickle": true') -> None:
    """Is ``model`` loadable? Reads configs only (model_index.json, the VAE's config), never weights.
    ``pickle_option``: how a message names the permission for pickle files (a jobs file's key by default)."""
    from ..model.loading import DEFAULT_MODEL, check_config_use, check_vae_source, pipeline_kind, single_file_kind
    from ..model.models import resolve_device, resolve_dtype
    from ..model.single_file import check_checkpoint, checkpoint_keys, is_checkpoint_path, vae_given

    resolve_dtype(model.dtype, resolve_device(model.device))  # both raise UserError on what they cannot use
    source = model.source or DEFAULT_MODEL
    check_config_use(source, model.config)
    if model.vae is not None:
        check_vae_source(model.vae)
    if is_checkpoint_path(Path(source)):
        path = Path(source)
        check_checkpoint(path, model.allow_pickle, option=pickle_option)
        keys = checkpoint_keys(path)  # its tensor names only: a pickle's unpickled without running code
        single_file_kind(path, keys, model.config)  # a config of the checkpoint's family
        vae_given(path, keys, model.vae, lambda: None)  # a checkpoint pruned of its VAE has one given
    else:
        pipeline_kind(source)
        _check_channels(model, source)


def _check_channels(model: ModelSpec, source: str) -> None:
    """An inpainting or editing UNet, or a VAE of another latent width, by their configs (no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..model.loading import check_latent_channels

    unet = _config(UNet2DConditionModel, source, subfolder="unet")
    vae = _config(AutoencoderKL, model.vae) if model.vae else _config(AutoencoderKL, source, subfolder="vae")
    if unet and vae and all(isinstance(c.get(k), int) for c, k in (
            (unet, "in_channels"), (unet, "out_channels"), (vae, "latent_channels"))):
        check_latent_channels(unet["in_channels"], unet["out_channels"], vae["latent_channels"], source, model.vae)


def _default_model() -> str:
    from ..model.loading import DEFAULT_MODEL

    return DEFAULT_MODEL


def _config(cls, source: str, subfolder: str | None = None) -> dict | None:
    """``cls``'s config from a local folder or a cached Hub id, without weights; None when there is none."""
    from ..model.loading import local_files_only

    if Path(source).is_file():
        return None  # a single-file checkpoint: its config comes with the load
    try:
        config = cls.load_config(source, subfolder=subfolder, local_files_only=local_files_only(source))
    except Exception:
        return None
    return config if isinstance(config, dict) else None  # a damaged config.json (a list): the load says which


def _meta_model(config: dict | None):
    """An object with a weightless ``unet`` (meta device) built from a UNet ``config``, for layer checks;
    None if unknown."""
    from types import SimpleNamespace

    import torch
    from diffusers import UNet2DConditionModel

    if config is None:  # no config to be had offline: the range is checked when the model loads
        return None
    try:
        with torch.device("meta"):
            return SimpleNamespace(unet=UNet2DConditionModel.from_config(config))
    except Exception:  # a config this diffusers cannot build: the load will say why
        return None
