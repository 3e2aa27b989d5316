"""``compiling.compiled``: torch.compile as the package uses it."""

from __future__ import annotations

import pytest
import torch

from attndistill.errors import UserError
from attndistill.model import compiling


def test_a_compiler_that_cannot_run_is_one_line_naming_the_switches():
    """No C++ compiler (or no Triton): a user error that says which switches to drop, not a traceback."""
    import torch._inductor.config

    program = compiling.compiled(lambda x: (x * 3).cos())
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-compiler-here",), "fx_graph_cache": False}), \
            pytest.raises(UserError, match=r"could not compile here \(InvalidCxxCompiler: .*--compiled-norms") as err:
        program(torch.randn(4, 4))
    assert "\n" not in str(err.value)


def test_the_recompile_limit_is_raised_inside_the_calls_only(monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")  # tracing is what counts here
    seen = []

    def fn(x):
        seen.append(torch._dynamo.config.recompile_limit)  # runs while dynamo traces
        return x + 1

    limit = torch._dynamo.config.recompile_limit
    program = compiling.compiled(fn)
    with torch._dynamo.config.patch(recompile_limit=2):
        for n in (1, 2, 5, 6):  # batch 1 and 2+, 2-D and 3-D: three programs, over a limit of 2
            program(torch.randn(n, 3) if n < 5 else torch.randn(n, 3, 2))
    assert seen and min(seen) >= compiling.RECOMPILE_LIMIT
    assert torch._dynamo.config.recompile_limit == limit
