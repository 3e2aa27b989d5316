"""``attndistill batch``: run a JSONL file of jobs, resumable and sharded (torchrun, Slurm arrays, --shard)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app, common
from .common import AllowPickle, ConfigDir, Device, Dtype, Model, Quiet, Vae, debug_enabled, run_command

BATCH_EXAMPLE = ("Example: attndistill batch jobs.jsonl --out results/  (a line of jobs.jsonl: "
                 '{"task": "style", "content": "horse.jpg", "style": "cat.jpg", "steps": 100}); '
                 "torchrun --nproc_per_node 8 --no-python attndistill batch jobs.jsonl --out results/")


@app.command("batch", epilog=BATCH_EXAMPLE)
def batch(
    jobs: Annotated[Path | None, typer.Argument(
        help="Jobs file: one JSON object per line (task + the command's options; paths relative to it)",
        show_default=False, metavar="JOBS")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Output folder: images, results.jsonl, locks", show_default=False)] = None,
    retry_failed: Annotated[bool, typer.Option(help="Run again the jobs recorded as failed")] = False,
    shard: Annotated[str | None, typer.Option(
        help="I/N: run part I (0-based) of N \\[default: from SLURM_ARRAY_TASK_ID/COUNT; torchrun ranks split "
             "further]", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(help="Validate every job (inputs, options, outputs) and stop")] = False,
    merge: Annotated[Path | None, typer.Option(
        help="Merge the per-shard results of this folder into its results.jsonl and stop", show_default=False,
        metavar="DIR")] = None,
    group: Annotated[int | None, typer.Option(
        help="Style jobs sharing a style image, settings and result size run up to this many at a time in one "
             "batch (the same results up to rounding, more images per minute) \\[default: 8 on GPUs, 1 on CPUs]",
        show_default=False, min=1)] = None,
    loss_logs: Annotated[bool, typer.Option(
        help="Also write each job's step losses to losses/JOB_ID.jsonl in --out, as --loss-log does for one "
             "command (style jobs then run one by one: a batch of them is optimised as one loss)")] = False,
    model: Model = None, vae: Vae = None, config: ConfigDir = None, allow_pickle: AllowPickle = False,
    device: Device = "auto", dtype: Dtype = "auto", quiet: Quiet = False,
) -> None:
    """Run every job of JOBS into --out: skips finished jobs, records each job in results.jsonl.

    Model options are defaults for jobs that do not set their own. Exit code 1 when a job failed.
    """
    from ..batch.runner import ModelSpec, merge_results, run_batch
    from ..batch.runner import dry_run as check_all
    from ..errors import UserError
    from ..model.perf import pixel_switches

    code = 0

    def log(text: str) -> None:
        if not quiet:
            typer.echo(text, err=True)

    def body() -> None:
        nonlocal code
        if merge is not None:
            extra = "the jobs file" if jobs is not None else "--out" if out is not None else "--dry-run" \
                if dry_run else "--loss-logs" if loss_logs else None
            if extra:
                raise UserError(f"--merge DIR only merges the shards' results of DIR and runs no job; drop {extra}, "
                                "or run the jobs without --merge")
            merged = merge_results(merge)
            typer.echo(f"merged: {merged}")
            code = 1 if merged.failed or merged.missing else 0
            return
        if jobs is None or out is None:
            raise UserError("batch needs a jobs file and --out DIR (or --merge DIR); see attndistill batch --help")
        # the speed flags that change pixels belong to each job, as a "perf" in its line would
        switches = tuple(sorted(pixel_switches(common.PERF).items())) if common.PERF else ()
        defaults = ModelSpec(source=_absolute(model), vae=_absolute(vae), config=_absolute(config),
                             allow_pickle=allow_pickle, device=device, dtype=dtype, perf=switches)
        if dry_run:
            bad = check_all(jobs, out, defaults=defaults, shard=shard, log=typer.echo, retry_failed=retry_failed,
                            loss_logs=loss_logs, group_size=group)
            code = 2 if bad else 0
            return
        summary = run_batch(jobs, out, shard=shard, retry_failed=retry_failed, defaults=defaults, perf=common.PERF,
                            group_size=group, loss_logs=loss_logs, debug=debug_enabled(), log=log,
                            progress=not quiet,  # each job's bar
                            errors=lambda text: typer.echo(text, err=True))  # -q hides progress, not failures
        typer.echo(str(summary))
        code = summary.exit_code

    run_command(body)
    if code:
        raise typer.Exit(code)


def _absolute(value: str | Path | None) -> str | None:
    """Local paths given on the command line are relative to the current folder, not the jobs file."""
    if value is None:
        return None
    return str(Path(value).resolve()) if Path(value).exists() else str(value)
