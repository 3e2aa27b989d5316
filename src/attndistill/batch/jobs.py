"""Jobs files of the batch runner: parse each line into a :class:`Job`.

One line is one job, a task name plus the options of the matching CLI command::

    {"task": "style", "content": "photos/horse.jpg", "style": "art/cat.jpg", "steps": 100, "size": 512}

Input paths are relative to the jobs file, ``output`` to the output folder (default ``ID.png``).
:mod:`attndistill.batch.check` then reads every image and model config a job names, before any work.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import UserError, first_line
from ..fingerprints import path_digest
from ..images import check_png_name, numbered_outputs
from .state import runner_owns

# -- tasks -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    """How a job's task name maps onto a public API function (imported only when used)."""

    module: str  # a module of attndistill.tasks
    function: str
    inputs: tuple[str, ...]  # required arguments, passed positionally in this order
    paths: tuple[str, ...]  # arguments holding image paths (relative to the jobs file)
    preset: str  # the PRESETS entry whose ranges the options are checked against
    reference: str  # the reference argument: jobs sharing it (and model, size) run consecutively
    count: str | None = None  # option giving the number of images the job writes

    def resolve(self) -> Callable[..., Any]:
        try:
            return getattr(importlib.import_module(f"attndistill.tasks.{self.module}"), self.function)
        except (ImportError, AttributeError):
            raise UserError(f"attndistill.tasks.{self.module}.{self.function} is not available in this installation; "
                            "update attndistill or drop these jobs") from None


TASKS: dict[str, TaskSpec] = {
    "style": TaskSpec("transfer", "style_transfer", ("content", "style"), ("content", "style", "mask"),
                      "style", "style"),
    "appearance": TaskSpec("transfer", "appearance_transfer", ("structure", "appearance"),
                           ("structure", "appearance", "mask"), "appearance", "appearance"),
    "texture": TaskSpec("transfer", "texture_synthesis", ("reference",), ("reference",), "texture",
                        "reference", "num"),
    "texture-masked": TaskSpec("textures", "masked_texture_synthesis",
                               ("reference", "ref_labels", "target_labels"),
                               ("reference", "ref_labels", "target_labels"), "texture-masked", "reference", "num"),
    "texture-sample": TaskSpec("generate", "texture_sampling", ("reference",), ("reference",),
                               "texture-sample", "reference", "num"),
    "texture-layout": TaskSpec("generate", "layout_texture", ("reference", "layout"),
                               ("reference", "layout"), "texture-sample", "reference", "num"),
    "t2i": TaskSpec("generate", "text_to_image", ("prompt", "style"),
                    ("style", "content", "control_image"), "t2i", "style", "num_images"),
    "expand": TaskSpec("textures", "expand_texture", ("reference",), ("reference",), "expand",
                       "reference"),
}
#: Path arguments that take a single image (the references take several).
_ONE_IMAGE = {"content", "structure", "target_labels", "layout", "control_image", "mask"}
#: CLI argument names that differ from the API's.
ALIASES = {"style_images": "style", "appearance_images": "appearance", "references": "reference"}
#: Options the runner handles itself; everything else goes to the API function.
RUNNER_KEYS = ("task", "id", "output", "overwrite", "model", "vae", "config", "allow_pickle", "device", "dtype",
               "grid", "perf")
_INTS = {"steps", "iters", "seed", "num", "num_images", "stride", "view_batch", "view", "decode_tile"}
_FLOATS = {"lr", "content_weight", "attention_scale", "guidance", "guidance_rescale", "strength", "control_scale",
           "start_t"}
_BOOLS = {"adain", "overwrite", "allow_pickle", "fused", "tune_vae", "grid"}
_STRINGS = {"id", "output", "model", "vae", "config", "device", "dtype", "prompt", "negative_prompt", "control",
            "controlnet", "tile", "mode", "reference_fit"}
_NOT_OPTIONS = {"model", "device", "dtype", "vae", "progress", "callback"}


def texture_task(mode: str | None, *, layout: bool, labels: tuple[bool, bool], strength: bool = False,
                 option: Callable[[str], str] = "'{}'".format) -> str:
    """The task a texture run is, for the ``texture`` command and batch lines alike: masked with label
    maps, SDEdit sampling with a layout, else optimisation or (``mode`` sample) sampling. ``labels``:
    (reference maps given, target map given); ``option`` names an option in the caller's words."""
    if mode not in (None, "optimize", "sample"):
        raise UserError(f"unknown {option('mode')} '{mode}'; use optimize or sample")
    if strength and not layout:
        raise UserError(f"{option('strength')} needs a {option('layout')} image")
    if any(labels):
        if not all(labels):
            raise UserError(f"masked synthesis needs both {option('ref_labels')} and {option('target_labels')}")
        if mode == "sample" or layout:
            raise UserError(f"{option('ref_labels')}/{option('target_labels')} run masked optimisation; drop "
                            f"{option('mode')} sample and {option('layout')}")
        return "texture-masked"
    if layout:
        if mode == "optimize":
            raise UserError(f"{option('layout')} runs AD-guided sampling (SDEdit); drop {option('mode')} optimize "
                            "or set it to sample")
        return "texture-layout"
    return "texture-sample" if mode == "sample" else "texture"


def _texture_task(raw: dict) -> str:
    """A ``texture`` line's task (its ``mode`` taken out of the options)."""
    return texture_task(raw.pop("mode", None), layout="layout" in raw, strength="strength" in raw,
                        labels=("ref_labels" in raw, "target_labels" in raw))


# -- jobs ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides which model a job needs; jobs with equal specs share one load."""

    source: str | None = None
    vae: str | None = None
    config: str | None = None
    allow_pickle: bool = False
    device: str = "auto"
    dtype: str = "auto"
    perf: tuple[tuple[str, Any], ...] = ()  # speed switches this job sets over the runner's (sorted pairs)


@dataclass
class Job:
    """One line of the jobs file, parsed; ``error`` is set when the line is unusable."""

    line: int  # 1-based
    id: str
    task: str = ""
    args: dict[str, Any] = field(default_factory=dict)  # API arguments, paths made absolute
    model: ModelSpec = field(default_factory=ModelSpec)
    outputs: tuple[Path, ...] = ()
    overwrite: bool = False
    grid: bool = False  # the images as one grid image, as the CLI's --grid writes them
    error: str | None = None
    planned_size: tuple[int, int] | None = None  # the result's (w, h), as the checks computed it from configs

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]

    @property
    def group(self) -> str:
        """Jobs of one model, size (the planned one where known) and reference: a run takes them together."""
        if self.error:
            return json.dumps(["~", self.line])
        ref = self.args.get(self.spec.reference)
        size = self.planned_size or self.args.get("size")
        return json.dumps([asdict(self.model), str(size), ref], default=str)

    @property
    def settings(self) -> str:
        """The group and every option but the images and seed: jobs that may share a batch or CUDA graphs."""
        options = {k: v for k, v in self.args.items() if k not in self.spec.paths and k != "seed"}
        return json.dumps([self.group, options], default=str, sort_keys=True)


def run_order(jobs: Sequence[Job]) -> list[Job]:
    """The order a run takes ``jobs`` in: group by group (groups ordered by their settings' text, not by the
    file), and in a group the jobs of one setting together, where the first of them stands in the file, then
    by line. Every shard of a run computes the same."""
    first: dict[str, int] = {}
    for job in sorted(jobs, key=lambda j: j.line):
        first.setdefault(job.settings, job.line)
    return sorted(jobs, key=lambda j: (j.group, first[j.settings], j.line))


def _fail(line: int, message: str) -> UserError:
    """A line's error in the jobs file's words: the library's messages name command-line options."""
    return UserError(f"line {line}: {job_words(message)}")


def job_words(message: str) -> str:
    """``--start-t`` -> ``'start_t'``, ``--no-cuda-graphs`` -> ``'cuda_graphs': false``: the keys a job line has.

    Only options that are job keys; the batch command's own (``--out``), anything in a path and a command quoted
    whole (``'attndistill texture --mode sample'``) stay as they are.
    """
    parts = re.split(r"('attndistill [^']*')", message)  # odd parts: the quoted commands
    return "".join(part if i % 2 else _job_keys_of(part) for i, part in enumerate(parts))


def _job_keys_of(message: str) -> str:
    keys = _job_keys()

    def key(match: re.Match, negated: bool) -> str:
        name = match[1].replace("-", "_")
        return match[0] if name not in keys else f"'{name}': false" if negated else f"'{name}'"

    flag = r"(?<![\w.'-])--{}([a-z][a-z0-9-]*)(?![\w.-])"
    message = re.sub(flag.format("no-"), lambda m: key(m, True), message)
    message = re.sub(flag.format(""), lambda m: key(m, False), message)
    # a message that starts with a setting's name ("start-t must be in 1..1000"): its key, as the advice says it
    return re.sub(r"^([a-z][a-z0-9]*(?:-[a-z0-9]+)+)(?= )", lambda m: key(m, False), message)


@lru_cache(maxsize=1)
def _job_keys() -> frozenset[str]:
    """Every key a job line may have: the tasks' options, the runner's keys, texture's mode, the speed switches."""
    from ..model.perf import PerfOptions

    keys = set(RUNNER_KEYS) | {"mode"} | {f.name for f in fields(PerfOptions)}
    for spec in TASKS.values():
        try:
            keys |= set(inspect.signature(spec.resolve()).parameters) - _NOT_OPTIONS
        except UserError:  # a task this installation lacks: its line says so itself
            continue
    return frozenset(keys)


#: torch dtype names (as results record them) -> the ``dtype`` option's names.
DTYPE_OPTIONS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def job_from_parameters(params: Mapping[str, Any], *, source: str = "the image") -> dict[str, Any]:
    """The jobs-file line that reruns the run whose parameters a result carries (``attndistill info --job``).

    Every recorded setting the task's API function accepts is kept, so the rerun does not depend on
    today's defaults; relative input paths are made absolute against the current folder.
    """
    task = params.get("task")
    if task not in TASKS:
        raise UserError(f"{source} was made by task {task!r}, which the batch runner cannot rerun; "
                        f"it reruns {', '.join(TASKS)}")
    spec = TASKS[task]
    accepted = inspect.signature(spec.resolve()).parameters
    job: dict[str, Any] = {"task": task}
    for key, value in params.items():
        if value is None or key == "task":
            continue
        if key in ("model", "vae", "config", "controlnet"):  # local folders and files made absolute
            if str(value).startswith("<"):  # e.g. a ControlNet made in memory, recorded by its class
                raise UserError(f"{source} was made with a {key} passed in memory ({value}), not a folder or "
                                "Hub id; it cannot be rerun from its parameters")
            job[key] = str(Path(value).resolve()) if Path(value).exists() else value
        elif key in ("grid", "allow_pickle"):
            job[key] = bool(value)
        elif key == "dtype":
            job["dtype"] = DTYPE_OPTIONS.get(value, value)
        elif key == "perf":  # pixel-changing speed switches the result was made with
            job["perf"] = value
        elif key in accepted and key not in _NOT_OPTIONS:
            job[key] = value
    for name in spec.paths:
        if name not in job:
            continue
        items = job[name] if isinstance(job[name], list) else [job[name]]
        if "<image>" in items:
            raise UserError(f"{source} was made from an image passed in memory ('{name}'), not a file; "
                            "it cannot be rerun from its parameters")
        absolute = [str(Path(v).resolve()) if Path(v).exists() else v for v in items]
        job[name] = absolute if isinstance(job[name], list) else absolute[0]
    return job


def _as_json(value: Any) -> str:
    """A value as the jobs file spells it (true, "2", null), not as Python does (True, '2', None)."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _check_types(raw: Mapping[str, Any], line: int) -> None:
    for key, value in raw.items():
        if any("\0" in v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)):
            raise _fail(line, f"'{key}' holds a NUL character (\\u0000), which no path or option may hold")
        if key in _INTS and (not isinstance(value, int) or isinstance(value, bool)):
            raise _fail(line, f"'{key}' must be a whole number (got {_as_json(value)})")
        if key in _FLOATS and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise _fail(line, f"'{key}' must be a number (got {_as_json(value)})")
        if key in _FLOATS and not math.isfinite(value):
            raise _fail(line, f"'{key}' must be a finite number (got {_as_json(value)})")
        if key in _BOOLS and not isinstance(value, bool):
            raise _fail(line, f"'{key}' must be true or false (got {_as_json(value)})")
        if key in _STRINGS and not isinstance(value, str):
            raise _fail(line, f"'{key}' must be a string (got {_as_json(value)})")
        if key == "layers" and value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise _fail(line, f"'layers' must be a range like \"10-15\" or a list of layer numbers like [10, 11, 12] "
                              f"(got {_as_json(value)})")


def _parse_perf(value: Any, line: int) -> tuple[tuple[str, Any], ...]:
    """A job's ``perf``: {switch: value} over the runner's speed switches, as results record them."""
    from ..model.perf import PerfOptions

    if value is None:
        return ()
    known = [f.name for f in fields(PerfOptions)]
    if not isinstance(value, dict) or any(k not in known for k in value):
        raise _fail(line, f"'perf' must be an object of speed switches ({', '.join(known)}), got {_as_json(value)}")
    try:
        PerfOptions(**value)
    except UserError as exc:
        raise _fail(line, f"'perf': {exc}") from None
    return tuple(sorted(value.items()))


def _contents(value: str | list[str]) -> str | list[str]:
    """A path's file digest, or a list's; the path itself where it leads to no regular file (a missing one, a
    folder: the checks before the run refuse them, and a folder given as an image was read whole first)."""
    if isinstance(value, list):
        return [_contents(v) for v in value]
    return (path_digest(value) if os.path.isfile(value) else None) or value


def _resolve_local(value: str | None, base: Path) -> str | None:
    """A model/VAE/config path relative to the jobs file; Hub ids (``owner/name``, no such folder there) stay as
    they are. A missing local path stays relative to the jobs file too: kept as written, it was looked for in
    the current folder, so one line ran or failed depending on where the command was started."""
    from ..model.loading import home, looks_like_hub_id

    if value is None:
        return None
    candidate = base / home(value)  # an absolute path (from "~" too) stays itself
    if candidate.exists():
        return str(candidate.resolve())
    if looks_like_hub_id(value):
        return value
    return str(candidate)  # its error names where it was looked for


def _parse_size(value: Any, line: int):
    from ..images import parse_size

    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        value = f"{value[0]}x{value[1]}"
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise _fail(line, f"'size' must be a number, \"WIDTHxHEIGHT\" or [width, height] (got {_as_json(value)})")
    try:
        return parse_size(str(value), multiple=1)  # the task rounds it for the model, as from the CLI
    except UserError as exc:
        raise _fail(line, str(exc)) from None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:32] or "job"


class _TwiceGiven(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _once_each(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are each given once: json keeps the last of two silently."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _TwiceGiven(key)
        seen[key] = value
    return seen


def parse_job(raw: Any, *, line: int, base: Path, out_dir: Path, defaults: ModelSpec) -> Job:
    """One decoded JSON line -> :class:`Job`; a :class:`UserError` naming the line and the fix otherwise."""
    from ..model.loading import home

    if not isinstance(raw, dict):
        raise _fail(line, "each line must be a JSON object such as {\"task\": \"style\", ...}")
    spelled: dict[str, str] = {}  # each setting's name -> the key the line gives it under
    for k in raw:  # one setting under two spellings: which one ran would be the JSON's order's choice
        same = spelled.setdefault(ALIASES.get(k.replace("-", "_"), k.replace("-", "_")), k)
        if same != k:
            raise _fail(line, f"'{same}' and '{k}' name the same setting; keep one")
    raw = {name: raw[k] for name, k in spelled.items()}
    identity = {k: v for k, v in raw.items() if k != "id"}  # what the job id is a hash of
    task = raw.pop("task", None)
    if not isinstance(task, str):
        raise _fail(line, f"'task' is missing; use one of {', '.join(TASKS)}")
    if task == "texture":
        try:
            task = _texture_task(raw)
        except UserError as exc:
            raise _fail(line, str(exc)) from None
    if task not in TASKS:
        raise _fail(line, f"task '{task}' is not known; use one of {', '.join(TASKS)}")
    _check_types(raw, line)
    spec = TASKS[task]
    fn = spec.resolve()
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = [n for n in params if n not in _NOT_OPTIONS]
        unknown = sorted(k for k in raw if k not in known and k not in RUNNER_KEYS)
        if unknown:
            close = {k: difflib.get_close_matches(k, [*known, *RUNNER_KEYS], n=1) for k in unknown}
            meant = "; ".join(f"did you mean '{c[0]}' for '{k}'?" for k, c in close.items() if c)
            raise _fail(line, f"{task} has no option {', '.join(map(repr, unknown))}; {meant + ' ' if meant else ''}"
                              f"known: {', '.join(known)}; "
                              f"and for every task: {', '.join(k for k in RUNNER_KEYS if k not in known)}")
    missing = [name for name in spec.inputs if raw.get(name) in (None, "", [])]
    missing += [name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
                and p.default is inspect.Parameter.empty and name not in _NOT_OPTIONS and raw.get(name) is None]
    if missing:
        raise _fail(line, f"{task} needs {', '.join(map(repr, missing))}")

    model = ModelSpec(
        source=_resolve_local(raw.pop("model", None), base) or defaults.source,
        vae=_resolve_local(raw.pop("vae", None), base) or defaults.vae,
        config=_resolve_local(raw.pop("config", None), base) or defaults.config,
        allow_pickle=raw.pop("allow_pickle", defaults.allow_pickle),
        device=raw.pop("device", defaults.device), dtype=raw.pop("dtype", defaults.dtype),
        perf=tuple(sorted((dict(defaults.perf) | dict(_parse_perf(raw.pop("perf", None), line))).items())))
    overwrite = raw.pop("overwrite", False)
    grid = raw.pop("grid", False)
    output = raw.pop("output", None)
    job_id = raw.pop("id", None)
    args = raw
    for name in spec.paths:
        value = args.get(name)
        if value is None:
            continue
        if isinstance(value, list) and name in _ONE_IMAGE:
            raise _fail(line, f"'{name}' takes one image: a path relative to the jobs file, not a list")
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) and v for v in items):
            raise _fail(line, f"'{name}' must be a path or a list of paths relative to the jobs file")
        resolved = [str(base / home(v)) for v in items]
        args[name] = resolved if isinstance(value, list) else resolved[0]
    if "size" in args:
        args["size"] = _parse_size(args["size"], line)
    if "controlnet" in args:
        args["controlnet"] = _resolve_local(args["controlnet"], base)

    if job_id is None:
        identity.update(model=model.source, vae=model.vae, config=model.config)  # another model: another job
        # the images' contents, not their paths: 'c.jpg' beside another jobs file is another image, and was taken
        # for this job's, finished; an image edited since its result was made was taken for the same; and a
        # project folder moved elsewhere ran all its finished jobs again
        identity.update({name: _contents(args[name]) for name in spec.paths if name in args})
        if "controlnet" in args:  # a Hub id, a folder or a file of gigabytes: by its place, not hashed
            identity["controlnet"] = args["controlnet"]
        if model.dtype != "auto":  # the command's --dtype too, as a job's own "dtype" was
            identity["dtype"] = model.dtype
        if model.perf:  # switches that change pixels (the job's own and the runner's flags): other results
            identity["perf"] = dict(model.perf)
        digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
        first = args[spec.inputs[0]]
        stem = Path(first[0] if isinstance(first, list) else first).stem if spec.paths[0] == spec.inputs[0] \
            else str(first)
        job_id = f"{task}-{_slug(stem)}-{digest}"
    elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", job_id):
        raise _fail(line, f"id '{job_id}' may only use letters, digits, '.', '_' and '-'")
    if output is not None and (Path(output).is_absolute() or ".." in Path(output).parts or output.startswith("~")):
        raise _fail(line, f"output '{output}' is outside the output folder; give a path relative to --out without "
                          f"'..', e.g. \"output\": \"{Path(output).name or 'image.png'}\"")
    if output is not None and Path(output).parts and runner_owns(Path(output).parts[0]):
        raise _fail(line, f"output '{output}' is under '{Path(output).parts[0]}', which the runner keeps in --out for "
                          "its records, logs and locks; give it another folder")
    if output is not None:
        try:
            check_png_name(output)
        except UserError as exc:
            raise _fail(line, str(exc)) from None
    out = out_dir / (output if output is not None else f"{job_id}.png")
    count = args.get(spec.count, 1) if spec.count else 1
    if count < 1:
        raise _fail(line, f"'{spec.count}' must be at least 1 (got {count})")
    from ..tasks.setup import MAX_IMAGES

    if count > MAX_IMAGES:
        raise _fail(line, f"'{spec.count}' {count} is more than one job makes (at most {MAX_IMAGES}); split it into "
                          "several lines with other seeds")
    if grid and not spec.count:
        raise _fail(line, f"'grid' needs a task that writes several images; {task} writes one")
    return Job(line=line, id=job_id, task=task, args=args, model=model,
               outputs=numbered_outputs(out, 1 if grid else count), overwrite=overwrite, grid=grid)


def read_jobs(path: str | os.PathLike, *, out_dir: str | os.PathLike,
              defaults: ModelSpec | None = None) -> list[Job]:
    """Parse every line of a jobs file. Unusable lines become jobs with ``error`` set, so one bad line
    never stops the others; blank lines and lines starting with ``#`` are skipped."""
    path, out_dir = Path(path), Path(out_dir)
    if path.is_dir():
        found = sorted(path.glob("*.jsonl"))
        hint = f", e.g. '{found[0]}'" if len(found) == 1 else ""
        raise UserError(f"jobs file '{path}' is a directory; pass the .jsonl jobs file itself (one job per line)"
                        f"{hint}")
    if str(path) == "-" or (path.exists() and not path.is_file()):  # stdin, a pipe, a device: no folder to
        # resolve the jobs' relative paths against
        raise UserError(f"jobs file '{path}' is not a regular file; save the jobs to a .jsonl file (its folder is "
                        "where relative paths in it start)")
    if not path.is_file():
        raise UserError(f"jobs file '{path}' does not exist; pass a .jsonl file with one job per line")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows Notepad) is not part of line 1
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"jobs file '{path}' cannot be read ({exc}); save it as UTF-8 text") from None
    base = path.resolve().parent
    jobs: list[Job] = []
    ids: dict[str, int] = {}
    outputs: dict[Path, int] = {}
    folders: dict[Path, int] = {}  # the folders the outputs are in, up to the root
    # lines end at "\n" alone (a "\r" before it is JSON whitespace): splitlines() also broke at U+2028, U+0085
    # and others, which JSON strings may hold, and numbered every later line wrongly
    for number, text_line in enumerate(text.split("\n"), 1):
        if not text_line.strip() or text_line.lstrip().startswith("#"):
            continue
        named = False  # the line gives its own id (not the hash of its settings)
        try:
            raw = json.loads(text_line, object_pairs_hook=_once_each)
            named = isinstance(raw, dict) and "id" in raw
            job = parse_job(raw, line=number, base=base, out_dir=out_dir, defaults=defaults or ModelSpec())
        except _TwiceGiven as exc:
            job = Job(line=number, id=f"line-{number}", error=f"line {number}: '{exc.key}' is given twice; keep one")
        except json.JSONDecodeError as exc:
            job = Job(line=number, id=f"line-{number}", error=f"line {number}: not valid JSON ({exc.msg})")
        except UserError as exc:
            job = Job(line=number, id=f"line-{number}", error=str(exc))
        except Exception as exc:  # a check that did not foresee this input: this line's error, not the run's
            job = Job(line=number, id=f"line-{number}", error=str(_fail(number, _unexpected(exc))))
        if not job.error:
            if job.id in ids:
                job.error = (f"line {number}: id '{job.id}' is line {ids[job.id]}'s too; give each job its own id"
                             if named else
                             f"line {number}: the same job as line {ids[job.id]}; remove one or give each an id")
            clash = [outputs[p] for p in job.outputs if p in outputs]
            if clash and not job.error:
                job.error = f"line {number}: writes the same output as line {clash[0]}; set another 'output'"
            # an output that another's would need as a folder, or the other way round: one of the two fails
            under = [outputs[q] for p in job.outputs for q in p.parents if q in outputs]
            over = [folders[p] for p in job.outputs if p in folders]
            if (under or over) and not job.error:
                job.error = (f"line {number}: its output and line {(under or over)[0]}'s are a file and a folder of "
                             "the same name; set another 'output'")
        if not job.error:
            ids[job.id] = number
            outputs.update((p, number) for p in job.outputs)
            folders.update((q, number) for p in job.outputs for q in p.parents)
        else:
            job.id = f"line-{number}" if job.id in ids else job.id
        jobs.append(job)
    if not jobs:
        raise UserError(f"jobs file '{path}' has no jobs; write one JSON object per line")
    return jobs


def _unexpected(exc: BaseException) -> str:
    text = first_line(exc)
    return (f"this job cannot be checked (unexpected {type(exc).__name__}{': ' + text if text else ''}); "
            "check the values of this line's options")


def carries_job(path: Path, job_id: str) -> bool:
    """Is ``path`` a complete result of ``job_id``? (Images carry their job id in their parameters.)"""
    from ..images import read_parameters

    try:
        return path.is_file() and read_parameters(path).get("job") == job_id
    except Exception:
        return False
