"""The benchmark script still runs (tiny model, CPU): it measures, so it must not rot between GPU sessions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


def test_bench_prints_one_json_line_per_run(capsys):
    path = Path(__file__).parent.parent / "benchmarks" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tiny", "--device", "cpu", "--cases", "a,c", "--steps", "1", "--compare", "--size-scale", "0.25",
                "--profile", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["case"], r["path"]) for r in rows] == [
        ("a", "fast"), ("a", "profile"), ("a", "plain"), ("a", "fast-vs-plain"),
        ("c", "fast"), ("c", "profile"), ("c", "plain"), ("c", "fast-vs-plain")]
    assert all(r["top"] and r["top"][0]["ms"] > 0 for r in rows if r["path"] == "profile")
    assert all("error" not in r for r in rows)
    assert all(r["seconds"] > 0 and r["card"] == "cpu" for r in rows if r["path"] in ("fast", "plain"))
    assert all(r["max_abs_pixel_diff"] <= 1 / 255 for r in rows if r["path"] == "fast-vs-plain")


def test_breakdown_times_static_calls_by_kind():
    import torch

    path = Path(__file__).parent.parent / "benchmarks" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from attndistill.core.stepper import StaticCall

    iteration = StaticCall(lambda: torch.ones(2).sum(), capture=False, grad=True)
    denoise = StaticCall(lambda: torch.zeros(2), capture=False, grad=False)
    with bench.timed_static_calls(torch.device("cpu")) as parts:
        iteration(), iteration(), denoise()
    assert {k: v["calls"] for k, v in parts.items()} == {"iteration": 2, "denoising": 1}
    assert all(v["ms"] >= 0 for v in parts.values())
    assert iteration() == 2 and parts["iteration"]["calls"] == 2  # the original call is back, untimed


def test_sync_check_counts_sync_warnings_by_call_site(monkeypatch):
    """CUDA's sync debug mode warns at each operation that waits for the GPU; the check groups them by where
    they came from (simulated here: the CPU has no such mode) and ignores other warnings."""
    import warnings

    import torch

    path = Path(__file__).parent.parent / "benchmarks" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    def steps():
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # one site, three times
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # another line
        warnings.warn("something else", stacklevel=1)

    syncs, sites = bench.sync_sites(steps, torch.device("cpu"))
    assert syncs == 4 and [s["count"] for s in sites] == [3, 1] and modes == ["warn", 0]
    assert all("test_bench.py" in s["where"] for s in sites)


def test_flop_counts_follow_the_programs(tiny_sd15):
    path = Path(__file__).parent.parent / "benchmarks" / "flops.py"
    spec = importlib.util.spec_from_file_location("flops", path)
    flops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flops)
    counts = flops.programs(tiny_sd15, side=16)
    # one target's arithmetic does not depend on the others in its batch; reference + content is one call
    assert counts["iteration_b8"] == pytest.approx(8 * counts["iteration_b1"], rel=1e-9)
    assert counts["reference_content_b1"] == pytest.approx(2 * counts["reference_b1"], rel=1e-9)
    assert counts["reference_content_b8"] == pytest.approx(9 * counts["reference_b1"], rel=1e-9)
    assert counts["denoise_b8"] == pytest.approx(8 * counts["denoise_b1"], rel=1e-9)
    # early exit: the feature call stops before the UNet's end; the backward costs about a forward
    assert counts["reference_b1"] < counts["denoise_b1"] < counts["iteration_b1"]
    case = flops.cases(counts, None)
    assert case["c"]["gflop_per_step"] == pytest.approx(counts["reference_b1"] + counts["iteration_b1"], abs=0.1)
    assert case["g one by one"]["tflop"] > case["g"]["tflop"]  # the batch shares the style's features


def test_lookahead_memory_reads_a_calls_peak_and_what_it_keeps(tiny_sd15, tiny_sdxl):
    """``benchmarks/lookahead_memory.py`` reads allocations from the profiler: a transient counts in the
    peak only, what outlives the call in both; and its measured calls still run."""
    import torch

    path = Path(__file__).parent.parent / "benchmarks" / "lookahead_memory.py"
    spec = importlib.util.spec_from_file_location("lookahead_memory", path)
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    kept = []

    def work():
        transient = torch.ones(250_000)  # 1,000,000 bytes, freed on return
        kept.append(transient[:1000].clone())  # 4,000 bytes that outlive the call

    peak, end = memory.allocations(work)
    assert end == 4000 and peak >= 1_004_000
    for line in (memory.lookahead_call(tiny_sd15, rows=4, side=8, content=True, case="a"),
                 memory.reference_call(tiny_sd15, side=8, contents=2),
                 memory.lookahead_call(tiny_sdxl, rows=2, side=8, content=False, case="d")):
        assert line["peak_mb"] >= line["kept_mb"] >= 0 and line["steps_per_call"] >= 1


def test_graph_memory_counts_each_captured_programs_working_memory(tiny_sd15, tiny_sdxl):
    """``benchmarks/graph_memory.py``: each kind of program's peak is counted (on the tiny models), and a larger
    batch needs more."""
    path = Path(__file__).parent.parent / "benchmarks" / "graph_memory.py"
    spec = importlib.util.spec_from_file_location("graph_memory", path)
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    kinds = {name for _, programs in memory.CASES.values() for name, _, _ in programs}
    assert kinds == {"iteration", "denoise", "reference"}
    for model, name, batch, contents in ((tiny_sd15, "iteration", 2, 2), (tiny_sd15, "reference", 1, 2),
                                         (tiny_sdxl, "denoise", 2, 0)):
        assert memory.program_peak(model, name, batch, contents) > 0, name
    one, six = (memory.program_peak(tiny_sd15, "iteration", b, 0) for b in (1, 6))
    assert six > 3 * one


def test_run_memory_splits_a_whole_run_by_phase(capsys):
    """``benchmarks/run_memory.py`` profiles case d on the tiny SDXL model and finds the run's peak inside one
    of the phases it tags. The run takes the GPU's static programs, as the script forces, and the library it
    wrapped to do so is itself again afterwards."""
    from attndistill.core.engine import Distiller
    from attndistill.model.models import DiffusionModel
    from attndistill.tasks import setup

    library = (Distiller.features, Distiller._new_stepper, DiffusionModel.decode, setup.Distiller)
    path = Path(__file__).parent.parent / "benchmarks" / "run_memory.py"
    spec = importlib.util.spec_from_file_location("run_memory", path)
    run_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_memory)
    run_memory.main(["--tiny", "--steps", "1", "--only", "run"])
    assert (Distiller.features, Distiller._new_stepper, DiffusionModel.decode, setup.Distiller) == library
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    steppers = next(line["steppers"] for line in lines if line["what"] == "run")
    assert steppers and set(steppers) == {"StaticStepper"}
    phases = {line["phase"] for line in lines if line["what"] == "phase"}
    assert {"vae_encode", "text_encode", "lookahead_call", "ad_iteration", "denoise", "vae_decode"} <= phases
    peak = next(line for line in lines if line["what"] == "peak" and line["count"] == "all")
    assert peak["phase"] in phases and peak["peak_mb"] > 0
    assert all(line["peak_above_start_mb"] <= peak["peak_mb"] + 1e-6 for line in lines if line["what"] == "phase")
