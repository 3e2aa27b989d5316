"""What every command shares: option types, model loading, error handling, writing results."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from ..checks import MAX_SEED
from ..errors import CLI_WORDS, UserError, out_of_memory_advice
from ..loss_log import LossLog as RunLosses
from ..loss_log import is_loss_log
from ..presets import VAE_TUNING_STEPS
from .console import readers_may_leave

#: Speed/memory switches given on the command line (set by the root command; None in library use).
PERF = None

# -- shared options (Annotated aliases so each command declares them in one line) --------------------

def named(value: str | None) -> str | None:
    """Option callback: an empty model name is no model (it fell back to the default, which the error then named)."""
    if value is not None and not value.strip():
        raise typer.BadParameter("is empty; give a Hub id, a folder or a weights file, or leave it out for SD 1.5")
    return value


Model = Annotated[str | None, typer.Option(
    "--model", "-m", help="Hub id, diffusers folder or .safetensors file \\[default: SD 1.5]", show_default=False,
    callback=named)]
Vae = Annotated[Path | None, typer.Option(
    help="AutoencoderKL folder or Hub id (e.g. madebyollin/sdxl-vae-fp16-fix) to use instead of the model's VAE")]
ConfigDir = Annotated[Path | None, typer.Option(
    "--config", help="Local diffusers folder describing a single-file checkpoint (offline use)")]
AllowPickle = Annotated[bool, typer.Option(help="Allow loading pickle (.ckpt/.pth/.bin) weights you trust")]
Steps = Annotated[int | None, typer.Option(help="Timesteps visited \\[default: task preset]", show_default=False)]
Iters = Annotated[int | None, typer.Option(help="Adam iterations per timestep \\[default: preset]",
                                           show_default=False)]


def finite(value: float | None) -> float | None:
    """Option callback: inf and nan are no settings (they would only fail, or worse not fail, mid-run)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


Lr = Annotated[float | None, typer.Option(help="Adam learning rate \\[default: preset]", show_default=False,
                                          callback=finite)]
ContentWeight = Annotated[float | None, typer.Option(help="Content loss weight lambda \\[default: preset]",
                                                     show_default=False, callback=finite)]
AttentionScale = Annotated[float | None, typer.Option(help="Attention scale a in the ideal attention \\[default: 1]",
                                                      show_default=False, callback=finite)]
ReferenceFit = Annotated[str | None, typer.Option(
    help="How reference images meet the model: squash (stretched to its square, as the paper's code) or keep "
         "(the first one's aspect at the same area; other references centre-cropped to it) \\[default: squash]",
    show_default=False)]
TuneVae = Annotated[bool, typer.Option(
    help=f"Fine-tune a copy of the VAE decoder on the reference(s) for this run (VAE*, {VAE_TUNING_STEPS} "
         "steps)")]
Layers = Annotated[str | None, typer.Option(
    help="Self-attention layers, e.g. 10-15 or 10,11,12 \\[default: the model's last six]", show_default=False)]
Size = Annotated[str | None, typer.Option(
    help="Long side in pixels, or WIDTHxHEIGHT (sides rounded to the model's multiple: 64 for SD 1.5, 32 for SDXL) "
         "\\[default: model's native size]",
    show_default=False)]
Seed = Annotated[int, typer.Option(help="Random seed", min=0, max=MAX_SEED)]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto")]
Dtype = Annotated[str, typer.Option(help="fp32, bf16, fp16 or auto (bf16 on GPU, fp32 on CPU)")]
Output = Annotated[Path, typer.Option("--output", "-o", help="Output PNG path")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output file")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")]
Preview = Annotated[Path | None, typer.Option(
    help="Write a small look at the running job to this PNG every --preview-every steps (for long runs; several "
         "images: the first four side by side)",
    show_default=False)]
#: Steps between two ``--preview`` images where ``--preview-every`` is not given.
PREVIEW_EVERY = 10
PreviewEvery = Annotated[int | None, typer.Option(
    min=1, help=f"Steps between two --preview images (with --preview) \\[default: {PREVIEW_EVERY}]",
    show_default=False)]
LossLog = Annotated[Path | None, typer.Option(
    help="Also write each step's loss to this JSON Lines file (step, timestep, loss; the loss of each Adam "
         "iteration where a step has several), once the run is done: for plots and comparisons",
    show_default=False)]


class Terminal(logging.StreamHandler):
    """The console script's log lines on stderr, each warning said once (``once``): a command reads each input
    twice (the check before the model loads, then the run), and a warning about it (an animation's first frame)
    was printed twice. A line is compared as printed, after every filter (the batch's names its job line): two
    jobs' warnings about one file are two lines. INFO lines (a program compiling) are always said."""

    def __init__(self, *, once: bool = True) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        self.once, self.said = once, set()

    def emit(self, record: logging.LogRecord) -> None:
        if self.once and record.levelno >= logging.WARNING:
            line = self.format(record)
            if line in self.said:
                return
            self.said.add(line)
        super().emit(record)


def quiet_libraries(*, say_once: bool = True) -> None:
    """Silence the loading bars and import chatter of diffusers/transformers; keep warnings that matter."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - logging is cosmetic
        pass
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig, which leaves a root that has handlers (an embedding app's) alone
        root.addHandler(Terminal(once=say_once))
        root.setLevel(logging.WARNING)
    # this package's INFO lines too: what the user waits for (a program compiling for minutes) and nothing chatty
    logging.getLogger("attndistill").setLevel(logging.INFO)
    # diffusers passes this deprecated argument to huggingface_hub on every config lookup: noise before any error
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)


def load(model: str | None, *, vae: Path | None = None, device: str = "auto", dtype: str = "auto",
         config: Path | None = None, allow_pickle: bool = False):
    """Load the model for a command (prints nothing unless it fails)."""
    from ..model.loading import DEFAULT_MODEL, load_model

    return load_model(model or DEFAULT_MODEL, vae=vae, device=device, dtype=dtype, config=config,
                      allow_pickle=allow_pickle, perf=PERF)


def check_images(**roles) -> None:
    """Read every input image before the model loads: a bad file fails in a second, not after a download.

    ``check_images(content_image=path, style_image=[a, b])``; None values are skipped.
    """
    from ..images import load_image

    for role, value in roles.items():
        for path in value if isinstance(value, list | tuple) else [value]:
            if path is not None:
                load_image(path, what=role.replace("_", " "))


def check_command_options(task: str, *, size: str | None = None, num: int = 1, what: str = "num",
                          **options: object) -> None:
    """Options that need no model, checked before it loads: a typo fails at once, not after a download.

    ``task`` names the preset whose defaults fill the options not given (``texture-sample``, ``t2i``...).
    """
    from ..batch.check import check_options as check
    from ..tasks.setup import check_run

    parse_size_option(size)
    check_run(seed=0, num=num, what=what)  # the count; --seed is bounded by its option
    check(task, options, t2i=task == "t2i")


def check_before_load(task: str, *, model: str | None, vae: Path | None, config: Path | None, allow_pickle: bool,
                      device: str, dtype: str, output: Path, count: int = 1, overwrite: bool,
                      preview: Path | None = None, preview_every: int | None = None, loss_log: Path | None = None,
                      size: str | None = None, **args) -> None:
    """What a batch dry run checks of a job, checked before this command's model loads: every input image
    (read once, named as the command names it), the options, what needs the model; then the ``count``
    outputs named after ``output`` (none of them an input, even with ``overwrite``), the preview file and the loss
    log.

    The model's configs (no weights) decide whether ``--size``, a mask's white, references cut under
    reference fit keep, ``--layers`` and a ControlNet fit it, so such a mistake fails in a second rather than
    after a load or a download. ``task`` is a batch task name; ``args`` are the command's API arguments.
    """
    from ..batch.check import Validator
    from ..batch.jobs import ALIASES, Job, ModelSpec
    from ..images import numbered_outputs

    def plain(value):
        return [str(v) for v in value] if isinstance(value, list | tuple) else str(value) \
            if isinstance(value, Path) else value

    values = {ALIASES.get(k, k): plain(v) for k, v in args.items() if v is not None}
    if size is not None:
        values["size"] = parse_size_option(size)
    spec = ModelSpec(source=model, vae=plain(vae), config=plain(config), allow_pickle=allow_pickle, device=device,
                     dtype=dtype)
    validator = Validator(Path.cwd(), labels=_INPUT_LABELS)
    outputs = tuple(numbered_outputs(output, count))
    validator.check_inputs(Job(line=0, id="command", task=task, args=values, model=spec, outputs=outputs),
                           model=False, side_files={"--preview": preview, "--loss-log": loss_log})
    check_outputs(output, count, overwrite=overwrite, preview=preview, preview_every=preview_every, loss_log=loss_log)


#: How the commands name the inputs whose job keys read otherwise ("reference" is a texture command's texture).
_INPUT_LABELS = {"reference": "texture image", "ref_labels": "reference label map",
                 "target_labels": "target label map"}


def parse_size_option(size: str | None, multiple: int = 1):
    """``--size`` text -> int (long side), (w, h) or None; the task rounds it to the model's multiple."""
    from ..images import parse_size

    return None if size is None else parse_size(size, multiple=multiple)


def write_images(images, output: Path, *, overwrite: bool, losses: StepLosses | None = None) -> list[Path]:
    """Save one image to ``output`` or several to ``OUT-0.png``, ``OUT-1.png``... atomically; a failure removes
    the new files this call wrote (a full disk at the second left the first, which a rerun then refused to
    replace), never one that replaced an earlier result with ``overwrite``; then ``losses``."""
    from ..errors import UserError
    from ..images import numbered_outputs, save_result

    written, new, said = [], [], []
    try:
        for img, planned in zip(images, numbered_outputs(output, len(images)), strict=True):
            existed = planned.exists()
            path, taken = save_result(img, planned, overwrite=overwrite)
            written.append(path)
            if not existed or path != planned:
                new.append(path)
            if taken is not None:  # it appeared during the run (checked before): the work is kept anyway
                said.append((echo_err, f"warning: '{taken}' appeared while this ran and is left as it is; this "
                                       f"result is {path}"))
            said.append((typer.echo, f"wrote {path} ({img.width}x{img.height})"))  # the size --size was rounded to
    except (UserError, OSError, KeyboardInterrupt):  # Ctrl-C or SIGTERM between two images: none of the set
        for path in new:
            path.unlink(missing_ok=True)
        replaced = [str(p) for p in written if p not in new]  # --overwrite: the earlier results they replaced are gone
        if replaced:
            echo_err(f"note: {', '.join(replaced)} already replaced the earlier result{'s' * (len(replaced) > 1)} "
                     "of that name; the rest of the set was not written")
        raise
    for say, line in said:  # once all are written: no "wrote" for a file then removed
        say(line)
    if losses is not None:
        try:
            losses.save(overwrite=overwrite)
        except UserError as exc:  # the images are whole and kept: the error says so, not only "output"
            raise UserError(f"{str(exc).replace('output ', '--loss-log ', 1)} (the images were written: "
                            f"{', '.join(map(str, written))})") from None
    return written


class StepLosses(RunLosses):
    """``--loss-log``: a :class:`~attndistill.loss_log.LossLog` bound to its file, written once the run is
    done, and said."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    @classmethod
    def of(cls, path: Path | None) -> StepLosses | None:
        return None if path is None else cls(path)

    def save(self, *, overwrite: bool) -> Path:
        self.write(self.path, overwrite=overwrite)
        staged = self.tuning_rows  # --tune-vae: the decoder's tuning, numbered apart
        own = len(self.rows) - staged  # none in finetune-vae's log
        counted = (f"{own} steps, and {staged} of the decoder's tuning" if own and staged else
                   f"{own} steps" if own else f"{staged} steps of the decoder's tuning")
        typer.echo(f"wrote {self.path} ({counted})")
        return self.path


@contextmanager
def losses_kept_if_diverged(losses: StepLosses | None, *, overwrite: bool) -> Iterator[None]:
    """A run that diverges still writes the losses of its steps before that: the curve an lr sweep wants most."""
    from ..errors import NonFiniteError

    try:
        yield
    except NonFiniteError as exc:
        if losses is not None and losses.end_at_divergence(exc):
            with contextlib.suppress(UserError):  # the divergence is the error to tell
                losses.save(overwrite=overwrite)
        raise


#: What a preview file carries: a later run may replace a preview, never any other file.
PREVIEW_MARK = {"preview": True}


def is_preview(path: Path) -> bool:
    from ..images import read_parameters

    try:
        return read_parameters(path) == PREVIEW_MARK
    except Exception:  # unreadable, not a PNG, a folder: not a preview
        return False


def step_callback(path: Path | None, every: int | None, model, losses: StepLosses | None = None):
    """A progress callback writing a low-resolution decode of the current latents to ``path`` (or None) and
    keeping ``losses``; None where there is neither.

    The preview is replaced atomically, so an image viewer never shows half of it.
    """
    if path is None and losses is None:
        return None
    from ..images import save_png

    every = every or PREVIEW_EVERY
    failed = []  # a preview that could not be written (a full disk): said once, and the run goes on

    def callback(info) -> None:
        if losses is not None:
            losses(info)
        if info.stage or path is None or failed:  # the decoder's tuning (--tune-vae): no latents to show
            return
        if (info.step + 1) % every == 0 or info.step + 1 == info.total:
            try:
                save_png(model.preview(info.latents, side=64), path, overwrite=True, parameters=PREVIEW_MARK)
            except UserError as exc:
                failed.append(exc)
                echo_err(f"warning: {str(exc).replace('output ', '--preview ', 1)}; the run goes on without previews")

    return callback


def check_loss_log(loss_log: Path, outputs: list[Path], *, overwrite: bool, folder: Path | None = None) -> None:
    """Refuse a ``--loss-log`` that names no file, one of the run's ``outputs``, a place inside its output
    ``folder`` (``finetune-vae``'s, which holds a VAE's files only), or a file that no earlier run's loss log is
    (an input, a model's file: never replaced, even with ``overwrite``)."""
    from ..errors import UserError
    from ..images import check_output_file, check_output_kind

    if str(loss_log).strip() in ("", ".", "-"):  # an empty option is the current folder to pathlib
        raise UserError(f"--loss-log '{loss_log}' names no file; give a file name such as losses.jsonl")
    check_output_kind(loss_log, what="--loss-log", example="losses.jsonl")  # a link loop fails resolve()
    if loss_log.resolve() in {p.resolve() for p in outputs}:
        raise UserError(f"--loss-log '{loss_log}' is an output or preview file; give the loss log another name")
    if folder is not None and loss_log.resolve().is_relative_to(folder.resolve()):
        raise UserError(f"--loss-log '{loss_log}' lies in the VAE's folder '{folder}', which holds the VAE's files "
                        "only; write the loss log beside it")
    if loss_log.exists() and not loss_log.is_dir() and not is_loss_log(loss_log):
        raise UserError(f"--loss-log '{loss_log}' exists and is not the loss log of an earlier run; give the loss "
                        "log another name or delete that file")
    check_output_file(loss_log, overwrite=overwrite, what="--loss-log", option="--loss-log", example="losses.jsonl")


def check_outputs(output: Path, count: int, *, overwrite: bool, preview: Path | None = None,
                  preview_every: int | None = None, loss_log: Path | None = None) -> None:
    """Refuse before any work if an output exists (or cannot be written); so for the ``--preview`` file and the
    ``--loss-log``. ``--preview-every`` without ``--preview`` is refused too: it would write nothing."""
    from ..errors import UserError
    from ..images import check_output, check_output_kind, numbered_outputs

    if preview_every is not None and preview is None:
        raise UserError(f"--preview-every {preview_every} writes nothing without --preview; add --preview "
                        "peek.png (the PNG replaced every N steps) or leave --preview-every out")

    outputs = numbered_outputs(output, count)
    if loss_log is not None:
        check_loss_log(loss_log, [*outputs, *([preview] if preview else [])], overwrite=overwrite)
    if preview is not None:
        check_output_kind(preview, what="--preview")
        if preview.resolve() in {p.resolve() for p in outputs}:
            raise UserError(f"--preview '{preview}' is an output file; give the preview another name")
        if preview.exists() and not is_preview(preview):
            raise UserError(f"--preview '{preview}' exists and is not a preview of an earlier run; give the "
                            "preview another name or delete that file")
        check_output(preview, overwrite=True, what="--preview", option="--preview", why="previews are PNG files")
    for path in outputs:
        check_output(path, overwrite=overwrite)


def debug_enabled() -> bool:
    return os.environ.get("ATTNDISTILL_DEBUG", "") not in ("", "0")


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, so ``finally`` blocks remove temp files and locks like on Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the block (main thread only; signals live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def second_signal_exits() -> Iterator[None]:
    """A second Ctrl-C (or SIGTERM) ends the process at once. Python runs a signal's handler between bytecodes, so
    one during a long native operation (a UNet call on a huge image on the CPU) waited for it to end, minutes
    on end. The C-level handler writes each signal to a wakeup fd right away; a thread reading it exits on the
    second, as the first one's handler has not got to run (outputs are written atomically: nothing is half-left)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def watch() -> None:
        seen = 0
        with reader:
            while data := reader.recv(64):
                for signum in data:
                    if signum in (signal.SIGINT, signal.SIGTERM):
                        seen += 1
                        if seen == 2:
                            exit_at_once(signum)

    threading.Thread(target=watch, name="second-signal", daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        writer.close()  # the watcher's recv returns b"": it closes its end and ends


def exit_at_once(signum: int) -> None:
    """End the process now, saying why where stderr takes it: with its reader gone (``cmd 2>&1 | tee log``, whose
    ``tee`` the first Ctrl-C ended) the write failed and killed the watcher before its exit, and a full pipe
    would block it."""
    import select

    with contextlib.suppress(OSError, ValueError):
        if select.select([], [2], [], 0)[1]:
            os.write(2, b"interrupted at once (a second signal): no partial output was left\n")
    os._exit(130 if signum == signal.SIGINT else 143)


def run_command(fn: Callable[[], None], *, say_once: bool = True) -> None:
    """Run a command body: user errors -> one line on stderr and a non-zero exit, no traceback. ``say_once``: a
    warning repeated word for word is printed once (not for a server, whose every job's warnings count). The
    work goes on when the console's reader goes away (``| head``): its reports then go nowhere."""
    with readers_may_leave():
        _run_reported(fn, say_once=say_once)


def _run_reported(fn: Callable[[], None], *, say_once: bool) -> None:
    quiet_libraries(say_once=say_once)
    words = CLI_WORDS.set(True)  # its messages name options as typed here (--lr, not lr=)
    try:
        with sigterm_as_interrupt(), second_signal_exits():
            fn()
    except UserError as exc:
        if debug_enabled():
            traceback.print_exc()
        # a path with a line break in it ('a\nb.png') is said as typed, on the one line an error is
        typer.echo("error: " + str(exc).replace("\r", "\\r").replace("\n", "\\n"), err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        typer.echo("interrupted: no partial output was left", err=True)
        raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
    except Exception as exc:
        if (advice := out_of_memory_advice(exc)) is not None:
            typer.echo(f"error: {advice}", err=True)
            raise typer.Exit(4) from None
        if debug_enabled():
            raise
        typer.echo(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                   err=True)
        raise typer.Exit(1) from None
    finally:
        CLI_WORDS.reset(words)


def echo_err(text: str) -> None:
    print(text, file=sys.stderr)
