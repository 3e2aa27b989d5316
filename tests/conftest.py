"""Shared fixtures: tiny random-weight models saved to disk and loaded through the user's path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One thread: on a small shared machine two threads fight over cores and tiny convolutions get 10x slower.
torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"
CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def configs_dir() -> Path:
    return CONFIGS


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory) -> Path:
    from attndistill.testing import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    from attndistill.testing import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd15(tiny_sd15_dir):
    from attndistill import load_model

    return load_model(str(tiny_sd15_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_sd15_fp64(tiny_sd15_dir):
    """The tiny model in float64, for whole optimisations compared across kernels that round differently
    (batched or channels-last convolutions): in float32, 30 Adam steps on an L1 loss amplify that rounding
    past 1e-4 for some inputs (1e-2 seen), so only float64 shows that two paths compute the same thing."""
    import torch

    from attndistill import load_model

    return load_model(str(tiny_sd15_dir), device="cpu", dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_dir):
    from attndistill import load_model

    return load_model(str(tiny_sdxl_dir), device="cpu", dtype="fp32")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_last_test: list[str] = []


@pytest.fixture(autouse=True)
def _grad_mode_left_on(request):
    """Every test starts with autograd on: one that leaves it off fails the next test's backward far away."""
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail(f"autograd was left off by the test before this one in this process: {_last_test[-1:]}")
    _last_test[:] = [request.node.nodeid]
    yield


def _compiled_with(monkeypatch, backend: str):
    """Programs made in the test with ``backend``, none of another test's (their caches and Dynamo's cleared)."""
    from attndistill.model import compiling, group_norm

    made = (group_norm._program, compiling.static_program)  # with the backend of their day
    monkeypatch.setattr(compiling, "BACKEND", backend)
    for programs in made:
        programs.cache_clear()
    torch._dynamo.reset()
    yield
    for programs in made:
        programs.cache_clear()
    torch._dynamo.reset()


@pytest.fixture
def dynamo_eager(monkeypatch):
    """Compiled blocks and programs traced by Dynamo (guards, recompiles, graph breaks) and run as traced: the
    wiring of a switch (its messages, its options), without AOT autograd's tracing (``aot_eager``) of each shape,
    which took about half of this suite's slowest tests."""
    yield from _compiled_with(monkeypatch, "eager")


@pytest.fixture
def untraced(monkeypatch):
    """The compile switches' own wiring (their messages, options, statuses) with their programs run as plain
    PyTorch, untraced: a whole-UNet trace costs 5-10 s here, and what tracing does (guards, recompiles, graph
    breaks, gradients) is what the tests with ``dynamo_eager`` and ``aot_eager`` check."""
    from unittest import mock

    from attndistill.model import compiling, group_norm

    def untraced_program(fn, **kwargs):
        def run(*args, **kwargs):  # the program's Python as Dynamo meets it (no early exit: dead code there)
            with mock.patch.object(torch.compiler, "is_compiling", return_value=True):
                return fn(*args, **kwargs)

        return run

    for module in (compiling, group_norm):
        monkeypatch.setattr(module, "compiled", untraced_program)
    yield from _compiled_with(monkeypatch, "eager")


@pytest.fixture
def aot_eager(monkeypatch):
    """Compiled programs traced as with inductor (guards, autograd, dynamic shapes) but run as PyTorch
    operations: the gradients under test, without minutes of C++ code generation on a cold cache. Twice
    Dynamo's time (a whole-UNet loss: 18 s against 8 s): for the tests of what AOT autograd computes."""
    yield from _compiled_with(monkeypatch, "aot_eager")


@pytest.fixture
def bare_root_logger():
    """A context in which the root logger has no handlers, as the console script starts with (pytest's are put
    back after, the command's own removed): what a command prints to the terminal lands in CliRunner's output.
    A context, not the fixture itself: pytest adds its handlers again when the test's call begins."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def bare():
        root = logging.getLogger()
        pytest_handlers, level = root.handlers[:], root.level
        for handler in pytest_handlers:
            root.removeHandler(handler)
        try:
            yield root
        finally:
            for handler in root.handlers[:]:  # the command's own, on the runner's closed stream
                root.removeHandler(handler)
            for handler in pytest_handlers:
                root.addHandler(handler)
            root.setLevel(level)

    return bare
