"""User-facing errors: one line that names the input and the fix.

Everything the user can cause (a bad file, a bad option, a model that is not
available) raises :class:`UserError`; the CLI prints its message without a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one line."""

    exit_code = 2


class NonFiniteError(UserError):
    """The loss or the latent became NaN/Inf during optimisation."""

    exit_code = 3


#: Switches that lower the peak memory of a run, for the out-of-memory advice below.
MEMORY_SWITCHES = ("--gradient-checkpointing", "--vae-tiling", "--attention-slicing", "--offload-text-encoders",
                   "--lookahead-batch 1", "--no-cuda-graphs")
#: What helps when the GPU runs out of memory (the same advice in the CLI and the batch runner).
OOM_ADVICE = ("the GPU ran out of memory; try a smaller size, fewer images at once (--num, a smaller --view-batch "
              f"or batch --group), {', '.join(MEMORY_SWITCHES)} or --cpu-offload, or --device cpu")
#: The web UI's version: the page has fields for size and image count; the switches are the server's.
UI_OOM_ADVICE = ("the GPU ran out of memory; try a smaller size, fewer Images or fewer Views per batch, or start "
                 f"the UI again with memory switches, e.g. attndistill ui {' '.join(MEMORY_SWITCHES)} "
                 "(or --cpu-offload, or --device cpu)")


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or other device) out-of-memory error, whatever its exact type."""
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
