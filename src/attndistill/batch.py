"""Batch runner: many jobs from one JSONL file, resumable, never run twice, sharded across processes.

Each line of the jobs file is one job, a task name plus the options of the matching CLI command::

    {"task": "style", "content": "photos/horse.jpg", "style": "art/cat.jpg", "steps": 100, "size": 512}

Input paths are relative to the jobs file, ``output`` to the output folder (default ``ID.png``). The
runner writes images atomically, appends one line per finished job to ``results.jsonl`` (one write and
an fsync, so a crash loses at most the job in flight), holds a lock file per running job, and on a
re-run skips the jobs whose images exist and carry their job id. Shards (``--shard I/N``, torchrun,
Slurm arrays) take deterministic slices of the job list and write their own results file, merged by
:func:`merge_results`.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import inspect
import json
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .batchstate import (
    JobLock,
    Shard,
    append_record,
    latest,
    launcher_rank,
    merge_results,
    process_device,
    read_records,
    resolve_shard,
    select,
    wait_for_all_ranks,
)
from .errors import OOM_ADVICE, UserError, is_out_of_memory

__all__ = ["TASKS", "Job", "JobLock", "ModelSpec", "Runner", "Summary", "TaskSpec", "append_record", "dry_run",
           "merge_results", "read_jobs", "read_records", "resolve_shard", "run_batch", "select"]

Log = Callable[[str], None]


# -- tasks -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    """How a job's task name maps onto a public API function (imported only when used)."""

    module: str
    function: str
    inputs: tuple[str, ...]  # required arguments, passed positionally in this order
    paths: tuple[str, ...]  # arguments holding image paths (relative to the jobs file)
    preset: str  # the PRESETS entry whose ranges the options are checked against
    reference: str  # the reference argument: jobs sharing it (and model, size) run consecutively
    count: str | None = None  # option giving the number of images the job writes

    def resolve(self) -> Callable[..., Any]:
        try:
            return getattr(importlib.import_module(self.module), self.function)
        except (ImportError, AttributeError):
            raise UserError(f"{self.module}.{self.function} is not available in this installation; "
                            "update attndistill or drop these jobs") from None


TASKS: dict[str, TaskSpec] = {
    "style": TaskSpec("attndistill.tasks", "style_transfer", ("content", "style"), ("content", "style"),
                      "style", "style"),
    "appearance": TaskSpec("attndistill.tasks", "appearance_transfer", ("structure", "appearance"),
                           ("structure", "appearance"), "appearance", "appearance"),
    "texture": TaskSpec("attndistill.tasks", "texture_synthesis", ("reference",), ("reference",), "texture",
                        "reference", "num"),
    "texture-masked": TaskSpec("attndistill.textures", "masked_texture_synthesis",
                               ("reference", "ref_labels", "target_labels"),
                               ("reference", "ref_labels", "target_labels"), "texture-masked", "reference", "num"),
    "texture-sample": TaskSpec("attndistill.generate", "texture_sampling", ("reference",), ("reference",),
                               "texture-sample", "reference", "num"),
    "texture-layout": TaskSpec("attndistill.generate", "layout_texture", ("reference", "layout"),
                               ("reference", "layout"), "texture-sample", "reference", "num"),
    "t2i": TaskSpec("attndistill.generate", "text_to_image", ("prompt", "style"),
                    ("style", "content", "control_image"), "t2i", "style", "num_images"),
    "expand": TaskSpec("attndistill.textures", "expand_texture", ("reference",), ("reference",), "expand",
                       "reference"),
}
#: CLI argument names that differ from the API's.
ALIASES = {"style_images": "style", "appearance_images": "appearance", "references": "reference"}
#: Options the runner handles itself; everything else goes to the API function.
RUNNER_KEYS = ("task", "id", "output", "overwrite", "model", "vae", "config", "allow_pickle", "device", "dtype")
_INTS = {"steps", "iters", "seed", "num", "num_images", "stride", "view_batch"}
_FLOATS = {"lr", "content_weight", "attention_scale", "guidance", "strength", "control_scale", "start_t"}
_BOOLS = {"adain", "overwrite", "allow_pickle", "fused", "tune_vae"}
_STRINGS = {"id", "output", "model", "vae", "config", "device", "dtype", "prompt", "negative_prompt", "control",
            "controlnet", "tile", "mode"}
_PRESET_FIELDS = ("steps", "iters", "lr", "content_weight", "guidance", "adain", "attention_scale", "stride")
_NOT_OPTIONS = {"model", "device", "dtype", "vae", "progress", "callback"}


def _texture_task(raw: dict) -> str:
    """``texture`` with the CLI's ``mode``/``layout``/``ref_labels`` picks the matching task, as the CLI does."""
    mode = raw.pop("mode", None)
    if "ref_labels" in raw or "target_labels" in raw:
        return "texture-masked"
    if "layout" in raw:
        return "texture-layout"
    if mode in (None, "optimize"):
        return "texture"
    if mode == "sample":
        return "texture-sample"
    raise UserError(f"mode '{mode}' is not known; use optimize or sample")


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
    error: str | None = None

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]

    @property
    def group(self) -> str:
        """Sort key: same model, size and reference first, then file order."""
        if self.error:
            return json.dumps(["~", self.line])
        ref = self.args.get(self.spec.reference)
        return json.dumps([asdict(self.model), str(self.args.get("size")), ref, self.line], default=str)


def _fail(line: int, message: str) -> UserError:
    return UserError(f"line {line}: {message}")


def _check_types(raw: Mapping[str, Any], line: int) -> None:
    for key, value in raw.items():
        if key in _INTS and (not isinstance(value, int) or isinstance(value, bool)):
            raise _fail(line, f"'{key}' must be a whole number (got {value!r})")
        if key in _FLOATS and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise _fail(line, f"'{key}' must be a number (got {value!r})")
        if key in _BOOLS and not isinstance(value, bool):
            raise _fail(line, f"'{key}' must be true or false (got {value!r})")
        if key in _STRINGS and not isinstance(value, str):
            raise _fail(line, f"'{key}' must be a string (got {value!r})")


def _resolve_local(value: str | None, base: Path) -> str | None:
    """A model/VAE/config path relative to the jobs file when it exists there; hub ids stay as they are."""
    if value is None:
        return None
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() else value


def _parse_size(value: Any, line: int):
    from .images import parse_size

    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        value = f"{value[0]}x{value[1]}"
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise _fail(line, f"'size' must be a number, \"WIDTHxHEIGHT\" or [width, height] (got {value!r})")
    try:
        return parse_size(str(value))
    except UserError as exc:
        raise _fail(line, str(exc)) from None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:32] or "job"


def _numbered(output: Path, count: int) -> tuple[Path, ...]:
    """Output names the CLI uses: ``OUT.png`` for one image, ``OUT-0.png``, ``OUT-1.png``... for several."""
    if count == 1:
        return (output,)
    return tuple(output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count))


def parse_job(raw: Any, *, line: int, base: Path, out_dir: Path, defaults: ModelSpec) -> Job:
    """One decoded JSON line -> :class:`Job`; a :class:`UserError` naming the line and the fix otherwise."""
    if not isinstance(raw, dict):
        raise _fail(line, "each line must be a JSON object such as {\"task\": \"style\", ...}")
    raw = {ALIASES.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in raw.items()}
    identity = {k: v for k, v in raw.items() if k != "id"}  # what the job id is a hash of
    task = raw.pop("task", None)
    if not isinstance(task, str):
        raise _fail(line, f"'task' is missing; use one of {', '.join(TASKS)}")
    if task == "texture":
        task = _texture_task(raw)
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
            raise _fail(line, f"{task} has no option {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    missing = [name for name in spec.inputs if raw.get(name) in (None, "", [])]
    if missing:
        raise _fail(line, f"{task} needs {', '.join(map(repr, missing))}")

    model = ModelSpec(
        source=_resolve_local(raw.pop("model", None), base) or defaults.source,
        vae=_resolve_local(raw.pop("vae", None), base) or defaults.vae,
        config=_resolve_local(raw.pop("config", None), base) or defaults.config,
        allow_pickle=raw.pop("allow_pickle", defaults.allow_pickle),
        device=raw.pop("device", defaults.device), dtype=raw.pop("dtype", defaults.dtype))
    overwrite = raw.pop("overwrite", False)
    output = raw.pop("output", None)
    job_id = raw.pop("id", None)
    args = raw
    for name in spec.paths:
        value = args.get(name)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) and v for v in items):
            raise _fail(line, f"'{name}' must be a path or a list of paths relative to the jobs file")
        resolved = [str(base / v) for v in items]
        args[name] = resolved if isinstance(value, list) else resolved[0]
    if "size" in args:
        args["size"] = _parse_size(args["size"], line)

    if job_id is None:
        identity.update(model=model.source, vae=model.vae, config=model.config)  # another model: another job
        digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
        first = args[spec.inputs[0]]
        stem = Path(first[0] if isinstance(first, list) else first).stem if spec.paths[0] == spec.inputs[0] \
            else str(first)
        job_id = f"{task}-{_slug(stem)}-{digest}"
    elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", job_id):
        raise _fail(line, f"id '{job_id}' may only use letters, digits, '.', '_' and '-'")
    out = out_dir / (output if output is not None else f"{job_id}.png")
    if out.suffix.lower() != ".png":
        raise _fail(line, f"output '{output}' must end in .png")
    count = args.get(spec.count, 1) if spec.count else 1
    if count < 1:
        raise _fail(line, f"'{spec.count}' must be at least 1 (got {count})")
    return Job(line=line, id=job_id, task=task, args=args, model=model, outputs=_numbered(out, count),
               overwrite=overwrite)


def read_jobs(path: str | os.PathLike, *, out_dir: str | os.PathLike,
              defaults: ModelSpec | None = None) -> list[Job]:
    """Parse every line of a jobs file. Unusable lines become jobs with ``error`` set, so one bad line
    never stops the others; blank lines and lines starting with ``#`` are skipped."""
    path, out_dir = Path(path), Path(out_dir)
    if path.is_dir() or not path.is_file():
        raise UserError(f"jobs file '{path}' does not exist; pass a .jsonl file with one job per line")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"jobs file '{path}' cannot be read ({exc}); save it as UTF-8 text") from None
    base = path.resolve().parent
    jobs: list[Job] = []
    ids: dict[str, int] = {}
    outputs: dict[Path, int] = {}
    for number, text_line in enumerate(text.splitlines(), 1):
        if not text_line.strip() or text_line.lstrip().startswith("#"):
            continue
        try:
            job = parse_job(json.loads(text_line), line=number, base=base, out_dir=out_dir,
                            defaults=defaults or ModelSpec())
        except json.JSONDecodeError as exc:
            job = Job(line=number, id=f"line-{number}", error=f"line {number}: not valid JSON ({exc.msg})")
        except UserError as exc:
            job = Job(line=number, id=f"line-{number}", error=str(exc))
        if not job.error:
            if job.id in ids:
                job.error = f"line {number}: the same job as line {ids[job.id]}; remove one or give each an id"
            clash = [outputs[p] for p in job.outputs if p in outputs]
            if clash and not job.error:
                job.error = f"line {number}: writes the same output as line {clash[0]}; set another 'output'"
        if not job.error:
            ids[job.id] = number
            outputs.update((p, number) for p in job.outputs)
        else:
            job.id = f"line-{number}" if job.id in ids else job.id
        jobs.append(job)
    if not jobs:
        raise UserError(f"jobs file '{path}' has no jobs; write one JSON object per line")
    return jobs


# -- validation (no model weights) ------------------------------------------------------------------

class Validator:
    """Deep checks of a job before any model work: images readable, numbers in range, outputs writable.

    Images and models are checked once each however many jobs use them.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._images: dict[str, str | None] = {}
        self._models: dict[ModelSpec, str | None] = {}
        self._layers: dict[ModelSpec, Any] = {}

    def check(self, job: Job) -> None:
        """Raise a :class:`UserError` that names the line when ``job`` cannot run."""
        if job.error:
            raise UserError(job.error)
        try:
            self._check(job)
        except UserError as exc:
            raise _fail(job.line, str(exc)) from None

    def _check(self, job: Job) -> None:
        from .presets import get_preset
        from .tasks import check_settings

        spec = job.spec
        for name in spec.paths:
            value = job.args.get(name)
            for item in value if isinstance(value, list) else [] if value is None else [value]:
                self._image(item, name)
        check_settings(get_preset(spec.preset).override(
            **{k: job.args[k] for k in _PRESET_FIELDS if k in job.args}))
        self._model(job.model)
        if job.args.get("layers") is not None:
            self._check_layers(job.args["layers"], job.model)
        for path in job.outputs:
            if path.exists() and not job.overwrite and not _carries(path, job.id):
                raise UserError(f"output '{path}' already exists; delete it, set \"overwrite\": true or another "
                                "'output'")
            if path.is_dir():
                raise UserError(f"output '{path}' is a directory; set another 'output'")

    def _image(self, path: str, name: str) -> None:
        from .images import load_image

        if path not in self._images:
            what = name.replace("_", " ") + ("" if name.endswith("image") else " image")
            try:
                load_image(path, what=what)
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

    def _check_layers(self, layers: Any, model: ModelSpec) -> None:
        from .engine import parse_layers

        if model not in self._layers:
            self._layers[model] = _meta_model(model)
        shell = self._layers[model]
        if shell is not None:
            parse_layers(layers, shell)  # range checked against the model's own layer count
        elif isinstance(layers, str) and not re.fullmatch(r"\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*", layers):
            raise UserError(f"layers '{layers}' is not understood; use a range like 10-15 or a list like 10,11,12")


def check_model(model: ModelSpec) -> None:
    """Is ``model`` loadable? Reads configs only (model_index.json, the VAE's config), never weights."""
    from .models import DEFAULT_MODEL, _kind_from_index, _read_model_index, resolve_device, resolve_dtype

    resolve_dtype(model.dtype, resolve_device(model.device))
    source = model.source or DEFAULT_MODEL
    path = Path(source)
    if path.is_file() or path.suffix in (".safetensors", ".ckpt", ".pt", ".bin"):
        if not path.is_file():
            raise UserError(f"checkpoint '{path}' does not exist; check the path")
        if path.suffix != ".safetensors" and not model.allow_pickle:
            raise UserError(f"checkpoint '{path}' is a pickle file that can run code when loaded; convert it to "
                            ".safetensors or set \"allow_pickle\": true if you trust it")
    else:
        _kind_from_index(_read_model_index(source), source)
    if model.vae is not None and not (Path(model.vae) / "config.json").is_file():
        raise UserError(f"VAE '{model.vae}' is not a diffusers AutoencoderKL folder (no config.json)")


def _meta_model(model: ModelSpec):
    """An object with a weightless ``unet`` (meta device) of ``model``, for layer checks; None if unknown."""
    from types import SimpleNamespace

    import torch
    from diffusers import UNet2DConditionModel

    from .models import DEFAULT_MODEL, _offline

    source = model.source or DEFAULT_MODEL
    if Path(source).is_file():
        return None
    try:
        config = UNet2DConditionModel.load_config(source, subfolder="unet",
                                                  local_files_only=_offline() or Path(source).is_dir())
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    except Exception:  # no config to be had offline: the range is checked when the model loads
        return None
    return SimpleNamespace(unet=unet)


# -- completion ----------------------------------------------------------------------------------

def _carries(path: Path, job_id: str) -> bool:
    """Is ``path`` a complete result of ``job_id``? (Images carry their job id in their parameters.)"""
    from .images import read_parameters

    try:
        return path.is_file() and read_parameters(path).get("job") == job_id
    except Exception:
        return False


def is_done(job: Job) -> bool:
    return bool(job.outputs) and all(_carries(p, job.id) for p in job.outputs)


def _remove_leftovers(job: Job) -> None:
    """With the job's lock held: temp files of a killed write, and images of an unfinished multi-image job."""
    for path in job.outputs:
        for tmp in path.parent.glob(f".{path.name}.*.partial"):
            tmp.unlink(missing_ok=True)
        if _carries(path, job.id):
            path.unlink()


# -- running ---------------------------------------------------------------------------------------

@dataclass
class Summary:
    """What happened to this process's jobs."""

    total: int = 0
    done: int = 0  # ran now
    skipped: int = 0  # already complete
    failed: int = 0  # failed now (or invalid)
    not_retried: int = 0  # failed before; rerun with --retry-failed
    busy: int = 0  # another live process holds the lock

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.not_retried else 0

    def __str__(self) -> str:
        parts = [f"{self.done} done", f"{self.skipped} already done", f"{self.failed} failed"]
        if self.not_retried:
            parts.append(f"{self.not_retried} failed before (rerun with --retry-failed)")
        if self.busy:
            parts.append(f"{self.busy} running elsewhere")
        return f"{self.total} jobs: " + ", ".join(parts)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Runner:
    """Runs jobs one after another in this process, loading each model once and reusing it."""

    def __init__(self, out_dir: Path, *, shard: Shard, retry_failed: bool = False, progress: bool = False,
                 debug: bool = False, log: Log = _stderr, perf=None, group_size: int = 1) -> None:
        self.out_dir = out_dir
        self.perf = perf
        self.group_size = group_size
        self.shard = shard
        self.retry_failed = retry_failed
        self.progress = progress
        self.debug = debug
        self.log = log
        self.results = out_dir / shard.results_name
        self._model_spec: ModelSpec | None = None
        self._model = None
        self._load_errors: dict[ModelSpec, str] = {}

    def run(self, jobs: list[Job]) -> Summary:
        """Skip finished jobs, validate the rest before loading any model, then run them in group order."""
        summary = Summary(total=len(jobs))
        previous = latest(read_records(self.out_dir))
        validator = Validator(self.out_dir)
        todo: list[Job] = []
        for job in jobs:
            if is_done(job):
                summary.skipped += 1
                if previous.get(job.id, {}).get("status") != "done":  # finished, but killed before recording
                    self._record(job, "done", seconds=None, recovered=True)
                continue
            if previous.get(job.id, {}).get("status") == "failed" and not self.retry_failed:
                summary.not_retried += 1
                self.log(f"{job.id}: failed before ({previous[job.id].get('error')}); rerun with --retry-failed")
                continue
            try:
                validator.check(job)
            except UserError as exc:
                summary.failed += 1
                self._record(job, "failed", error=str(exc))
                self.log(f"invalid {job.id}: {exc}")
                continue
            todo.append(job)
        todo.sort(key=lambda j: j.group)  # same model, size and reference one after another
        k = 0
        for chunk in _batches(todo, self.group_size):
            tag = f"[{k + 1}{f'-{k + len(chunk)}' if len(chunk) > 1 else ''}/{len(todo)}]"
            k += len(chunk)
            statuses = self._run_chunk_locked(chunk, tag) if len(chunk) > 1 else [self._run_locked(chunk[0], tag)]
            for status in statuses:
                if status == "done":
                    summary.done += 1
                elif status == "failed":
                    summary.failed += 1
                elif status == "busy":
                    summary.busy += 1
                else:
                    summary.skipped += 1
        self._model = None
        return summary

    def _run_chunk_locked(self, chunk: list[Job], tag: str) -> list[str]:
        """Style jobs sharing a style image, model and settings: one batched optimisation for all of them.

        Each target gets the gradient it would get alone (see ``style_transfer_batch``), so results match
        one-by-one runs; if the batch fails, its jobs run one by one so one bad job cannot sink the others.
        """
        from .images import save_png
        from .tasks import style_transfer_batch

        locks, runnable, statuses = [], [], {}
        for job in chunk:
            lock = JobLock(self.out_dir, job.id)
            if not lock.acquire():
                statuses[job.id] = "busy"
            elif is_done(job):
                lock.release()
                statuses[job.id] = "skipped"
            else:
                _remove_leftovers(job)
                locks.append(lock)
                runnable.append(job)
        try:
            start = time.perf_counter()
            try:
                model = self._load(runnable[0].model)
                args = {k: v for k, v in runnable[0].args.items() if k not in ("content", "style")}
                images = style_transfer_batch([j.args["content"] for j in runnable], runnable[0].args["style"],
                                              model=model, progress=self.progress, **args)
                for job, image in zip(runnable, images, strict=True):
                    job.outputs[0].parent.mkdir(parents=True, exist_ok=True)
                    save_png(image, job.outputs[0], overwrite=job.overwrite, parameters=_parameters(image, job))
            except Exception as exc:
                self.log(f"{tag} batched run failed ({_describe(exc)}); running its jobs one by one")
                _free_memory()
                for job in runnable:
                    statuses[job.id] = self._run(job, tag)
            else:
                seconds = (time.perf_counter() - start) / len(runnable)
                for job in runnable:
                    self._record(job, "done", seconds=seconds, outputs=job.outputs, batched=len(runnable))
                    statuses[job.id] = "done"
                self.log(f"{tag} {len(runnable)} style jobs done in one batch, {seconds:.1f} s each")
        except (KeyboardInterrupt, SystemExit):
            self.log(f"{tag}: interrupted; no partial output left, these jobs run again next time")
            raise
        finally:
            for lock in locks:
                lock.release()
        return [statuses[job.id] for job in chunk]

    def _run_locked(self, job: Job, tag: str) -> str:
        lock = JobLock(self.out_dir, job.id)
        if not lock.acquire():
            owner = lock.owner()
            self.log(f"{tag} {job.id}: running elsewhere (pid {owner.get('pid')} on {owner.get('host')}); skipped")
            return "busy"
        try:
            if is_done(job):  # another process finished it between our check and the lock
                return "skipped"
            _remove_leftovers(job)
            return self._run(job, tag)
        except (KeyboardInterrupt, SystemExit):
            self.log(f"{tag} {job.id}: interrupted; no partial output left, it runs again next time")
            raise
        finally:
            lock.release()

    def _run(self, job: Job, tag: str) -> str:
        from .images import save_png

        start = time.perf_counter()
        try:
            model = self._load(job.model)
            spec = job.spec
            args = dict(job.args)
            inputs = [args.pop(name) for name in spec.inputs]
            result = spec.resolve()(*inputs, model=model, progress=self.progress, **args)
            images = list(result) if isinstance(result, list | tuple) else [result]
            paths = job.outputs if len(images) == len(job.outputs) else _numbered(job.outputs[0], len(images))
            for image, path in zip(images, paths, strict=True):
                path.parent.mkdir(parents=True, exist_ok=True)
                save_png(image, path, overwrite=job.overwrite, parameters=_parameters(image, job))
        except UserError as exc:
            return self._failed(job, tag, str(exc), start)
        except Exception as exc:
            return self._failed(job, tag, _describe(exc), start, trace=traceback.format_exc())
        seconds = time.perf_counter() - start
        self._record(job, "done", seconds=seconds, outputs=paths)
        self.log(f"{tag} {job.id}: done in {seconds:.1f} s -> {', '.join(map(str, paths))}")
        return "done"

    def _failed(self, job: Job, tag: str, error: str, start: float, trace: str | None = None) -> str:
        extra = {}
        if trace is not None:
            log = self.out_dir / "logs" / f"{job.id}.txt"
            with contextlib.suppress(OSError):
                log.parent.mkdir(exist_ok=True)
                log.write_text(trace)
                extra["log"] = str(log.relative_to(self.out_dir))
            if self.debug:
                self.log(trace)
        _free_memory()
        self._record(job, "failed", seconds=time.perf_counter() - start, error=error, **extra)
        self.log(f"{tag} {job.id}: failed: {error}")
        return "failed"

    def _load(self, spec: ModelSpec):
        if spec == self._model_spec and self._model is not None:
            return self._model
        if spec in self._load_errors:
            raise UserError(self._load_errors[spec])
        from .models import DEFAULT_MODEL, load_model

        self._model = self._model_spec = None
        _free_memory()
        try:
            self._model = load_model(spec.source or DEFAULT_MODEL, vae=spec.vae, config=spec.config,
                                     allow_pickle=spec.allow_pickle, device=process_device(spec.device, self.shard),
                                     dtype=spec.dtype, perf=self.perf)
        except UserError as exc:
            self._load_errors[spec] = str(exc)
            raise
        self._model_spec = spec
        return self._model

    def _record(self, job: Job, status: str, *, seconds: float | None = None, error: str | None = None,
                outputs: Iterable[Path] | None = None, **extra: Any) -> None:
        record = {"job": job.id, "line": job.line, "task": job.task, "status": status, "error": error,
                  "outputs": [_relative(p, self.out_dir) for p in (job.outputs if outputs is None else outputs)],
                  "seconds": None if seconds is None else round(seconds, 3), "shard": str(self.shard),
                  "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), **extra}
        append_record(self.results, record)


#: Options a batched style run shares; jobs that differ only in content (and output) can join one batch.
_BATCHABLE = {"content", "style", "steps", "iters", "lr", "content_weight", "attention_scale", "layers", "size",
              "seed"}


def _batch_key(job: Job) -> str | None:
    """Jobs with equal keys can be optimised together; None: this job runs alone."""
    if job.task != "style" or job.error or len(job.outputs) != 1 or set(job.args) - _BATCHABLE:
        return None
    shared = {k: v for k, v in job.args.items() if k not in ("content", "seed")}
    return json.dumps([asdict(job.model), shared], sort_keys=True, default=str)


def _batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """Consecutive jobs with the same batch key, in chunks of at most ``size``; other jobs alone."""
    chunks: list[list[Job]] = []
    for job in jobs:
        key = _batch_key(job) if size > 1 else None
        last = chunks[-1] if chunks else None
        if key is not None and last and len(last) < size and _batch_key(last[0]) == key:
            last.append(job)
        else:
            chunks.append([job])
    return chunks


def _parameters(image, job: Job) -> dict:
    text = image.info.get("parameters")
    try:
        params = json.loads(text) if isinstance(text, str) else dict(text or {})
    except ValueError:
        params = {}
    return {**params, "job": job.id}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if is_out_of_memory(exc):
        return OOM_ADVICE
    return f"unexpected {type(exc).__name__}: {text}"


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _free_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- entry points ----------------------------------------------------------------------------------

def run_batch(jobs_file: str | os.PathLike, out_dir: str | os.PathLike, *, shard: str | None = None,
              retry_failed: bool = False, defaults: ModelSpec | None = None, progress: bool = False,
              debug: bool = False, log: Log = _stderr, env: Mapping[str, str] | None = None,
              perf=None, group_size: int | None = None) -> Summary:
    """Run this process's share of a jobs file; see the module docstring. Example::

        summary = run_batch("jobs.jsonl", "results/", shard="0/4")
    """
    out_dir = Path(out_dir)
    jobs = read_jobs(jobs_file, out_dir=out_dir, defaults=defaults)
    part = resolve_shard(shard, env)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output folder '{out_dir}' cannot be created ({exc.strerror}); choose another --out") from None
    from .images import atomic_write, is_writable

    if not is_writable(out_dir):
        raise UserError(f"output folder '{out_dir}' is not writable; choose another --out")
    manifest = {"jobs_file": str(Path(jobs_file).resolve()), "jobs": [j.id for j in jobs]}
    atomic_write(out_dir / "batch.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()), overwrite=True)
    mine = select(jobs, part)
    log(f"shard {part}: {len(mine)} of {len(jobs)} jobs -> {out_dir / part.results_name}")
    if group_size is None:  # a batch is nearly free on a GPU; on a CPU it costs its full size
        import torch

        group_size = 8 if torch.cuda.is_available() else 1
    summary = Runner(out_dir, shard=part, retry_failed=retry_failed, progress=progress, debug=debug, perf=perf,
                     group_size=group_size,
                     log=log).run(mine)
    log(f"shard {part}: {summary}")
    if part.count > 1 and wait_for_all_ranks(env) and launcher_rank(env) == 0:
        log(f"merged: {merge_results(out_dir)}")
    return summary


def dry_run(jobs_file: str | os.PathLike, out_dir: str | os.PathLike, *, defaults: ModelSpec | None = None,
            shard: str | None = None, log: Log = _stderr, env: Mapping[str, str] | None = None) -> int:
    """Validate every job of the file (all shards) without loading any weights; returns the number invalid."""
    out_dir = Path(out_dir)
    jobs = read_jobs(jobs_file, out_dir=out_dir, defaults=defaults)
    part = resolve_shard(shard, env)
    validator = Validator(out_dir)
    bad = done = 0
    for job in jobs:
        if is_done(job):
            done += 1
            continue
        try:
            validator.check(job)
        except UserError as exc:
            bad += 1
            log(f"invalid {job.id}: {exc}")
    log(f"dry run: {len(jobs)} jobs, {len(jobs) - bad - done} ready, {done} already done, {bad} invalid; "
        f"shard {part} would take {len(select(jobs, part))}")
    return bad


