"""Batch runner: many jobs from one JSONL file, resumable, never run twice, sharded across processes.

Jobs files are parsed by :mod:`attndistill.batch.jobs` and checked by :mod:`attndistill.batch.check`. The
runner writes images atomically, appends one line per finished job to ``results.jsonl`` (one write and
an fsync, so a crash loses at most the job in flight), holds a lock file per running job, and on a
re-run skips the jobs whose images exist and carry their job id. Shards (``--shard I/N``, torchrun,
Slurm arrays) take deterministic slices of the job list and write their own results file, merged by
:func:`merge_results`.
"""

from __future__ import annotations

import contextlib
import glob
import inspect
import json
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import NonFiniteError, UserError, first_line, is_out_of_memory, out_of_memory_advice
from ..images import numbered_outputs, partial_prefix
from ..loss_log import LossLog, is_loss_log
from .check import Validator
from .jobs import TASKS, Job, ModelSpec, TaskSpec, carries_job, job_words, read_jobs, run_order
from .state import (
    LOGS,
    LOSSES,
    MANIFEST,
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

__all__ = ["TASKS", "Job", "JobLock", "ModelSpec", "Runner", "Summary", "TaskSpec", "append_record", "dry_run",
           "merge_results", "read_jobs", "read_records", "resolve_shard", "run_batch", "select"]

Log = Callable[[str], None]




# -- completion ----------------------------------------------------------------------------------

def is_done(job: Job) -> bool:
    return bool(job.outputs) and all(carries_job(p, job.id) for p in job.outputs)


def loss_log_path(out_dir: Path, job: Job) -> Path:
    return out_dir / LOSSES / f"{job.id}.jsonl"


def _check_loss_log(out_dir: Path, job: Job) -> None:
    """Before a job's work: its loss log's place holds nothing, or an earlier try's log (which it replaces)."""
    path = loss_log_path(out_dir, job)
    if path.exists() and not is_loss_log(path):
        raise UserError(f"'{path}' exists and is not a loss log; move that file away or run without --loss-logs")


def _remove_leftovers(job: Job) -> None:
    """With the job's lock held: temp files of a killed write, and images of an unfinished multi-image job."""
    for path in job.outputs:
        for tmp in path.parent.glob(f"{glob.escape(partial_prefix(path.name))}*.partial"):
            tmp.unlink(missing_ok=True)
        if carries_job(path, job.id):
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
    shard: str = ""  # "I/N" when this process ran one shard of several

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.not_retried else 0

    def __str__(self) -> str:
        parts = [f"{self.done} done", f"{self.skipped} already done", f"{self.failed} failed"]
        if self.not_retried:
            parts.append(f"{self.not_retried} failed before (rerun with --retry-failed)")
        if self.busy:
            parts.append(f"{self.busy} running elsewhere")
        prefix = f"shard {self.shard}: " if self.shard else ""
        return f"{prefix}{self.total} jobs: " + ", ".join(parts)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Runner:
    """Runs jobs one after another in this process, loading each model once and reusing it."""

    def __init__(self, out_dir: Path, *, shard: Shard, retry_failed: bool = False, progress: bool = False,
                 debug: bool = False, log: Log = _stderr, errors: Log | None = None, perf=None,
                 group_size: int = 1, loss_logs: bool = False) -> None:
        if loss_logs and group_size > 1:  # a batch is one loss: no job's own
            raise ValueError("loss logs need jobs run one by one (group_size 1)")
        self.out_dir = out_dir
        self.loss_logs = loss_logs
        self.perf = perf
        self.group_size = group_size
        self.shard = shard
        self.retry_failed = retry_failed
        self.progress = progress
        self.debug = debug
        self.log = log
        self.errors = errors or log  # what went wrong: shown even where progress lines are not (-q)
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
        unlogged = 0  # done before, without a loss log
        for job in jobs:
            if is_done(job):
                summary.skipped += 1
                log_file = loss_log_path(self.out_dir, job)
                unlogged += self.loss_logs and not log_file.exists()
                if previous.get(job.id, {}).get("status") != "done":  # finished, but killed before recording
                    self._record(job, "done", seconds=None, recovered=True,
                                 **({"loss_log": _relative(log_file, self.out_dir)} if log_file.exists() else {}))
                JobLock(self.out_dir, job.id).remove_if_stale()  # or killed after recording, before unlocking
                continue
            if (error := _failed_before(job, previous, self.retry_failed)) is not None:
                summary.not_retried += 1
                self.log(f"{job.id}: failed before ({error}); rerun with --retry-failed")
                continue
            try:
                with _naming(job):  # what the checks warn of (an animated image) names the line too
                    validator.check(job)
                if self.loss_logs:
                    _check_loss_log(self.out_dir, job)
            except UserError as exc:
                summary.failed += 1
                self._record(job, "failed", error=str(exc))
                self.errors(f"invalid {job.id}: {exc}")
                continue
            todo.append(job)
        todo = run_order(todo)  # same model, size, reference and settings one after another
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
        if unlogged:
            self.log(f"{unlogged} of the jobs done before have no loss log (--loss-logs logs the jobs it runs); "
                     f"delete their images to run them again with one")
        self._model = None
        return summary

    def _run_chunk_locked(self, chunk: list[Job], tag: str) -> list[str]:
        """Style jobs sharing a style image, model and settings: one batched optimisation for all of them.

        Each target gets the gradient it would get alone (see ``style_transfer_batch``), so results match
        one-by-one runs; if the batch fails, its jobs run one by one so one bad job cannot sink the others.
        """
        from ..tasks.transfer import style_transfer_batch

        locks, runnable, statuses = [], [], {}
        for job in chunk:
            lock = JobLock(self.out_dir, job.id)
            if not lock.acquire():
                statuses[job.id] = self._busy(job, lock, tag)
            elif is_done(job):
                lock.release()
                statuses[job.id] = "skipped"
            else:
                _remove_leftovers(job)
                locks.append(lock)
                runnable.append(job)
        if not runnable:  # each one done or held by another process: no batch to run (it read runnable[0])
            return [statuses[job.id] for job in chunk]
        try:
            start = time.perf_counter()
            failure = None
            try:
                model = self._load(runnable[0].model)
                args = {k: v for k, v in runnable[0].args.items() if k not in ("content", "style", "mask")}
                masks = [j.args.get("mask") for j in runnable]
                with _naming(*runnable):
                    images = style_transfer_batch([j.args["content"] for j in runnable], runnable[0].args["style"],
                                                  model=model, progress=self.progress,
                                                  masks=masks if any(m is not None for m in masks) else None, **args)
                saved = {job.id: _save_result(image, job.outputs[0], job, batched=len(runnable))
                         for job, image in zip(runnable, images, strict=True)}
            except Exception as exc:  # handled below: inside except, its traceback keeps the batch's memory
                failure = (_describe(exc), is_out_of_memory(exc))
            if failure is not None:
                self.log(f"{tag} batched run failed ({failure[0]}); running its jobs one by one")
                images = None
                _free_memory(self._model if failure[1] else None)
                for job in runnable:
                    _remove_leftovers(job)  # the batch may have saved some of its images before it failed
                    statuses[job.id] = self._run(job, tag)
            else:
                seconds = (time.perf_counter() - start) / len(runnable)
                for job in runnable:
                    path, displaced = saved[job.id]
                    if displaced is not None:
                        statuses[job.id] = self._failed(job, tag, displaced, start, written=[path])
                        continue
                    self._record(job, "done", seconds=seconds, outputs=job.outputs, batched=len(runnable))
                    statuses[job.id] = "done"
                done = sum(statuses[job.id] == "done" for job in runnable)
                self.log(f"{tag} {len(runnable)} style jobs run in one batch, {seconds:.1f} s each"
                         + (f"; {len(runnable) - done} of them failed" if done < len(runnable) else ""))
        except (KeyboardInterrupt, SystemExit):
            for job in runnable:  # a job's image saved before the signal stays: it is whole, and done
                if not is_done(job):
                    _remove_leftovers(job)
            self.log(f"{tag}: interrupted; no partial output left, these jobs run again next time")
            raise
        finally:
            for lock in locks:
                lock.release()
        return [statuses[job.id] for job in chunk]

    def _busy(self, job: Job, lock: JobLock, tag: str) -> str:
        """A job whose lock another live process holds: said, and skipped."""
        owner = lock.owner()
        self.log(f"{tag} {job.id}: running elsewhere (pid {owner.get('pid')} on {owner.get('host')}); skipped")
        return "busy"

    def _run_locked(self, job: Job, tag: str) -> str:
        lock = JobLock(self.out_dir, job.id)
        if not lock.acquire():
            return self._busy(job, lock, tag)
        try:
            if is_done(job):  # another process finished it between our check and the lock
                return "skipped"
            _remove_leftovers(job)
            return self._run(job, tag)
        except (KeyboardInterrupt, SystemExit):
            if not is_done(job):  # the images a multi-image job saved before the signal: all of them or none
                _remove_leftovers(job)
            self.log(f"{tag} {job.id}: interrupted; no partial output left, it runs again next time")
            raise
        finally:
            lock.release()

    def _run(self, job: Job, tag: str, *, retry: bool = True) -> str:
        """Run one job; one that runs out of memory beside earlier jobs' CUDA graphs runs again without them."""
        with _naming(job):
            return self._run_named(job, tag, retry=retry)

    def _run_named(self, job: Job, tag: str, *, retry: bool) -> str:
        start = time.perf_counter()
        earlier_graphs, failure, written, displaced, logged = False, None, [], None, {}
        losses = LossLog() if self.loss_logs else None
        try:
            model = self._load(job.model)
            earlier_graphs = bool(model.graphs)
            spec = job.spec
            args = dict(job.args)
            inputs = [args.pop(name) for name in spec.inputs]
            fn = spec.resolve()
            if "allow_pickle" in inspect.signature(fn).parameters:  # a ControlNet's files, beside the model's
                args["allow_pickle"] = job.model.allow_pickle
            if losses is not None:
                args["callback"] = losses
            result = fn(*inputs, model=model, progress=self.progress, **args)
            if losses is not None:  # before the images: a job whose images exist is done, and has its log
                logged["loss_log"] = _relative(self._write_losses(job, losses), self.out_dir)
            images = list(result) if isinstance(result, list | tuple) else [result]
            if job.grid:
                from ..images import image_grid

                images = [image_grid(images)]
            paths = job.outputs if len(images) == len(job.outputs) else numbered_outputs(job.outputs[0], len(images))
            for image, path in zip(images, paths, strict=True):
                path, why = _save_result(image, path, job)
                written.append(path)
                displaced = displaced or why
        except UserError as exc:  # in the jobs file's words: its line, its keys ('vae', not --vae)
            if isinstance(exc, NonFiniteError) and losses is not None and not logged and \
                    losses.end_at_divergence(exc):
                with contextlib.suppress(UserError):  # the steps before it diverged: the curve a sweep wants most
                    logged["loss_log"] = _relative(self._write_losses(job, losses), self.out_dir)
            return self._failed(job, tag, f"line {job.line}: {job_words(str(exc))}", start, written=written,
                                **logged)
        except Exception as exc:  # handled below: inside except, its traceback keeps the job's memory
            failure = (_describe(exc), traceback.format_exc(), is_out_of_memory(exc))
        if failure is not None:
            result = images = None
            if failure[2]:
                _free_memory(self._model)
                if retry and earlier_graphs:
                    self.log(f"{tag} {job.id}: out of memory beside the CUDA graphs of earlier jobs; "
                             "dropped them, running it once more")
                    return self._run_named(job, tag, retry=False)  # inside this run's naming already
            return self._failed(job, tag, failure[0], start, trace=failure[1], written=written, **logged)
        if displaced is not None:
            return self._failed(job, tag, displaced, start, written=written, **logged)
        seconds = time.perf_counter() - start
        self._record(job, "done", seconds=seconds, outputs=paths, **logged)
        self.log(f"{tag} {job.id}: done in {seconds:.1f} s -> {', '.join(map(str, paths))}")
        return "done"

    def _write_losses(self, job: Job, losses: LossLog) -> Path:
        """The job's loss log, replacing one an earlier try of it wrote (killed before its images were saved)."""
        path = loss_log_path(self.out_dir, job)
        try:
            path.parent.mkdir(exist_ok=True)
        except OSError as exc:
            raise UserError(f"loss log folder '{path.parent}' cannot be made ({exc.strerror}); run without "
                            "--loss-logs or use another --out") from None
        _check_loss_log(self.out_dir, job)  # again: a file may have come while the job ran
        return losses.write(path, overwrite=True)

    def _failed(self, job: Job, tag: str, error: str, start: float, trace: str | None = None,
                written: list[Path] | None = None, **extra: Any) -> str:
        """Record and say a failure; ``extra``: more of its record (the loss log of a run that diverged)."""
        if trace is not None:
            log = self.out_dir / LOGS / f"{job.id}.txt"
            with contextlib.suppress(OSError):
                log.parent.mkdir(exist_ok=True)
                log.write_text(trace)
                extra["log"] = str(log.relative_to(self.out_dir))
            if self.debug:
                self.log(trace)
        _free_memory()
        self._record(job, "failed", seconds=time.perf_counter() - start, error=error, outputs=written or [],
                     **extra)
        self.errors(f"{tag} {job.id}: failed: {error}")
        return "failed"

    def _load(self, spec: ModelSpec):
        from dataclasses import replace

        from ..model.perf import PerfOptions

        perf = replace(self.perf or PerfOptions(), **dict(spec.perf))  # the job's switches over the runner's
        if self._model is not None and replace(spec, perf=()) == replace(self._model_spec, perf=()):
            if spec != self._model_spec:  # the same weights with other speed switches: no reload
                self._model.set_perf(perf)
                self._model_spec = spec
            return self._model
        if spec in self._load_errors:
            raise UserError(self._load_errors[spec])
        from ..model.loading import DEFAULT_MODEL, load_model

        self._model = self._model_spec = None
        _free_memory()
        try:
            self._model = load_model(spec.source or DEFAULT_MODEL, vae=spec.vae, config=spec.config,
                                     allow_pickle=spec.allow_pickle, device=process_device(spec.device, self.shard),
                                     dtype=spec.dtype, perf=perf)
        except UserError as exc:
            self._load_errors[spec] = str(exc)
            raise
        self._model_spec = spec
        return self._model

    def _record(self, job: Job, status: str, *, seconds: float | None = None, error: str | None = None,
                outputs: Iterable[Path] | None = None, **extra: Any) -> None:
        if outputs is None:  # what the job wrote: its outputs when done; a failed job passes what it wrote
            outputs = [] if status == "failed" else job.outputs
        record = {"job": job.id, "line": job.line, "task": job.task, "status": status, "error": error,
                  "outputs": [_relative(p, self.out_dir) for p in outputs],
                  "seconds": None if seconds is None else round(seconds, 3), "shard": str(self.shard),
                  "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), **extra}
        append_record(self.results, record)


#: Options a batched style run shares; jobs that differ only in content (and output) can join one batch.
_BATCHABLE = {"content", "style", "steps", "iters", "lr", "content_weight", "attention_scale", "layers", "size",
              "seed", "reference_fit", "mask", "tile", "tune_vae"}


def _batch_key(job: Job) -> str | None:
    """Jobs with equal keys can be optimised together; None: this job runs alone.

    A batch gives every content the first one's size, so jobs share one only when their results have the
    same size: the size the checks computed from the model's configs, else (no configs to be had) a
    (width, height) ``size`` or, for a long side, the same content aspect.
    """
    if job.task != "style" or job.error or len(job.outputs) != 1 or set(job.args) - _BATCHABLE:
        return None
    shared = {k: v for k, v in job.args.items() if k not in ("content", "seed", "mask")}
    if job.planned_size is not None:
        shared["size"] = list(job.planned_size)
    elif not isinstance(shared.get("size"), list | tuple):
        aspect = _aspect(job.args.get("content"))
        if aspect is None:
            return None
        shared["aspect"] = aspect
    return json.dumps([asdict(job.model), shared], sort_keys=True, default=str)


def _aspect(path) -> str | None:
    """Width:height of an image file as shown (EXIF rotation applied), read from its header; None if unreadable."""
    from fractions import Fraction

    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated a quarter turn
                w, h = h, w
    except Exception:  # the job's own run reports what is wrong with the file
        return None
    return str(Fraction(w, h))


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


def _save_result(image, path: Path, job: Job, batched: int = 1) -> tuple[Path, str | None]:
    """Save one result at ``path``: (where it went, None), or, where another file took ``path`` while the
    job ran, (the result beside it, why the job is not done). Leftovers of the job itself were removed under
    its lock, so a file there now is someone else's: it is kept, and so is the work."""
    from ..images import save_result

    path.parent.mkdir(parents=True, exist_ok=True)
    saved, taken = save_result(image, path, overwrite=job.overwrite, parameters=_parameters(image, job, batched))
    if taken is None:
        return saved, None
    return saved, (f"output '{taken}' appeared while the job ran and is left as it is; its result is '{saved}': "
                   f"move it to '{taken.name}' to count the job done, or delete '{taken.name}' and rerun with "
                   "--retry-failed")


def _parameters(image, job: Job, batched: int = 1) -> dict:
    """The image's own parameters, plus its job id and, when it was optimised in a batch, how many shared it:
    rerun alone, such a result matches to rounding, not bit for bit."""
    text = image.info.get("parameters")
    try:
        params = json.loads(text) if isinstance(text, str) else dict(text or {})
    except ValueError:
        params = {}
    if batched > 1 and "seed" in params:  # a batch ran with its first job's seed (style transfer draws no noise
        # from it: the pixels are the same); each image records its own job's, as its rerun line should say
        import inspect

        default = inspect.signature(TASKS[job.task].resolve()).parameters["seed"].default
        params["seed"] = job.args.get("seed", default)
    return {**params, "job": job.id, **({"batched": batched} if batched > 1 else {})}


@contextlib.contextmanager
def _naming(*jobs: Job):
    """The warnings a job's run logs name its line, in the jobs file's words: a batch prints the warnings of
    many jobs one after another, and the CLI's words (--guidance) are no key of a jobs line. Jobs optimised
    together in one batch share their warnings: each names all of their lines."""
    if len(jobs) == 1:
        who = f"line {jobs[0].line} ({jobs[0].id})"
    else:
        who = f"lines {', '.join(str(j.line) for j in jobs)} (one batch)"

    def name(record: logging.LogRecord) -> bool:
        if record.name.startswith("attndistill") and record.levelno >= logging.WARNING and \
                not getattr(record, "job_named", False):
            record.msg, record.job_named = f"{who}: {job_words(str(record.msg))}", True
        return True

    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(name)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(name)


def _describe(exc: BaseException) -> str:
    if (advice := out_of_memory_advice(exc)) is not None:
        return advice
    return f"unexpected {type(exc).__name__}: {first_line(exc)}"


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _free_memory(model=None) -> None:
    """Hand cached device memory back; with ``model`` (after running out of memory), its CUDA graphs too."""
    if model is not None:
        model.release_graphs()
    if "torch" in sys.modules:  # nothing to hand back before any work (a dry run need not import it)
        from ..model.models import free_memory

        free_memory()


# -- entry points ----------------------------------------------------------------------------------

def run_batch(jobs_file: str | os.PathLike, out_dir: str | os.PathLike, *, shard: str | None = None,
              retry_failed: bool = False, defaults: ModelSpec | None = None, progress: bool = False,
              debug: bool = False, log: Log = _stderr, errors: Log | None = None,
              env: Mapping[str, str] | None = None, perf=None, group_size: int | None = None,
              loss_logs: bool = False) -> Summary:
    """Run this process's share of a jobs file; see the module docstring. Example::

        summary = run_batch("jobs.jsonl", "results/", shard="0/4")

    ``loss_logs``: each job's step losses to ``losses/<job id>.jsonl`` in ``out_dir`` (as ``--loss-log``
    writes them for one command); style jobs then run one by one, since a batch of them is optimised as one loss.
    """
    out_dir = Path(out_dir)
    _check_loss_logs(out_dir, loss_logs, group_size)
    jobs = read_jobs(jobs_file, out_dir=out_dir, defaults=defaults)
    part = resolve_shard(shard, env)
    _check_out_dir(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output folder '{out_dir}' cannot be created ({exc.strerror}); choose another --out") from None
    from ..images import atomic_write, is_writable

    if not is_writable(out_dir):
        raise UserError(f"output folder '{out_dir}' is not writable; choose another --out")
    manifest = {"jobs_file": str(Path(jobs_file).resolve()), "jobs": [j.id for j in jobs]}
    atomic_write(out_dir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()), overwrite=True)
    mine = select(jobs, part)
    log(f"shard {part}: {len(mine)} of {len(jobs)} jobs -> {out_dir / part.results_name}")
    if group_size is None:  # a batch is nearly free on a GPU; on a CPU it costs its full size
        import torch

        group_size = 1 if loss_logs else 8 if torch.cuda.is_available() else 1
    summary = Runner(out_dir, shard=part, retry_failed=retry_failed, progress=progress, debug=debug, perf=perf,
                     group_size=group_size, loss_logs=loss_logs, log=log, errors=errors).run(mine)
    if part.count > 1:  # the caller prints the summary (once: under torchrun it was printed twice)
        summary.shard = str(part)
    if part.count > 1 and wait_for_all_ranks(env) and launcher_rank(env) == 0:
        log(f"merged: {merge_results(out_dir)}")
    return summary


def _check_loss_logs(out_dir: Path, loss_logs: bool, group_size: int | None) -> None:
    """``--loss-logs`` beside what it cannot go with, before any job is read."""
    if not loss_logs:
        return
    if group_size is not None and group_size > 1:
        raise UserError(f"--loss-logs logs each job's own loss, and --group {group_size} optimises style jobs as "
                        "one loss; drop --group (with --loss-logs jobs run one by one)")
    if (out_dir / LOSSES).exists() and not (out_dir / LOSSES).is_dir():
        raise UserError(f"'{out_dir / LOSSES}' is a file, and --loss-logs writes a folder of that name; move the "
                        "file away or run without --loss-logs")


def _failed_before(job: Job, previous: dict[str, dict], retry_failed: bool) -> str | None:
    """The error of a job recorded as failed, which a run skips (None: it runs, or is checked again). A line that
    cannot be read (its id is its line number) is checked again: edited, it kept showing the error it had before."""
    record = previous.get(job.id, {})
    if record.get("status") != "failed" or retry_failed or job.error:
        return None
    return str(record.get("error"))


def _check_out_dir(out_dir: Path) -> None:
    """--out is a folder or may become one: a file there (or a link to nowhere), or a folder this user cannot
    write, is said once, by a run and a dry run alike."""
    if out_dir.is_symlink() and not out_dir.exists():
        raise UserError(f"output folder '{out_dir}' is a broken symbolic link (or a loop of them); choose another "
                        "--out")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output folder '{out_dir}' is a file; choose another --out")
    existing = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"output folder '{out_dir}' cannot be made: '{existing}' is a file; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output folder '{existing}' cannot be written by this user; choose another --out")
    for records in sorted(out_dir.glob("results*.jsonl")) if out_dir.is_dir() else ():
        if not records.is_file():  # where the runs record what they did: read, appended to, merged
            raise UserError(f"'{records}' is not a file, but a batch records its results under that name; remove "
                            "it or choose another --out")


def dry_run(jobs_file: str | os.PathLike, out_dir: str | os.PathLike, *, defaults: ModelSpec | None = None,
            shard: str | None = None, log: Log = _stderr, env: Mapping[str, str] | None = None,
            retry_failed: bool = False, loss_logs: bool = False, group_size: int | None = None) -> int:
    """Validate every job of the file (all shards) without loading any weights; returns the number invalid.

    Jobs recorded as failed are counted apart, as a run without ``retry_failed`` skips them: "ready" is what a
    run would start. ``loss_logs`` and ``group_size`` as the run would take them."""
    out_dir = Path(out_dir)
    _check_loss_logs(out_dir, loss_logs, group_size)
    jobs = read_jobs(jobs_file, out_dir=out_dir, defaults=defaults)
    part = resolve_shard(shard, env)
    _check_out_dir(out_dir)  # once, not once per job
    previous = latest(read_records(out_dir)) if out_dir.is_dir() else {}
    validator = Validator(out_dir)
    bad = done = failed = 0
    for job in jobs:
        if is_done(job):
            done += 1
            continue
        if (error := _failed_before(job, previous, retry_failed)) is not None:
            failed += 1
            log(f"{job.id}: failed before ({error}); a run skips it unless --retry-failed")
            continue
        try:
            with _naming(job):  # what the checks warn of (an animated image) names the line too
                validator.check(job)
            if loss_logs:
                _check_loss_log(out_dir, job)
        except UserError as exc:
            bad += 1
            log(f"invalid {job.id}: {exc}")
    skipped = f", {failed} failed before (skipped without --retry-failed)" if failed else ""
    log(f"dry run: {len(jobs)} jobs, {len(jobs) - bad - done - failed} ready, {done} already done{skipped}, "
        f"{bad} invalid; shard {part} would take {len(select(jobs, part))}")
    return bad


