"""Loss logs: each step's loss of a run as JSON Lines, for plots and comparisons of settings.

A run's callback collects the rows (:class:`LossLog` is one); they are written once the run is done, whole or
not at all, as every output. The CLI's ``--loss-log`` writes one for a command, the batch runner's
``--loss-logs`` one for each job.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core.progress import StepInfo


class LossLog:
    """The rows of one run: step (1-based), timestep, loss; "ad_timestep" where the loss is of another timestep
    (AD-guided sampling's t', the next step's); "ad" and "content" where a content loss takes part
    (loss = ad + content weight * content, the last iteration's terms); "losses", every Adam iteration's loss,
    where a step has several. A step without AD iterations (plain sampling, past ``start_t``) has loss null;
    the decoder's tuning (``tune_vae``) is numbered apart, its rows marked with their "stage"."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def __call__(self, info: StepInfo) -> None:
        row = {"step": info.step + 1, "timestep": info.timestep, "loss": _plain(info.loss)}
        if info.ad_timestep is not None:  # AD-guided sampling: the loss is of t', the next step's timestep
            row["ad_timestep"] = info.ad_timestep
        if info.parts:  # which term moves, which one rules
            row.update({name: _plain(value) for name, value in info.parts.items()})
        if info.losses and len(info.losses) > 1:
            row["losses"] = [_plain(v) for v in info.losses]
        last = self.rows[-1] if self.rows else None
        if last is not None and last.get("stage") == info.stage and last["step"] >= row["step"]:
            # the work started over (the decoder's tuning, out of memory beside cached graphs): its new rows
            # replace the first attempt's
            self.rows = [r for r in self.rows if r.get("stage") != info.stage or r["step"] < row["step"]]
        self.rows.append({**row, "stage": info.stage} if info.stage else row)

    def end_at_divergence(self, exc: BaseException) -> bool:
        """The rows of a run that ``exc`` stopped: where it names the step that diverged, the steps before it and
        that step with loss null (the NaN watch reads its flag every few steps, so steps after it may have run).
        Returns whether there is a row to write."""
        from .errors import StepDiverged

        if isinstance(exc, StepDiverged):
            self.rows = [row for row in self.rows if "stage" in row or row["step"] < exc.step]
            row = {"step": exc.step, "timestep": exc.timestep, "loss": None}
            self.rows.append(row if exc.ad_timestep is None else {**row, "ad_timestep": exc.ad_timestep})
        return bool(self.rows)

    @property
    def tuning_rows(self) -> int:
        """Rows of the decoder's tuning (``tune_vae``), not of the run's own steps."""
        return sum(1 for row in self.rows if "stage" in row)

    def write(self, path: Path, *, overwrite: bool) -> Path:
        """Write the rows to ``path`` atomically; an existing file is replaced only with ``overwrite``."""
        from .images import atomic_write

        text = "".join(json.dumps(row) + "\n" for row in self.rows)
        atomic_write(path, lambda f: f.write(text.encode()), overwrite=overwrite)
        return path


def _plain(value: float) -> float | None:
    """JSON has no NaN: a diverged step's loss is null."""
    return value if math.isfinite(value) else None


def is_loss_log(path: Path) -> bool:
    """A file a loss log was written to (JSON objects with a step and a loss, a line each), or an empty one: what a
    later run may replace. Read up to 64 MiB, as no loss log of up to 100,000 steps comes near."""
    try:
        if not path.is_file():  # a pipe's read would wait for its writer
            return False
        with open(path, "rb") as f:
            text = f.read(64 << 20).decode()
        rows = [json.loads(line) for line in text.splitlines()]
    except (OSError, ValueError):  # unreadable, not text, not JSON lines
        return False
    return all(isinstance(r, dict) and "step" in r and "loss" in r for r in rows)
