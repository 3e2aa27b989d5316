"""``torch.compile`` as this package uses it: dynamic shapes, and a recompile limit scoped to the call.

Dynamic shapes let one compilation serve every batch and latent size of a program, so the compile cost is
paid once per process and shape family, not per task or job. Sizes 0 and 1 still get programs of their
own (PyTorch specialises them), and so does each distinct parameter shape of a module.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

#: Distinct programs one compiled function may have (SD 1.5 has ~10 ResNet block shapes, SDXL more).
RECOMPILE_LIMIT = 64
#: The compiler the programs go to. The tests of this package's wiring use ``"aot_eager"``: the same
#: tracing, guards and autograd, without generating kernels (minutes of C++ compiling on 2 cores).
BACKEND = "inductor"


def compiled(fn: Callable, *, dynamic: bool = True) -> Callable:
    """``torch.compile(fn, dynamic=dynamic)``, allowed :data:`RECOMPILE_LIMIT` programs inside its calls only.

    ``dynamic=False``: a program per shape, each specialised to it (a whole UNet call, whose shapes a run
    keeps, and whose kernels are then chosen for them).
    """
    program = torch.compile(fn, dynamic=dynamic, backend=BACKEND)

    def run(*args, **kwargs):
        try:
            return program(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            raise _compile_failed(exc) from exc

    def call(*args, **kwargs):
        config = torch._dynamo.config
        wanted = _settings(config)
        before = {name: getattr(config, name) for name, value in wanted.items() if getattr(config, name) != value}
        if not before:
            return run(*args, **kwargs)
        for name in before:  # set and reset by hand: config.patch costs ~25 us a call
            setattr(config, name, wanted[name])
        try:
            return run(*args, **kwargs)
        finally:
            for name, value in before.items():
                setattr(config, name, value)

    return call


@functools.cache
def static_program(fn: Callable, what: str) -> Callable:
    """``fn`` compiled with static shapes (:func:`compiled`), once per process: a program per shape and
    setting, shared by every caller. Made at first use, so that the backend is the one set then (tests trace
    with ``aot_eager``).

    what: the program in words. Its first call with new tensor shapes says (log level INFO) that ``what`` is
    compiling: a whole UNet call takes minutes to compile the first time, during which a run's progress bar
    stands still.
    """
    program = compiled(fn, dynamic=False)
    seen: set[tuple] = set()

    def call(*args, **kwargs):
        shapes = tuple(tuple(a.shape) for a in args if torch.is_tensor(a))
        if shapes not in seen:
            seen.add(shapes)
            log.info("compiling %s for latents of %s: minutes the first time, seconds once PyTorch's cache on disk "
                     "holds it", what, "×".join(map(str, shapes[0])) if shapes else "no tensor")
        return program(*args, **kwargs)

    return call


def _settings(config) -> dict[str, object]:
    """The compiler settings our programs are made under (those this PyTorch has).

    Gradient checkpointing recomputes a block's forward in the backward; the capture processors' recording (a
    side effect) inside a checkpointed block would split a program at every block, although the recompute's
    recording is never read (SDXL with checkpointing: 20 programs for one loss instead of 1).
    """
    wanted = {"recompile_limit": max(config.recompile_limit, RECOMPILE_LIMIT),
              "skip_fwd_side_effects_in_bwd_under_checkpoint": True}
    return {name: value for name, value in wanted.items() if hasattr(config, name)}


def _compile_failed(exc: torch._dynamo.exc.BackendCompilerFailed) -> Exception:
    """A compiler that cannot run here (no C++ compiler, no Triton) as a one-line error naming the way out;
    out-of-memory errors stay themselves, for the memory remedies to see."""
    from ..errors import UserError, is_out_of_memory

    inner = getattr(exc, "inner_exception", None) or exc
    if is_out_of_memory(inner):
        return inner
    reason = next((line for line in str(inner).splitlines() if line.strip()), type(inner).__name__)
    return UserError(f"torch.compile could not compile here ({type(inner).__name__}: {reason.strip()}); run "
                     "without --compile, --compiled-loss, --compiled-calls and --compiled-norms, or install what "
                     "it needs (a C++ compiler for the CPU, Triton for a GPU)")
