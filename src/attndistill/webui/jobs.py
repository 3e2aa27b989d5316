"""What runs behind the web UI, without Gradio: background jobs with progress,
live previews and cancel, the "same run from the terminal" command and readable error lines.

Kept apart from :mod:`attndistill.webui.app` so it can be tested without a browser.
"""

import itertools
import logging
import queue
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..core.progress import Callback, StepInfo
from ..errors import CLI_WORDS, UserError, first_line, out_of_memory_advice
from ..model.compiling import log as compiling_log

if TYPE_CHECKING:
    from ..batch.jobs import ModelSpec

log = logging.getLogger(__name__)



#: How a pre-load check names the inputs whose argument names read otherwise: as the page labels them.
PAGE_LABELS = {"reference": "texture image", "ref_labels": "reference label map", "target_labels": "target label map"}


@dataclass(frozen=True)
class TaskCall:
    """A tab's run as the batch task that does it and the public API's arguments: the page checks it as a
    batch dry run would before its model loads, then runs the same arguments."""

    task: str  # a key of attndistill.batch.jobs.TASKS
    args: dict

    def check(self, model: "ModelSpec", *, loaded: bool = False) -> None:
        """Raise the :class:`UserError` the run would, for what needs no weights: unreadable images, options
        out of range, a size, mask, label map, layers or ControlNet that do not fit ``model``'s configs, and
        unless it is ``loaded``, a model that would not load. A mistake then fails in a second, not after a
        model load. The run checks everything again."""
        from ..batch.check import Validator, check_model
        from ..batch.jobs import Job

        job = Job(line=0, id="page", task=self.task, args={k: v for k, v in self.args.items() if v is not None},
                  model=model)
        try:
            if not loaded:  # the Model and VAE boxes, by their configs (the UI's launch option for pickles)
                check_model(model, pickle_option="--allow-pickle")
            Validator(Path.cwd(), labels=PAGE_LABELS).check_inputs(job, model=False)
        except UserError:
            raise
        except Exception:  # a check that did not foresee this input: the run's own checks decide
            log.warning("the check before the model loads failed; the run checks its inputs itself", exc_info=True)

    def run(self, model, callback: Callback):
        from ..batch.jobs import TASKS

        return TASKS[self.task].resolve()(**self.args, model=model, progress=False, callback=callback)


class Cancelled(Exception):
    """Raised from the progress callback to stop a run between two steps."""


@dataclass
class Update:
    """One progress report of a running job."""

    step: int  # 1-based
    total: int
    loss: float
    preview: Image.Image | None = None
    stage: str = ""  # see StepInfo.stage


class _Notes(logging.Handler):
    """The warnings the library logs from one thread: what the page says beside that run's result."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread: int | None = None
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.thread == self.thread and message not in self.messages:
            self.messages.append(message)


#: The logger of :func:`attndistill.model.compiling.static_program`'s "compiling ..." lines (level INFO).
COMPILING_LOG = compiling_log.name


class _Waits(logging.Handler):
    """What the library says a run waits for (a program compiling for minutes) from one thread, put in the
    job's updates as a report without a step: the page says why no step comes."""

    def __init__(self, updates: "queue.Queue[Update | None]") -> None:
        super().__init__(logging.INFO)
        self.thread: int | None = None
        self.updates = updates
        self.position = (0, 0)  # (step, total) of the run's last report

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and record.levelno == logging.INFO and record.name == COMPILING_LOG:
            self.updates.put(Update(*self.position, float("nan"), None, record.getMessage()))


class Job:
    """One API call in a worker thread.

    ``fn(callback)`` runs the task; the callback queues an :class:`Update` per step, renders
    ``preview(latents)`` every ``every`` steps, and raises :class:`Cancelled` once :meth:`cancel`
    was called, which unwinds the task through its own ``finally`` blocks.
    """

    def __init__(self, fn: Callable[[Callback], object], *,
                 preview: Callable[[torch.Tensor], Image.Image] | None = None, every: int = 0) -> None:
        self.fn, self.preview, self.every = fn, preview, every
        self.result: object = None
        self.error: BaseException | None = None
        self.last: Update | None = None
        self._notes = _Notes()
        self._updates: queue.Queue[Update | None] = queue.Queue()
        self._waits = _Waits(self._updates)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="attndistill-job", daemon=True)
        self.started = time.monotonic()

    def start(self) -> "Job":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._stop.set()

    def stop_if_cancelled(self, message: str) -> None:
        """For the task itself, between phases without steps (loading a model): end the run if cancelled."""
        if self._stop.is_set():
            raise Cancelled(message)

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, Cancelled)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def _callback(self, info: StepInfo) -> None:
        if self._stop.is_set():
            raise Cancelled(f"cancelled after step {info.step} of {info.total}")
        step = info.step + 1
        image = None
        if (self.preview is not None and self.every > 0 and step % self.every == 0 and step < info.total
                and not info.stage):  # a stage's latents are empty
            try:
                image = self.preview(info.latents)
            except Exception as exc:  # a preview is a nicety: never let it end the run
                log.warning("live preview disabled: %s", exc)
                self.preview = None
        self._waits.position = (step, info.total)
        self._updates.put(Update(step, info.total, info.loss, image, info.stage))

    @property
    def notes(self) -> list[str]:
        """Warnings the run logged (a negative prompt without guidance, a prompt CLIP cuts short...)."""
        return list(self._notes.messages)

    def _work(self) -> None:
        CLI_WORDS.set(True)  # this thread's own context: the page names options as its commands do
        library = logging.getLogger("attndistill")
        self._notes.thread = self._waits.thread = threading.get_ident()
        library.addHandler(self._notes)
        library.addHandler(self._waits)
        try:
            self.result = self.fn(self._callback)
        except BaseException as exc:  # handed to the page by the caller of updates()
            self.error = exc
        finally:
            library.removeHandler(self._notes)
            library.removeHandler(self._waits)
            self._updates.put(None)

    def updates(self) -> Iterator[Update]:
        """Progress reports until the run ends (then ``result`` or ``error`` is set). A report with a ``stage``
        and no step (``total`` 0) says what the run waits for before its first step."""
        while (item := self._updates.get()) is not None:
            if item.total:  # the last step reached, for the page's "done" and "cancelled" lines
                self.last = item
            yield item
        self._thread.join()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)


@dataclass
class Run:
    """One click of a tab's Run button, from the queue to its end: what the tab's Cancel acts on."""

    cancelled: bool = False
    job: Job | None = None


@dataclass
class RunBoard:
    """The runs of each (page, tab), waiting in the queue or running, and Cancel acting on them.

    Gradio calls the handlers from several threads; one lock keeps "is it running, or still waiting?"
    and the answer to it together. Runs of one tab start in click order (one device queue), so when a
    run starts, earlier tickets of its tab that never started were dropped before their handler ran (a
    value Gradio refused, a page closed) and are forgotten: they can never take a later run's Cancel.
    """

    _waiting: dict[tuple, dict[int, Run]] = field(default_factory=dict)
    _running: dict[tuple, Run] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _tickets: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def queued(self, key: tuple) -> int:
        """A Run click: its ticket, which the run hands to :meth:`start`."""
        with self._lock:
            ticket = next(self._tickets)
            self._waiting.setdefault(key, {})[ticket] = Run()
            return ticket

    def start(self, key: tuple, ticket: int | None) -> Run | None:
        """The run of ``ticket`` begins (a call without a ticket gets a run of its own); None: it was withdrawn."""
        with self._lock:
            waiting = self._waiting.get(key, {})
            for old in [t for t in waiting if ticket is not None and t < ticket]:
                del waiting[old]
            run = waiting.pop(ticket, None) if ticket is not None else None
            if not waiting:
                self._waiting.pop(key, None)
            if run is not None and run.cancelled:
                return None
            run = run or Run()
            self._running[key] = run
            return run

    def attach(self, key: tuple, job: Job) -> bool:
        """Give the running run of ``key`` its job; False if Cancel came first (then the job must not start)."""
        with self._lock:
            run = self._running.get(key)
            if run is None:
                return True  # a job started without the board (direct calls)
            run.job = job
            return not run.cancelled

    def finish(self, key: tuple, run: Run) -> None:
        with self._lock:
            if self._running.get(key) is run:
                del self._running[key]

    def cancel(self, key: tuple) -> str:
        """Cancel the running run of ``key`` and withdraw its waiting ones; returns what happened, in words."""
        with self._lock:
            running = self._running.get(key)
            waiting = [r for r in self._waiting.get(key, {}).values() if not r.cancelled]
            for run in waiting:
                run.cancelled = True
            if running is not None and not running.cancelled:
                running.cancelled = True
                if running.job is not None:
                    running.job.cancel()
                return "cancelling: the run stops after the current step"
        if waiting:
            return "cancelled: the run that waited in the queue will not start"
        return "nothing of this tab is running or waiting"


def cli_command(words: list[str], options: dict[str, object]) -> str:
    """``attndistill WORDS --option value ...`` quoted for a POSIX shell.

    ``None`` options are left out, ``True`` becomes a bare flag, ``False`` ``--no-flag``, a list repeats
    the option. Floats keep every digit (``repr``), so the command reproduces the run exactly.
    """
    parts = ["attndistill", *words]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value == "":
            continue
        if value is True:
            parts.append(flag)
        elif value is False:
            parts.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, list | tuple):
            for v in value:
                parts += [flag, str(v)]
        else:
            parts += [flag, repr(value) if isinstance(value, float) else str(value)]
    return shlex.join(parts)


def error_message(exc: BaseException) -> str:
    """One readable line for the page; tracebacks go to the server log only."""
    if isinstance(exc, UserError):
        return str(exc)
    text = first_line(exc)
    if (advice := out_of_memory_advice(exc, page=True)) is not None:
        return advice
    if isinstance(exc, ImportError):
        return f"this task is not available in this installation ({text})"
    log.error("unexpected error in a web UI job", exc_info=exc)
    return f"unexpected {type(exc).__name__}: {text} (the server log has the details)"
