"""User-facing errors: one line that names the input and the fix.

Everything the user can cause (a bad file, a bad option, a model that is not
available) raises :class:`UserError`; the CLI prints its message without a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Collection

#: Whether a message's reader types command-line options (the CLI, the web UI beside its commands) rather than
#: keyword arguments (the Python API): set by those front ends for the work they run.
CLI_WORDS: contextvars.ContextVar[bool] = contextvars.ContextVar("attndistill_cli_words", default=False)

#: An option as messages write one (not inside a word or a path), with the value that follows it where one does:
#: a number or size, a path, or one of the words options take.
_OPTION = re.compile(r"(?<![\w./-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)"
                     r"(?:[ =]([-+]?\d[\d.]*(?:e[-+]?\d+)?(?:x\d+)?|[a-z0-9]+|/[\w./-]+)(?![\w-]|\.\w))?")
#: The words an option takes as its value (``--device cpu``), written as a string argument (``device='cpu'``).
_VALUE_WORDS = frozenset({"auto", "cpu", "cuda", "mps", "fp32", "fp16", "bf16", "x", "y", "xy", "none", "canny",
                          "squash", "keep", "sample", "optimize"})


def in_api_words(message: str, parameters: Collection[str], flags: Collection[str] = ()) -> str:
    """``message`` with each command-line option that is one of ``parameters`` spelt as the keyword argument
    (``--lr`` -> ``lr=``, ``--view 6`` -> ``view=6``, ``--device cpu`` -> ``device='cpu'``; one of ``flags``:
    ``--tune-vae`` -> ``tune_vae=True``): what a Python caller passes. Other options, and whatever is quoted (file
    names), stay as they are."""
    def spell(match: re.Match) -> str:
        name, value = match.group(1).replace("-", "_"), match.group(2)
        if name not in parameters:
            return match.group(0)
        if value is None:
            return f"{name}=True" if name in flags else f"{name}="
        if value[0].isdigit() or value[0] in "+-":
            return f"{name}={value}"
        return f"{name}={value!r}" if value in _VALUE_WORDS or value[0] == "/" else f"{name}= {value}"

    parts = re.split(r"('[^']*')", message)  # quoted spans (paths, names) at the odd places
    return "".join(part if i % 2 else _OPTION.sub(spell, part) for i, part in enumerate(parts))


class UserError(Exception):
    """A problem with the user's input, reported as one line."""

    exit_code = 2


class UnmatchedLabels(UserError, ValueError):
    """Target labels with no reference token of the same label at some token grid (masked AD would give
    their attention rows no key: NaN). ``labels`` are the label ids; ``grid`` the reference's (h, w) there."""

    def __init__(self, labels: list[int], grid: tuple[int, int] | None = None):
        self.labels, self.grid = labels, grid
        at = f" at a {grid[0]}x{grid[1]} token grid" if grid else ""
        super().__init__(f"target labels {labels} have no region in the reference label map{at}; make the "
                         "regions of those labels larger")


class NonFiniteError(UserError):
    """The loss or the latent became NaN/Inf during optimisation."""

    exit_code = 3


class StepDiverged(NonFiniteError):
    """A run's step went NaN/Inf: ``step`` (counted from 1, as the bar counts) and its ``timestep`` say which, so
    a loss log can end there (the watch reads its flag every few steps: later steps may have run);
    ``ad_timestep``: the timestep its AD iterations ran at, where that is another (sampling's t')."""

    def __init__(self, message: str, *, step: int, timestep: int, ad_timestep: int | None = None) -> None:
        super().__init__(message)
        self.step, self.timestep, self.ad_timestep = step, timestep, ad_timestep


def precision_advice(dtype) -> str:
    """", use --dtype fp32" for a run in half precision, whose range fp32 widens; nothing for an fp32 (or fp64)
    run, which that advice would only send round in a circle."""
    import torch

    return ", use --dtype fp32" if dtype in (torch.float16, torch.bfloat16) else ""


#: Switches that lower the peak memory of a run, for the out-of-memory advice below.
MEMORY_SWITCHES = ("--gradient-checkpointing", "--vae-tiling", "--attention-slicing", "--offload-text-encoders",
                   "--lookahead-batch 1", "--no-cuda-graphs")
#: What helps when the GPU runs out of memory (the same advice in the CLI and the batch runner).
OOM_ADVICE = ("the GPU ran out of memory; try a smaller size, fewer images at once (--num, a smaller --view-batch "
              f"or batch --group), {', '.join(MEMORY_SWITCHES)} or --cpu-offload, or --device cpu")
#: What helps when the machine's own memory runs out (a CPU run, a huge image converted): no GPU switch helps.
HOST_OOM_ADVICE = ("the machine ran out of memory (RAM); try a smaller size, fewer images at once (--num, a smaller "
                   "--view-batch or batch --group), --gradient-checkpointing, smaller input images, or a machine "
                   "with more memory")
#: The web UI's versions: the page has fields for size and image count; the switches are the server's.
UI_HOST_OOM_ADVICE = ("the machine ran out of memory (RAM); try a smaller size, fewer images at once (Images, Views "
                      "per batch), attndistill ui --gradient-checkpointing, smaller input images, or a machine with "
                      "more memory")
UI_OOM_ADVICE = ("the GPU ran out of memory; try a smaller size, fewer Images or fewer Views per batch, or start "
                 f"the UI again with memory switches, e.g. attndistill ui {' '.join(MEMORY_SWITCHES)} "
                 "(or --cpu-offload, or --device cpu)")


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (empty for none): error lines stay one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def out_of_memory_advice(exc: BaseException, *, page: bool = False) -> str | None:
    """What helps with ``exc`` where it is running out of memory, on the device or the machine (``page``: in the
    web UI's words); None for any other error."""
    if is_out_of_memory(exc):
        return UI_OOM_ADVICE if page else OOM_ADVICE
    text = str(exc)  # PyTorch's CPU allocator: "can't allocate memory" (Linux), "not enough memory" (Windows)
    if isinstance(exc, MemoryError) or "can't allocate memory" in text or "not enough memory: you tried" in text:
        return UI_HOST_OOM_ADVICE if page else HOST_OOM_ADVICE
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or other device) out-of-memory error, whatever its exact type."""
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
