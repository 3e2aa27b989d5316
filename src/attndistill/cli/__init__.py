"""The ``attndistill`` command line: parse input, call the library, write results.

Each command lives in a small module of this package and registers itself on
:data:`app`; none of them contains algorithm code.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer
from typer.core import TyperGroup

from ..version import __version__

#: Flags of the root command that are also accepted after the subcommand (``attndistill style ... --debug``).
GLOBAL_FLAGS = ("--debug", "--compile", "--compiled-loss", "--compiled-calls", "--channels-last",
                "--no-channels-last", "--channels-last-norms", "--compiled-norms", "--cudnn-benchmark",
                "--no-cudnn-benchmark", "--lookahead-overlap", "--feed-forward-chunks", "--no-feed-forward-chunks",
                "--cuda-graphs", "--no-cuda-graphs", "--fused", "--no-fused", "--gradient-checkpointing",
                "--no-gradient-checkpointing", "--attention-slicing", "--vae-tiling", "--cpu-offload",
                "--offload-text-encoders", "--no-offload-text-encoders")


#: Root options with a value, also accepted after the subcommand (``--lookahead-batch 16`` or ``=16``).
GLOBAL_OPTIONS = ("--lookahead-batch",)


class _Group(TyperGroup):
    """Accept the global flags and options anywhere before ``--``, not only before the subcommand."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        cut = args.index("--") if "--" in args else len(args)
        moved, kept, i = [], [], 0
        while i < cut:
            a = args[i]
            if i > 0 and a in GLOBAL_FLAGS:
                moved.append(a)
            elif i > 0 and a in GLOBAL_OPTIONS:
                if i + 1 >= cut:  # moved to the front, it would take the command's name as its value
                    typer.echo(f"error: {a} needs a value, e.g. {a} 16", err=True)
                    raise typer.Exit(2)
                moved += [a, args[i + 1]]
                i += 1
            elif i > 0 and a.split("=", 1)[0] in GLOBAL_OPTIONS:
                moved.append(a)
            else:
                kept.append(a)
            i += 1
        return super().parse_args(ctx, moved + kept + args[cut:])


app = typer.Typer(
    name="attndistill", cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Attention Distillation: transfer style, appearance and texture with Stable Diffusion.",
    context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        typer.echo(f"attndistill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors")] = False,
    compile: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the UNet's ResNet and feed-forward blocks: faster steps after a "
                          "one-time compilation per process")] = False,
    compiled_loss: Annotated[bool, typer.Option(
        "--compiled-loss",
        help="Each AD iteration's UNet forward, loss and backward as one compiled program: on an H200 18-22% faster "
             "steps after about two minutes of compiling per latent shape (seconds in later processes, from "
             "PyTorch's cache on disk)")] = False,
    compiled_calls: Annotated[bool, typer.Option(
        "--compiled-calls",
        help="The UNet calls without gradients (reference, content and look-ahead features; the denoising call) as "
             "compiled programs, a program per call shape: on an H200 with --compiled-loss 9% faster texture synthesis "
             "than with --compiled-loss alone")] = False,
    channels_last: Annotated[bool | None, typer.Option(
        "--channels-last/--no-channels-last",
        help="UNet in NHWC memory layout: no layout transposition around each convolution "
             "\\[default: on for GPUs]", show_default=False)] = None,
    channels_last_norms: Annotated[bool, typer.Option(
        "--channels-last-norms",
        help="With channels-last, GroupNorm reads and writes NHWC: no copies to NCHW and back around each "
             "(GPU; on an H200 slower at batch 1, 2-3% faster at batches 6-8)")] = False,
    compiled_norms: Annotated[bool, typer.Option(
        "--compiled-norms",
        help="GroupNorms, and the SiLU after each ResNet block's norm, as small compiled programs in the input's "
             "layout (a handful of programs to compile, not one per block as --compile; on an H200 4-8% faster at "
             "batch 1, 6% slower at batch 8)")
                              ] = False,
    cudnn_benchmark: Annotated[bool | None, typer.Option(
        "--cudnn-benchmark/--no-cudnn-benchmark",
        help="cuDNN times its convolution algorithms once per shape and keeps the fastest (GPU) "
             "\\[default: as the process has it]", show_default=False)] = None,
    lookahead_batch: Annotated[int | None, typer.Option(
        "--lookahead-batch", min=1,
        help="Compute the reference/content features of upcoming steps in UNet calls of up to N rows "
             "(1: every step on its own) \\[default: on GPUs, 16 rows of 64x64 latents, not in expand]",
        show_default=False)] = None,
    lookahead_overlap: Annotated[bool, typer.Option(
        "--lookahead-overlap", help="Make the next look-ahead call on a second CUDA stream while the current "
                                    "steps run (more memory; on an H200 no clear gain)")] = False,
    feed_forward_chunks: Annotated[bool, typer.Option(
        "--feed-forward-chunks/--no-feed-forward-chunks",
        help="Feature calls without gradients (look-ahead, reference) run their feed-forward layers a few rows "
             "at a time: about a third less peak memory")] = True,
    cuda_graphs: Annotated[bool | None, typer.Option(
        "--cuda-graphs/--no-cuda-graphs",
        help="Replay the reference features, each AD iteration and each denoising call as CUDA graphs "
             "\\[default: on for GPUs]", show_default=False)] = None,
    fused: Annotated[bool | None, typer.Option(
        "--fused/--no-fused", help="Reference, content and target in one UNet call \\[default: automatic]",
        show_default=False)] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Less memory for the backward pass, slower \\[default: on for SDXL on cards under 16 GiB, and where a "
             "CUDA graph would not fit]",
        show_default=False)] = None,
    attention_slicing: Annotated[bool, typer.Option("--attention-slicing", help="Attention in slices: less memory")
                                 ] = False,
    vae_tiling: Annotated[bool, typer.Option("--vae-tiling", help="Encode/decode in tiles: less memory")] = False,
    cpu_offload: Annotated[bool, typer.Option(
        "--cpu-offload", help="Idle components wait in CPU memory (diffusers' model offload; no CUDA graphs)")
                           ] = False,
    offload_text_encoders: Annotated[bool | None, typer.Option(
        "--offload-text-encoders/--no-offload-text-encoders",
        help="Text encoders wait in CPU memory (saves ~1.6 GB with SDXL) \\[default: on for cards under 16 GiB]",
        show_default=False)] = None,
) -> None:
    """Flags on this line work with every command, before or after its name."""
    from ..model.perf import PerfOptions
    from . import common

    if debug:
        os.environ["ATTNDISTILL_DEBUG"] = "1"
    whole = [f for f, on in (("--compiled-loss", compiled_loss), ("--compiled-calls", compiled_calls)) if on]
    if whole:
        typer.echo(f"note: {' and '.join(whole)} compile whole UNet calls during the first steps (minutes for each "
                   "shape; seconds once PyTorch's cache on disk has them); later steps and jobs reuse them", err=True)
    elif compile:
        typer.echo("note: --compile compiles the UNet's blocks during the first steps (a minute or more); "
                   "later steps and jobs in this process reuse them", err=True)
    elif compiled_norms:
        typer.echo("note: --compiled-norms compiles a few small programs during the first steps; later steps and "
                   "jobs in this process reuse them", err=True)
    common.PERF = PerfOptions(compile=compile, compiled_loss=compiled_loss, compiled_calls=compiled_calls,
                              channels_last=channels_last, channels_last_norms=channels_last_norms,
                              compiled_norms=compiled_norms, cudnn_benchmark=cudnn_benchmark,
                              lookahead_batch=lookahead_batch, lookahead_overlap=lookahead_overlap,
                              feed_forward_chunks=feed_forward_chunks,
                              fused=fused, cuda_graphs=cuda_graphs,
                              gradient_checkpointing=gradient_checkpointing, attention_slicing=attention_slicing,
                              vae_tiling=vae_tiling, cpu_offload=cpu_offload,
                              offload_text_encoders=offload_text_encoders)


def _register() -> None:
    """Import the command modules; each adds its commands to :data:`app`."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"{__name__}.{info.name}")


_register()


def _command_path(argv: list[str]) -> str:
    """The command a usage error belongs to where click gives no context (an option missing its value is found
    before the command's context exists): the first argument that names a command."""
    import typer.main

    commands = typer.main.get_command(app).commands
    name = next((a for a in argv if not a.startswith("-")), None)
    return f"attndistill {name}" if name in commands else "attndistill"


def main() -> None:
    """Console-script entry point. A usage error (a missing argument, a bad option value) is one line that
    names the fix, as every other error is, instead of click's usage text and boxed message."""
    import sys

    usage_error = typer.BadParameter.__base__  # click's UsageError, as this Typer vendors it
    try:
        code = app(standalone_mode=False, prog_name="attndistill")
    except typer.TyperException as exc:  # click's exceptions, vendored
        if type(exc).__name__ == "NoArgsIsHelpError" or not isinstance(exc, usage_error):
            exc.show()  # bare ``attndistill``: the help is the answer
        else:
            where = exc.ctx.command_path if exc.ctx is not None else _command_path(sys.argv[1:])
            typer.echo(f"error: {exc.format_message().rstrip('.')} (see '{where} -h')", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:  # Ctrl-C before a command's own handler is in place
        typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
